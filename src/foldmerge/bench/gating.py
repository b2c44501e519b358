"""`foldmerge bench gating`: merging ViTs fine-tuned from one pre-trained start (Ye et al.,
"Merging Vision Transformers from Different Tasks and Domains"; its Tables 2-4, 6, 8, 9, Fig. 3).

Sources: one ViT (width 64, depth 6, 4 heads; 6 blocks so that the paper's m in {0, 1, 3, 5}
leaves one block ungated) pre-trained from seed 0 on the union of mnist/transpose and
fmnist/transpose (20 classes, 3 epochs), then fine-tuned for 1 epoch (AdamW lr 3e-4) on each of
12 tasks: MNIST and Fashion-MNIST, clean and under the views rot90, invert, rot180, rot270,
noise (`TASKS`). Merges of the first 3, 6 and all 12. Every merge reads 256 unlabeled training
images per task (the gate trains on them, RegMean's Grams come from them).

Rows (Tables 3-4): individual models; AvgMean; RegMean; task arithmetic with λ chosen on the
tasks' validation splits from the paper's {0.25, 0.5, 0.75, 1}; TIES (density 0.2, λ from
{0.5, 1} on validation); the gating merge on AvgMean and on RegMean with m in {0, 1, 3, 5};
FS-Merge (`average` init) and distillation (`average` init) on the 3-model set. Accuracy: per
task, on its test split; baselines use the task's own head (the paper's "manually selected"
classifier), the gating merge the head its gate picks (a wrong pick counts wrong). Parameters
in millions (what the merged model stores, heads included); MFLOPs of one forward of one
image as we compute it (a gated layer runs its N source layers, `flop_counter`).

Also: the weight similarity (eq. 4) of every attention and MLP module for 3, 6 and 12 models
(Fig. 3); Table 2's four strategies and Table 9's four similarity strategies (12 models,
RegMean, m = 3); Table 8's gate ablation (width 8 and 32, from scratch or with a trunk
pre-trained on fmnist/flip's labels); the domain table (Table 6: MNIST under clean / rot90 /
invert / flip / noise, leave one domain out, the merged model scored on the unseen domain:
baselines average their heads' logits (all heads share the classes), the gating merge uses its
gate's pick); and, once, sources trained from *different* seeds without pre-training (the
paper's stated limitation, beside FS-Merge from `first`).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from ..api import merge_sample
from ..data import Task
from ..evaluation import evaluate, originals
from ..gated import GateNet
from ..methods import average, distill, fs_merge, gating, regmean, task_arithmetic, ties
from ..progress import status
from ..similarity import STRATEGIES, similarities
from ..sources import fine_tune, pretrain_union, source_dirname, train_staged_source
from ..train import TrainConfig, fit
from . import cached_model, image_mflops

VIT = {"image_size": 28, "channels": 1, "patch": 7, "width": 64, "depth": 6, "heads": 4, "mlp_dim": 128,
       "out_dim": 64}
PRETRAIN = ("mnist/transpose", "fmnist/transpose")
TASKS = ["mnist", "fmnist", "mnist/rot90", "fmnist/rot90", "mnist/invert", "fmnist/invert",
         "mnist/rot180", "fmnist/rot180", "mnist/rot270", "fmnist/rot270", "mnist/noise", "fmnist/noise"]
SIZES = (3, 6, 12)
DOMAINS = ["mnist", "mnist/rot90", "mnist/invert", "mnist/flip", "mnist/noise"]
MS = (0, 1, 3, 5)
PER_TASK = 256
TA_GRID = (0.25, 0.5, 0.75, 1.0)
TIES_GRID = (0.5, 1.0)
TABLES = ("main", "similarity", "strategies", "gate", "domain", "scratch")


# ----------------------------------------------------------------------------- sources
def _cached(path: Path, make):
    return cached_model(path, make, "foldmerge bench gating (source)")


def get_base(cache: Path, config: dict = VIT):
    return _cached(cache / "gating" / "base", lambda: pretrain_union("vit", config, PRETRAIN, seed=0))


def get_sources(tasks, cache: Path, base) -> list:
    return [_cached(cache / "gating" / "fine-tuned" / source_dirname(Task.parse(t), 0),
                    lambda t=t: fine_tune(base, t, seed=0)) for t in tasks]


def get_scratch_sources(tasks, cache: Path, config: dict = VIT) -> list:
    """Differently initialized: each source from its own seed, trained on its task alone (2 epochs)."""
    return [_cached(cache / "gating" / "scratch" / source_dirname(Task.parse(t), 10 + k),
                    lambda t=t, k=k: train_staged_source("vit", t, config, 10 + k, None, 0, 2, 1e-3, 64, 0.01, None,
                                                         head="class-embedding"))
            for k, t in enumerate(tasks)]


# ----------------------------------------------------------------------------- scoring
def scores(model, routed: bool, split: str = "test") -> dict:
    """Per-task accuracy: with the task's own head, or (routed) with the head the model picks."""
    r = evaluate(model, split=split)
    return r["routed"] if routed else r["per_task"]


def _row(name: str, n: int, per_task: dict, model, seconds: float | None, **extra) -> dict:
    return {"set": n, "method": name, "per_task": per_task, "mean": sum(per_task.values()) / len(per_task),
            "params_m": model.num_parameters() / 1e6 if model is not None else None,
            "mflops": None if model is None else model.meta.get("mflops_per_input") or image_mflops(model),
            "seconds": seconds, **extra}


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _on_validation(make, grid):
    """(best merge, its value, validation means) for `make(value)` over `grid`."""
    best, best_v, means = None, None, {}
    for v in grid:
        m = make(v)
        means[v] = sum(scores(m, False, "val").values()) / len(m.tasks)
        if best is None or means[v] > means[best_v]:
            best, best_v = m, v
    return best, best_v, means


def main_rows(n: int, sources, base, data, status) -> list[dict]:
    rows = []
    per = originals(sources)["per_task"]
    single = sources[0].num_parameters() / 1e6
    rows.append({"set": n, "method": "individual", "per_task": per, "mean": sum(per.values()) / len(per),
                 "params_m": single * n, "mflops": image_mflops(sources[0]), "seconds": None})
    avg, s = _timed(average.merge, sources)
    rows.append(_row("AvgMean", n, scores(avg, False), avg, s))
    reg, s = _timed(regmean.merge, sources, data)
    rows.append(_row("RegMean", n, scores(reg, False), reg, s))
    (ta, lam, means), s = _timed(_on_validation, lambda v: task_arithmetic.merge(sources, base=base, lam=v), TA_GRID)
    rows.append(_row("task arithmetic", n, scores(ta, False), ta, s, lam=lam, validation=means))
    (ti, lam, means), s = _timed(_on_validation, lambda v: ties.merge(sources, base=base, lam=v), TIES_GRID)
    rows.append(_row("TIES", n, scores(ti, False), ti, s, lam=lam, density=ti.meta["density"], validation=means))
    for b in ("average", "regmean"):
        for m in MS:
            g, s = _timed(gating.merge, sources, data, m=m, rest=b)
            rows.append(_row(f"ours + {'AvgMean' if b == 'average' else 'RegMean'} m={m}", n, scores(g, True), g, s,
                             gate_accuracy=g.meta["gate"]["train_accuracy"], gated_modules=g.meta["gated_modules"]))
            status(f"  {rows[-1]['method']}: {rows[-1]['mean']:.2f} ({s:.0f} s)")
    for r in rows[:5]:
        status(f"  {r['method']}: {r['mean']:.2f}")
    return rows


def trained_rows(n: int, sources, data) -> list[dict]:
    rows = []
    for name, fn in (("FS-Merge (average init)", fs_merge.merge), ("distillation (average init)", distill.merge)):
        mdl, s = _timed(fn, sources, data, init="average")
        rows.append(_row(name, n, scores(mdl, False), mdl, s,
                         learnable_parameters=mdl.meta.get("learnable_parameters")))
    return rows


def similarity_rows(n: int, sources) -> dict:
    pairs = n * (n - 1) / 2         # eq. 4 sums pairs; divided, it is the mean cosine, comparable across n
    return {kind: {name: sim / pairs for name, _, sim in similarities(sources, kind)} for kind in ("attention", "mlp")}


def strategy_rows(sources, data) -> list[dict]:
    """Table 2 (12 models): where the gate acts, and Table 9: how similarity is computed (m = 3)."""
    n, rows = len(sources), []
    reg = regmean.merge(sources, data)
    rows.append(_row("RegMean; AvgMean emb/norm; manual head", n, scores(reg, False), reg, None, table=2))
    g0 = gating.merge(sources, data, m=0, rest="regmean")
    per = {}
    for k, t in enumerate(g0.tasks):          # emb/norm of the input's own source: an oracle gate
        g0.fixed_route = k
        per[t.name] = _one_task(g0, t)
    g0.fixed_route = None
    rows.append(_row("RegMean; emb/norm of the task's model; manual head", n, per, g0, None, table=2))
    rows.append(_row("RegMean; gated emb/norm; gate head (m=0)", n, scores(g0, True), g0, None, table=2))
    for strategy in STRATEGIES:
        g, s = _timed(gating.merge, sources, data, m=3, rest="regmean", strategy=strategy)
        rows.append(_row(f"RegMean + gating m=3, similarity {strategy}", n, scores(g, True), g, s, table=9,
                         gated_modules=g.meta["gated_modules"]))
    return rows


def _one_task(model, task) -> float:
    return evaluate(model, [task])["per_task"][task.name]


def gate_rows(sources, data, cache: Path) -> list[dict]:
    """Table 8: the gate's size and start (12 models, RegMean, m = 3)."""
    rows = []
    for width in (8, 32):
        for pre in (False, True):
            start = pretrained_trunk(width, cache) if pre else None
            g, s = _timed(gating.merge, sources, data, m=3, rest="regmean", gate_width=width, gate_start=start)
            rows.append(_row(f"gate width {width}, {'pre-trained trunk' if pre else 'from scratch'}", len(sources),
                             scores(g, True), g, s, gate_accuracy=g.meta["gate"]["train_accuracy"]))
    return rows


def pretrained_trunk(width: int, cache: Path) -> dict:
    """A gate trunk pre-trained on another task's labels (fmnist/flip, 1 epoch), cached."""
    path = cache / "gating" / f"gate-trunk-w{width}.safetensors"
    if path.is_file():
        return load_file(str(path))
    task = Task.parse("fmnist/flip")
    x, y = task.split("train")
    torch.manual_seed(0)
    net = GateNet(task.num_classes, width=width)
    fit(list(net.parameters()), lambda xb, yb: F.cross_entropy(net(xb), yb), (x, y),
        TrainConfig.adamw(1, 3e-3, 64), desc=f"pre-train a gate trunk (width {width}) on {task}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in net.trunk.state_dict().items()}
    save_file(state, str(path))
    return state


class HeadAverage(torch.nn.Module):
    """A merged model scored on an unseen domain: every head shares the classes, so their logits
    are averaged (no head is the unseen domain's); answers as one extra 'task'."""

    def __init__(self, model, task):
        super().__init__()
        self.model, self.tasks = model, [task]

    def forward(self, x):
        return [torch.stack(self.model(x)).mean(0)]


class GateChosen(torch.nn.Module):
    def __init__(self, model, task):
        super().__init__()
        self.model, self.tasks = model, [task]

    def forward(self, x):
        logits, pick = torch.stack(self.model(x)), self.model.route(x)
        return [logits[pick, torch.arange(len(x))]]


def domain_rows(cache: Path, base, status) -> list[dict]:
    """Table 6: leave one domain out; merge the other four, score on the held-out domain."""
    sources = get_sources(DOMAINS, cache, base)
    rows = []
    for held in range(len(DOMAINS)):
        target = Task.parse(DOMAINS[held])
        src = [s for k, s in enumerate(sources) if k != held]
        data = merge_sample(src, PER_TASK, seed=0)

        def on_target(model, gated=False):
            return evaluate((GateChosen if gated else HeadAverage)(model, target))["per_task"][target.name]
        indiv = [on_target(s) for s in src]
        rows.append({"target": target.name, "method": "individual (mean of sources)", "accuracy": sum(indiv) / len(indiv)})
        rows.append({"target": target.name, "method": "AvgMean", "accuracy": on_target(average.merge(src))})
        rows.append({"target": target.name, "method": "RegMean", "accuracy": on_target(regmean.merge(src, data))})
        rows.append({"target": target.name, "method": "task arithmetic λ=0.5",
                     "accuracy": on_target(task_arithmetic.merge(src, base=base, lam=0.5))})
        for b in ("average", "regmean"):
            for m in (0, 3):
                g = gating.merge(src, data, m=m, rest=b)
                rows.append({"target": target.name, "method": f"ours + {'AvgMean' if b == 'average' else 'RegMean'} m={m}",
                             "accuracy": on_target(g, gated=True)})
        status(f"  domain {target.name} held out: done")
    return rows


def scratch_rows(cache: Path, status) -> list[dict]:
    """The limitation: sources from different seeds, no common start (3 tasks)."""
    src = get_scratch_sources(TASKS[:3], cache)
    data = merge_sample(src, PER_TASK, seed=0)
    per = originals(src)["per_task"]
    rows = [{"set": 3, "method": "individual", "per_task": per, "mean": sum(per.values()) / len(per)}]
    for name, make, routed in (("AvgMean", lambda: average.merge(src), False),
                               ("RegMean", lambda: regmean.merge(src, data), False),
                               ("ours + RegMean m=3", lambda: gating.merge(src, data, m=3, rest="regmean"), True),
                               ("FS-Merge (first init)", lambda: fs_merge.merge(src, data, init="first"), False)):
        mdl, s = _timed(make)
        rows.append(_row(name, 3, scores(mdl, routed), mdl, s))
        status(f"  scratch {name}: {rows[-1]['mean']:.2f}")
    return rows


def run_bench(tables=TABLES, sizes=SIZES, out: str = "runs/bench") -> dict:
    bad = [t for t in tables if t not in TABLES]
    if bad:
        raise ValueError(f"unknown table {bad[0]!r}; choose from {', '.join(TABLES)}")
    if any(n not in SIZES for n in sizes):
        raise ValueError(f"--sizes must be among {SIZES}")
    cache, t0 = Path(out), time.perf_counter()
    base = get_base(cache)
    result = {"bench": "gating", "tasks": TASKS, "pretrain": list(PRETRAIN), "vit": VIT, "per_task_images": PER_TASK,
              "main": [], "similarity": {}, "strategies": [], "gate": [], "domain": [], "scratch": []}
    need = sorted(set(sizes) | ({12} if {"strategies", "gate"} & set(tables) else set()))
    sources_all = get_sources(TASKS[:max(need)], cache, base)
    for n in need:
        src = sources_all[:n]
        data = merge_sample(src, PER_TASK, seed=0)
        if "similarity" in tables and n in sizes:
            result["similarity"][str(n)] = similarity_rows(n, src)
        if "main" in tables and n in sizes:
            status(f"{n} models: {', '.join(TASKS[:n])}")
            result["main"] += main_rows(n, src, base, data, status)
            if n == 3:
                result["main"] += trained_rows(n, src, data)
        if n == 12 and "strategies" in tables:
            status("Tables 2 and 9: strategies (12 models)")
            result["strategies"] = strategy_rows(src, data)
        if n == 12 and "gate" in tables:
            status("Table 8: the gate (12 models)")
            result["gate"] = gate_rows(src, data, cache)
    if "domain" in tables:
        status("Table 6: domains (leave one out)")
        result["domain"] = domain_rows(cache, base, status)
    if "scratch" in tables:
        status("different initializations (3 models)")
        result["scratch"] = scratch_rows(cache, status)
    result["sources"] = {s.tasks[0].name: s.meta.get("test_accuracy") for s in sources_all}
    result["total_seconds"] = time.perf_counter() - t0
    return result


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(140, Console().width))
    for n in sorted({r["set"] for r in result["main"]}):
        rows = [r for r in result["main"] if r["set"] == n]
        tasks = list(rows[0]["per_task"])
        t = Table(title=f"{n} models fine-tuned from one start: per-task accuracy % (test)")
        for c in ["method", "params (M)", "MFLOPs"] + tasks + ["avg"]:
            t.add_column(c, justify="left" if c == "method" else "right")
        for r in rows:
            t.add_row(r["method"], f"{r['params_m']:.2f}", f"{r['mflops']:.1f}",
                      *[f"{r['per_task'][k]:.1f}" for k in tasks], f"{r['mean']:.2f}")
        console.print(t)
    if result["similarity"]:
        t = Table(title="weight similarity (eq. 4 / pairs: mean cosine) per module")
        t.add_column("models")
        sims = result["similarity"]
        first = next(iter(sims.values()))
        cols = [(k, m) for k in ("attention", "mlp") for m in first[k]]
        for k, m in cols:
            t.add_column(m.replace("blocks.", "b"), justify="right")
        for n, s in sims.items():
            t.add_row(n, *[f"{s[k][m]:.4f}" for k, m in cols])
        console.print(t)
    for key, title in (("strategies", "Tables 2 and 9 (12 models)"), ("gate", "Table 8: the gate (12 models, RegMean, m=3)"),
                       ("scratch", "different initializations (3 models)")):
        if result[key]:
            t = Table(title=title)
            for c in ("method", "params (M)", "avg"):
                t.add_column(c)
            for r in result[key]:
                t.add_row(r["method"], "-" if r.get("params_m") is None else f"{r['params_m']:.2f}", f"{r['mean']:.2f}")
            console.print(t)
    if result["domain"]:
        targets = list(dict.fromkeys(r["target"] for r in result["domain"]))
        t = Table(title="Table 6: leave one domain out (accuracy % on the unseen domain)")
        for c in ["method"] + [f"-> {x}" for x in targets] + ["avg"]:
            t.add_column(c)
        for name in dict.fromkeys(r["method"] for r in result["domain"]):
            vals = [next(r["accuracy"] for r in result["domain"] if r["method"] == name and r["target"] == x)
                    for x in targets]
            t.add_row(name, *[f"{v:.1f}" for v in vals], f"{sum(vals) / len(vals):.2f}")
        console.print(t)
    console.print(f"measured now: seed 0; {result['total_seconds'] / 60:.1f} min; command: {command}")
