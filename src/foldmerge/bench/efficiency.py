"""`foldmerge bench data-efficiency`: the FS-Merge paper's Figures 4-6 (and F.8's Figure 7 for text).

How accuracy depends on the number of original training examples per task that a merge sees:
16, 32, ..., 1024 originals, with augmented images filling every task to 1024 (paper 3.4: "to
ensure the total number of images per dataset reached 1024"); texts are not augmented (F.8), and
a count larger than a task's training split leaves room for is skipped and said so. Rows: the
ensemble (uses no merge data: one value, drawn as a line), distillation, FS-Merge diag and
diag+low-rank; per-task and joint test accuracy (joint after the routing calibration).

Architectures, each with the sources and hyperparameters of the bench that measured it first:
  mlp   bench mlp's pair: MLP 784-128-128 on MNIST 0-4 / 5-9 (seeds 2s, 2s+1); every merge with
        its CLI defaults (FS-Merge global from `first`, E.1's bold 1,000 epochs at lr 0.1), and
        FS-Merge's MLP default, full maps, beside diag and diag+low-rank(16).
  vit   bench vit's pairs (seed s: its pair s; width 64, depth 4); its validated pairs16 choice (distillation
        100 epochs at lr 1e-3, FS-Merge diag 200 at 1e-2, diag+low-rank(12) 100 at 1e-3).
  bert  bench text's scratch pairs (seed s: its pair s; BBC topics); its settings (100 epochs, lr 1e-3, early
        stopping on 200 held-out texts, as F.8).
Each cell (arch, count, seed) is saved under OUT/efficiency/cells when measured: an interrupted
run resumes at the next one.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..api import held_out_sample, merge_sample
from ..evaluation import Ensemble, evaluate, originals
from ..progress import bar, status
from . import Cells, accuracy, merge_scored, mlp, read_back, text, vit
from .results import summary

COUNTS = (16, 32, 64, 128, 256, 512, 1024)
TOTAL = 1024                       # originals + augmented per task (images)
ARCHS = ("mlp", "vit", "bert")
SEEDS = {"mlp": 3, "vit": 1, "bert": 1}


def plan(arch: str) -> list[tuple[str, str, dict]]:
    """(row, method, options) of the trained merges."""
    if arch == "mlp":
        return [("distill", "distill", {}), ("fs-merge diag", "fs-merge", {"param": "diag"}),
                ("fs-merge diag+lowrank(16)", "fs-merge", {"param": "diag+lowrank(16)"}),
                ("fs-merge full", "fs-merge", {})]
    if arch == "vit":
        return [row for row in vit.method_plan(vit.VALIDATED) if row[1] in ("distill", "fs-merge")]
    trained = dict(next(o for _, m, o in text.method_plan("scratch") if m == "fs-merge"))
    return [row for row in text.method_plan("scratch") if row[1] == "distill"] + [
        ("fs-merge diag", "fs-merge", {**trained, "param": "diag"}),
        ("fs-merge diag+lowrank(12)", "fs-merge", trained)]


def get_sources(arch: str, seed: int, cache: Path) -> list:
    if arch == "mlp":
        return mlp.get_sources("mnist", [128, 128], seed, cache)
    if arch == "vit":
        return vit.get_sources([2 * seed, 2 * seed + 1], vit.VIT, cache, None, (3, 2))
    return text.get_sources("scratch", seed, cache)


def _measure(arch: str, n: int, seed: int, cache: Path) -> list[dict]:
    sources = get_sources(arch, seed, cache)
    base = {"arch": arch, "originals": n, "seed": seed, "tasks": [t.name for s in sources for t in s.tasks]}
    if arch == "bert":
        held = text.SETTINGS["scratch"]["held_out"]
        data, extra = merge_sample(sources, n, seed), {"held_out": held_out_sample(sources, n, held, seed)}
        base["augmented"] = 0
    else:
        data, extra = merge_sample(sources, n, seed, augment=TOTAL - n), {}
        base["augmented"] = TOTAL - n
    rows = []
    for name, method, opts in plan(arch):
        status(f"data-efficiency {arch}, {n} originals, seed {seed}: {name}")
        merged, calibrated, raw, seconds = merge_scored(sources, data, method, seed, {**opts, **extra})
        rows.append({**base, "method": name, **accuracy(calibrated), "joint_uncalibrated": raw.get("joint_mean"),
                     "seconds": seconds, "learnable_parameters": merged.meta.get("learnable_parameters")})
    return rows


def _reference(arch: str, seed: int, cache: Path) -> list[dict]:
    """The rows that use no merge data: the originals and the ensemble."""
    sources = get_sources(arch, seed, cache)
    base = {"arch": arch, "originals": None, "seed": seed}
    return [{**base, "method": "originals", "per_task": originals(sources)["per_task_mean"], "joint": None},
            {**base, "method": "ensemble", **accuracy(evaluate(Ensemble(sources)))}]


def room(arch: str, seed: int, cache: Path) -> int | None:
    """The most originals per task a text pair leaves beside its held-out texts (None: images, no limit)."""
    if arch != "bert":
        return None
    return text.texts_room([t for s in get_sources(arch, seed, cache) for t in s.tasks], text.SETTINGS["scratch"]["held_out"])


def curves(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (method, count): the points of the figure."""
    return summary(rows, ("method", "originals"))


def run_bench(arch: str = "mlp", counts: tuple = COUNTS, seeds: int | None = None, out: str = "runs/bench") -> dict:
    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {', '.join(ARCHS)}")
    bad = [n for n in counts if not 1 <= n <= TOTAL]
    if bad:
        raise ValueError(f"original examples per task must lie in 1…{TOTAL}, got {bad[0]}")
    seeds = seeds or SEEDS[arch]
    cache, t0, rows = Path(out), time.perf_counter(), []
    for s in range(seeds):
        rows += _reference(arch, s, cache)
    limit = room(arch, 0, cache)
    cells = [(n, s) for n in counts for s in range(seeds) if limit is None or n <= limit]
    skipped = sorted({n for n in counts if limit is not None and n > limit})
    if skipped:
        status(f"skipped (a task's training split leaves only {limit} texts beside the held-out ones): {skipped}")
    store = Cells()
    with bar(len(cells), f"data-efficiency cells ({arch})") as progress:
        for n, s in cells:
            rows += store.rows(cache / "efficiency" / "cells" / f"{arch}-n{n}-s{s}.json",
                               lambda: _measure(arch, n, s, cache))
            progress.advance(1, info=f"{n} originals, seed {s}")
    return {"bench": "data-efficiency", "arch": arch, "counts": [n for n in counts if n not in skipped],
            "skipped": skipped, "total_per_task": None if arch == "bert" else TOTAL, "seeds": seeds,
            "rows": rows, "curves": curves(rows), **store.facts(),
            "total_seconds": time.perf_counter() - t0}


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(120, Console().width))
    fill = f"augmented to {result['total_per_task']} per task" if result["total_per_task"] else "no augmentation"
    table = Table(title=f"data efficiency ({result['arch']}, {fill}): per-task / joint accuracy % (test), "
                        f"mean over {result['seeds']} seed(s)")
    table.add_column("originals per task", justify="right")
    points = [c for c in result["curves"] if c["originals"] is not None]
    ref = {c["method"]: c for c in result["curves"] if c["originals"] is None}
    names = list(dict.fromkeys(c["method"] for c in points))
    for name in ["ensemble"] + names:
        table.add_column(name, justify="right")

    def cell(c):
        return "-" if c is None else f"{c['per_task']:.1f} / " + ("-" if c["joint"] is None else f"{c['joint']:.1f}")
    for n in result["counts"]:
        got = {c["method"]: c for c in points if c["originals"] == n}
        table.add_row(str(n), cell(ref.get("ensemble")), *[cell(got.get(m)) for m in names])
    console.print(table)
    if result["skipped"]:
        console.print(f"skipped (too few training texts beside the held-out ones): {result['skipped']}")
    console.print(f"measured now: seeds 0…{result['seeds'] - 1}; {result['total_seconds'] / 60:.1f} min"
                  f"{read_back(result)}; command: {command}")
