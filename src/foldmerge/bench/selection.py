"""`foldmerge bench select`: label-free selection against labelled validation.

For each setting and each hyperparameter grid the paper benches tune (RegMean α, ZipIt! α × β,
OT fusion's λ, and for ViTs its token filter), every candidate is merged from the whole merge
sample and scored on the labelled validation split (what `bench mlp` / `bench vit` choose by)
and on the test split; `foldmerge.selection.choose` picks one from the unlabeled sample alone.
The table says whether the two picks agree and how many test points (per-task) the label-free
pick gives up against the validation pick (negative: it did better). Settings: the MLP bench's
depth-2 and depth-4 pairs of seed 0 on MNIST and Fashion-MNIST halves (64 images per task), and
the first ViT pair of pairs16 (16 + 800 augmented images per task). The trained methods'
epochs and learning rates are not searched here (a grid of trainings per setting is hours on a CPU).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..api import merge, merge_sample
from ..context import FeatureCache
from ..evaluation import evaluate
from ..progress import status
from ..selection import candidates, choose
from . import mlp, vit

MLP_GRIDS = {"regmean": {"alpha": [1.0, 0.9, 0.7, 0.5, 0.3, 0.1]},
             "zipit": {"alpha": [0.3, 0.5, 1.0], "beta": [0.0, 0.125, 0.25, 0.5, 1.0]},
             "opt": {"reg": [0.0, 0.02, 0.08]}}
VIT_GRIDS = {"regmean": {"alpha": [0.9, 0.7, 0.5]},
             "zipit": {"alpha": [0.3, 0.5, 1.0], "beta": [0.0, 0.125, 0.25, 0.5, 1.0]},
             "opt": {"filter": ["cls", "window-8", "full"], "reg": [0.0, 0.08]}}
SETTINGS = ["mnist d2", "mnist d4", "fmnist d2", "fmnist d4", "vit pairs16"]


def _setting(name: str, cache: Path):
    """(sources, merge sample, grids) of a setting."""
    if name == "vit pairs16":
        sources = vit.get_sources(vit.groups("pairs16")[0], vit.VIT, cache, None, (3, 2))
        n_orig, n_aug, _ = vit.SETTINGS["pairs16"]
        return sources, merge_sample(sources, n_orig, 0, augment=n_aug), VIT_GRIDS
    dataset, depth = name.split(" d")
    sources = mlp.get_sources(dataset, [128] * int(depth), 0, cache)
    return sources, merge_sample(sources, mlp.PER_TASK, 0), MLP_GRIDS


def run_bench(settings: list[str] | None = None, methods: list[str] | None = None, out: str = "runs/bench") -> dict:
    settings = list(settings or SETTINGS)
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise ValueError(f"--settings: unknown {bad[0]!r}; choose from {', '.join(SETTINGS)}")
    t0 = time.perf_counter()
    rows = []
    for name in settings:
        sources, data, grids = _setting(name, Path(out))
        for method, grid in grids.items():
            if methods and method not in methods:
                continue
            status(f"{name}: {method} over {len(candidates(grid))} candidates")
            start = time.perf_counter()
            trials = []
            for c in candidates(grid):
                merged = merge(sources, data, method=method, calibrate="none", **c)
                trials.append({"options": c, "val": evaluate(merged, split="val")["per_task_mean"],
                               "test": evaluate(merged)["per_task_mean"]})
            labelled = max(trials, key=lambda t: t["val"])
            picked, report = choose(lambda d, c: merge(sources, d, method=method, calibrate="none", **c),
                                    sources, data, grid, FeatureCache())
            free = next(t for t in trials if t["options"] == picked)
            best = max(trials, key=lambda t: t["test"])
            rows.append({"setting": name, "method": method, "grid": grid, "trials": trials,
                         "label_free_trials": report["trials"], "validation_pick": labelled["options"],
                         "label_free_pick": picked, "same": picked == labelled["options"],
                         "test_at_validation_pick": labelled["test"], "test_at_label_free_pick": free["test"],
                         "best_test": best["test"], "loss": labelled["test"] - free["test"],
                         "seconds": time.perf_counter() - start})
    return {"bench": "select", "settings": settings, "rows": rows, "total_seconds": time.perf_counter() - t0}


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(140, Console().width))
    t = Table(title="label-free selection (agreement with the sources on held-out merge inputs) against labelled "
                    "validation: per-task test accuracy % at each pick")
    for col in ("setting", "method", "validation pick", "label-free pick", "same", "test @ validation",
                "test @ label-free", "lost", "best test"):
        t.add_column(col, justify="left" if col in ("setting", "method") else "right")

    def fmt(o):
        return ", ".join(f"{k} {v}" for k, v in o.items())

    for r in result["rows"]:
        t.add_row(r["setting"], r["method"], fmt(r["validation_pick"]), fmt(r["label_free_pick"]),
                  "yes" if r["same"] else "no", f"{r['test_at_validation_pick']:.2f}",
                  f"{r['test_at_label_free_pick']:.2f}", f"{r['loss']:+.2f}", f"{r['best_test']:.2f}")
    console.print(t)
    rows = result["rows"]
    if rows:
        same = sum(r["same"] for r in rows)
        console.print(f"same pick in {same} of {len(rows)}; mean points lost {sum(r['loss'] for r in rows) / len(rows):+.2f}, "
                      f"worst {max(r['loss'] for r in rows):+.2f}")
    console.print(f"measured now: seed 0; {result['total_seconds'] / 60:.1f} min; command: {command}")
