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

from ..api import merge, merge_sample
from ..evaluation import evaluate
from ..progress import status
from . import Cells, read_back, vit
from .mlp import e1_warmup

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


def _vit_pairs16(out: Path, seed: int):
    """bench vit pairs16's first pair (its sources, its 16 + 800 augmented images per task) and the
    options validation chose there (docs/results/bench-vit-pairs16.json)."""
    orig, aug, _ = vit.SETTINGS["pairs16"]
    sources = vit.get_sources(vit.groups("pairs16")[0], vit.VIT, out, None, (3, 2))
    data = merge_sample(sources, orig, seed, augment=aug)

    def base(row):
        epochs, lr = vit.VALIDATED[row]
        return {"epochs": epochs, "lr": lr, **e1_warmup(epochs), **vit.TRAIN}
    return sources, data, {"fs-merge": {**vit.FS_MERGE, "param": "diag+lowrank(12)", **base("fs-merge diag+lowrank(12)")},
                           "distill": {"init": "first", **base("distill")}}


CELLS = {"vit-pairs16": _vit_pairs16}


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
            for label, change in TRIALS[method]:
                opts = _options(bases[method], change)

                def measure():
                    status(f"{cell}: {method} {label}")
                    merged = merge(sources, data, method=method, seed=seed, **opts)
                    val = evaluate(merged, split="val")
                    return [{"cell": cell, "method": method, "trial": label, "options": opts,
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
