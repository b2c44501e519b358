"""`foldmerge bench defaults`: every method with every option at its CLI default, as a new user runs it.

The paper benches (`bench mlp`, `bench vit`) choose some hyperparameters on validation; a user
with unlabeled data has no validation labels and runs the defaults. This bench shows what that
user gets: MLPs of width 128 at two depths, trained from different seeds on two class splits of
each dataset (the halves 0–4 / 5–9 and the even / odd classes), merged from 64 unlabeled
training images per task (plus the augmented images a method gets by default: RegMean's 1,024)
with no option given (`foldmerge merge A B --method M`). Cells are
per-task / joint test accuracy %, joint after the routing calibration every merge gets (the
uncalibrated joint is in --json). Sources are trained as in `bench mlp` (appendix E.1) and
cached beside its own; pair s uses source seeds 2s and 2s + 1 and merge-sample seed s.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..api import default_augment
from ..evaluation import Ensemble, evaluate, originals
from ..progress import bar, status
from . import merge_scored, sample_drawer, selected
from .mlp import get_sources

SPLITS = {
    "mnist": [("mnist:0-4", "mnist:5-9"), ("mnist:0,2,4,6,8", "mnist:1,3,5,7,9")],
    "fmnist": [("fmnist:0-4", "fmnist:5-9"), ("fmnist:0,2,4,6,8", "fmnist:1,3,5,7,9")],
}
DEPTHS = (2, 4)
PER_TASK = 64
# (row, method, options): nothing but what picks the method or the variant
PLAN = [("average", "average", {}), ("slerp", "slerp", {}), ("regmean", "regmean", {}),
        ("permute", "permute", {}), ("opt", "opt", {}), ("zipit", "zipit", {}), ("distill", "distill", {}),
        ("fs-merge local", "fs-merge", {"variant": "local"}), ("fs-merge global", "fs-merge", {})]


def settings(datasets, depths) -> list[tuple[str, tuple[str, str], int]]:
    return [(d, split, depth) for d in datasets for split in SPLITS[d] for depth in depths]


def run_bench(datasets=("mnist", "fmnist"), depths=DEPTHS, seeds: int = 1, methods: list[str] | None = None,
              out: str = "runs/bench") -> dict:
    bad = [d for d in datasets if d not in SPLITS]
    if bad:
        raise ValueError(f"--datasets: unknown {bad[0]!r}; choose from {', '.join(SPLITS)}")
    if seeds < 1 or any(d < 1 for d in depths):
        raise ValueError("--seeds and --depths must be positive")
    known = {n for n, _, _ in PLAN} | {m for _, m, _ in PLAN}
    unknown = [m for m in (methods or []) if m not in known]
    if unknown:
        raise ValueError(f"unknown bench method {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    plan = [(n, m, o) for n, m, o in PLAN if selected(n, m, methods)]
    cache = Path(out)
    t0 = time.perf_counter()
    rows = []
    units = [(s, seed) for s in settings(datasets, depths) for seed in range(seeds)]
    with bar(len(units) * (len(plan) + 2), "defaults bench") as progress:
        for (dataset, split, depth), seed in units:
            label = f"{' / '.join(split)}, depth {depth}"
            status(f"{label}, pair {seed}")
            sources = get_sources(dataset, [128] * depth, seed, cache, tasks=split)
            base = {"dataset": dataset, "split": list(split), "depth": depth, "seed": seed, "setting": label}

            def add(name, result, **extra):
                rows.append({**base, "method": name, "per_task": result["per_task_mean"],
                             "joint": result.get("joint_mean"), **extra})
                progress.advance(1)

            add("originals", originals(sources))
            add("ensemble", evaluate(Ensemble(sources)))
            draw = sample_drawer(sources, PER_TASK, seed)
            for name, method, opts in plan:
                augment = default_augment(method, sources)      # what `merge` draws by default
                merged, scores, raw, seconds = merge_scored(sources, draw(augment), method, seed, opts)
                add(name, scores, joint_uncalibrated=raw.get("joint_mean"), seconds=seconds,
                    options={**merged.meta["options"], "augment": augment}, calibration=merged.meta["calibration"])
    return {"bench": "defaults", "datasets": list(datasets), "depths": list(depths), "seeds": list(range(seeds)),
            "per_task_images": PER_TASK, "settings": list(dict.fromkeys(r["setting"] for r in rows)),
            "rows": rows, "total_seconds": time.perf_counter() - t0}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def table(result: dict) -> dict:
    """{row: {setting: (per-task, joint, joint before calibration)}}, means over the seeds, plus
    "mean" over the settings."""
    out: dict = {}
    for r in result["rows"]:
        out.setdefault(r["method"], {}).setdefault(r["setting"], []).append(
            (r["per_task"], r["joint"], r.get("joint_uncalibrated")))
    for cells in out.values():
        for s, vals in cells.items():
            cells[s] = tuple(_mean([v[i] for v in vals]) for i in range(3))
        cells["mean"] = tuple(_mean([c[i] for c in cells.values()]) for i in range(3))
    return out


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(140, Console().width))
    cells = table(result)
    t = Table(title=f"every option at its default: per-task / joint (joint with the heads uncalibrated) accuracy % "
                    f"(test), MLPs of width 128, {result['per_task_images']} unlabeled images per task, mean over "
                    f"{len(result['seeds'])} pair(s)")
    t.add_column("method")
    for s in result["settings"] + ["mean"]:
        t.add_column(s, justify="right")

    def cell(c):
        if c is None:
            return "-"
        text = f"{c[0]:.1f} / " + ("-" if c[1] is None else f"{c[1]:.1f}")
        return text + ("" if c[2] is None else f" ({c[2]:.1f})")

    for name, row in cells.items():
        t.add_row(name, *[cell(row.get(s)) for s in result["settings"] + ["mean"]])
    console.print(t)
    console.print(f"measured now: seeds {result['seeds']}; {result['total_seconds'] / 60:.1f} min; command: {command}")
