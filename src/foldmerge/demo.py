"""The demo: two MLPs on MNIST 0–4 and 5–9 (seeds 0 and 1), merged from 64 unlabeled
images per task with FS-Merge local and global, beside originals, ensemble, weight
averaging and the random-guess level (the setting of the FS-Merge paper's Table 2,
one hidden layer of width 128)."""
from __future__ import annotations

import time
from pathlib import Path

from .api import merge, merge_sample
from .evaluation import Ensemble, evaluate, originals, random_guess
from .progress import status
from .sources import source_dirname, train_source
from .tables import result_row

TASKS = ("mnist:0-4", "mnist:5-9")


def run_demo(seed: int = 0, per_task: int = 64, hidden: tuple[int, ...] = (128,),
             out: str | None = None) -> dict:
    rows = []
    t0 = time.perf_counter()
    sources = []
    for k, task in enumerate(TASKS):
        status(f"training source {k + 1}/{len(TASKS)}: {task}, seed {seed + k}")
        start = time.perf_counter()
        sources.append(train_source(task, list(hidden), seed=seed + k))
        sources[-1].meta["train_seconds"] = time.perf_counter() - start
    if out:
        for s in sources:
            s.save(Path(out) / "sources" / source_dirname(s.tasks[0], s.meta["seed"]))
    tasks = [t for s in sources for t in s.tasks]
    rows.append(result_row("random guess", random_guess(tasks)))
    rows.append(result_row("original models", originals(sources),
                           sum(s.meta["train_seconds"] for s in sources)))
    rows.append(result_row("ensemble (reference)", evaluate(Ensemble(sources))))
    data = merge_sample(sources, per_task, seed)
    runs = [("average", "average", {}),
            ("FS-Merge local", "fs-merge", {"variant": "local"}),
            ("FS-Merge global", "fs-merge", {"variant": "global"})]
    for label, method, opts in runs:
        status(f"merging: {label}")
        merged = merge(sources, data, method=method, seed=seed, **opts)
        rows.append(result_row(label, evaluate(merged), merged.meta["wall_seconds"]))
        if out:
            merged.save(Path(out) / label.lower().replace(" ", "-"))
    return {"setting": {"tasks": list(TASKS), "hidden": list(hidden), "per_task_images": per_task,
                        "seed": seed, "source_seeds": [seed, seed + 1]},
            "rows": rows, "total_seconds": time.perf_counter() - t0}
