"""`foldmerge bench same-task`: models of one task from different seeds merged into one (the setting of
Git Re-Basin, ZipIt! and CCA Merge), every method that merges models from different starts.

Sources: two models of one family per cell, trained from seeds 2s and 2s+1 on the full label set of
MNIST or Fashion-MNIST (`FAMILIES`): an MLP of two hidden layers of 128 (the FS-Merge paper's
schedule, appendix E.1), a ViT (width 64, depth 4, trained from scratch on 12,000 images for 4
epochs), a ResNet-8 with BatchNorm (bench cnn's sources). Each model's 256 unlabeled training images
(`PER_TASK`, its own draw) are the merge data; every method runs with its defaults for the family
(`foldmerge merge --help`), so the shared head is each source's adapted head averaged
(`foldmerge.heads`). Task arithmetic, TIES and the gating merge need one common start and are not
run here.

Rows: each source and their mean (originals), the ensemble (the sources' logits averaged: every
model runs), then every merge: test accuracy and its label-free fidelity (top-1 agreement with each
source and KL, on 256 further unlabeled training images per source, `foldmerge.selection.fidelity`).
The bench ends with the rank correlation (Spearman) between fidelity and accuracy over the merges
of each cell and over all of them.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..api import fidelity_sample, merge, merge_sample
from ..arch import resnet
from ..arch.defaults import SOURCES
from ..context import FeatureCache
from ..data import Task
from ..evaluation import SourceHeads, evaluate
from ..heads import share
from ..progress import status
from ..selection import fidelity
from ..sources import source_dirname, train_resnet_source, train_source, train_vit_source
from . import cached_model, image_mflops, mean_std, read_back, selected, spearman

DATASETS = ("mnist", "fmnist")
PER_TASK = 256
FIDELITY = 256
SEEDS = 1
VIT = {"image_size": 28, "channels": 1, "patch": 7, "width": 64, "depth": 4, "heads": 4, "mlp_dim": 128, "out_dim": 64}
VIT_TRAINING = {"epochs": 4, "limit": 12000}
RESNET_TRAINING = {k: SOURCES["resnet"].values[k] for k in ("epochs", "limit")}
FAMILIES = {
    "mlp": lambda task, seed: train_source(task, [128, 128], seed),
    "vit": lambda task, seed: train_vit_source(task, VIT, seed, **VIT_TRAINING),
    "resnet": lambda task, seed: train_resnet_source(task, {**resnet.SOURCE_CONFIG, "width": 1}, seed,
                                                     **RESNET_TRAINING),
}
PLAN = [("W.Avg", "average"), ("SLERP", "slerp"), ("Git Re-Basin", "weight-matching"), ("Permute", "permute"),
        ("ZipIt!", "zipit"), ("OT fusion", "opt"), ("CCA Merge", "cca"), ("PLeaS", "pleas"), ("RegMean", "regmean"),
        ("Distillation", "distill"), ("FS-Merge", "fs-merge")]


def get_source(family: str, dataset: str, seed: int, cache: Path):
    task = Task.parse(dataset)
    return cached_model(cache / "same-task" / family / source_dirname(task, seed),
                        lambda: FAMILIES[family](task, seed), "foldmerge bench same-task (source)")


def run_cell(family: str, dataset: str, seed: int, cache: Path, methods: list[str] | None = None) -> list[dict]:
    """Every row of one (family, data set, seed pair), kept in the cell's file row by row."""
    cell = cache / "same-task" / "cells" / f"{family}-{dataset}-s{seed}.json"
    rows = json.loads(cell.read_text()) if cell.is_file() else []
    have = {r["method"] for r in rows}
    sources = [get_source(family, dataset, 2 * seed + k, cache) for k in range(2)]
    forms = [s.merge_form() for s in sources]
    sharing = share(forms)
    data = merge_sample(forms, PER_TASK, seed)
    held = fidelity_sample(forms, PER_TASK, FIDELITY, seed)
    features = FeatureCache()
    base = {"family": family, "dataset": dataset, "seed": seed}

    def keep(row):
        rows.append({**base, **row})
        cell.parent.mkdir(parents=True, exist_ok=True)
        tmp = cell.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(cell)

    for k, s in enumerate(sources):
        if f"source {k + 1}" not in have:
            keep({"method": f"source {k + 1}", "accuracy": s.meta["test_accuracy"], "mflops": image_mflops(s)})
    if "Ensemble" not in have:
        ensemble = SourceHeads(forms, sharing.index, sharing.tasks)
        keep({"method": "Ensemble", "accuracy": evaluate(ensemble)["per_task_mean"],
              "mflops": sum(image_mflops(s) for s in forms)})
    for name, method in PLAN:
        if name in have or not selected(name, method, methods):
            continue
        status(f"same-task {family} {dataset} seed {seed}: {name}")
        merged = merge(sources, data, method=method, seed=seed, fidelity=0)
        fid = list(fidelity(merged, forms, held, features, sharing.index).values())
        keep({"method": name, "accuracy": evaluate(merged)["per_task_mean"],
              "agreement": sum(f["agreement"] for f in fid) / len(fid), "kl": sum(f["kl"] for f in fid) / len(fid),
              "mflops": image_mflops(merged), "seconds": merged.meta["wall_seconds"]})
    return rows


def aggregate(rows: list[dict]) -> list[dict]:
    out = []
    for family, dataset, method in dict.fromkeys((r["family"], r["dataset"], r["method"]) for r in rows):
        sel = [r for r in rows if (r["family"], r["dataset"], r["method"]) == (family, dataset, method)]
        agg = {"family": family, "dataset": dataset, "method": method, "seeds": len(sel)}
        for k in ("accuracy", "agreement", "kl", "mflops", "seconds"):
            agg[k], agg[k + "_std"] = mean_std([r.get(k) for r in sel])
        out.append(agg)
    return out


def correlations(rows: list[dict]) -> dict:
    """Spearman's rho between fidelity (agreement) and test accuracy over the merges of each cell
    (family, data set, seed), their mean, and over every merge of the run."""
    merges = [r for r in rows if r.get("agreement") is not None]
    cells = {}
    for key in dict.fromkeys((r["family"], r["dataset"], r["seed"]) for r in merges):
        sel = [r for r in merges if (r["family"], r["dataset"], r["seed"]) == key]
        if len(sel) > 2:
            cells["{} {} s{}".format(*key)] = spearman([r["agreement"] for r in sel], [r["accuracy"] for r in sel])
    pooled = spearman([r["agreement"] for r in merges], [r["accuracy"] for r in merges]) if len(merges) > 2 else None
    return {"per_cell": cells, "mean_per_cell": sum(cells.values()) / len(cells) if cells else None,
            "pooled": pooled, "merges": len(merges)}


def run_bench(families=tuple(FAMILIES), datasets=DATASETS, seeds: int = SEEDS, methods: list[str] | None = None,
              out: str = "runs/bench") -> dict:
    bad = [f for f in families if f not in FAMILIES] + [d for d in datasets if d not in DATASETS]
    if bad:
        raise ValueError(f"unknown family or data set {bad[0]!r}; families: {', '.join(FAMILIES)}; data sets: "
                         f"{', '.join(DATASETS)}")
    if seeds < 1:
        raise ValueError("--seeds must be positive")
    cache, t0 = Path(out), time.perf_counter()
    rows, cached = [], 0
    for family in families:
        for dataset in datasets:
            for seed in range(seeds):
                cached += (cache / "same-task" / "cells" / f"{family}-{dataset}-s{seed}.json").is_file()
                rows += run_cell(family, dataset, seed, cache, methods)
    return {"bench": "same-task", "families": list(families), "datasets": list(datasets), "seeds": seeds,
            "per_task_images": PER_TASK, "fidelity_images": FIDELITY, "vit": VIT, "vit_training": VIT_TRAINING,
            "resnet_training": RESNET_TRAINING, "rows": rows, "table": aggregate(rows),
            "correlation": correlations(rows), "cells": len(families) * len(datasets) * seeds,
            "cells_from_cache": cached, "total_seconds": time.perf_counter() - t0}


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(110, Console().width))

    def pm(r, k, digits=1):
        if r.get(k) is None:
            return "-"
        return f"{r[k]:.{digits}f} ± {r[k + '_std']:.{digits}f}" if r["seeds"] > 1 else f"{r[k]:.{digits}f}"

    for family in result["families"]:
        for dataset in result["datasets"]:
            sel = [r for r in result["table"] if r["family"] == family and r["dataset"] == dataset]
            if not sel:
                continue
            t = Table(title=f"{family}, two models of {dataset} (all classes) from different seeds: test accuracy %"
                            f"{', mean ± std over ' + str(sel[0]['seeds']) + ' seed pairs' if sel[0]['seeds'] > 1 else ''}")
            for c in ("method", "accuracy", "agreement %", "KL", "MFLOPs", "seconds"):
                t.add_column(c, justify="left" if c == "method" else "right")
            for r in sel:
                t.add_row(r["method"], pm(r, "accuracy", 2), pm(r, "agreement"), pm(r, "kl", 3),
                          f"{r['mflops']:.2f}", pm(r, "seconds"))
            console.print(t)
    c = result["correlation"]
    if c["per_cell"]:
        cells = ", ".join(f"{k} {v:+.2f}" for k, v in c["per_cell"].items())
        console.print(f"fidelity against accuracy, Spearman's rho over the merges: per cell {cells}; mean "
                      f"{c['mean_per_cell']:+.2f}; all {c['merges']} merges pooled {c['pooled']:+.2f}")
    console.print(f"measured: seed pairs 0…{result['seeds'] - 1} (source seeds 2s, 2s+1); "
                  f"{result['total_seconds'] / 60:.1f} min this run{read_back(result)}; command: {command}")
