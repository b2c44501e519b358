"""`foldmerge bench vit`: merging ViTs from different initializations and tasks (FS-Merge paper 3.2).

Sources: TASKS[i] is learned by a ViT "pre-trained" from seed i on PRETRAIN_TASK, then
fine-tuned on that task (`train_vit_source`), with frozen class-embedding heads; cached
under OUT/sources. Settings (paper Table 8): pairs16 / pairs100 merge the pairs (0,1), (2,3),
(4,5) from 16 / 100 original images per task (+800 / +1000 augmented); groups4 merges
tasks 0–3 and 4–7, groups8 all eight, from 100 (+1000) per task, and adds FS-Merge seq.
Every method runs on the same data; the table gives per-task and joint test accuracy per
group and their mean, the number of learnable parameters and the wall time of each method.

Hyperparameters. Fixed as appendix E.2: AdamW, batch 128, weight decay 0.001, `first` init,
own-task targets, no target scaling for FS-Merge; a cosine schedule with E.1's warmup of 20
epochs (E.2 gives none). Chosen, as the paper does, on the
VALIDATION split of the first pair, once per setting, then used for every pair: epochs and
learning rate of distillation and of both FS-Merge variants, RegMean α, Opt's filter and λ
(GRID: a CPU-sized subset of E.2's grids, around its bold values), ZipIt!'s α and β (not in
the paper's ViT tables: the MLP bench's grid). Every trial, its validation score and the
choice go into --json; the choice is cached in OUT/tuned-vit-pairs16.json (`--retune` redoes
it; a cached choice that lacks a row's hyperparameters is completed by searching those alone, and
`--methods` searches only what its rows read).
Permute runs on pairs only (it matches two models). The search runs on pairs16 only (the
paper's setting a); pairs100 and the group settings reuse its choice (a search per setting,
over four or eight models at a time, does not fit a CPU session). FS-Merge seq. uses the
low-rank FS-Merge's learning rate; its last stage trains for the low-rank FS-Merge's epochs
and every earlier stage for a quarter of them (E.2's bold seq. values, 50 and 200 epochs,
have that proportion).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..api import load, merge, merge_sample
from ..data import Task
from ..evaluation import Ensemble, evaluate, originals, random_guess
from ..progress import bar, status
from ..sources import source_dirname, train_vit_source
from . import accuracy, merge_scored, selected
from .mlp import e1_warmup

# setting: (original images per task, augmented images per task, models per group)
SETTINGS = {"pairs16": (16, 800, 2), "pairs100": (100, 1000, 2), "groups4": (100, 1000, 4),
            "groups8": (100, 1000, 8)}
PRETRAIN_TASK = "mnist/transpose"
TASKS = ["mnist:0-4", "fmnist:5-9", "fmnist:0-4", "mnist/rot90:5-9", "mnist/invert:0-4", "fmnist/flip:0-4",
         "mnist/rot180:5-9", "fmnist/rot90:0-4"]
PAIRS = [tuple(TASKS[i:i + 2]) for i in (0, 2, 4)]


def groups(setting: str) -> list[list[int]]:
    """Indices into TASKS of every group the setting merges."""
    size = SETTINGS[setting][2]
    if size == 2:
        return [[0, 1], [2, 3], [4, 5]]
    return [list(range(i, i + size)) for i in range(0, len(TASKS) - size + 1, size)]
VIT = {"image_size": 28, "channels": 1, "patch": 7, "width": 64, "depth": 4, "heads": 4, "mlp_dim": 128,
       "out_dim": 64}
SMALL_VIT = {**VIT, "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64, "out_dim": 32}


GRID = {
    "regmean_alpha": [0.9, 0.7, 0.5],
    "opt": [("cls", 0.08), ("window-8", 0.08), ("full", 0.0)],
    "zipit": [(a, b) for a in (0.3, 0.5, 1.0) for b in (0.0, 0.125, 0.25, 0.5, 1.0)],    # the MLP bench's grid
    "distill": [(e, lr) for e in (30, 100, 200) for lr in (1e-3, 1e-4)],
    "fs-merge diag": [(e, lr) for e in (100, 200) for lr in (1e-2, 1e-3)],
    "fs-merge diag+lowrank(12)": [(e, lr) for e in (100, 200) for lr in (1e-3, 1e-4)],
}
# E.2's bold values for setting (a): what --no-tune (and the tests) use; ZipIt! (not in E.2) at its ViT
# defaults (foldmerge.arch.defaults, the vit row)
PAPER_CHOICE = {"regmean_alpha": 0.9, "opt": ["window-8", 0.08], "zipit": [0.3, 0.125], "distill": [100, 1e-4],
                "fs-merge diag": [200, 1e-3], "fs-merge diag+lowrank(12)": [200, 1e-4]}
# what validation chose on pairs16 (docs/results/bench-vit-pairs16.json), for the benches that reuse it at other sizes and counts
VALIDATED = {**PAPER_CHOICE, "distill": [100, 1e-3], "fs-merge diag": [200, 1e-2], "fs-merge diag+lowrank(12)": [100, 1e-3]}
TRAIN = {"optimizer": "adamw", "batch_size": 128, "weight_decay": 0.001}
FS_MERGE = {"variant": "global", "init": "first", "target_scale": "none"}


def method_plan(tuned: dict | None = None, epochs_scale: float = 1.0, group_size: int = 2) -> list[tuple[str, str, dict]]:
    """(row name, method, options) of every merge, with the chosen hyperparameters."""
    t = tuned or PAPER_CHOICE

    def trained(row):
        epochs, lr = t[row]
        epochs = max(1, int(round(epochs * epochs_scale)))
        return {"epochs": epochs, "lr": lr, **e1_warmup(epochs), **TRAIN}

    return [
        ("average", "average", {}),
        ("slerp", "slerp", {}),
        ("regmean", "regmean", {"alpha": t["regmean_alpha"]}),
        ("opt", "opt", {"filter": t["opt"][0], "reg": t["opt"][1]}),
        ("zipit", "zipit", {"alpha": t["zipit"][0], "beta": t["zipit"][1]}),
    ] + ([("permute", "permute", {})] if group_size == 2 else []) + [
        ("distill", "distill", {"init": "first", **trained("distill")}),
        ("fs-merge diag", "fs-merge", {**FS_MERGE, "param": "diag", **trained("fs-merge diag")}),
        ("fs-merge diag+lowrank(12)", "fs-merge",
         {**FS_MERGE, "param": "diag+lowrank(12)", **trained("fs-merge diag+lowrank(12)")}),
    ] + ([("fs-merge seq diag+lowrank(12)", "fs-merge", _seq_options(trained("fs-merge diag+lowrank(12)")))]
         if group_size > 2 else [])


def seq_epochs(epochs: int) -> dict:
    """FS-Merge seq.'s schedule for a budget of `epochs`: the last stage gets them all, earlier
    stages a quarter (E.2's bold values, 50 and 200, have that proportion)."""
    return {"epochs": max(1, epochs // 4), "last_epochs": epochs}


def _seq_options(last: dict) -> dict:
    """FS-Merge seq.: the last stage as low-rank FS-Merge, earlier stages a quarter of its epochs."""
    return {**FS_MERGE, "variant": "seq", "param": "diag+lowrank(12)", **last, **seq_epochs(last["epochs"])}


def choice_keys(methods: list[str] | None, group_size: int = 2) -> list[str]:
    """The keys of PAPER_CHOICE that the rows selected by `methods` (None: all) read."""
    reads = {"regmean": "regmean_alpha", "fs-merge seq diag+lowrank(12)": "fs-merge diag+lowrank(12)"}
    keys = [reads.get(name, name) for name, method, _ in method_plan(group_size=group_size)
            if selected(name, method, methods)]
    return [k for k in PAPER_CHOICE if k in keys]


def tune(sources, data, epochs_scale: float = 1.0, grid: dict | None = None, have: dict | None = None,
         keys: list[str] | None = None) -> dict:
    """Choose the hyperparameters of `method_plan` on the validation split (module docstring);
    those in `have` (an earlier choice) are kept, only the missing ones among `keys` (default
    all) are searched."""
    grid = grid or GRID
    trials: list[dict] = list((have or {}).get("trials", []))
    chosen: dict = {k: v for k, v in (have or {}).items() if k in PAPER_CHOICE}
    plan = {name: (method, opts) for name, method, opts in method_plan(PAPER_CHOICE, epochs_scale)}

    def score(row, value, **opts):
        method, base = plan[row]
        merged = merge(sources, data, method=method, seed=0, **{**base, **opts})
        val = evaluate(merged, split="val")
        trials.append({"row": row, "value": value, "options": {**base, **opts}, "val_per_task": val["per_task_mean"],
                       "val_joint": val.get("joint_mean"), "seconds": merged.meta["wall_seconds"]})
        progress.advance(1)
        status(f"  tuning {row} {value}: validation per-task {val['per_task_mean']:.2f}"
               f" ({merged.meta['wall_seconds']:.0f} s)")
        return val["per_task_mean"]

    def ep(e):
        return max(1, int(round(e * epochs_scale)))

    todo = [k for k in (keys or PAPER_CHOICE) if k not in chosen]
    with bar(sum(len(grid[k]) for k in todo),
             "tuning on validation (pair 1)") as progress:
        if "regmean_alpha" in todo:
            chosen["regmean_alpha"] = max(grid["regmean_alpha"], key=lambda a: score("regmean", a, alpha=a))
        if "opt" in todo:
            chosen["opt"] = list(max(grid["opt"], key=lambda fr: score("opt", list(fr), filter=fr[0], reg=fr[1])))
        if "zipit" in todo:
            chosen["zipit"] = list(max(grid["zipit"], key=lambda ab: score("zipit", list(ab), alpha=ab[0], beta=ab[1])))
        for row in ("distill", "fs-merge diag", "fs-merge diag+lowrank(12)"):
            if row in todo:
                chosen[row] = list(max(grid[row], key=lambda el: score(row, list(el), epochs=ep(el[0]), lr=el[1],
                                                                       **e1_warmup(ep(el[0])))))
    return {**chosen, "trials": trials}


def load_or_tune(setting: str, cache: Path, sources, data, retune: bool, epochs_scale: float,
                 keys: list[str] | None = None) -> dict:
    """The cached choice (OUT/tuned-vit-<setting>.json), completed by a search of what it lacks
    among `keys` (default all: the rows a bench runs; what other rows need is searched when they run)."""
    keys = keys or list(PAPER_CHOICE)
    path = cache / (f"tuned-vit-{setting}" + ("" if epochs_scale == 1 else f"-x{epochs_scale:g}") + ".json")
    have = None if retune or not path.is_file() else json.loads(path.read_text())
    if have is not None and all(k in have for k in keys):
        status(f"hyperparameters from {path} (chosen on validation; --retune to redo)")
        return have
    tuned = {**tune(sources, data, epochs_scale, have=have, keys=keys),
             "chosen_on": f"validation split of the first group {list(PAIRS[0])}, setting {setting}, seed 0"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(tuned, indent=1) + "\n")
    os.replace(tmp, path)
    return tuned


def get_sources(indices: list[int], config: dict, cache: Path, limit: int | None, epochs: tuple[int, int]) -> list:
    """The source ViTs of TASKS[i] (seed i) for i in indices: loaded from the cache or trained and cached."""
    tag = f"w{config['width']}d{config['depth']}" + (f"-limit{limit}" if limit else "")
    models = []
    for i in indices:
        task, seed = TASKS[i], i
        path = cache / "sources" / "vit" / tag / source_dirname(Task.parse(task), seed)
        if (path / "config.json").is_file():
            models.append(load(path))
            continue
        m = train_vit_source(task, config, seed, pretrain_task=PRETRAIN_TASK, pretrain_epochs=epochs[0],
                             epochs=epochs[1], limit=limit)
        m.meta["command"] = "foldmerge bench vit (source)"
        m.save(path)
        models.append(m)
    return models


def run_bench(setting: str = "pairs16", pairs: int | None = None, out: str = "runs/bench", small: bool = False,
              limit: int | None = None, epochs_scale: float = 1.0, methods: list[str] | None = None,
              source_epochs: tuple[int, int] = (3, 2), seed: int = 0, tune_: bool = True,
              retune: bool = False) -> dict:
    """`pairs`: how many of the setting's groups to run (default all)."""
    if setting not in SETTINGS:
        raise ValueError(f"--setting must be one of {', '.join(SETTINGS)}")
    all_groups = groups(setting)
    count = len(all_groups) if pairs is None else pairs
    if not 1 <= count <= len(all_groups):
        raise ValueError(f"--pairs must lie in 1…{len(all_groups)} for {setting}")
    n_orig, n_aug, size = SETTINGS[setting]
    known = {n for n, _, _ in method_plan(group_size=size)} | {m for _, m, _ in method_plan(group_size=size)}
    bad = [m for m in (methods or []) if m not in known]
    if bad:
        raise ValueError(f"unknown bench method {bad[0]!r}; choose from {', '.join(sorted(known))}")
    config = SMALL_VIT if small else VIT
    cache = Path(out)
    t0 = time.perf_counter()
    tuned = None
    if tune_:
        tune_setting = "pairs16"
        t_orig, t_aug, _ = SETTINGS[tune_setting]
        first = get_sources(groups(tune_setting)[0], config, cache, limit, source_epochs)
        tuned = load_or_tune(tune_setting + ("-small" if small else "") + (f"-limit{limit}" if limit else ""), cache,
                             first, merge_sample(first, t_orig, seed, augment=t_aug), retune, epochs_scale,
                             keys=choice_keys(methods, size))
    # rows not run may lack a choice; they are skipped below, so E.2's value only fills the plan
    plan = method_plan(None if tuned is None else {**PAPER_CHOICE, **tuned}, epochs_scale, size)
    rows = []
    for g, indices in enumerate(all_groups[:count]):
        status(f"group {g + 1}/{count}: {' + '.join(TASKS[i] for i in indices)}")
        sources = get_sources(indices, config, cache, limit, source_epochs)
        tasks = [t for s in sources for t in s.tasks]
        base = {"pair": g, "tasks": [t.name for t in tasks]}
        rows.append({**base, "method": "random guess", **accuracy(random_guess(tasks))})
        rows.append({**base, "method": "originals", **accuracy(originals(sources))})
        rows.append({**base, "method": "ensemble", **accuracy(evaluate(Ensemble(sources)))})
        data = merge_sample(sources, n_orig, seed, augment=n_aug)
        for name, method, opts in plan:
            if not selected(name, method, methods):
                continue
            merged, calibrated, raw, seconds = merge_scored(sources, data, method, seed, opts)
            scores = accuracy(calibrated)
            status(f"  {name}: test per-task {scores['per_task']:.2f} ({seconds:.0f} s)")
            rows.append({**base, "method": name, **scores, "joint_uncalibrated": raw.get("joint_mean"),
                         "calibration": merged.meta["calibration"], "seconds": seconds,
                         "learnable_parameters": merged.meta.get("learnable_parameters"), "options": opts})
    return {"bench": "vit", "setting": setting, "originals_per_task": n_orig, "augmented_per_task": n_aug,
            "vit": config, "pretrain_task": PRETRAIN_TASK,
            "pairs": [[TASKS[i] for i in indices] for indices in all_groups[:count]],
            "seed": seed, "epochs_scale": epochs_scale, "limit": limit, "rows": rows,
            "hyperparameters": {k: v for k, v in (tuned or PAPER_CHOICE).items()
                                if k != "trials" and (k not in PAPER_CHOICE or k in choice_keys(methods, size))},
            "chosen_on": (tuned or {}).get("chosen_on", "appendix E.2 bold values (no tuning)"),
            "tuning_trials": (tuned or {}).get("trials", []),
            "total_seconds": time.perf_counter() - t0}


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(120, Console().width))
    pairs = len(result["pairs"])
    names = list(dict.fromkeys(r["method"] for r in result["rows"]))
    table = Table(title=f"ViT {result['setting']}: {result['originals_per_task']} originals + "
                        f"{result['augmented_per_task']} augmented images per task; per-task / joint accuracy % (test)")
    table.add_column("method")
    for p in range(pairs):
        table.add_column(" + ".join(result["pairs"][p]) if len(result["pairs"][p]) <= 2
                         else f"group {p + 1} ({len(result['pairs'][p])} tasks)", justify="right")
    for col in ("mean", "joint, uncalibrated (mean)", "% of ensemble", "learnable params", "seconds (mean)"):
        table.add_column(col, justify="right")
    ens = [r["per_task"] for r in result["rows"] if r["method"] == "ensemble"]
    ens_mean = sum(ens) / len(ens) if ens else None
    for name in names:
        sel = [r for r in result["rows"] if r["method"] == name]
        cells = []
        for p in range(pairs):
            r = next((r for r in sel if r["pair"] == p), None)
            cells.append("-" if r is None else f"{r['per_task']:.1f} / " + (f"{r['joint']:.1f}" if r["joint"] is not None else "-"))
        pt = sum(r["per_task"] for r in sel) / len(sel)
        js = [r["joint"] for r in sel if r["joint"] is not None]
        mean = f"{pt:.1f} / " + (f"{sum(js) / len(js):.1f}" if js else "-")
        raw = [r["joint_uncalibrated"] for r in sel if r.get("joint_uncalibrated") is not None]
        raw_mean = f"{sum(raw) / len(raw):.1f}" if raw else "-"
        lp = sel[0].get("learnable_parameters")
        secs = [r["seconds"] for r in sel if r.get("seconds") is not None]
        of_ens = "-" if not ens_mean or name in ("random guess", "originals") else f"{100 * pt / ens_mean:.1f}"
        table.add_row(name, *cells, mean, raw_mean, of_ens, "-" if lp is None else f"{lp:,}",
                      "-" if not secs else f"{sum(secs) / len(secs):.0f}")
    console.print(table)
    console.print(f"measured now: seed {result['seed']}, ViT {result['vit']}, pre-trained on {result['pretrain_task']}; "
                  f"{result['total_seconds'] / 60:.1f} min; command: {command}")
