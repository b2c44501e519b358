"""`foldmerge bench mlp`: the FS-Merge paper's MLP tables (Table 2, Tables 9–14), measured here.

Setting (paper section 3.1, appendix E.1): two MLPs trained from different seeds on the
halves 0–4 and 5–9 of MNIST or Fashion-MNIST, merged from 64 unlabeled training images per
task. `--vary depth`: width 128, 1/2/3/4/6 hidden layers; `--vary width`: one hidden layer
of width 16/64/128/512/1024. Every method runs on the same sources and the same merge sample;
each cell is the mean ± sample std over the seeds of the test accuracy.

Hyperparameters. Where appendix E.1 marks a value in bold it is used as is (FS-Merge local:
random init, 15k epochs (20k Fashion-MNIST), lr 0.1, momentum 0.9; global: `first` init,
1k epochs (1.5k), lr 0.1; global ZipIt init: 10k epochs, lr 0.1). What the paper does not
fix legibly is chosen here on the VALIDATION split of the pair of seed 0, for every depth and
width on its own (the paper chose once, at depth 2, and used that for every depth: RegMean's
best α moves from 0.1 at depth 1 to 0.5 or more at depth 4, so one choice for all is the wrong
protocol): RegMean α and whether its Grams see 1,024 augmented images per task besides the 64
originals (the authors' code builds them from augmented samples), ZipIt! α and β (also the
ZipIt init of FS-Merge), the distillation student's init and learning rate, OT fusion's λ (the
"opt" row, which the paper runs on transformers only). The grid, every validation score and
the choice go into --json; a cached choice that lacks a hyperparameter (a row added since) is
completed by searching that one alone.

Seeds: pair s uses source seeds 2s (task 0–4) and 2s + 1 (task 5–9) and merge-sample seed s.
Source models are cached under OUT/sources (safetensors) and reused by later runs.
Work is spread over processes (one per core by default), each single-threaded.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from importlib import resources
from multiprocessing import get_context
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..api import load, merge
from ..data import Task
from ..evaluation import Ensemble, evaluate, originals
from ..progress import bar, status
from ..sources import source_dirname, train_source
from . import mean_std, merge_scored, sample_drawer, selected

VALUES = {"depth": [1, 2, 3, 4, 6], "width": [16, 64, 128, 512, 1024]}
TASKS = {"mnist": ("mnist:0-4", "mnist:5-9"), "fmnist": ("fmnist:0-4", "fmnist:5-9")}
PER_TASK = 64
ROW_ORDER = ("originals", "ensemble", "average", "slerp", "regmean", "permute", "opt", "zipit", "cca", "pleas", "distill",
             "fs-merge local", "fs-merge local, zipit init", "fs-merge global", "fs-merge global, zipit init")

GRID = {
    "regmean_alpha": [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
    "regmean_augment": [0, 1024],          # augmented images per task for RegMean's Grams
    "zipit_alpha": [0.3, 0.5, 1.0],
    "zipit_beta": [0.0, 0.125, 0.25, 0.5, 1.0],
    "distill_init": ["first", "average", "regmean"],
    "distill_lr": [0.1, 0.03, 0.01],
    "opt_reg": [0.0, 0.02, 0.08],          # OT fusion's λ: 0 = exact (hard) transport, > 0 Sinkhorn
}


def hidden_for(vary: str, value: int) -> list[int]:
    return [128] * value if vary == "depth" else [value]


def paper_epochs(dataset: str) -> dict:
    """Bold epoch counts of appendix E.1."""
    fashion = dataset == "fmnist"
    return {"local": 20000 if fashion else 15000, "global": 1500 if fashion else 1000,
            "global_zipit": 10000, "distill": 1500 if fashion else 1000}


def e1_warmup(epochs: int) -> dict:
    """Appendix E.1's cosine warmup, 20 epochs whatever the run's length, as the fraction of
    training that `warmup` takes (the whole run but its last step when it is 20 epochs or less)."""
    return {"warmup": min(20 / epochs, 1 - 1 / (2 * epochs)) if epochs else 0.0}


def _student_alpha(init: str, alpha: float) -> dict:
    """RegMean's alpha for a distillation student that starts from RegMean (the option applies to that init only)."""
    return {"regmean_alpha": alpha} if init == "regmean" else {}


def method_plan(dataset: str, tuned: dict, epochs_scale: float = 1.0) -> list[tuple[str, str, dict]]:
    """(row name, method, options) for every merge the bench runs."""
    ep = {k: max(1, int(round(v * epochs_scale))) for k, v in paper_epochs(dataset).items()}
    zipit = {"alpha": tuned["zipit_alpha"], "beta": tuned["zipit_beta"]}
    zinit = {"zipit_alpha": tuned["zipit_alpha"], "zipit_beta": tuned["zipit_beta"]}
    fs = {"lr": 0.1, "momentum": 0.9}
    return [
        ("average", "average", {}),
        ("slerp", "slerp", {}),
        ("regmean", "regmean", {"alpha": tuned["regmean_alpha"], "augment": tuned["regmean_augment"]}),
        ("permute", "permute", {}),
        ("opt", "opt", {"reg": tuned["opt_reg"]}),
        ("zipit", "zipit", zipit),
        ("cca", "cca", {}),
        ("pleas", "pleas", {}),
        ("distill", "distill", {"init": tuned["distill_init"], "lr": tuned["distill_lr"], "momentum": 0.9,
                                "epochs": ep["distill"], **e1_warmup(ep["distill"]),
                                **_student_alpha(tuned["distill_init"], tuned["regmean_alpha"])}),
        ("fs-merge local", "fs-merge", {"variant": "local", "init": "random", "epochs": ep["local"],
                                        **e1_warmup(ep["local"]), **fs}),
        ("fs-merge local, zipit init", "fs-merge",
         {"variant": "local", "init": "zipit", "epochs": ep["local"], **e1_warmup(ep["local"]), **fs, **zinit}),
        ("fs-merge global", "fs-merge", {"variant": "global", "init": "first", "epochs": ep["global"],
                                         **e1_warmup(ep["global"]), **fs}),
        ("fs-merge global, zipit init", "fs-merge",
         {"variant": "global", "init": "zipit", "epochs": ep["global_zipit"], **e1_warmup(ep["global_zipit"]),
          **fs, **zinit}),
    ]


# ------------------------------------------------------------------------------ sources
def get_sources(dataset: str, hidden: list[int], pair_seed: int, cache: Path,
                tasks: tuple[str, ...] | None = None) -> list:
    """The two source models of a pair (on `tasks`, default the dataset's halves): loaded from
    the cache, or trained (E.1) and cached."""
    folder = cache / "sources" / dataset / ("h" + "x".join(map(str, hidden)))
    models = []
    for k, task in enumerate(tasks or TASKS[dataset]):
        seed = 2 * pair_seed + k
        path = folder / source_dirname(_task(task), seed)
        model = None
        if (path / "config.json").is_file():
            model = load(path)
            if list(model.backbone.hidden) != list(hidden) or model.meta.get("seed") != seed:
                model = None            # a different model under that name: train afresh
        if model is None:
            model = train_source(task, hidden, seed)
            model.meta["command"] = "foldmerge bench mlp (source)"
            model.save(path)
            model.meta["path"] = str(path)
        models.append(model)
    return models


def _task(spec):
    return Task.parse(spec)


# ------------------------------------------------------------------------------- tuning
# each search of `tune` (named by its first key), the keys it chooses, and the rows that read them
SEARCHES = {"regmean_alpha": (("regmean_alpha", "regmean_augment"), ("regmean", "distill")),
            "zipit_alpha": (("zipit_alpha", "zipit_beta"),
                            ("zipit", "fs-merge local, zipit init", "fs-merge global, zipit init")),
            "distill_init": (("distill_init", "distill_lr"), ("distill",)),
            "opt_reg": (("opt_reg",), ("opt",))}


def searches_for(dataset: str, methods: list[str] | None) -> list[str]:
    """The searches whose values the rows selected by `methods` (None: all) read."""
    rows = {name for name, method, _ in method_plan(dataset, _placeholder_tuning())
            if selected(name, method, methods)}
    return [k for k, (_, readers) in SEARCHES.items() if rows & set(readers)]


def tune(dataset: str, hidden: list[int], cache: Path, grid: dict | None = None, have: dict | None = None,
         searches: list[str] | None = None) -> dict:
    """Choose the unfixed hyperparameters on the validation split of the `hidden` pair of seed 0
    (module docstring); those in `have` (an earlier choice) are kept, only the missing ones among
    `searches` (default all) are searched (a row added later, or only the rows a `--methods` run reads)."""
    grid = grid or GRID
    chosen = {k: v for k, v in (have or {}).items() if k != "trials"}
    trials: list[dict] = list((have or {}).get("trials", []))
    sources = get_sources(dataset, hidden, 0, cache)
    draw = sample_drawer(sources, PER_TASK, 0)

    def score(method, augment=0, **opts):
        merged = merge(sources, draw(augment), method=method, seed=0, **opts)
        val = evaluate(merged, split="val")
        trials.append({"method": method, "options": {**opts, "augment": augment}, "val_per_task": val["per_task_mean"],
                       "val_joint": val.get("joint_mean")})
        progress.advance(1)
        return val["per_task_mean"]

    reg_pairs = [(a, n) for n in grid["regmean_augment"] for a in grid["regmean_alpha"]]
    zip_pairs = [(a, b) for a in grid["zipit_alpha"] for b in grid["zipit_beta"]]
    d_pairs = [(i, lr) for i in grid["distill_init"] for lr in grid["distill_lr"]]
    todo = [k for k in (searches or SEARCHES) if k not in chosen]
    n = sum({"regmean_alpha": len(reg_pairs), "zipit_alpha": len(zip_pairs),
             "distill_init": len(d_pairs), "opt_reg": len(grid["opt_reg"])}[k] for k in todo)
    with bar(n, f"tuning on {dataset} validation, hidden {hidden}") as progress:
        if "regmean_alpha" in todo:
            chosen["regmean_alpha"], chosen["regmean_augment"] = max(
                reg_pairs, key=lambda an: score("regmean", alpha=an[0], augment=an[1]))
        if "zipit_alpha" in todo:
            chosen["zipit_alpha"], chosen["zipit_beta"] = max(
                zip_pairs, key=lambda ab: score("zipit", alpha=ab[0], beta=ab[1]))
        if "distill_init" in todo:
            epochs = paper_epochs(dataset)["distill"]
            chosen["distill_init"], chosen["distill_lr"] = max(d_pairs, key=lambda p: score(
                "distill", init=p[0], lr=p[1], momentum=0.9, epochs=epochs, **e1_warmup(epochs),
                **_student_alpha(p[0], chosen["regmean_alpha"])))
        if "opt_reg" in todo:
            chosen["opt_reg"] = max(grid["opt_reg"], key=lambda r: score("opt", reg=r))
    return {**chosen, "chosen_on": f"{dataset} validation split, hidden {hidden}, pair seed 0",
            "trials": trials}


def tuned_path(dataset: str, hidden: list[int], cache: Path) -> Path:
    return cache / f"tuned-{dataset}-h{'x'.join(map(str, hidden))}.json"


def load_or_tune(dataset: str, hidden: list[int], cache: Path, retune: bool, searches: list[str] | None = None,
                 threads: int | None = None) -> dict:
    """The cached choice for this setting (OUT/tuned-<dataset>-h<hidden>.json), completed by a
    search of what it lacks among `searches` (default all)."""
    if threads:
        torch.set_num_threads(threads)
    searches = list(SEARCHES) if searches is None else list(searches)      # [] (rows that read no tuned value): none
    path = tuned_path(dataset, hidden, cache)
    have = None if retune or not path.is_file() else json.loads(path.read_text())
    if not searches:        # the rows asked for read no chosen value: nothing to search (no file written)
        return {**_placeholder_tuning(), **(have or {})}
    if have is not None and all(k in have for s in searches for k in SEARCHES[s][0]):
        status(f"hyperparameters from {path} (chosen on validation; --retune to redo)")
        return have
    tuned = tune(dataset, hidden, cache, have=have, searches=searches)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(tuned, indent=1) + "\n")
    os.replace(tmp, path)
    return tuned


# ---------------------------------------------------------------------------- one unit
def run_unit(dataset: str, vary: str, value: int, seed: int, tuned: dict, cache: str,
             methods: list[str] | None, epochs_scale: float = 1.0, threads: int = 1) -> list[dict]:
    """Every method on one (setting, seed): the rows of that cell, measured on the test split."""
    torch.set_num_threads(threads)
    hidden = hidden_for(vary, value)
    sources = get_sources(dataset, hidden, seed, Path(cache))
    rows = []

    def add(name, result, seconds, **extra):
        rows.append({"method": name, "value": value, "seed": seed, "per_task": result["per_task_mean"],
                     "joint": result.get("joint_mean"), "per_task_by_task": result["per_task"],
                     "seconds": seconds, **extra})

    add("originals", originals(sources), None)
    t = time.perf_counter()
    add("ensemble", evaluate(Ensemble(sources)), time.perf_counter() - t)
    draw = sample_drawer(sources, PER_TASK, seed)
    for name, method, opts in method_plan(dataset, tuned, epochs_scale):
        if not selected(name, method, methods):
            continue
        # augment is the merge sample's option, not the method's
        merged, scores, raw, seconds = merge_scored(sources, draw(opts.get("augment", 0)), method, seed,
                                                    {k: v for k, v in opts.items() if k != "augment"})
        extra = {k: merged.meta[k] for k in ("final_loss", "initial_loss") if merged.meta.get(k) is not None}
        add(name, scores, seconds, options=opts, joint_uncalibrated=raw.get("joint_mean"),
            calibration=merged.meta["calibration"], **extra)
    return rows


def _unit_cost(vary: str, value: int) -> float:
    """Rough relative cost, to start the longest units first."""
    return value if vary == "depth" else (value / 128) ** 2 + 0.5


# ------------------------------------------------------------------------------- driver
def run_bench(dataset: str = "mnist", vary: str = "depth", seeds: int = 5, values: list[int] | None = None,
              methods: list[str] | None = None, jobs: int | None = None, out: str = "runs/bench",
              epochs_scale: float = 1.0, retune: bool = False) -> dict:
    if dataset not in TASKS:
        raise ValueError(f"--dataset must be one of {', '.join(TASKS)}, got {dataset!r}")
    if vary not in VALUES:
        raise ValueError(f"--vary must be depth or width, got {vary!r}")
    if seeds < 1:
        raise ValueError("--seeds must be at least 1")
    if epochs_scale <= 0:
        raise ValueError("--epochs-scale must be positive")
    values = list(values or VALUES[vary])
    if any(v < 1 for v in values):
        raise ValueError(f"{vary} values must be positive, got {values}")
    known = {name for name, _, _ in method_plan(dataset, _placeholder_tuning())} | \
            {m for _, m, _ in method_plan(dataset, _placeholder_tuning())}
    unknown = [m for m in (methods or []) if m not in known]
    if unknown:
        raise ValueError(f"unknown bench method {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    cache = Path(out)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    searches = searches_for(dataset, methods)
    jobs = max(1, jobs or os.cpu_count() or 1)
    units = sorted(((v, s) for v in values for s in range(seeds)), key=lambda u: -_unit_cost(vary, u[0]))
    jobs = min(jobs, len(units))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    choices: dict[int, dict] = {}          # value -> the validation choice for that setting
    rows: list[dict] = []
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_quiet_worker) as pool:
        def each(calls, label, done):
            """Run calls {key: (fn, args)} here (one job) or in the pool, `done(key, result)` as each ends."""
            with bar(len(calls), label) as progress:
                def finished(key, result, i):
                    done(key, result)
                    progress.advance(1, info=f"{key} done")
                    status(f"{label}: {key} done ({i}/{len(calls)})")   # the workers are quiet: a log sees this
                if jobs == 1:
                    for i, (key, (fn, args)) in enumerate(calls.items(), 1):
                        finished(key, fn(*args), i)
                    return
                futures = {pool.submit(fn, *args): key for key, (fn, args) in calls.items()}
                try:
                    for i, fut in enumerate(as_completed(futures), 1):
                        finished(futures[fut], fut.result(), i)
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise

        # the validation choice of every setting first (cached ones are read, not searched)
        each({v: (load_or_tune, (dataset, hidden_for(vary, v), cache, retune, searches, threads))
              for v in sorted(values, key=lambda v: -_unit_cost(vary, v))},
             f"validation choices, {dataset}, vary {vary}", lambda v, c: choices.__setitem__(v, c))
        # rows not run may lack a choice; they are skipped, so a placeholder only fills the plan
        tuned = {v: {**_placeholder_tuning(), **_read_by(c, searches)} for v, c in choices.items()}
        each({(v, s): (run_unit, (dataset, vary, v, s, tuned[v], str(cache), methods, epochs_scale, threads))
              for v, s in units},
             f"bench mlp {dataset}, vary {vary}", lambda key, r: rows.extend(r))
    return {
        "bench": "mlp", "dataset": dataset, "vary": vary, "values": values, "seeds": list(range(seeds)),
        "tasks": list(TASKS[dataset]), "per_task_images": PER_TASK, "epochs_scale": epochs_scale,
        "hyperparameters": {str(v): {k: x for k, x in _read_by(choices[v], searches).items() if k != "trials"}
                            for v in values},
        "tuning_trials": {str(v): choices[v].get("trials", []) for v in values},
        "plan": {str(v): [{"row": n, "method": m, "options": o}
                          for n, m, o in method_plan(dataset, tuned[v], epochs_scale) if selected(n, m, methods)]
                 for v in values},
        "table": aggregate(rows, values),
        "paper": paper_reference(dataset, vary),
        "runs": sorted(rows, key=lambda r: (r["value"], r["seed"], r["method"])),
        "jobs": jobs, "threads_per_job": threads, "total_seconds": time.perf_counter() - t0,
    }


def _read_by(choice: dict, searches: list[str]) -> dict:
    """The part of a cached choice that the searches of this run made (and its provenance)."""
    return {k: v for k, v in choice.items()
            if k in ("trials", "chosen_on") or any(k in SEARCHES[s][0] for s in searches)}


def _placeholder_tuning() -> dict:
    """A value for every chosen hyperparameter (the keys a complete choice has)."""
    return {"regmean_alpha": 0.9, "regmean_augment": 0, "zipit_alpha": 0.3, "zipit_beta": 0.0, "distill_init": "first",
            "distill_lr": 0.1, "opt_reg": 0.0}


def _quiet_worker() -> None:
    """Worker setup: no progress bars; exit when the bench process is gone (killed or
    interrupted) instead of computing on for nobody."""
    os.environ["FOLDMERGE_PROGRESS"] = "0"
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


# --------------------------------------------------------------------------- reporting
def aggregate(rows: list[dict], values: list[int]) -> dict:
    """{metric: {row: {value: {mean, std, n, seconds}}}}."""
    table: dict = {"per_task": {}, "joint": {}, "joint_uncalibrated": {}}
    names = sorted({r["method"] for r in rows},
                   key=lambda n: (ROW_ORDER.index(n) if n in ROW_ORDER else len(ROW_ORDER), n))
    for metric in table:
        for name in names:
            cells = {}
            for v in values:
                sel = [r for r in rows if r["method"] == name and r["value"] == v]
                if not sel:
                    continue
                m, sd = mean_std([r.get(metric) for r in sel])
                if m is None:
                    continue
                secs = [r["seconds"] for r in sel if r["seconds"] is not None]
                cells[str(v)] = {"mean": m, "std": sd, "n": len(sel),
                                 "seconds": sum(secs) / len(secs) if secs else None}
            if cells:
                table[metric][name] = cells
    return table


def paper_reference(dataset: str, vary: str) -> dict:
    """The published tables for this setting (data file bench/paper_mlp.json)."""
    text = resources.files("foldmerge").joinpath("bench/paper_mlp.json").read_text()
    data = json.loads(text)
    out = {}
    for metric in ("per_task", "joint"):
        entry = data.get(f"{dataset}/{vary}/{metric}")
        if entry:
            out[metric] = {"table": entry["table"], "values": entry["values"], "rows": entry["rows"]}
    return out


def paper_value(paper: dict, metric: str, row: str, value: int) -> float | None:
    entry = paper.get(metric)
    if not entry or row not in entry["rows"] or value not in entry["values"]:
        return None
    return entry["rows"][row][entry["values"].index(value)][0]


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(120, Console().width))
    paper = result["paper"]
    # the paper's joint values sit beside our uncalibrated joint: the paper's heads are not calibrated
    names = {"per_task": ("per-task", "per_task"), "joint": ("joint", None),
             "joint_uncalibrated": ("joint, heads as the method made them (no routing calibration)", "joint")}
    for metric, (label, paper_metric) in names.items():
        rows = result["table"].get(metric)
        if not rows:
            continue
        ref = paper.get(paper_metric, {}).get("table")
        table = Table(title=f"{result['dataset'].upper()} 0-4 / 5-9, vary {result['vary']}: {label} accuracy % "
                            f"(test), ours mean ± std over {len(result['seeds'])} seed(s)"
                            + (f"; [dim](paper {ref})[/dim] = published value" if ref else ""))
        table.add_column("method")
        for v in result["values"]:
            table.add_column(f"{result['vary']} {v}", justify="right")
        for name, cells in rows.items():
            out = [name]
            for v in result["values"]:
                c = cells.get(str(v))
                if c is None:
                    out.append("-")
                    continue
                text = f"{c['mean']:.2f} ± {c['std']:.2f}"
                p = paper_value(paper, paper_metric, name, v) if paper_metric else None
                if p is not None:
                    text += f" [dim](paper {p:.2f})[/dim]"
                out.append(text)
            table.add_row(*out)
        console.print(table)
    for v, hp in result["hyperparameters"].items():
        said = [text.format(**hp) for keys, text in (
            (("regmean_alpha",), "RegMean α {regmean_alpha} with {regmean_augment} augmented images per task"),
            (("zipit_alpha",), "ZipIt! α {zipit_alpha} β {zipit_beta}"),
            (("distill_init",), "distillation init {distill_init} lr {distill_lr}"), (("opt_reg",), "OT λ {opt_reg}"))
            if all(k in hp for k in keys)]
        console.print(f"{result['vary']} {v}: chosen on validation ({hp.get('chosen_on', '?')}): "
                      f"{', '.join(said) or 'nothing'}")
    console.print("the rest are appendix E.1's bold values"
                  + (f"; epochs scaled by {result['epochs_scale']}" if result["epochs_scale"] != 1 else ""))
    console.print(f"measured now: seeds {result['seeds']}, {result['jobs']} process(es) x "
                  f"{result['threads_per_job']} thread(s), {result['total_seconds'] / 60:.1f} min; command: {command}")
    console.print("'paper' values are copied from Kinderman et al. (FS-Merge), not measured here.")
