"""`foldmerge bench cost`: what FS-Merge costs next to distillation (FS-Merge paper, appendix C, Table 6).

For n = 2, 4 and 8 ViTs (the bench's tiny ViT, random weights: cost does not depend on what
the weights learned), every method trains on the same merge sample (`per_task` random images
per model), the same cached teacher features (computed before the clock starts), the same
epochs, batch size and optimizer:

  distill             one student ViT, every weight learned (`first` init)
  fs-merge folded     global FS-Merge, diag+low-rank maps, trained in folded form (the default)
  fs-merge supernet   the same, trained in SuperNet form (all n models run every step)
  fs-merge seq        FS-Merge seq. (n - 1 two-model stages), folded form, on the ViT bench's
                      schedule: the last stage `epochs` long, earlier ones a quarter of that

Each run is a fresh process (one after another, so they never share cores). Time: wall time
of the whole merge. With --same-process the timed runs of one n share one process instead,
methods alternating after an untimed run of each (`measure_alternating`): on a shared
machine whose speed drifts by tens of percent over minutes, run i of every method then meets
it in the same state, and the run-by-run ratios scatter less. With --steps R the time is that of
the training steps alone (`measure_steps`): in one process per n, each method's real training step
(its `fit` loss, backward and optimizer step, through `train.train_step`) runs in blocks of 4,
the methods alternating block by block for R rounds, which follows a drifting machine more
closely than whole runs (FS-Merge seq.: the step of its last stage). Memory: peak above the
process's level just before the merge (CUDA: peak allocated bytes; CPU: peak resident set
size sampled every millisecond). On the CPU the memory comes from separate runs in which
glibc maps every block over 16 KiB on its own and returns freed memory at once, so that the
resident set follows the live tensors rather than the allocator's caches; that slows every
step, so those runs are not timed, and they train one epoch (the peak is reached within the
first steps of each stage; every step after repeats the same allocations). Ratios are to distillation with the same n.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from functools import partial
from multiprocessing import get_context
from types import SimpleNamespace

import torch
from rich.console import Console
from rich.table import Table

from .. import api, train
from .. import context as context_module
from .. import methods as methods_module
from ..api import merge
from ..io import release_freed_memory
from ..methods.common import cat_with_owner
from ..model import TaskModel
from ..progress import bar, status
from .vit import (  # the ViT bench's model, task names (heads only: data are random), seq. schedule
    TASKS,
    VIT,
    seq_epochs,
)

TRAIN = {"optimizer": "adamw", "batch_size": 128, "weight_decay": 0.001, "lr": 1e-4}
FS = {"param": "diag+lowrank(12)", "init": "first", "target_scale": "none"}
STEP_BLOCK = 4     # --steps: consecutive steps of one method between turns
METHODS = {
    "distill": ("distill", {"init": "first"}),
    "fs-merge folded": ("fs-merge", {"variant": "global", "form": "folded", **FS}),
    "fs-merge supernet": ("fs-merge", {"variant": "global", "form": "supernet", **FS}),
    "fs-merge seq": ("fs-merge", {"variant": "seq", "form": "folded", **FS}),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def private_bytes() -> int:
    """The process's private resident memory (RssAnon): what it owns, without the pages of mapped files."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, else sampled RSS (`private`: sampled
    private memory, `private_bytes`, for a merge whose sources are memory-mapped files), with freed
    memory given back to the system first (`release_freed_memory`), so that in a long process the peak
    is what the block inside allocates, not what it found free."""

    def __init__(self, device: str, private: bool = False):
        self.cuda = device.startswith("cuda")
        self._bytes = private_bytes if private else _rss_bytes

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        release_freed_memory()
        self.base = self.peak = self._bytes()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.001):
                self.peak = max(self.peak, self._bytes())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._bytes())
            self.bytes = self.peak - self.base


def vit_config(width: int = 64, patch: int = 7) -> dict:
    """The bench ViT at another width (heads of 16) or patch size (more tokens per image)."""
    if width % 16 or width < 16:
        raise ValueError(f"--width must be a positive multiple of 16 (heads of 16), got {width}")
    if patch < 1 or 28 % patch:
        raise ValueError(f"--patch must divide 28, got {patch}")
    return {**VIT, "width": width, "heads": width // 16, "mlp_dim": 2 * width, "patch": patch}


def measure(n: int, method: str, per_task: int, epochs: int, device: str, threads: int | None,
            precision: str = "32-true", vit: dict | None = None, memory: bool = True) -> dict:
    """One run, meant for a fresh process: seconds and peak bytes of one merge.

    memory=False on the CPU skips the RSS sampler: its thread wakes every millisecond and
    takes the interpreter lock, which slows a run of many small kernels more than one of
    few large kernels, so timed runs go without it (peak_bytes is then None).
    """
    models, data, cache = _setup(n, per_task, device, threads, vit or VIT)
    return _timed_merge(models, data, cache, method, epochs, device, precision, memory)


def measure_alternating(n: int, methods: list[str], per_task: int, epochs: int, device: str, threads: int | None,
                        precision: str = "32-true", vit: dict | None = None, repeats: int = 1) -> list[dict]:
    """Every method's timed runs in this one process, alternating (A, B, A, B, …), after one
    untimed one-epoch run of each: run i of every method then meets the machine in the same
    state, which a slow spell of a shared machine does not break as it breaks runs in
    separate processes minutes apart. Each merge still runs whole, through `merge()`."""
    models, data, cache = _setup(n, per_task, device, threads, vit or VIT)
    for m in methods:
        _timed_merge(models, data, cache, m, 1, device, precision, memory=False)
    return [_timed_merge(models, data, cache, m, epochs, device, precision, memory=False)
            for _ in range(repeats) for m in methods]


def measure_steps(n: int, methods: list[str], per_task: int, device: str, threads: int | None,
                  precision: str = "32-true", vit: dict | None = None, rounds: int = 30,
                  block: int = STEP_BLOCK, against: str | None = None) -> list[dict]:
    """Seconds per training step of every method, `rounds` rows each, measured in this process.

    Each method runs with a `Context` whose `fit` hands over what it would train (parameters,
    loss, data, config) instead of training; its step is then
    `train.train_step` on one batch of the bench's size, with the method's own optimizer. The
    methods take turns, `block` steps at a time, after two untimed blocks each, in the order
    of `methods` and the reverse by turns. `against`: the
    `src` folder of another checkout of foldmerge; its folded FS-Merge step joins the turns
    (its package loaded beside this one, the same models, data and batch), as one more row."""
    models, data, cache = _setup(n, per_task, device, threads, vit or VIT)
    steps, learnable = {}, {}

    def capture(m, pkg, pkg_models, name, opts):
        if hasattr(pkg.train, "capture_fits"):         # a checkout from before the Context
            with pkg.train.capture_fits() as fits:
                merged = pkg.api.merge(pkg_models, data, method=name, seed=0, epochs=1, **TRAIN, **opts)
        else:
            fits = []

            def record(params, loss_fn, data_, cfg, **_):
                fits.append(([p for p in params if p.requires_grad], loss_fn, list(data_), cfg))
                return []
            context = pkg.context.Context(features=cache if pkg is here else pkg.context.FeatureCache(), fit=record)
            merged = pkg.methods.get_method(name)(pkg_models, data, seed=0, context=context, epochs=1, **TRAIN,
                                                  **opts)
        params, loss_fn, args, cfg = fits[-1]
        opt = pkg.train.make_optimizer(params, cfg)
        pick = torch.randperm(len(args[0]), generator=torch.Generator().manual_seed(0))[:cfg.batch_size]
        batch = [t[pick.to(t.device)] for t in args]
        steps[m] = lambda: pkg.train.train_step(opt, params, loss_fn, batch)
        learnable[m] = merged.meta.get("learnable_parameters")

    here = SimpleNamespace(api=api, train=train, context=context_module, methods=methods_module)
    for m in methods:
        capture(m, here, models, *METHODS[m])
    if against is not None:
        other, label = load_checkout(against)
        copies = []
        for mine in models:          # the same models, as the other checkout's TaskModels
            c = other.model.TaskModel.from_config(mine.config())
            c.load_state_dict(mine.state_dict())
            copies.append(c.to(device).eval())
        methods = list(methods) + [f"fs-merge folded @ {label}"]
        capture(methods[-1], other, copies, *METHODS["fs-merge folded"])
    cuda = device.startswith("cuda")

    def timed(m: str) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(block):
            steps[m]()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / block

    rows = []
    with _autocast(device, precision):
        for _ in range(2):
            for m in methods:
                timed(m)
        for r in range(rounds):
            # A B C, then C B A: no method always runs right after the same one (a step leaves the
            # caches to the next; a fixed order biased side-by-side rows by a few percent)
            got = {m: timed(m) for m in (methods if r % 2 == 0 else methods[::-1])}
            rows += [{"n": n, "method": m, "seconds": got[m], "peak_bytes": None,
                      "learnable_parameters": learnable[m]} for m in methods]
    return rows


def load_checkout(src: str):
    """(the foldmerge package of another checkout, loaded under a name of its own, its label):
    `src` is that checkout's `src` folder (e.g. of `git worktree add /tmp/old b26666b`)."""
    pkg_dir = os.path.join(src, "foldmerge")
    if not os.path.isfile(os.path.join(pkg_dir, "__init__.py")):
        raise ValueError(f"--against {src}: no foldmerge package there (give a checkout's src folder)")
    name = "foldmerge_against_" + hashlib.sha1(os.path.abspath(src).encode()).hexdigest()[:8]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(pkg_dir, "__init__.py"),
                                                      submodule_search_locations=[pkg_dir])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    pkg = sys.modules[name]
    for sub in ("api", "train", "model"):
        importlib.import_module(f"{name}.{sub}")
    try:
        label = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        label = os.path.abspath(src)
    return pkg, label


def _setup(n: int, per_task: int, device: str, threads: int | None, vit: dict):
    """(n random ViTs, their merge sample, a FeatureCache holding their features); one-time costs paid."""
    if threads:
        torch.set_num_threads(threads)
    models = []
    for k in range(n):
        torch.manual_seed(k)
        models.append(TaskModel("vit", vit, [TASKS[k]], head="class-embedding").to(device).eval())
    g = torch.Generator().manual_seed(0)
    data = [torch.rand(per_task, 1, 28, 28, generator=g).to(device) for _ in range(n)]
    # the sources' features, as every method reads them: outside the clock
    cache = context_module.FeatureCache()
    for k in range(2, n + 1):
        x, _ = cat_with_owner(data[:k])
        for m in models[:k]:
            cache(m, x)
    _warm_up()
    return models, data, cache


def _timed_merge(models, data, cache, method: str, epochs: int, device: str, precision: str, memory: bool) -> dict:
    name, opts = METHODS[method]
    autocast = _autocast(device, precision)
    schedule = seq_epochs(epochs) if opts.get("variant") == "seq" else {"epochs": epochs}
    track = memory or device.startswith("cuda")        # CUDA's counters cost nothing
    with PeakMemory(device) if track else nullcontext() as mem, autocast:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        merged = merge(models, data, method=name, seed=0, cache=cache, **schedule, **TRAIN, **opts)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"n": len(models), "method": method, "seconds": seconds, "peak_bytes": mem.bytes if track else None,
            "learnable_parameters": merged.meta.get("learnable_parameters"),
            **({"stage_epochs": [st["epochs"] for st in merged.meta["stages"]]} if "stages" in merged.meta else {})}


def _autocast(device: str, precision: str):
    """The precision context every timed merge and step runs under (bf16-mixed: bf16 autocast)."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if precision == "bf16-mixed" else nullcontext()


def _warm_up() -> None:
    """Pay a fresh process's one-time costs before the clock: they are not the merge's. The
    method modules are imported lazily, and torch imports its compiler stack (torch._dynamo)
    when the first optimizer is built, about 1.3 s here, which every method would otherwise
    add to its time, shrinking every ratio towards 1."""
    assert methods_module.METHODS         # every method module imported
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)], foreach=True)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def run_bench(ns=(2, 4, 8), per_task: int = 1024, epochs: int = 5, device: str = "cpu",
              threads: int | None = None, methods: list[str] | None = None, precision: str = "32-true",
              repeats: int = 1, width: int = 64, patch: int = 7, same_process: bool = False,
              steps: int = 0, against: str | None = None) -> dict:
    methods = methods or list(METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown cost-bench method {bad[0]!r}; choose from {', '.join(METHODS)}")
    if any(n < 2 or n > len(TASKS) for n in ns):
        raise ValueError(f"--n values must lie in 2…{len(TASKS)}")
    if per_task < 1 or epochs < 1 or repeats < 1:
        raise ValueError("--per-task, --epochs and --repeats must be positive")
    if steps < 0:
        raise ValueError(f"--steps must be a positive number of rounds, got {steps}")
    if steps and same_process:
        raise ValueError("--steps times steps in one process already; drop --same-process")
    if against is not None:
        if not steps:
            raise ValueError("--against compares training steps side by side; give --steps ROUNDS")
        load_checkout(against)                    # a wrong path fails here, before any run
    vit = vit_config(width, patch)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device here")
    # repeats interleaved (every method, then again), so that a slow spell of the machine
    # does not fall on one method's runs only
    jobs = [(n, m) for n in ns for _ in range(repeats) for m in methods]
    t0 = time.perf_counter()
    if steps:
        rows = _step_runs(ns, methods, per_task, device, threads, precision, vit, steps, against)
    elif same_process:
        rows = _alternating_runs(ns, methods, per_task, epochs, device, threads, precision, vit, repeats)
    else:
        rows = _run_jobs(jobs, per_task, epochs, device, threads, precision, vit, "time")
    if not device.startswith("cuda"):
        # memory runs: the children inherit these, so RSS tracks live tensors (module docstring)
        saved = {k: os.environ.get(k) for k in _MALLOC_ENV}
        os.environ.update(_MALLOC_ENV)
        try:
            cells = list(dict.fromkeys(jobs))                  # one memory run per cell
            memory = dict(zip(cells, _run_jobs(cells, per_task, 1, device, threads, precision, vit, "memory")))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        for row in rows:            # (another checkout's row has no memory run)
            row["peak_bytes"] = memory.get((row["n"], row["method"]), {}).get("peak_bytes")
    timing = "one process per n, methods alternating" if same_process else "one process per run"
    if steps:
        timing = (f"training steps, one process per n, methods alternating in blocks of {STEP_BLOCK} steps, "
                  f"{steps} rounds")
    return {"bench": "cost", "device": device_name(device), "precision": precision, "per_task": per_task,
            "epochs": epochs, "vit": vit, "train": TRAIN, "fs_merge": FS, "repeats": repeats,
            "timing": timing,
            "steps": steps, "against": against,
            "rows": _medians(rows), "runs": rows, "total_seconds": time.perf_counter() - t0}


_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"}


def _in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _run_per_n(ns, what: str, measure_n, describe) -> list[dict]:
    """measure_n(n) in a fresh process for each n, one after another; describe(rows of one method)
    gives that method's status line."""
    rows = []
    with bar(len(ns), f"cost runs ({what}, one process per n)") as progress:
        for n in ns:
            got = _in_fresh_process(measure_n, n)
            for m in dict.fromkeys(r["method"] for r in got):
                status(f"  {what}: n={n} {m}: " + describe([r for r in got if r["method"] == m]))
            rows += got
            progress.advance(1)
    return rows


def _alternating_runs(ns, methods, per_task, epochs, device, threads, precision, vit, repeats) -> list[dict]:
    return _run_per_n(ns, "time", partial(measure_alternating, methods=methods, per_task=per_task, epochs=epochs,
                                          device=device, threads=threads, precision=precision, vit=vit,
                                          repeats=repeats),
                      lambda rows: ", ".join(f"{r['seconds']:.1f}" for r in rows) + " s")


def _step_runs(ns, methods, per_task, device, threads, precision, vit, rounds, against=None) -> list[dict]:
    return _run_per_n(ns, "steps", partial(measure_steps, methods=methods, per_task=per_task, device=device,
                                           threads=threads, precision=precision, vit=vit, rounds=rounds,
                                           against=against),
                      lambda rows: f"median {statistics.median(r['seconds'] for r in rows) * 1e3:.2f} ms a step "
                                   f"over {len(rows)} rounds")


def _run_jobs(jobs, per_task, epochs, device, threads, precision, vit, what) -> list[dict]:
    rows = []
    with bar(len(jobs), f"cost runs ({what})") as progress:
        for n, m in jobs:
            # a fresh process per run: its peak memory and allocator state are its own
            row = _in_fresh_process(measure, n, m, per_task, epochs, device, threads, precision, vit, what == "memory")
            rows.append(row)
            peak = f", peak {row['peak_bytes'] / 2**20:.0f} MiB" if row["peak_bytes"] is not None else ""
            status(f"  {what}: n={n} {m}: {row['seconds']:.1f} s{peak}")
            progress.advance(1)
    return rows


def _medians(rows: list[dict]) -> list[dict]:
    """One row per (n, method): median seconds and peak over repeats, with ratios to distill."""
    out = []
    keys = list(dict.fromkeys((r["n"], r["method"]) for r in rows))
    for n, m in keys:
        sel = [r for r in rows if r["n"] == n and r["method"] == m]
        out.append({"n": n, "method": m, "seconds": statistics.median(r["seconds"] for r in sel),
                    "peak_bytes": (None if any(r["peak_bytes"] is None for r in sel)      # not measured
                                   else statistics.median(r["peak_bytes"] for r in sel)),
                    "learnable_parameters": sel[0]["learnable_parameters"]})
    for r in out:
        base = next((b for b in out if b["n"] == r["n"] and b["method"] == "distill"), None)
        r["time_ratio"] = r["seconds"] / base["seconds"] if base else None
        r["memory_ratio"] = (r["peak_bytes"] / base["peak_bytes"]
                             if base and r["peak_bytes"] is not None and base["peak_bytes"] else None)
        # run i of a method over run i of distillation (adjacent in time: repeats are interleaved);
        # their quartiles show how far one bench's ratio can be trusted on a noisy machine
        mine, theirs = ([x["seconds"] for x in rows if x["n"] == r["n"] and x["method"] == m]
                        for m in (r["method"], "distill"))
        pairs = [a / b for a, b in zip(mine, theirs)] if base and r["method"] != "distill" else []
        r["time_ratio_quartiles"] = None
        if len(pairs) >= 3:
            q1, _, q3 = statistics.quantiles(pairs, n=4, method="inclusive")
            r["time_ratio_quartiles"] = [q1, q3]
    return out


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(120, Console().width))
    v = result["vit"]
    per_step = bool(result.get("steps"))
    table = Table(title=f"merge cost on {result['device']} ({result['precision']}): ViT width {v['width']}, depth "
                        f"{v['depth']}, {(28 // v['patch']) ** 2 + 1} tokens; {result['per_task']} images per model, "
                        + (f"steps of batch {result['train']['batch_size']}" if per_step else
                           f"{result['epochs']} epochs, batch {result['train']['batch_size']}"))
    for col in ("n", "method", "ms / step" if per_step else "seconds", "× distill time", "peak MiB", "× distill memory",
                "learnable params"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in result["rows"]:
        spread = r.get("time_ratio_quartiles")
        table.add_row(str(r["n"]), r["method"], f"{r['seconds'] * 1e3:.2f}" if per_step else f"{r['seconds']:.1f}",
                      "-" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}"
                      + (f" ({spread[0]:.2f}–{spread[1]:.2f})" if spread else ""),
                      "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}",
                      "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}",
                      f"{r['learnable_parameters']:,}" if r["learnable_parameters"] else "-")
    console.print(table)
    if any(r.get("time_ratio_quartiles") for r in result["rows"]):
        what = "round" if per_step else "run"
        console.print(f"× distill time: ratio of the medians; in brackets the quartiles of the {what}-by-{what} ratios "
                      f"({what} i of the method over {what} i of distillation, adjacent in time)")
    for n in dict.fromkeys(r["n"] for r in result["runs"]):
        other = [r for r in result["runs"] if r["n"] == n and r["method"].startswith("fs-merge folded @")]
        theirs = [r["seconds"] for r in other]
        if theirs:
            ours = [r["seconds"] for r in result["runs"] if r["n"] == n and r["method"] == "fs-merge folded"]
            ratios = [a / b for a, b in zip(ours, theirs)]
            q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
            console.print(f"n = {n}: fs-merge folded here / at {other[0]['method'].split('@ ', 1)[1]}: {med:.3f} "
                          f"(quartiles {q1:.3f}–{q3:.3f}, round by round)")
    count = f"{result['steps']} rounds" if per_step else f"{result['repeats']} run(s)"
    console.print(f"measured now ({result['total_seconds'] / 60:.1f} min, median of {count} each, "
                  f"{result.get('timing', 'one process per run')}); "
                  f"target: fs-merge folded ≤ 1.15× distill time and ≤ 1.25× its memory for n = 2, 4; "
                  f"command: {command}")
