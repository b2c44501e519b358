"""`foldmerge bench vit`: merging ViTs from different initializations and tasks (FS-Merge paper 3.2).

Sources: for pair p, two ViTs "pre-trained" from seeds 2p and 2p + 1 on PRETRAIN_TASK, each
then fine-tuned on its own downstream task (`train_vit_source`), with frozen class-embedding
heads; cached under OUT/sources. Merge data: `originals` unlabeled training images per task
expanded by augmentation to `augmented` more (paper E.2, settings a and b of Table 8).
Every method runs on the same data; the table gives per-task and joint test accuracy per
pair and their mean, the number of learnable parameters and the wall time of each method.

Hyperparameters are the bold values of appendix E.2 for setting (a) where we could read them
(AdamW, batch 128, weight decay 0.001, `first` init; FS-Merge diag 200 epochs lr 1e-3;
diag+low-rank(12) 200 epochs lr 1e-4; distillation 100 epochs lr 1e-4; RegMean α 0.9; Opt
window 8, λ 0.08) — not yet re-chosen on validation at this scale (issue 4 is open).
"""
from __future__ import annotations

import time
from pathlib import Path

SETTINGS = {"pairs16": (16, 800), "pairs100": (100, 1000)}
PRETRAIN_TASK = "mnist/transpose"
PAIRS = [("mnist:0-4", "fmnist:5-9"), ("fmnist:0-4", "mnist/rot90:5-9"), ("mnist/invert:0-4", "fmnist/flip:0-4")]
VIT = {"image_size": 28, "channels": 1, "patch": 7, "width": 64, "depth": 4, "heads": 4, "mlp_dim": 128,
       "out_dim": 64}
SMALL_VIT = {**VIT, "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64, "out_dim": 32}


def method_plan(epochs_scale: float = 1.0) -> list[tuple[str, str, dict]]:
    def ep(n):
        return max(1, int(round(n * epochs_scale)))

    train = {"optimizer": "adamw", "batch_size": 128, "weight_decay": 0.001, "target_scale": "none"}
    return [
        ("average", "average", {}),
        ("slerp", "slerp", {}),
        ("regmean", "regmean", {"alpha": 0.9}),
        ("opt", "opt", {"filter": "window-8", "reg": 0.08}),
        ("distill", "distill", {"init": "first", "epochs": ep(100), "lr": 1e-4, **train}),
        ("fs-merge diag", "fs-merge", {"variant": "global", "init": "first", "param": "diag", "epochs": ep(200),
                                       "lr": 1e-3, **train}),
        ("fs-merge diag+lowrank(12)", "fs-merge", {"variant": "global", "init": "first", "param": "diag+lowrank(12)",
                                                   "epochs": ep(200), "lr": 1e-4, **train}),
    ]


def get_sources(pair: int, config: dict, cache: Path, limit: int | None, epochs: tuple[int, int]) -> list:
    from ..api import load
    from ..sources import source_dirname, train_vit_source
    from ..data import Task
    tag = f"w{config['width']}d{config['depth']}" + (f"-limit{limit}" if limit else "")
    models = []
    for k, task in enumerate(PAIRS[pair]):
        seed = 2 * pair + k
        path = cache / "sources" / "vit" / tag / source_dirname(Task.parse(task), seed)
        if (path / "config.json").is_file():
            models.append(load(path))
            continue
        m = train_vit_source(task, config, seed, pretrain_task=PRETRAIN_TASK, pretrain_epochs=epochs[0],
                             epochs=epochs[1], limit=limit)
        m.meta["command"] = "foldmerge bench vit (source)"
        m.save(path)
        models.append(m)
    return models


def run_bench(setting: str = "pairs16", pairs: int = 3, out: str = "runs/bench", small: bool = False,
              limit: int | None = None, epochs_scale: float = 1.0, methods: list[str] | None = None,
              source_epochs: tuple[int, int] = (3, 2), seed: int = 0) -> dict:
    from ..api import merge, merge_sample
    from ..evaluation import Ensemble, evaluate, originals, random_guess
    from ..progress import status
    if setting not in SETTINGS:
        raise ValueError(f"--setting must be one of {', '.join(SETTINGS)} (groups4/groups8 come with FS-Merge seq.)")
    if not 1 <= pairs <= len(PAIRS):
        raise ValueError(f"--pairs must lie in 1…{len(PAIRS)}")
    plan = method_plan(epochs_scale)
    known = {n for n, _, _ in plan} | {m for _, m, _ in plan}
    bad = [m for m in (methods or []) if m not in known]
    if bad:
        raise ValueError(f"unknown bench method {bad[0]!r}; choose from {', '.join(sorted(known))}")
    n_orig, n_aug = SETTINGS[setting]
    config = SMALL_VIT if small else VIT
    cache = Path(out)
    t0 = time.perf_counter()
    rows = []
    for p in range(pairs):
        status(f"pair {p + 1}/{pairs}: {' + '.join(PAIRS[p])}")
        sources = get_sources(p, config, cache, limit, source_epochs)
        tasks = [t for s in sources for t in s.tasks]
        base = {"pair": p, "tasks": [t.name for t in tasks]}
        rows.append({**base, "method": "random guess", **_scores(random_guess(tasks))})
        rows.append({**base, "method": "originals", **_scores(originals(sources))})
        rows.append({**base, "method": "ensemble", **_scores(evaluate(Ensemble(sources)))})
        data = merge_sample(sources, n_orig, seed, augment=n_aug)
        for name, method, opts in plan:
            if methods and name not in methods and method not in methods:
                continue
            status(f"  {name}")
            merged = merge(sources, data, method=method, seed=seed, **opts)
            rows.append({**base, "method": name, **_scores(evaluate(merged)), "seconds": merged.meta["wall_seconds"],
                         "learnable_parameters": merged.meta.get("learnable_parameters"), "options": opts})
    return {"bench": "vit", "setting": setting, "originals_per_task": n_orig, "augmented_per_task": n_aug,
            "vit": config, "pretrain_task": PRETRAIN_TASK, "pairs": [list(PAIRS[p]) for p in range(pairs)],
            "seed": seed, "epochs_scale": epochs_scale, "limit": limit, "rows": rows,
            "total_seconds": time.perf_counter() - t0}


def _scores(result: dict) -> dict:
    return {"per_task": result["per_task_mean"], "joint": result.get("joint_mean")}


def print_report(result: dict, command: str) -> None:
    import sys
    from rich.console import Console
    from rich.table import Table
    console = Console(file=sys.stdout, width=max(120, Console().width))
    pairs = len(result["pairs"])
    names = list(dict.fromkeys(r["method"] for r in result["rows"]))
    table = Table(title=f"ViT {result['setting']}: {result['originals_per_task']} originals + "
                        f"{result['augmented_per_task']} augmented images per task; per-task / joint accuracy % (test)")
    table.add_column("method")
    for p in range(pairs):
        table.add_column(" + ".join(result["pairs"][p]), justify="right")
    for col in ("mean", "learnable params", "seconds (mean)"):
        table.add_column(col, justify="right")
    for name in names:
        sel = [r for r in result["rows"] if r["method"] == name]
        cells = []
        for p in range(pairs):
            r = next((r for r in sel if r["pair"] == p), None)
            cells.append("-" if r is None else f"{r['per_task']:.1f} / " + (f"{r['joint']:.1f}" if r["joint"] is not None else "-"))
        pt = sum(r["per_task"] for r in sel) / len(sel)
        js = [r["joint"] for r in sel if r["joint"] is not None]
        mean = f"{pt:.1f} / " + (f"{sum(js) / len(js):.1f}" if js else "-")
        lp = sel[0].get("learnable_parameters")
        secs = [r["seconds"] for r in sel if r.get("seconds") is not None]
        table.add_row(name, *cells, mean, "-" if lp is None else f"{lp:,}",
                      "-" if not secs else f"{sum(secs) / len(secs):.0f}")
    console.print(table)
    console.print(f"measured now: seed {result['seed']}, ViT {result['vit']}, pre-trained on {result['pretrain_task']}; "
                  f"{result['total_seconds'] / 60:.1f} min; command: {command}")
