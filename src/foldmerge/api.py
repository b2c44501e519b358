"""The Python API, and the one merge pipeline the command line calls too.

    import foldmerge
    a, b = foldmerge.load("runs/src/mnist_0-4-s0"), foldmerge.load("runs/src/mnist_5-9-s1")
    merged = foldmerge.merge([a, b], data=64, method="fs-merge", variant="global")
    merged.save("runs/merged")
    foldmerge.evaluate(merged)        # {'per_task': …, 'per_task_mean': …, 'joint': …, 'joint_mean': …}

`merge` is three steps, each once:

  prepare  check the settings and the output target, resolve the method and its options, load
           and check the sources (paths: ours or Hugging Face's), draw or check the data, set up
           the checkpoint and the context the method runs in: a `Job`;
  run      the method (with `select`: once per candidate first), here or under an `Engine`;
  finish   calibrate the heads, refuse non-finite weights, record options and provenance, save
           (with the Hugging Face export in the same swap), remove the checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from . import hf, selection
from .calibrate import calibrate_heads
from .card import card
from .checkpoint import Checkpoint
from .checkpoint import checkpoint_dir as checkpoint_dir_of
from .context import Context, FeatureCache
from .data import Task
from .data.augment import expand
from .data.files import Examples
from .data.files import describe as describe_examples
from .data.files import read as read_examples
from .engine import ACCELERATORS, PRECISIONS, PARALLEL, Engine
from .errors import did_you_mean
from .evaluation import SourceHeads
from .heads import SAME_TASK, Sharing, merge_heads, share
from .evaluation import evaluate as _evaluate
from .inputs import check_same_tokens, common_length, preprocess, reads
from .inputs import labelled as labelled_examples
from .io import check_target, identity, nonfinite, save_model
from .loading import load as _load
from .loading import load_sources, read_option_files
from .methods import METHODS, get_method
from .model import TaskModel, as_input, padding_id
from .options import (
    Choice,
    FilePath,
    Flag,
    Integer,
    ListOf,
    ModelRef,
    Option,
    Rule,
    TensorFile,
    Text,
    check_value,
    check_values,
)
from .provenance import describe, environment, source_record
from .selection import fidelity as fidelity_report


def load(path: str | os.PathLike, task=None, allow_pickle: bool = False) -> TaskModel:
    """A saved model: a foldmerge model directory or a Hugging Face one (`foldmerge.loading`)."""
    return _load(path, task, allow_pickle)


def merge_form(model: TaskModel) -> TaskModel:
    """The equivalent model a merge reads (`TaskModel.merge_form`: a ResNet's BatchNorm folded in)."""
    return model.merge_form()


def evaluate(model, tasks: list[Task | str] | None = None, split: str = "test", labelled: dict | None = None) -> dict:
    """Per-task and joint accuracy (`foldmerge.evaluation.evaluate`)."""
    return _evaluate(model, tasks, split=split, labelled=labelled)


# ------------------------------------------------------------------------------- the sample
def merge_sample(models, per_task: int, seed: int = 0, augment: int = 0) -> list[torch.Tensor]:
    """For each model, `per_task` unlabeled training images of each of its tasks (seeded),
    plus `augment` augmented images made from them (`foldmerge.data.augment.expand`)."""
    out = []
    for k, m in enumerate(models):
        parts = []
        for i, t in enumerate(m.tasks):
            s = _task_seed(seed, k, i)
            originals = t.sample(per_task, seed=s)
            parts += [originals] + ([expand(t, originals, augment, seed=s)] if augment else [])
        out.append(torch.cat(parts))
    return out


def _originals(job) -> list[torch.Tensor] | None:
    """Each model's drawn examples without the augmented copies made from them (None: none made).
    Held-out judgments (the calibration's two-fold check, --select) read these only: an augmented
    copy of an example in one half would leak it into the other."""
    augment, n = job.sample.get("augment") or 0, job.sample.get("per_task")
    if not augment or job.data is None:
        return None
    return [torch.cat([d[i * (n + augment):i * (n + augment) + n] for i in range(len(m.tasks))])
            for m, d in zip(job.models, job.data)]


def _augmented_folds(job) -> list | None:
    """--select's two folds of an augmented sample: each half of the originals with augmented copies
    made from that half alone, scored on the other half's originals (None: no augmentation)."""
    if _originals(job) is None:
        return None
    augment, n = job.sample["augment"], job.sample["per_task"]
    folds = []
    for f in (0, 1):
        fit, held = [], []
        for k, (m, d) in enumerate(zip(job.models, job.data)):
            parts, scored = [], []
            for i, t in enumerate(m.tasks):
                o = d[i * (n + augment):i * (n + augment) + n]
                half = o[f::2]
                parts += [half, expand(t, half, augment, seed=_task_seed(job.seed, k, i) + 1 + f).to(d.dtype)]
                scored.append(o[1 - f::2])
            fit.append(torch.cat(parts))
            held.append(torch.cat(scored))
        folds.append((fit, held))
    return folds


def _task_seed(seed: int, model: int, task: int) -> int:
    """The draw of task `task` of model `model` in a merge seeded `seed` (sample and held-out alike)."""
    return seed * 1000 + 17 * model + task


def held_out_sample(models, per_task: int, held_out: int, seed: int = 0) -> list[torch.Tensor]:
    """For each model, `held_out` further training examples of each task, disjoint from the
    `merge_sample(models, per_task, seed)` drawn with the same seed (the next ones of its draw)."""
    out = []
    for k, m in enumerate(models):
        out.append(torch.cat([t.sample(per_task + held_out, seed=_task_seed(seed, k, i))[per_task:]
                              for i, t in enumerate(m.tasks)]))
    return out


def fidelity_sample(models, used: int, n: int, seed: int) -> list[torch.Tensor] | None:
    """The fidelity report's examples of built-in tasks: the next `n` of each task's draw after the
    `used` the merge reads, fewer where a task's training split runs out; None where one has none left."""
    out = []
    for k, m in enumerate(models):
        parts = []
        for i, t in enumerate(m.tasks):
            take = min(n, len(t.split("train")[0]) - used)
            if take <= 0:
                return None
            parts.append(t.sample(used + take, seed=_task_seed(seed, k, i))[used:])
        out.append(torch.cat(parts))
    return out


def default_augment(method: str, models=()) -> int:
    """Augmented images per task `method` gets by default: 1,024 for RegMean on images, whose Grams
    gain from them (bench defaults, docs/benchmarks/defaults.md), 0 for the rest and for text."""
    if any(t.is_text for m in models for t in m.tasks):
        return 0
    return 1024 if method == "regmean" else 0


# ------------------------------------------------------------------------------ the settings
class Grid(ListOf):
    """--select ARG=V1,V2,…, repeated for a grid; from Python or YAML also {arg: [values]}. The values
    are read by the method's own options (`Job`)."""

    def __init__(self):
        super().__init__(Text())

    metavar = "ARG=V1,V2,…"

    def from_command_line(self, value):
        return self.check(value)

    def check(self, value):
        if isinstance(value, dict):
            return {str(k).replace("-", "_"): list(v) if isinstance(v, (list, tuple)) else [v]
                    for k, v in value.items()}
        return selection.parse(super().check(value))


# the methods that read their sources one layer at a time (what --lazy needs)
LAZY = tuple(m.name + (f" {m.lazy.when}" if m.lazy.when else "") for m in METHODS.values() if m.lazy)


SETTINGS = (
    Option("data", ListOf(FilePath()), "unlabeled examples of each model's task, one per model in model order: a "
           "folder of images, a .txt file (a line each), a table FILE:COLUMN (.csv .tsv .jsonl .json .parquet), a "
           "datasets folder, or .npy / .safetensors tensors (docs/data.md); unset: the built-in task's "
           "training split"),
    Option("per_task", Integer(1), "unlabeled examples drawn per task for the merge (from its built-in training "
           "split or from --data)", 64, "the FS-Merge paper's MLP merges, appendix E.1"),
    Option("augment", Integer(0), "augmented images per task made from the drawn ones (crop, flip, "
           "solarize/blur, MixUp)", Rule(lambda c: default_augment(c.options["method"], c.models),
                                         "1024 for RegMean on images (bench defaults: its Grams gain from them), "
                                         "0 otherwise")),
    Option("held_out", Integer(0), "fs-merge (global) and distill: stop early on N further unlabeled examples per "
           "task, keeping the epoch with the lowest held-out loss", 0, "off; paper F.8 uses 200"),
    Option("fidelity", Integer(0), "unlabeled examples per task, beyond those the merge reads, on which the merge's "
           "agreement with each source and their KL divergence are measured and recorded (0: none)", 256,
           "the standard error of a 90 % agreement measured on 256 examples is 1.9 points"),
    Option("seed", Integer(0), "seed of the sample's draw and of the method", 0, "a fixed seed: a rerun gives the "
           "same model"),
    Option("calibrate", Choice(("routing", "none")), "routing: fit each head's offset and scale on the merge "
           "sample so that joint accuracy holds up, no per-task prediction changes; none: the heads as the "
           "method made them", "routing", "docs/evaluation.md, joint accuracy"),
    Option("select", Grid(), "choose an option's value without labels: each value merges from half of every "
           "model's sample and is scored by agreement with the sources on the other half; the best is merged "
           "from the whole sample (repeat for a grid; docs/selection.md)"),
    Option("tasks", ListOf(Text()), "Hugging Face sources: the task of each model (e.g. bbc:0-2 bbc:3-4), where its "
           "config does not record one; the merge sample is drawn from it"),
    Option("same_task", Choice(SAME_TASK), "models whose heads answer one task merge into one head (merged "
           "like any layer); auto: heads with the same labels (a Hugging Face model's id2label, unless "
           "transformers' placeholder LABEL_k names; a built-in task's data set and classes) answer one task; yes: "
           "all do; no: none do", "auto", "the same labels are the same task; placeholder names tell nothing"),
    Option("out", FilePath(), "output model directory (never an input, nor inside one)"),
    Option("force", Flag(), "replace a model already at the output (atomically; other files there are kept)", False),
    Option("checkpoint_every", Integer(1), "save the training state every N epochs to OUT.resume/ (removed once "
           "the model is saved)"),
    Option("resume", Flag(), "continue a stopped merge from OUT.resume/ (same command; bit-identical result on "
           "the CPU)", False),
    Option("allow_pickle", Flag(), "allow loading pickle checkpoints (read with torch's weights-only unpickler)",
           False),
    Option("lazy", Flag(), "read the sources as read-only memory maps of their safetensors files, in their own "
           "dtype (bfloat16 stays bfloat16), and merge parameter by parameter into a temporary file's pages (in "
           "TMPDIR): a merge then holds about one parameter of each source, not the sources nor the merged model; "
           "for the methods that merge layer by layer (" +
           "; ".join(LAZY) + ")", False, "the sources read whole into memory, as torch loads them"),
    Option("accelerator", Choice(ACCELERATORS), "train under Lightning Fabric on this device (unset: plain PyTorch "
           "on the CPU, unless --devices or --precision is given: then Fabric on the CPU)"),
    Option("devices", Integer(1), "processes / devices for data parallelism under Fabric", 1, "one process"),
    Option("precision", Choice(PRECISIONS), "training precision under Fabric (unset: 32-true)"),
    Option("parallel", Choice(PARALLEL), "how --devices processes share training: ddp (each holds the whole "
           "trained network, gradients averaged) or fsdp (PyTorch FSDP: the trained modules sharded over the "
           "processes, each holding 1/N of their parameters, gradients and optimizer state)", "ddp",
           "the trained networks of the merges measured here fit one device; fsdp where they do not"),
)
SETTING = {o.name: o for o in SETTINGS}


# ---------------------------------------------------------------------------------- prepare
@dataclass
class Job:
    """A merge ready to run: everything checked, every source loaded, the data drawn."""
    sources: list                   # the models as given or loaded
    models: list                    # the form a merge reads (`TaskModel.merge_form`)
    data: list
    method: object                  # a foldmerge.options.Method
    given: dict                     # method options as given, checked by their grammar
    options: dict                   # ... resolved (every declared option)
    seed: int
    calibrate: str
    select: dict | None
    held_out: list | None
    sample: dict
    engine: Engine | None
    context: Context
    call: dict
    out: Path | None = None
    force: bool = False
    checkpoint: Checkpoint | None = None
    keep_checkpoint: bool = False
    command: str | None = None
    fidelity: list | None = None    # held-out unlabeled examples per model, for the fidelity report
    labelled: dict | None = None    # {task: (inputs, labels)} of --eval-data
    score: bool = False             # finish scores the merge and its sources (meta["scores"])
    sharing: Sharing | None = None  # which source heads answer one task (`foldmerge.heads`)
    out_seen: tuple | None | bool = False  # `io.identity` of `out` when checked: the swap refuses if it changed
    started: float = field(default_factory=time.perf_counter)


def equal_depths(models: list[TaskModel]) -> list[TaskModel]:
    """Models of one family at one depth: where their depths differ, the shallower ones with identity
    blocks appended (the spec's `deepen`: pre-LN families), or one line saying why they cannot be."""
    spec = models[0].spec
    if spec.depth is None or len({m.arch for m in models}) > 1:
        return models
    depths = [spec.depth(m.backbone_config) for m in models]
    deepest = max(depths)
    if len(set(depths)) == 1:
        return models
    if spec.deepen is None:
        raise ValueError(f"these {spec.name} models have different layer counts {depths}; a {spec.name} block has no "
                         "identity (its "
                         "LayerNorm after the residual sum normalizes the stream), so a shallower one cannot be "
                         "padded: merge models of one depth (pre-LN families such as hf-vit and deit can)")
    out = []
    for m, d in zip(models, depths):
        if d == deepest:
            out.append(m)
            continue
        out.append(m.with_backbone(*spec.deepen(m.backbone_config, m.backbone, deepest),
                                   deepened={"from": d, "to": deepest, "rule": "identity blocks appended"}))
    return out


def _check_lazy(m, resolved: dict, sources, engine) -> None:
    """--lazy only where the method merges layer by layer (its `lazy` declaration) in this process, else one line."""
    if m.lazy is None or not m.lazy.applies(resolved, sources[0].spec):
        what = m.name + (f" --variant {resolved['variant']}" if resolved.get("variant") else "")
        raise ValueError(f"--lazy merges layer by layer ({'; '.join(LAZY)}); {what} holds the sources whole")
    if engine is not None:
        raise ValueError("--lazy merges in this process; leave out --accelerator, --devices, --precision and --parallel")
    dtypes = sorted({str(next(s.backbone.parameters()).dtype).removeprefix("torch.") for s in sources})
    if len(dtypes) > 1:
        raise ValueError(f"--lazy keeps the sources' dtype, and these differ ({', '.join(dtypes)}); convert one, "
                         "or merge without --lazy (in float32)")


def prepare(models, data=64, method: str = "fs-merge", seed: int = 0, augment: int | None = None, engine=None,
            calibrate: str = "routing", select=None, held_out=0, checkpoint_every: int = 0,
            checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, keep_checkpoint: bool = False,
            out: str | os.PathLike | None = None, force: bool = False, tasks=None, allow_pickle: bool = False,
            lazy: bool = False, accelerator: str | None = None, devices: int | None = None, precision: str | None = None,
            parallel: str | None = None, per_task: int | None = None, fidelity: int | None = None,
            same_task: str | None = None, eval_data=None,
            score: bool = False, cache: FeatureCache | None = None, command: str | None = None,
            config_file: str | os.PathLike | None = None, **options) -> Job:
    """Every check of a merge, before any work (see the module docstring); the arguments are `merge`'s."""
    call = {k: v for k, v in {"function": "foldmerge.merge", "data": describe(data), "method": method, "seed": seed,
                              "augment": augment, "calibrate": calibrate, "select": describe(select),
                              "held_out": describe(held_out) if held_out else None,
                              "options": describe(options)}.items() if v is not None}
    m = get_method(method)
    if isinstance(data, bool) or not isinstance(data, (int, list, tuple)):
        raise ValueError("data must be a number of examples per task, or per model: tensors or data files")
    from_files = isinstance(data, (list, tuple)) and any(isinstance(d, (str, os.PathLike, Examples)) for d in data)
    if per_task is not None and not from_files:
        raise ValueError("per_task counts the examples drawn from data files; " + (
            "given tensors are read whole" if isinstance(data, (list, tuple)) else "with data=N, N is the count"))
    s = check_values(SETTINGS, {"seed": seed, "calibrate": calibrate, "force": force, "resume": resume,
                                "allow_pickle": allow_pickle, "lazy": lazy, "checkpoint_every": checkpoint_every or None,
                                "tasks": tasks, "out": out, "select": select, "augment": augment,
                                "data": data if from_files else None,
                                "per_task": data if isinstance(data, int) else per_task,
                                "held_out": None if isinstance(held_out, (list, tuple)) else held_out,
                                "accelerator": accelerator, "devices": devices, "precision": precision,
                                "parallel": parallel, "fidelity": fidelity, "same_task": same_task}, "foldmerge.merge")
    _check_keywords(m, options)
    given = m.check(options)                     # names and grammar now, defaults once the data is known
    engine = _engine(engine, s)
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, (list, tuple)) or len(models) < 2:
        raise ValueError("merge needs a list of two or more models (TaskModels or model directories)")
    if "tasks" in s and len(s["tasks"]) != len(models):
        raise ValueError(f"--tasks needs one task per model ({len(models)}), got {len(s['tasks'])}")
    # before any work: every place this run writes is checked against every input (models, the
    # models options name, data files) and against what is there now
    named = [v for o in m.options if isinstance(o.kind, ModelRef) and isinstance(v := given.get(o.name), str)]
    inputs = _paths([models, named, data, eval_data, held_out, config_file])
    where = checkpoint_dir if checkpoint_dir is not None else (checkpoint_dir_of(s["out"]) if "out" in s else None)
    out_seen = False
    if "out" in s:
        check_target(s["out"], s["force"], inputs=inputs)
        out_seen = identity(s["out"])
    if where is not None and (s.get("checkpoint_every") or s["resume"]):
        check_target(where, True, inputs=inputs, kind="checkpoint", flag="the checkpoint directory")
    sources = load_sources(models, s.get("tasks"), s["allow_pickle"], s["lazy"])
    given = read_option_files(given, [o.name for o in m.options if isinstance(o.kind, ModelRef)],
                              [o.name for o in m.options if isinstance(o.kind, TensorFile)], s["allow_pickle"])
    merged_form = equal_depths([x.merge_form() for x in sources])
    sharing = share(merged_form, s.get("same_task", SETTING["same_task"].default))
    if sharing.shared and m.name == "gating":
        raise ValueError("the gating merge routes each input to its own task's head; these models answer one "
                         "task, so there is nothing to route between: use another method")
    n_fid = s.get("fidelity", SETTING["fidelity"].default)
    fid = None
    if from_files:
        data, sample, held, fid = _from_files(merged_form, data, s.get("per_task", SETTING["per_task"].default),
                                              s.get("held_out", 0), n_fid, s["seed"], s.get("augment"), m)
    else:
        data, sample = _draw(merged_form, data, s["seed"], s.get("augment"), m)
        held = _held_out(merged_form, held_out if isinstance(held_out, (list, tuple)) else s.get("held_out", 0),
                         sample, s["seed"], m)
        if held is not None:
            sample["held_out"] = held_out if isinstance(held_out, int) else [len(h) for h in held]
        if "per_task" in sample and n_fid:
            fid = fidelity_sample(merged_form, sample["per_task"] + sample.get("held_out", 0), n_fid, s["seed"])
    data, held, fid = (_like(merged_form, x) for x in (data, held, fid))
    labelled = _labelled(merged_form, sharing, eval_data) if eval_data else None
    resolved = m.resolve(merged_form, given, data, held)
    if s["lazy"]:
        _check_lazy(m, resolved, merged_form, engine)
    grid = select_grid(m, s["select"], given) if "select" in s else None
    if grid and data is None:
        raise ValueError("--select scores candidates on the merge data, and this merge has none")
    context = Context(features=cache or FeatureCache())
    job = Job(sources, merged_form, data, m, given, resolved, s["seed"], s["calibrate"], grid, held, sample, engine,
              context, call, Path(s["out"]) if "out" in s else None, s["force"], keep_checkpoint=keep_checkpoint,
              command=command, fidelity=fid, labelled=labelled, score=bool(score) or labelled is not None, sharing=sharing)
    job.out_seen = out_seen
    job.checkpoint = context.checkpoint = _checkpoint(job, s.get("checkpoint_every", 0), where, s["resume"])
    return job


KEYWORDS = ("data", "method", "seed", "augment", "engine", "calibrate", "select", "held_out", "checkpoint_every",
            "checkpoint_dir", "resume", "keep_checkpoint", "out", "force", "tasks", "allow_pickle", "lazy", "accelerator",
            "devices", "precision", "parallel", "per_task", "cache", "command", "config_file")


def _like(models, tensors: list | None) -> list | None:
    """Drawn or read examples in each model's floating-point dtype (a float64 model reads float64);
    token ids stay integers."""
    if tensors is None:
        return None
    dtypes = [next(m.parameters()).dtype for m in models]
    return [x.to(dt) if x.is_floating_point() else x for x, dt in zip(tensors, dtypes)]


def _paths(given) -> list:
    """The file and folder paths among arguments (nested lists and dicts of them)."""
    if isinstance(given, (str, os.PathLike)):
        return [given]
    if isinstance(given, dict):
        given = list(given.values())
    if isinstance(given, (list, tuple)):
        return [p for g in given for p in _paths(g)]
    return []


def _check_keywords(method, options: dict) -> None:
    """A keyword that is neither the method's option nor another method's nor `merge`'s, in one line."""
    everyone = {o.name for m in METHODS.values() for o in m.options}
    for k in options:
        if k not in everyone:
            raise ValueError(f"{k!r} is neither an option of method {method.name!r} nor a keyword of "
                             f"foldmerge.merge{did_you_mean(k, [o.name for o in method.options] + list(KEYWORDS))}")


def _engine(engine, settings: dict):
    """The Engine a merge trains under: the one given, or one made of the accelerator, devices and
    precision settings (any of them given: Lightning Fabric, on the CPU unless an accelerator is named)."""
    named = [k for k in ("accelerator", "devices", "precision", "parallel") if k in settings]
    if named and engine is not None:
        raise ValueError(f"give engine= or {', '.join(named)}, not both")
    if not named:
        return engine
    return Engine(settings.get("accelerator", "cpu"), settings.get("devices", 1), settings.get("precision", "32-true"),
                  settings.get("parallel", "ddp"))


def _draw(models, data, seed: int, augment, method) -> tuple[list | None, dict]:
    """(per-model data, what the model's meta records of it): drawn (data as an int) or given; None
    for a method that reads no data when a task has no built-in examples to draw."""
    if isinstance(data, int):
        lacking = [t.name for m in models for t in m.tasks if not t.builtin]
        if lacking:
            if method.data == "required":
                raise ValueError(f"method {method.name!r} reads unlabeled examples of every task, and task "
                                 f"{lacking[0]!r} has none built in: give them with --data (one file or folder "
                                 "per model)")
            if augment:
                raise ValueError("augment applies to a drawn sample of built-in tasks")
            return None, {"none": f"no merge data: {method.name} reads none, and task {lacking[0]!r} has none "
                                  "built in"}
        augment = default_augment(method.name, models) if augment is None else augment
        drawn = merge_sample(models, data, seed, augment)
        _check_data(models, drawn)
        return drawn, {"per_task": data, "augment": augment, "seed": seed}
    if augment:
        raise ValueError("augment applies to a drawn sample (data as an int), not to given tensors")
    _check_data(models, data)
    return list(data), {"given": "tensors"}


def _from_files(models, specs, per_task: int, held_out: int, n_fid: int, seed: int, augment, method):
    """(data, what meta records of it, held-out data or None, fidelity data or None) read from one data
    spec (or `Examples`) per model: per task of a model `per_task` examples drawn (seeded), `held_out`
    more for early stopping, up to `n_fid` more for the fidelity report, each preprocessed as its
    model's own (`foldmerge.inputs`)."""
    if len(specs) != len(models):
        raise ValueError(f"--data needs one data file or folder per model ({len(models)}), got {len(specs)}")
    if augment:
        raise ValueError("augment makes images from a built-in task's sample, not from data files")
    if held_out and not method.held_out:
        raise ValueError(f"held-out early stopping applies to fs-merge and distill, not to {method.name!r}")
    read = [spec if isinstance(spec, Examples) else read_examples(os.fspath(spec)) for spec in specs]
    if all(reads(m) == "text" for m in models):
        check_same_tokens(models, read)
    data, held, fid, record = [], [], [], []
    for k, (m, examples) in enumerate(zip(models, read)):
        need = per_task * len(m.tasks)
        if len(examples) < need + held_out:
            asked = f"--per-task {per_task}" + (f" and --held-out {held_out}" if held_out else "")
            raise ValueError(f"data {examples.source}: {len(examples)} examples, and {asked} ask(s) for "
                             f"{need + held_out} (model {k + 1} has {len(m.tasks)} task(s))")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(_task_seed(seed, k, 0)))
        data.append(preprocess(m, examples.take(order[:need].tolist())))
        if held_out:
            held.append(preprocess(m, examples.take(order[need:need + held_out].tolist())))
        rest = order[need + held_out:need + held_out + n_fid * len(m.tasks)].tolist()
        fid.append(preprocess(m, examples.take(rest)) if rest else None)
        record.append(describe_examples(examples))
    fid = fid if all(f is not None for f in fid) else []     # the report needs examples of every task
    if all(reads(m) == "text" for m in models) and all(not d.is_floating_point() for d in data + held + fid):
        pad = padding_id(models[0])
        padded = common_length(data + held + fid, pad)
        data, held, fid = padded[:len(data)], padded[len(data):len(data) + len(held)], padded[len(data) + len(held):]
    names = [r["source"] for r in record]
    for part in (data, held, fid):
        if part:
            _check_data(models, part, names)
    sample = {"files": record, "per_task": per_task, "seed": seed, **({"held_out": held_out} if held_out else {})}
    return data, sample, held or None, fid or None


def _labelled(models, sharing: Sharing, specs) -> dict:
    """{task: (inputs, labels)} of --eval-data, one spec per task of the merge (models sharing a task
    share one), each read as the first source of that task reads (`foldmerge.inputs.labelled`)."""
    tasks = sharing.tasks
    if models[0].head_kind in ("projection", "lm"):
        raise ValueError("--eval-data scores classifiers; these models' heads are "
                         + ("projections into an embedding space (their fidelity to the sources is measured by cosine "
                            "instead)" if models[0].head_kind == "projection" else
                            "language models' (their report is perplexity on held-out text, --fidelity)"))
    if len(specs) != len(tasks):
        raise ValueError(f"--eval-data needs one labelled file or folder per task of the merge ({len(tasks)}: "
                         f"{', '.join(t.name for t in tasks)}), got {len(specs)}")
    return {t.name: labelled_examples(models[sharing.sources_of(j)[0]], t, spec)
            for j, (t, spec) in enumerate(zip(tasks, specs))}


def _held_out(models, held_out, sample: dict, seed: int, method) -> list | None:
    if isinstance(held_out, (list, tuple)):
        _check_data(models, list(held_out))
        held = list(held_out)
    else:
        if not held_out:
            return None
        if "per_task" not in sample:
            raise ValueError("held_out as a count applies to a drawn sample (data as an int); give tensors instead")
        held = held_out_sample(models, sample["per_task"], held_out, seed)
    if not method.held_out:
        raise ValueError(f"held-out early stopping applies to fs-merge and distill, not to {method.name!r}")
    return held


@torch.no_grad()
def _check_data(models, data, names: list[str] | None = None) -> None:
    """Each model's data: a non-empty, finite tensor (images, or token ids) that the model takes;
    `names`: what each tensor was read from (a file), for the message."""
    if not isinstance(data, (list, tuple)) or not all(torch.is_tensor(d) for d in data):
        raise ValueError("data must be a list of tensors, one per model, or a number of images per task")
    if len(data) != len(models):
        raise ValueError(f"got {len(data)} data tensors for {len(models)} models")
    for k, (m, d) in enumerate(zip(models, data)):
        what = f"data {names[k]}" if names else f"data tensor {k + 1}"
        if d.ndim == 0 or len(d) == 0:
            raise ValueError(f"{what} is empty (shape {tuple(d.shape)})")
        if d.dtype == torch.bool or d.is_complex():
            raise ValueError(f"{what} has dtype {d.dtype}; expected floating-point inputs (or integer token ids)")
        if d.is_floating_point() and not bool(torch.isfinite(d).all()):
            raise ValueError(f"{what} holds NaN or Inf")
        was = m.training
        m.eval()
        try:
            p = next(m.parameters())
            m.features(as_input(d[:1], p))
        except (RuntimeError, ValueError, IndexError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if not d.is_floating_point() and "index out of range" in first:
                raise ValueError(f"{what} holds token ids up to {int(d.max())}, past model {k + 1}'s "
                                 "vocabulary (a different tokenizer?)") from None
            raise ValueError(f"{what} has shape {tuple(d.shape)}, which model {k + 1} does not take "
                             f"({first[:120]})") from None
        finally:
            m.train(was)


def select_grid(method, grid: dict, given: dict) -> dict:
    """--select's grid with every value read by the method's own option."""
    options = {o.name: o for o in method.options}
    out = {}
    for name, values in grid.items():
        if name not in options:
            raise ValueError(f"--select {name}: not an option of method {method.name!r}{did_you_mean(name, options)}")
        if name in given:
            raise ValueError(f"--select {name}: also given as an option; give one or the other")
        out[name] = [None if v is None else check_value(options[name], v) for v in values]
    return out


def _checkpoint(job: Job, every: int, where, resume: bool) -> Checkpoint | None:
    """The run's Checkpoint (None: none asked for), fingerprinted by everything that fixes the run."""
    if not every and not resume:
        return None
    if where is None:
        raise ValueError("checkpoints need a checkpoint directory (or an output directory)")
    if job.engine is not None:
        raise ValueError("checkpoints and --resume run in this process only, not under --accelerator")

    def digest(tensors):
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    fingerprint = {"method": job.method.name, "seed": job.seed, "sample": job.sample, "calibrate": job.calibrate,
                   "select": describe(job.select), "options": describe(job.given),
                   "sources": [digest(m.state_dict().values()) for m in job.models],
                   "data": digest(job.data or [])}
    return Checkpoint(where, every or None, fingerprint, resume=resume)


# -------------------------------------------------------------------------------------- run
def run(job: Job) -> TaskModel:
    """The merge by the job's method (with `select`, the chosen candidate's)."""
    chosen = None
    options = job.given
    if job.select:
        picked, chosen = selection.choose(lambda d, c: _run(job, d, {**job.given, **c}), job.models, job.data,
                                          dict(job.select), job.context.features, _augmented_folds(job))
        options = {**job.given, **picked}
    merged = _run(job, job.data, options)
    if chosen is not None:
        merged.meta["select"] = chosen
    return merged


def _run(job: Job, data, options: dict) -> TaskModel:
    """One merge by the method, in this process or under the job's engine."""
    if job.engine is None:
        torch.manual_seed(job.seed)
        return job.method(job.models, data, seed=job.seed, context=job.context, held_out=job.held_out, **options)
    config, weights, meta = job.engine.run(_merge_on_device, job.models, data, job.method.name, job.seed, options,
                                           job.held_out, job.engine.parallel)
    merged = TaskModel.from_config(config)
    tensors = load_bytes(weights)
    merged.to(next(iter(tensors.values())).dtype)
    merged.load_state_dict(tensors)
    merged.meta = meta
    merged.meta["engine"] = {"accelerator": job.engine.accelerator, "devices": job.engine.devices,
                             "precision": job.engine.precision, "parallel": job.engine.parallel}
    return merged


def _merge_on_device(fabric, models, data, method: str, seed: int, options: dict, held_out, parallel: str = "ddp"):
    """One rank of an engine run: copies of the sources and the data on this rank's device (the
    caller's models stay where they are), the result back on the CPU."""
    device = fabric.device
    models = [copy.deepcopy(m).to(device) for m in models]
    data = None if data is None else [d.to(device) for d in data]
    held_out = None if held_out is None else [h.to(device) for h in held_out]
    torch.manual_seed(seed)
    merged = get_method(method)(models, data, seed=seed, context=Context(fabric=fabric, parallel=parallel),
                                    held_out=held_out, **options)
    # sent back to the launching process by value (a spawned rank's shared tensors die with it),
    # as the safetensors bytes the model files use
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    return merged.config(), save_bytes(state), merged.meta


# ----------------------------------------------------------------------------------- finish
def finish(job: Job, merged: TaskModel) -> TaskModel:
    """Calibrate, check, record and (with an output directory) save; see the module docstring."""
    if job.sharing.shared:
        merge_heads(merged, job.sharing)
        merged.meta["same_task"] = job.sharing.record()
    if job.data is None:
        merged.meta["calibration"] = {"calibrate": "none", "why": "no merge data to calibrate on"}
    elif len(merged.tasks) == 1:
        merged.meta["calibration"] = {"calibrate": "none", "why": "one head: no task to route between"}
    elif merged.head_kind in ("projection", "lm"):
        merged.meta["calibration"] = {"calibrate": "none", "why": f"{merged.head_kind} heads: no classes of tasks to "
                                      "route between"}
    else:
        merged.meta["calibration"] = calibrate_heads(merged, job.models, _originals(job) or job.data,
                                                     job.sharing.index) \
            if job.calibrate == "routing" else {"calibrate": "none"}
    merged.meta.update(seed=job.seed, merge_sample=job.sample, wall_seconds=time.perf_counter() - job.started)
    if merged.head_kind == "lm" and hf.tied_family(merged):        # GPT-2's: the head is the token table
        merged.meta["lm_head"] = "tied to the token table" if hf.lm_head_tied(merged) else \
            "its own matrix: this merge learned it apart from the token table (saved with tie_word_embeddings false)"
    deepened = [m.meta.get("deepened") for m in job.models]
    if any(deepened):                            # per source: padded with identity blocks, or None
        merged.meta["deepened"] = deepened
    bad = nonfinite(merged.state_dict())
    if bad:
        raise ValueError(f"the {job.method.name} merge produced non-finite weights ({bad}); nothing was saved. "
                         "A lower learning rate or rank usually avoids it")
    merged.meta["sources"] = [source_record(m) for m in job.sources]
    merged.meta["provenance"] = {**environment(), "device": job.engine.accelerator if job.engine else "cpu",
                                 "precision": job.engine.precision if job.engine else "32-true"}
    merged.meta["call"] = job.call
    if job.command:
        merged.meta["command"] = job.command
    if job.checkpoint is not None:
        merged.meta["checkpoint"] = {"every": job.checkpoint.every, "resumed": job.checkpoint.resumed}
    if job.fidelity is not None:
        merged.meta["fidelity"] = fidelity_report(merged, job.models, job.fidelity, job.context.features,
                                                  job.sharing.index)
    if job.score:
        merged.meta["scores"] = scores(merged, job.models, job.labelled, job.sharing)
    if job.out is not None:
        save_model(merged, job.out, merged.meta, extra=lambda d: _export(merged, d, job.sources),
                   expect=job.out_seen)
    if job.checkpoint is not None and (job.out is not None or not job.keep_checkpoint):
        job.checkpoint.remove()
    return merged


def scores(merged, sources, labelled: dict | None, sharing: Sharing | None = None) -> list[dict]:
    """Accuracy of each source on its task, of the sources together (their heads side by side, and
    where models share a task the mean of their logits) and of the merge, on `labelled` ({task of the
    merge: (inputs, labels)}) or the built-in tasks' test splits; [] where a task has neither."""
    if any(not t.builtin and not (labelled and t.name in labelled) for t in merged.tasks):
        return []
    sharing = sharing or share(sources, "no")

    def score(model, index=None):
        if not labelled:
            return _evaluate(model)
        # a source's own task reads the labelled examples of the merge's task it answers
        names = {t.name: sharing.tasks[j].name for t, j in zip(model.tasks, index)} if index else {}
        return _evaluate(model, labelled={t: labelled[names.get(t, t)] for t in [u.name for u in model.tasks]})
    names = [Path(s.meta["path"]).name if s.meta.get("path") else f"source {k + 1}" for k, s in enumerate(sources)]
    rows = [{"model": f"source: {n}", **score(s, sharing.index[k])} for k, (n, s) in enumerate(zip(names, sources))]
    together = "sources' logits averaged per task" if sharing.shared else "sources side by side"
    rows.append({"model": together, **score(SourceHeads(sources, sharing.index, sharing.tasks))})
    rows.append({"model": f"merge: {merged.meta.get('method')}", **score(merged)})
    return rows


def _export(merged, folder: Path, sources) -> None:
    """What a merge writes beside its model files: its card, and for Hugging Face sources the export
    (`foldmerge.hf`), each of whose folders carries the card too."""
    (folder / "README.md").write_text(card(merged.meta) + "\n")
    if any(s.meta.get("source_format") == "huggingface" for s in sources):
        hf.write_hf(merged, folder / "hf", sources)
        for sub in sorted((folder / "hf").iterdir()):
            (sub / "README.md").write_text(card(merged.meta, f"{sub.name}: a foldmerge merge", "transformers") + "\n")


def merge(models, data: int | list[torch.Tensor] = 64, method: str = "fs-merge", **settings) -> TaskModel:
    """Merge `models` (TaskModels or model directories, ours or Hugging Face's) into one TaskModel with
    one head per task (models of one task share one, `foldmerge.heads`).

    data: per-model unlabeled input tensors, per-model data files or folders (as --data; `per_task`
      drawn from each), or an int N to draw N training examples per task of the built-in tasks
      (plus `augment` augmented images per task made from them; None: `default_augment`).
    method: one of `foldmerge.methods.METHODS`; its options as keywords (`foldmerge merge --help`
      lists them with their defaults), e.g. variant, param, init, epochs.
    seed, calibrate, select, held_out, fidelity, same_task, tasks, allow_pickle, lazy: as the command
      line's (`SETTINGS`). eval_data: labelled data per task of the merge, scored into meta.
    config_file: the YAML file the merge was described in, if any: an input, never written over.
    engine: a `foldmerge.engine.Engine` (device, devices for DDP, precision) to train under
      Lightning Fabric; the merged model comes back on the CPU. None: this process, as is.
    out, force: save the merged model there (its Hugging Face export too, for HF sources), in one
      atomic swap; an existing model is replaced only with `force`.
    checkpoint_every / checkpoint_dir / resume: save the training state every N epochs (to
      OUT.resume, or `checkpoint_dir`) and with `resume` continue a run that was stopped from it
      (`foldmerge.checkpoint`; bit-identical to an uninterrupted run). The checkpoint is removed
      once the merge is done (saved, with `out`), unless `keep_checkpoint` (without `out`).
    cache: a `foldmerge.context.FeatureCache` shared by several merges of the same sources and data.
    """
    job = prepare(models, data, method, **settings)
    return finish(job, run(job))
