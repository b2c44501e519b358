"""How much ridge CCA Merge needs: its `reg` (added to each covariance, relative to the mean
eigenvalue) swept on MLP pairs, in CCA Merge's own setting (two models of one task from different
seeds) and in ours (two models of disjoint tasks).

Settings: two MLPs (width 128, depth 2) of all ten MNIST classes from seeds 0 and 1 (bench
same-task's sources), and the pairs of bench mlp / defaults (seeds 0 and 1): MNIST 0-4 / 5-9 at
depths 2 and 4, Fashion-MNIST even / odd classes at depth 2. Merge data: 256 (one task) or 64
(disjoint) unlabeled training images per task; validation per-task accuracy (%) of each merge,
beside weight averaging's. The ridge keeps the whitening of directions a ReLU layer barely uses
(dead or nearly dead units) from amplifying noise.

    python examples/cca_ridge.py [--out runs/bench] [--json FILE]
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import foldmerge
from foldmerge.api import merge_sample
from foldmerge.bench import same_task
from foldmerge.bench.mlp import get_sources
from foldmerge.evaluation import evaluate
from foldmerge.provenance import environment

RIDGES = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/bench", help="the benches' source cache")
    p.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    args = p.parse_args()
    start, cache, rows = time.perf_counter(), Path(args.out), []
    settings = [("one task: MNIST 0-9, depth 2", [same_task.get_source("mlp", "mnist", k, cache) for k in (0, 1)],
                 256),
                ("MNIST 0-4 / 5-9, depth 2", get_sources("mnist", [128, 128], 0, cache), 64),
                ("MNIST 0-4 / 5-9, depth 4", get_sources("mnist", [128] * 4, 0, cache), 64),
                ("Fashion-MNIST even / odd, depth 2",
                 get_sources("fmnist", [128, 128], 0, cache, tasks=("fmnist:0,2,4,6,8", "fmnist:1,3,5,7,9")), 64)]
    print(f"{'setting':36s} " + " ".join(f"{r:>7g}" for r in RIDGES) + f" {'W.Avg':>7s}")
    for name, sources, per_task in settings:
        data = merge_sample(sources, per_task, 0)
        accs = [evaluate(foldmerge.merge(sources, data, method="cca", reg=r, fidelity=0), split="val")
                ["per_task_mean"] for r in RIDGES]
        avg = evaluate(foldmerge.merge(sources, data, method="average", fidelity=0), split="val")["per_task_mean"]
        print(f"{name:36s} " + " ".join(f"{a:7.2f}" for a in accs) + f" {avg:7.2f}", flush=True)
        rows.append({"setting": name, "per_task_images": per_task, "val_per_task": dict(zip(map(str, RIDGES), accs)),
                     "average_val_per_task": avg})
    if args.json:
        Path(args.json).write_text(json.dumps({
            "example": "cca_ridge", "ridges": list(RIDGES), "seed": 0, "rows": rows,
            "command": "python " + " ".join(sys.argv), "environment": environment(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "total_seconds": time.perf_counter() - start}, indent=1) + "\n")


if __name__ == "__main__":
    main()
