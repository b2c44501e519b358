"""Why joint accuracy falls after a merge, and what calibrating the heads can recover.

Two MLPs (width 128, depth 2) on Fashion-MNIST's even and odd classes (the `bench defaults`
sources of pair 0, cached under runs/bench), merged from 64 unlabeled images per task with
every option at its default. For each merge: joint accuracy with the heads as the method made
them, then after three calibrations fit on the merge sample alone (foldmerge.calibrate):
a per-head temperature, a per-head scale and shift, and the routing calibration every merge
gets by default (a scale and an input-dependent shift). Per-task accuracy is the same in every
column. The sources' heads side by side and each head's mean top logit on each task's test
images show where the fall comes from.

    python examples/joint_diagnosis.py [--out runs/bench] [--json FILE]
"""
import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch

import foldmerge
from foldmerge.api import merge_sample
from foldmerge.bench.mlp import get_sources
from foldmerge.calibrate import calibrate_routing
from foldmerge.evaluation import SourceHeads, evaluate
from foldmerge.provenance import environment

TASKS = ("fmnist:0,2,4,6,8", "fmnist:1,3,5,7,9")


@torch.no_grad()
def top_logits(model, tasks):
    """Mean top logit of every head on every task's test images: [task][head]."""
    model.eval()
    return [[round(l.max(1).values.mean().item(), 2) for l in model(t.split("test")[0][:2000])] for t in tasks]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/bench", help="the benches' source cache")
    p.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    args = p.parse_args()
    start = time.perf_counter()
    rows = []
    sources = get_sources("fmnist", [128, 128], 0, Path(args.out), tasks=TASKS)
    tasks = [t for s in sources for t in s.tasks]
    data = merge_sample(sources, 64, 0)
    side = SourceHeads(sources)
    r = evaluate(side)
    print(f"sources' heads side by side: per-task {r['per_task_mean']:.2f}, joint {r['joint_mean']:.2f}")
    print(f"  mean top logit [task][head]: {top_logits(side, tasks)}")
    rows.append({"merge": "sources' heads side by side", "per_task": r["per_task_mean"], "joint": r["joint_mean"],
                 "top_logits": top_logits(side, tasks)})
    print(f"{'merge':28s} {'per-task':>8s} {'joint':>7s} {'+temp.':>7s} {'+affine':>8s} {'+routing':>9s}")
    for name, method, opts in [("regmean", "regmean", {}), ("zipit", "zipit", {}), ("distill", "distill", {}),
                               ("fs-merge", "fs-merge", {}),
                               ("fs-merge, target-scale none", "fs-merge", {"target_scale": "none"})]:
        merged = foldmerge.merge(sources, data, method=method, calibrate="none", **opts)
        raw = evaluate(merged)
        cells = []
        for kind in ("temperature", "affine", "routing"):
            m = copy.deepcopy(merged)
            calibrate_routing(m, data, [0, 1], kind=kind)
            cells.append(evaluate(m)["joint_mean"])
        print(f"{name:28s} {raw['per_task_mean']:8.2f} {raw['joint_mean']:7.2f} " +
              " ".join(f"{c:8.2f}" for c in cells))
        rows.append({"merge": name, "per_task": raw["per_task_mean"], "joint": raw["joint_mean"],
                     "joint_temperature": cells[0], "joint_affine": cells[1], "joint_routing": cells[2],
                     **({"top_logits": top_logits(merged, tasks)} if name == "fs-merge" else {})})
        if name == "fs-merge":
            print(f"  fs-merge mean top logit [task][head]: {top_logits(merged, tasks)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "example": "joint_diagnosis", "tasks": list(TASKS), "hidden": [128, 128], "per_task_images": 64,
            "seed": 0, "rows": rows, "command": "python " + " ".join(sys.argv), "environment": environment(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "total_seconds": time.perf_counter() - start}, indent=1) + "\n")


if __name__ == "__main__":
    main()
