"""Benchmarks: `foldmerge bench mlp` (the FS-Merge paper's MLP tables, measured here).

Every number a benchmark prints is measured by the run that prints it; published values
appear only beside ours, read from a data file that names its table and labelled "paper".
"""
import json
import math
import time

import torch

from ..api import load, merge, merge_sample
from ..calibrate import calibrate_heads
from ..context import FeatureCache
from ..evaluation import evaluate, forward_mflops
from ..selection import fidelity


def selected(row: str, method: str, methods: list[str] | None) -> bool:
    """Whether `--methods` (None: all) asks for this row, by its name or its method's."""
    return not methods or row in methods or method in methods


def accuracy(scores: dict) -> dict:
    """A bench row's accuracy fields from `evaluation.evaluate`'s scores: per-task and joint means (%)."""
    return {"per_task": scores["per_task_mean"], "joint": scores.get("joint_mean")}


def sample_drawer(sources, per_task: int, seed: int):
    """`draw(augment)`: the merge sample of `sources` with that many augmented images per task
    (`api.merge_sample`), drawn once per count and reused by every merge of the bench cell."""
    drawn: dict[int, list] = {}

    def draw(augment: int = 0) -> list:
        if augment not in drawn:
            drawn[augment] = merge_sample(sources, per_task, seed, augment)
        return drawn[augment]
    return draw


def merge_scored(sources, data, method: str, seed: int, opts: dict, held: list | None = None):
    """One bench merge, scored on the test split twice: with the heads as the method made them
    and after the routing calibration that every merge gets by default (`foldmerge.calibrate`;
    per-task is the same, joint is what it changes). Returns (merged, calibrated scores,
    uncalibrated scores, seconds of merge and calibration). With `held` (further unlabeled inputs
    per source, `api.fidelity_sample`), the calibrated scores also hold the label-free fidelity:
    mean agreement % and KL over the tasks (`foldmerge.selection.fidelity`)."""
    merged = merge(sources, data, method=method, seed=seed, calibrate="none", fidelity=0, **opts)
    raw = evaluate(merged)
    start = time.perf_counter()
    merged.meta["calibration"] = calibrate_heads(merged, sources, data)
    seconds = merged.meta["wall_seconds"] + time.perf_counter() - start
    scores = evaluate(merged)
    if held is not None:
        fid = list(fidelity(merged, [s.merge_form() for s in sources], held, FeatureCache()).values())
        scores.update(agreement=sum(f["agreement"] for f in fid) / len(fid), kl=sum(f["kl"] for f in fid) / len(fid))
    return merged, scores, raw, seconds


def cached_model(path, make, command: str):
    """The model saved at `path`, or `make()` saved there first (its meta naming `command`):
    a bench's sources are trained once and reused by every later run."""
    if (path / "config.json").is_file():
        return load(path)
    m = make()
    m.meta["command"] = command
    m.save(path)
    return m


def image_mflops(model) -> float:
    """Millions of floating-point operations of one forward of one 28x28 image, in the model's dtype."""
    p = next(model.parameters())
    return forward_mflops(model, torch.zeros(1, 1, 28, 28, dtype=p.dtype))


def mean_std(xs) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation; 0 for one value) of the values that are not None."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation of paired values (ties get their mean rank); None where either
    side does not vary."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    a, b = ranks(xs), ranks(ys)
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((p - ma) * (q - mb) for p, q in zip(a, b))
    va, vb = sum((p - ma) ** 2 for p in a), sum((q - mb) ** 2 for q in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None


def read_back(result: dict) -> str:
    """What a resumable bench's summary line says of the cells it did not measure this time."""
    n = result.get("cells_from_cache", 0)
    return f" ({n} of {result['cells']} cells read back from earlier runs)" if n else ""


class Cells:
    """Where a resumable bench keeps its cells: each measured once and saved at its path
    (atomically), so an interrupted run resumes at the first cell it lacks. Counts the cells it
    read back instead of measuring, for the bench's summary and the report's wall time."""

    def __init__(self):
        self.count = self.read_back = 0

    def rows(self, path, measure) -> list[dict]:
        """The rows saved at `path`, or `measure()`'s, saved there first."""
        self.count += 1
        if path.is_file():
            self.read_back += 1
            return json.loads(path.read_text())
        rows = measure()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(path)
        return rows

    def facts(self) -> dict:
        return {"cells": self.count, "cells_from_cache": self.read_back}
