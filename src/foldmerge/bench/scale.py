"""`foldmerge bench scale`: does FS-Merge's margin over distillation grow with the ViT?

The paper (ViT-B-16, 86M weights) reports FS-Merge 3-7 points per task above distillation from
16 original images per task; `bench vit` (width 64, depth 4, 142k weights) measures +0.1. This
bench asks whether the margin appears as the model grows: the pair `bench vit` merges first
(mnist:0-4 + fmnist:5-9, sources pre-trained on mnist/transpose from seeds 0 and 1 as there) at
each ViT of `CONFIGS` (width 64 / 128 / 192, depth 4 / 6; 16 dimensions per head, MLP 2x
width), merged from 16 originals + 800 augmented and from 100 + 1000 images per task
(`bench vit`'s pairs16 and pairs100) by distillation and FS-Merge diag+low-rank(12).

Hyperparameters: the ones validation chose for `bench vit` pairs16 at width 64 (distillation and
FS-Merge each 100 epochs at lr 1e-3, AdamW, batch 128, E.1's warmup), the same at every size: a
search per size does not fit this machine, and a fixed recipe keeps the comparison about the size.
Each cell (width, depth, originals, seed) is saved when measured, under OUT/scale/cells, so an
interrupted run resumes where it stopped; `--configs` runs a subset.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..api import merge_sample
from ..evaluation import Ensemble, evaluate
from ..evaluation import originals as originals_of
from ..progress import bar, status
from . import Cells, accuracy, mean_std, merge_scored, read_back
from .results import signed
from .vit import PAIRS, TASKS, VALIDATED, VIT, get_sources, method_plan

# cheapest first, so an interrupted run has the small end of the curve
CONFIGS = ((64, 4), (128, 4), (64, 6), (192, 4), (128, 6), (192, 6))
SAMPLES = {16: 800, 100: 1000}        # originals per task: augmented per task (bench vit pairs16, pairs100)
ROWS = ("distill", "fs-merge diag+lowrank(12)")
EPOCHS, LR = VALIDATED["distill"]     # bench vit's validated pairs16 choice, the same for both rows
SOURCE_EPOCHS = (3, 2)                # bench vit's: pre-training, fine-tuning


def vit_config(width: int, depth: int) -> dict:
    return {**VIT, "width": width, "depth": depth, "heads": width // 16, "mlp_dim": 2 * width, "out_dim": width}


def plan() -> list[tuple[str, str, dict]]:
    return [row for row in method_plan(VALIDATED) if row[0] in ROWS]


def parse_config(text: str) -> tuple[int, int]:
    """'128x6' -> (128, 6)."""
    try:
        width, depth = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a ViT size is WIDTHxDEPTH (e.g. 128x6), got {text!r}") from None
    if width < 16 or width % 16 or depth < 1:
        raise ValueError(f"ViT width must be a multiple of 16 (16 dimensions per head) and depth >= 1, got {text!r}")
    return width, depth


def run_cell(width: int, depth: int, originals: int, seed: int, cache: Path, store: Cells) -> list[dict]:
    """Every row of one cell, read from its file if it was measured before."""
    return store.rows(cache / "scale" / "cells" / f"w{width}d{depth}-n{originals}-s{seed}.json",
                      lambda: _measure(width, depth, originals, seed, cache))


def _measure(width: int, depth: int, originals: int, seed: int, cache: Path) -> list[dict]:
    sources = get_sources([0, 1], vit_config(width, depth), cache, None, SOURCE_EPOCHS)
    base = {"width": width, "depth": depth, "originals": originals, "augmented": SAMPLES[originals], "seed": seed,
            "source_parameters": sources[0].num_parameters()}
    rows = [{**base, "method": "originals", "per_task": originals_of(sources)["per_task_mean"], "joint": None},
            {**base, "method": "ensemble", **accuracy(evaluate(Ensemble(sources)))}]
    data = merge_sample(sources, originals, seed, augment=SAMPLES[originals])
    for name, method, opts in plan():
        status(f"scale w{width} d{depth}, {originals} originals: {name}")
        merged, calibrated, raw, seconds = merge_scored(sources, data, method, seed, dict(opts))
        rows.append({**base, "method": name, **accuracy(calibrated), "joint_uncalibrated": raw.get("joint_mean"),
                     "seconds": seconds, "learnable_parameters": merged.meta.get("learnable_parameters")})
        status(f"  {name}: test per-task {rows[-1]['per_task']:.2f} ({seconds:.0f} s)")
    return rows


def gaps(rows: list[dict]) -> list[dict]:
    """Per (width, depth, originals): FS-Merge minus distillation, per task and joint, mean ± std over seeds."""
    out = []
    for key in dict.fromkeys((r["width"], r["depth"], r["originals"]) for r in rows):
        sel = [r for r in rows if (r["width"], r["depth"], r["originals"]) == key]
        by = {}
        for r in sel:
            by.setdefault(r["seed"], {})[r["method"]] = r
        d_pt, d_j = [], []
        for methods in by.values():
            fs, di = methods.get("fs-merge diag+lowrank(12)"), methods.get("distill")
            if fs and di:
                d_pt.append(fs["per_task"] - di["per_task"])
                d_j.append(fs["joint"] - di["joint"])
        row = {"width": key[0], "depth": key[1], "originals": key[2], "seeds": len(d_pt),
               "source_parameters": sel[0]["source_parameters"]}
        row["per_task_of"] = {name: mean_std(r["per_task"] for r in sel if r["method"] == name)[0]
                              for name in dict.fromkeys(r["method"] for r in sel)}
        row["gap_per_task"], row["gap_per_task_std"] = mean_std(d_pt)
        row["gap_joint"], row["gap_joint_std"] = mean_std(d_j)
        row["seconds"] = {name: mean_std(r.get("seconds") for r in sel if r["method"] == name)[0]
                          for name, _, _ in plan()}
        out.append(row)
    return out


def run_bench(configs: tuple = CONFIGS, originals: tuple = tuple(SAMPLES), seeds: int = 1,
              out: str = "runs/bench") -> dict:
    bad = [n for n in originals if n not in SAMPLES]
    if bad:
        raise ValueError(f"--originals must be among {', '.join(map(str, SAMPLES))}, got {bad[0]}")
    cache, t0, rows = Path(out), time.perf_counter(), []
    cells = [(w, d, n, s) for w, d in configs for n in originals for s in range(seeds)]
    store = Cells()
    with bar(len(cells), "scale cells") as progress:
        for w, d, n, s in cells:
            rows += run_cell(w, d, n, s, cache, store)
            progress.advance(1, info=f"w{w} d{d} n{n} s{s}")
    return {"bench": "scale", "pair": list(PAIRS[0]), "pretrain_task": "mnist/transpose", "tasks": TASKS[:2],
            "configs": [list(c) for c in configs], "samples": {str(n): SAMPLES[n] for n in originals},
            "seeds": seeds, "epochs": EPOCHS, "lr": LR, "source_epochs": list(SOURCE_EPOCHS),
            "rows": rows, "gaps": gaps(rows), **store.facts(),
            "total_seconds": time.perf_counter() - t0}


def _acc(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(120, Console().width))
    table = Table(title=f"FS-Merge diag+low-rank(12) minus distillation, pair {' + '.join(result['pair'])}: "
                        "per-task accuracy % (test)")
    for col in ("ViT", "source params", "originals + augmented", "ensemble", "distill", "fs-merge",
                "gap per task", "gap joint", "seconds (distill / fs-merge)"):
        table.add_column(col, justify="left" if col == "ViT" else "right")
    for g in result["gaps"]:
        secs = g["seconds"]
        table.add_row(f"w{g['width']} d{g['depth']}", f"{g['source_parameters']:,}",
                      f"{g['originals']} + {result['samples'][str(g['originals'])]}",
                      *[_acc(g["per_task_of"].get(m)) for m in ("ensemble", "distill", "fs-merge diag+lowrank(12)")],
                      signed(g["gap_per_task"], g["gap_per_task_std"], "-"), signed(g["gap_joint"], g["gap_joint_std"], "-"),
                      " / ".join("-" if secs[k] is None else f"{secs[k]:.0f}" for k in secs))
    console.print(table)
    console.print(f"measured now: {result['seeds']} seed(s), {result['epochs']} epochs at lr {result['lr']:g} for both "
                  f"methods at every size; {result['total_seconds'] / 60:.1f} min"
                  f"{read_back(result)}; command: {command}")
