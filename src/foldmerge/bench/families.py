"""`foldmerge bench families`: Hugging Face families (tables in arch/families) merged from different
seeds, one modality each.

Per family, two sources of the family's own transformers modules, built from a small config and
trained here from seeds 0 and 1 on two disjoint tasks (text: BBC News topics 0-2 / 3-4, tokenized by
the built-in tokenizer; images: MNIST 0-4 / 5-9), no pre-training stage: the seed fixes the start,
the task the data. Every merge reads the same 200 unlabeled training examples per task; the trained
merges (FS-Merge diagonal + low rank 12 from `first`, distillation from `first`) run bench text's
scratch schedule shortened to 50 epochs with early stopping on 200 further held-out examples; the
alignment methods (ZipIt!, permute) and weight averaging run with their defaults. Rows: the
originals, the ensemble, each merge: per-task and joint test accuracy (joint after the routing
calibration every merge gets), merge seconds, learnable parameters.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..api import held_out_sample, merge_sample
from ..data import Task
from ..data.texts import MAX_TOKENS, tokenizer
from ..evaluation import Ensemble, evaluate, originals
from ..progress import status
from ..sources import source_dirname, train_staged_source
from . import accuracy, cached_model, merge_scored, selected

TEXT, IMAGES = ("bbc:0-2", "bbc:3-4"), ("mnist:0-4", "mnist:5-9")
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


def _text(config: dict) -> dict:
    """A text family's config at the built-in tokenizer's vocabulary, padding id and length."""
    return {**config, "vocab_size": tokenizer().get_vocab_size(), "pad_token_id": 0}


# family -> (the tasks of its two sources, its config, how its sources train)
FAMILIES = {
    "roberta": (TEXT, lambda: _text({**SMALL, "intermediate_size": 256, "type_vocab_size": 1,
                                     "max_position_embeddings": MAX_TOKENS + 2})),
    "distilbert": (TEXT, lambda: _text({"dim": 64, "n_layers": 2, "n_heads": 4, "hidden_dim": 256,
                                        "max_position_embeddings": MAX_TOKENS})),
    "deit": (IMAGES, lambda: {**SMALL, "intermediate_size": 128, "image_size": 28, "patch_size": 7,
                              "num_channels": 1}),
}
SOURCE = {"text": dict(epochs=4, lr=1e-3, batch_size=32, limit=None),
          "image": dict(epochs=3, lr=1e-3, batch_size=64, limit=12000)}
PER_TASK, HELD_OUT = 200, 200
TRAINED = {"init": "first", "epochs": 50, "batch_size": 128, "patience": 10}
PLAN = [("average", "average", {}), ("ZipIt!", "zipit", {}), ("permute", "permute", {}),
        ("distill", "distill", TRAINED), ("fs-merge diag+lowrank(12)", "fs-merge", {"param": "diag+lowrank(12)", **TRAINED})]


def modality(family: str) -> str:
    return "text" if FAMILIES[family][0] == TEXT else "image"


def get_sources(family: str, cache: Path) -> list:
    tasks, config = FAMILIES[family]
    how = SOURCE[modality(family)]
    out = []
    for seed, task in enumerate(tasks):
        t = Task.parse(task)
        path = cache / "families" / family / source_dirname(t, seed)
        out.append(cached_model(path, lambda t=t, seed=seed: train_staged_source(
            family, t, config(), seed, None, 0, how["epochs"], how["lr"], how["batch_size"], 0.01, how["limit"],
            "linear"), "foldmerge bench families (source)"))
    return out


def run_bench(families: tuple = tuple(FAMILIES), methods: list[str] | None = None, out: str = "runs/bench",
              seed: int = 0) -> dict:
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        raise ValueError(f"unknown family {bad[0]!r}; this bench runs {', '.join(FAMILIES)}")
    known = {n for n, _, _ in PLAN} | {m for _, m, _ in PLAN}
    unknown = [m for m in (methods or []) if m not in known]
    if unknown:
        raise ValueError(f"unknown bench method {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    cache, t0, rows = Path(out), time.perf_counter(), []
    for family in families:
        status(f"{family}: sources on {' + '.join(FAMILIES[family][0])}")
        sources = get_sources(family, cache)
        base = {"family": family, "modality": modality(family), "pair": 0, "tasks": list(FAMILIES[family][0]),
                "source_parameters": sum(p.numel() for p in sources[0].backbone.parameters())}
        rows.append({**base, "method": "originals", **accuracy(originals(sources))})
        rows.append({**base, "method": "ensemble", **accuracy(evaluate(Ensemble(sources)))})
        data = merge_sample(sources, PER_TASK, seed)
        held = held_out_sample(sources, PER_TASK, HELD_OUT, seed)
        for name, method, opts in PLAN:
            if not selected(name, method, methods):
                continue
            extra = {"held_out": held} if method in ("fs-merge", "distill") else {}
            merged, calibrated, raw, seconds = merge_scored(sources, data, method, seed, {**opts, **extra})
            rows.append({**base, "method": name, **accuracy(calibrated), "joint_uncalibrated": raw.get("joint_mean"),
                         "seconds": seconds, "learnable_parameters": merged.meta.get("learnable_parameters"),
                         "options": opts, "early_stop": merged.meta.get("early_stop")})
            status(f"  {family} {name}: per-task {rows[-1]['per_task']:.2f} / joint {rows[-1]['joint']:.2f} "
                   f"({seconds:.0f} s)")
    return {"bench": "families", "families": list(families), "per_task": PER_TASK, "held_out": HELD_OUT,
            "source_training": SOURCE, "trained_merges": TRAINED, "seed": seed, "rows": rows,
            "total_seconds": time.perf_counter() - t0}


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(120, Console().width))
    families = result["families"]
    table = Table(title=f"Hugging Face families from different seeds: {result['per_task']} examples per task; "
                        "per-task / joint accuracy % (test)")
    table.add_column("method")
    for f in families:
        r = next(r for r in result["rows"] if r["family"] == f)
        table.add_column(f"{f} ({r['modality']}: {' + '.join(r['tasks'])})", justify="right")
    table.add_column("learnable params", justify="right")
    table.add_column("seconds", justify="right")
    for name in dict.fromkeys(r["method"] for r in result["rows"]):
        sel = [r for r in result["rows"] if r["method"] == name]
        cells = []
        for f in families:
            r = next((r for r in sel if r["family"] == f), None)
            cells.append("-" if r is None else f"{r['per_task']:.1f} / " +
                         ("-" if r["joint"] is None else f"{r['joint']:.1f}"))
        params = [f"{r['learnable_parameters']:,}" for r in sel if r.get("learnable_parameters")]
        secs = [f"{r['seconds']:.0f}" for r in sel if r.get("seconds") is not None]
        table.add_row(name, *cells, " / ".join(params) or "-", " / ".join(secs) or "-")
    console.print(table)
    console.print(f"measured now: seed {result['seed']} (sources seeds 0, 1); {result['total_seconds'] / 60:.1f} min; "
                  f"command: {command}")
