"""`foldmerge bench tune-fs`: what makes FS-Merge lead (or trail) distillation, on validation splits only.

Per cell (a bench setting's first group, its sources and merge sample as that bench makes them), FS-Merge
and distillation each run the same number of trials, every trial the bench's validated options with one
change (TRIALS): what weight decay pulls (`--decay`: toward zero, only the matrices, toward the start),
its strength, the learning rate, the logits' share in the loss (`--logit-weight`), for FS-Merge the
low rank and the initialization from an alignment (ZipIt!'s maps, with full maps as ZipIt!'s are dense;
the sources permuted onto model 1), for distillation the student's start (the average, RegMean). Every trial is scored on the tasks' VALIDATION
splits (never test): per-task and joint accuracy, seconds, learnable parameters. Each trial is a
cell kept under OUT/tune-fs (an interrupted run resumes). The table puts each FS-Merge trial beside
distillation's best trial, so a change is read against the same search budget on both sides.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..api import held_out_sample, merge, merge_sample
from ..evaluation import evaluate
from ..progress import status
from . import Cells, read_back, text, vit
from .mlp import e1_warmup
from .scale import SOURCE_EPOCHS, vit_config

# a trial: (label, changes to the cell's base options); FS-Merge and distillation get as many each
SHARED = [("validated", {}), ("decay matrices", {"decay": "matrices"}), ("decay to-start", {"decay": "to-start"}),
          ("decay to-start, wd 0.01", {"decay": "to-start", "weight_decay": 0.01}),
          ("wd 0.01", {"weight_decay": 0.01}), ("lr x3", {"lr_scale": 3.0}), ("logits 0.5", {"logit_weight": 0.5})]
TRIALS = {
    "fs-merge": SHARED + [("rank 32", {"param": "diag+lowrank(32)"}),
                          ("zipit init (full maps)", {"init": "zipit", "param": "full"}),
                          ("permute init", {"init": "permute"}),
                          # the second round: on language models the low rank was FS-Merge's gap (bench lm)
                          ("full maps", {"param": "full"}), ("permute init, full maps", {"init": "permute", "param": "full"})],
    "distill": SHARED + [("lr /3", {"lr_scale": 1 / 3}), ("init average", {"init": "average"}),
                         ("init regmean", {"init": "regmean"}),
                         # the second round: the best start with each of the two other best changes
                         ("init regmean, wd 0.01", {"init": "regmean", "weight_decay": 0.01}),
                         ("init regmean, logits 0.5", {"init": "regmean", "logit_weight": 0.5})],
}


def _vit_base(row: str) -> dict:
    epochs, lr = vit.VALIDATED[row]
    return {"epochs": epochs, "lr": lr, **e1_warmup(epochs), **vit.TRAIN}


def _vit_cell(setting: str, config: dict):
    """bench vit's first pair (sources as that bench or the scale study trains them), the setting's merge
    sample (originals + augmented images per task) and the options bench vit validated on pairs16
    (docs/results/bench-vit-pairs16.json), which bench vit and the scale study use at every cell."""
    def cell(out: Path, seed: int):
        orig, aug, _ = vit.SETTINGS[setting]
        sources = vit.get_sources(vit.groups(setting)[0], config, out, None, SOURCE_EPOCHS)
        data = merge_sample(sources, orig, seed, augment=aug)
        return sources, data, {"fs-merge": {**vit.FS_MERGE, "param": "diag+lowrank(12)",
                                            **_vit_base("fs-merge diag+lowrank(12)")},
                               "distill": {"init": "first", **_vit_base("distill")}}
    return cell


def _text_scratch(out: Path, seed: int):
    """bench text scratch's first pair (BERTs trained from scratch), its 200 merge texts per task, its
    held-out texts for early stopping and its options (docs/results/bench-text-scratch.json)."""
    s = text.SETTINGS["scratch"]
    sources = text.get_sources("scratch", 0, out)
    data = merge_sample(sources, s["per_task"], seed)
    held = held_out_sample(sources, s["per_task"], s["held_out"], seed)
    plan = {name: opts for name, _, opts in text.method_plan("scratch")}
    return sources, data, {"fs-merge": {**plan["fs-merge diag+lowrank(12)"], "held_out": held},
                           "distill": {**plan["distill"], "held_out": held}}


# vit-pairs16 is also the scale study's width-64 cell (the same sources, sample and options)
CELLS = {"vit-pairs16": _vit_cell("pairs16", vit.VIT), "vit-pairs100": _vit_cell("pairs100", vit.VIT),
         "text-scratch": _text_scratch,
         "scale-w128": _vit_cell("pairs16", vit_config(128, 4)), "scale-w192": _vit_cell("pairs16", vit_config(192, 4))}
FULL_SEARCH = {"vit-pairs16"}
# vit-pairs16 runs every trial; the other cells run, for each method, the validated options and its three
# best trials on vit-pairs16 (docs/results/bench-tune-fs-pairs16.json): the same count for both methods
LEADS = {"fs-merge": ("validated", "permute init, full maps", "permute init", "wd 0.01"),
         "distill": ("validated", "init regmean, wd 0.01", "init regmean", "init regmean, logits 0.5")}


def trials_for(cell: str, method: str) -> list[tuple[str, dict]]:
    if cell in FULL_SEARCH:
        return TRIALS[method]
    return [t for t in TRIALS[method] if t[0] in LEADS[method]]


def _options(base: dict, change: dict) -> dict:
    opts = {**base, **{k: v for k, v in change.items() if k != "lr_scale"}}
    if "lr_scale" in change:
        opts["lr"] = base["lr"] * change["lr_scale"]
    return opts


def run_bench(cells: tuple[str, ...] = tuple(CELLS), out: str = "runs/bench", seed: int = 0,
              methods: tuple[str, ...] = tuple(TRIALS)) -> dict:
    bad = [c for c in cells if c not in CELLS] + [m for m in methods if m not in TRIALS]
    if bad:
        raise ValueError(f"unknown cell or method {bad[0]!r}; cells: {', '.join(CELLS)}; methods: {', '.join(TRIALS)}")
    t0, store, rows = time.perf_counter(), Cells(), []
    for cell in cells:
        sources, data, bases = CELLS[cell](Path(out), seed)
        for method in methods:
            for label, change in trials_for(cell, method):
                opts = _options(bases[method], change)

                def measure():
                    status(f"{cell}: {method} {label}")
                    merged = merge(sources, data, method=method, seed=seed, **opts)
                    val = evaluate(merged, split="val")
                    return [{"cell": cell, "method": method, "trial": label,
                             "options": {k: v for k, v in opts.items() if k != "held_out"},
                             "val_per_task": val["per_task_mean"], "val_joint": val.get("joint_mean"),
                             "seconds": merged.meta["wall_seconds"],
                             "learnable_parameters": merged.meta.get("learnable_parameters")}]
                slug = f"{method}-{label}".replace(" ", "_").replace(",", "").replace("/", "over")
                rows += store.rows(Path(out) / "tune-fs" / cell / f"seed{seed}" / f"{slug}.json", measure)
    return {"bench": "tune-fs", "settings": list(cells), "seed": seed, "split": "val", "rows": rows,
            **store.facts(), "total_seconds": time.perf_counter() - t0}


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout)
    for cell in result["settings"]:
        rows = [r for r in result["rows"] if r["cell"] == cell]
        best = {m: max((r for r in rows if r["method"] == m), key=lambda r: r["val_per_task"], default=None)
                for m in TRIALS}
        table = Table(title=f"{cell}: validation accuracy (seed {result['seed']}); each row one change to the "
                            "validated options")
        for col in ("method", "trial", "val per-task %", "val joint %", "minus distill's best", "seconds"):
            table.add_column(col, justify="left" if col in ("method", "trial") else "right")
        ref = best.get("distill")
        for r in rows:
            gap = "" if ref is None else f"{r['val_per_task'] - ref['val_per_task']:+.2f}"
            joint = "-" if r["val_joint"] is None else f"{r['val_joint']:.2f}"
            table.add_row(r["method"], r["trial"], f"{r['val_per_task']:.2f}", joint, gap, f"{r['seconds']:.0f}")
        console.print(table)
    console.print(f"{command}; {result['total_seconds'] / 60:.1f} min{read_back(result)}")
