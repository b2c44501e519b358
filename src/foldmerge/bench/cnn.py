"""`foldmerge bench cnn`: ZipIt!'s Table 1 setting on our data: two ResNets with BatchNorm, trained
from different seeds on disjoint tasks, merged into one.

Sources: a ResNet-8 (`RESNET`, `foldmerge.arch.resnet.SOURCE_CONFIG`: 3 stages of one basic block, 8·w / 16·w / 32·w channels, BatchNorm,
projection shortcuts between stages; ResNet-20 is blocks = 3, too slow to train here many times)
at width multipliers w = 1 and 4, frozen class-embedding heads (ZipIt!'s CLIP text heads, our
stand-in), trained 4 epochs (AdamW lr 2e-3, cosine) on 6,000 training images of their task.
No colour image set installs from the package registries here (CIFAR-10 is on PyPI only as
loaders that download it at run time), so the pairs are MNIST 0-4 / 5-9, Fashion-MNIST 0-4 / 5-9
and the cross-data-set pair MNIST 0-4 / Fashion-MNIST 0-4. `SEEDS` pairs of seeds each.

Every merge reads the same 256 unlabeled training images per task (`PER_TASK`). Rows, in the
layout of ZipIt!'s Table 1 (joint, task A, task B, average per task, MFLOPs of one 28x28 image):
the originals, the ensemble (both models, heads side by side), W.Avg, Git Re-Basin (weight
matching), Permute, ZipIt! full and partial (stopped after 2 and after 1 of the 3 stages, the
rest kept per model), all with the BatchNorm reset (`foldmerge.methods.repair`, ZipIt!'s
`reset_bn_stats`; rows "no reset" show its effect), CCA Merge, PLeaS (budget 0: one model's
size; budget 0.5: 1.5x the width), RegMean (conv Grams), distillation and FS-Merge (global: diag and
diag+low-rank(16) maps from `first`, full maps from `zipit`, which needs them), the trained ones for `TRAINED_EPOCHS` epochs with
the residual-architecture defaults otherwise. Joint accuracy after the routing calibration
every `foldmerge merge` applies (the uncalibrated value is kept in the JSON).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..api import fidelity_sample, merge_sample
from ..arch import resnet
from ..arch.defaults import SOURCES
from ..data import Task
from ..evaluation import SourceHeads, evaluate
from ..progress import status
from ..sources import source_dirname, train_resnet_source
from . import cached_model, image_mflops, mean_std, merge_scored, read_back, selected, spearman

RESNET = resnet.SOURCE_CONFIG
PAIRS = {"mnist": ("mnist:0-4", "mnist:5-9"), "fmnist": ("fmnist:0-4", "fmnist:5-9"),
         "cross": ("mnist:0-4", "fmnist:0-4")}
WIDTHS = (1, 4)
SEEDS = 3
PER_TASK = 256
FIDELITY = 256               # further unlabeled images per task for the fidelity of every merge
SOURCE_TRAINING = {k: SOURCES["resnet"].values[k] for k in ("epochs", "limit")}
TRAINED_EPOCHS = 50


def plan() -> list[tuple[str, str, dict]]:
    """(row, method, options) of every merge of a cell."""
    e = {"epochs": TRAINED_EPOCHS}
    return [("W.Avg", "average", {"reset_bn": True}),
            ("Git Re-Basin", "weight-matching", {"reset_bn": True}),
            ("Permute (no reset)", "permute", {"reset_bn": False}),
            ("Permute", "permute", {"reset_bn": True}),
            ("ZipIt! 3/3 (no reset)", "zipit", {"reset_bn": False}),
            ("ZipIt! 3/3", "zipit", {"reset_bn": True}),
            ("ZipIt! 2/3", "zipit", {"reset_bn": True, "stop_layer": 2}),
            ("ZipIt! 1/3", "zipit", {"reset_bn": True, "stop_layer": 1}),
            ("CCA Merge", "cca", {}),
            ("PLeaS", "pleas", {}),
            ("PLeaS (budget 0.5)", "pleas", {"budget": 0.5}),
            ("RegMean", "regmean", {}),
            ("Distillation", "distill", e),
            ("FS-Merge diag (first)", "fs-merge", {"param": "diag", "init": "first", **e}),
            ("FS-Merge diag+lowrank (first)", "fs-merge", {"param": "diag+lowrank(16)", "init": "first", **e}),
            ("FS-Merge full (zipit)", "fs-merge", {"param": "full", "init": "zipit", **e})]


def get_source(task: str, width: int, seed: int, cache: Path):
    return cached_model(cache / "cnn" / f"w{width}" / source_dirname(Task.parse(task), seed),
                        lambda: train_resnet_source(task, {**RESNET, "width": width}, seed, **SOURCE_TRAINING),
                        "foldmerge bench cnn (source)")


def _scores(result: dict, tasks: list[str]) -> dict:
    per = result["per_task"]
    return {"task_a": per[tasks[0]], "task_b": per[tasks[1]], "avg": sum(per.values()) / len(per),
            "joint": result.get("joint_mean")}


def run_cell(pair: str, width: int, seed: int, cache: Path, methods: list[str] | None = None) -> list[dict]:
    """Every row of one (pair, width, seed), read from the cell's file if it was measured before."""
    cell = cache / "cnn" / "cells" / f"{pair}-w{width}-s{seed}.json"
    done = json.loads(cell.read_text()) if cell.is_file() else []
    have = {r["method"] for r in done}
    tasks = list(PAIRS[pair])
    sources = [get_source(t, width, 2 * seed + k, cache) for k, t in enumerate(tasks)]
    data = merge_sample(sources, PER_TASK, seed)
    held = fidelity_sample(sources, PER_TASK, FIDELITY, seed)
    rows = list(done)
    base = {"pair": pair, "width": width, "seed": seed}

    def keep(row):
        rows.append({**base, **row})
        cell.parent.mkdir(parents=True, exist_ok=True)
        tmp = cell.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(cell)

    if "Originals" not in have:
        per = {t: s.meta["test_accuracy"] for t, s in zip(tasks, sources)}
        keep({"method": "Originals", "task_a": per[tasks[0]], "task_b": per[tasks[1]],
              "avg": sum(per.values()) / 2, "joint": None, "mflops": image_mflops(sources[0]), "seconds": 0.0})
    if "Ensemble" not in have:
        ens = SourceHeads([s.merge_form() for s in sources])
        keep({"method": "Ensemble", **_scores(evaluate(ens), tasks),
              "mflops": sum(image_mflops(s) for s in sources), "seconds": 0.0})
    for name, method, opts in plan():
        if name in have or not selected(name, method, methods):
            continue
        status(f"cnn {pair} x{width} seed {seed}: {name}")
        merged, calibrated, raw, seconds = merge_scored(sources, data, method, seed, dict(opts), held)
        keep({"method": name, **_scores(calibrated, tasks), "joint_uncalibrated": raw.get("joint_mean"),
              "agreement": calibrated["agreement"], "kl": calibrated["kl"],
              "mflops": image_mflops(merged), "params": merged.num_parameters(), "seconds": seconds,
              "widths": merged.backbone_config.get("widths")})
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    out = []
    keys = list(dict.fromkeys((r["pair"], r["width"], r["method"]) for r in rows))
    for pair, width, method in keys:
        sel = [r for r in rows if (r["pair"], r["width"], r["method"]) == (pair, width, method)]
        agg = {"pair": pair, "width": width, "method": method, "seeds": len(sel)}
        for k in ("joint", "task_a", "task_b", "avg", "mflops", "seconds"):
            agg[k], agg[k + "_std"] = mean_std([r.get(k) for r in sel])
        out.append(agg)
    return out


def run_bench(pairs=tuple(PAIRS), widths=WIDTHS, seeds: int = SEEDS, methods: list[str] | None = None,
              out: str = "runs/bench") -> dict:
    bad = [p for p in pairs if p not in PAIRS]
    if bad:
        raise ValueError(f"unknown pair {bad[0]!r}; choose from {', '.join(PAIRS)}")
    if any(w < 1 for w in widths) or seeds < 1:
        raise ValueError("--widths and --seeds must be positive")
    cache, t0 = Path(out), time.perf_counter()
    rows, cached = [], 0
    for width in widths:
        for pair in pairs:
            for seed in range(seeds):
                cached += (cache / "cnn" / "cells" / f"{pair}-w{width}-s{seed}.json").is_file()
                rows += run_cell(pair, width, seed, cache, methods)
    merges = [r for r in rows if r.get("agreement") is not None]
    cells = {}
    for key in dict.fromkeys((r["pair"], r["width"], r["seed"]) for r in merges):
        sel = [r for r in merges if (r["pair"], r["width"], r["seed"]) == key]
        rho = spearman([r["agreement"] for r in sel], [r["avg"] for r in sel]) if len(sel) > 2 else None
        if rho is not None:
            cells["{} x{} s{}".format(*key)] = rho
    correlation = {"per_cell": cells, "mean_per_cell": sum(cells.values()) / len(cells) if cells else None,
                   "pooled": spearman([r["agreement"] for r in merges], [r["avg"] for r in merges])
                   if len(merges) > 2 else None, "merges": len(merges)}
    return {"bench": "cnn", "resnet": RESNET, "correlation": correlation, "fidelity_images": FIDELITY, "pairs": {p: list(PAIRS[p]) for p in pairs}, "widths": list(widths),
            "seeds": seeds, "per_task_images": PER_TASK, "source_training": SOURCE_TRAINING,
            "trained_epochs": TRAINED_EPOCHS, "rows": rows, "table": aggregate(rows),
            "cells": len(widths) * len(pairs) * seeds, "cells_from_cache": cached,
            "total_seconds": time.perf_counter() - t0}


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(120, Console().width))

    def pm(r, k, digits=1):
        if r.get(k) is None:
            return "-"
        return f"{r[k]:.{digits}f} ± {r[k + '_std']:.{digits}f}"

    for width in result["widths"]:
        for pair, tasks in result["pairs"].items():
            sel = [r for r in result["table"] if r["pair"] == pair and r["width"] == width]
            if not sel:
                continue
            t = Table(title=f"ResNet-8 x{width}, {tasks[0]} + {tasks[1]}: accuracy % (test), mean ± std over "
                            f"{sel[0]['seeds']} seed pairs")
            for c in ("method", "joint", f"task A ({tasks[0]})", f"task B ({tasks[1]})", "avg", "MFLOPs", "seconds"):
                t.add_column(c, justify="left" if c == "method" else "right")
            for r in sel:
                t.add_row(r["method"], pm(r, "joint"), pm(r, "task_a"), pm(r, "task_b"), pm(r, "avg"),
                          f"{r['mflops']:.1f}", f"{r['seconds']:.1f}")
            console.print(t)
    c = result.get("correlation") or {}
    if c.get("per_cell"):
        cells = ", ".join(f"{k} {v:+.2f}" for k, v in c["per_cell"].items())
        console.print(f"fidelity (agreement with the sources, no labels) against per-task accuracy, Spearman's rho "
                      f"over the merges: per cell {cells}; mean {c['mean_per_cell']:+.2f}; all {c['merges']} merges "
                      f"pooled {c['pooled']:+.2f}")
    console.print(f"measured: seeds 0…{result['seeds'] - 1} (source seeds 2s, 2s+1); "
                  f"{result['total_seconds'] / 60:.1f} min this run{read_back(result)}; command: {command}")
