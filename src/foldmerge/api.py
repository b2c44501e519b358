"""The Python API, mirroring the CLI.

    import foldmerge
    a, b = foldmerge.load("runs/src/mnist_0-4-s0"), foldmerge.load("runs/src/mnist_5-9-s1")
    merged = foldmerge.merge([a, b], data=64, method="fs-merge", variant="global")
    merged.save("runs/merged")
    foldmerge.evaluate(merged)        # {'per_task': …, 'per_task_mean': …, 'joint': …, 'joint_mean': …}
"""
from __future__ import annotations

import os
import time

import torch

from .data import Task
from .io import load_model
from .methods import get_method


def load(path: str | os.PathLike, allow_pickle: bool = False):
    model = load_model(path, allow_pickle=allow_pickle)
    model.meta = dict(model.meta or {}, path=str(path))
    return model


def merge_form(model):
    """The equivalent model a merge reads: the family's `merge_form` (a ResNet's BatchNorm folded
    into its convs), or the model itself. A new model; the given one is left as it is."""
    form = model.spec.merge_form
    return model if form is None else form(model)


def merge_sample(models, per_task: int, seed: int = 0, augment: int = 0) -> list[torch.Tensor]:
    """For each model, `per_task` unlabeled training images of each of its tasks (seeded),
    plus `augment` augmented images made from them (`foldmerge.data.augment.expand`)."""
    from .data.augment import expand
    out = []
    for k, m in enumerate(models):
        parts = []
        for i, t in enumerate(m.tasks):
            s = _task_seed(seed, k, i)
            originals = t.sample(per_task, seed=s)
            parts += [originals] + ([expand(t, originals, augment, seed=s)] if augment else [])
        out.append(torch.cat(parts))
    return out


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


CALIBRATE = ("routing", "none")
# augmented images per task a method's drawn sample gets when none is asked for: validation's
# evidence (README "Defaults"): RegMean's Grams from 64 originals + 1,024 augmented images per task
# scored higher in 7 of the 8 `bench defaults` settings (per-task mean +0.8, joint +1.2); ZipIt!
# and permute gained in only 4 and 3 of 8, and the trained merges fit the originals as E.1 does.
DEFAULT_AUGMENT = {"regmean": 1024}


def default_augment(method: str, models=()) -> int:
    """Augmented images per task `method` gets by default (0 where any task is text)."""
    if any(t.is_text for m in models for t in m.tasks):
        return 0
    return DEFAULT_AUGMENT.get(method, 0)


def merge(models, data: int | list[torch.Tensor] = 64, method: str = "fs-merge", seed: int = 0,
          augment: int | None = None, engine=None, calibrate: str = "routing", select: dict | None = None,
          checkpoint_every: int = 0, checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
          keep_checkpoint: bool = False, held_out: int = 0, **options):
    """Merge `models` (TaskModels or paths) into one TaskModel with every source's heads.

    data: per-model unlabeled input tensors, or an int N to draw N training images per task
    (plus `augment` augmented images per task made from them; None: `default_augment(method)`,
    1,024 for RegMean and 0 for the rest).
    engine: a `foldmerge.engine.Engine` (device, devices for DDP, precision) to train under
    Lightning Fabric; the merged model comes back on the CPU. None: this process, as is.
    calibrate: 'routing' (default) makes the heads comparable for joint accuracy without
    changing any per-task prediction (`foldmerge.calibrate`); 'none' leaves them as the method made them.
    select: {option: [values]} to choose among without labels: each candidate merges from half of
    every model's sample and is scored by its agreement with the sources on the other half
    (`foldmerge.selection`); the best one is merged from the whole sample.
    checkpoint_every / checkpoint_dir / resume: save the training state to `checkpoint_dir` every
    N epochs, and with `resume` continue a run that was stopped from it (`foldmerge.checkpoint`;
    the result is bit-identical to an uninterrupted run). The checkpoint is removed when the
    merge returns, unless `keep_checkpoint` (the CLI removes it once the model is saved).
    held_out: with data as an int, draw that many further unlabeled examples per task (disjoint
    from the sample) on which FS-Merge global and distillation stop early (paper F.8: the epoch with
    the lowest held-out loss is kept; `patience` option, default 20 epochs).
    options: passed to the method (see `foldmerge.methods`), e.g. variant, param, init, epochs.
    """
    from .provenance import describe
    # the call as made (arguments left at their defaults are not named; meta holds what they resolved to)
    call = {k: v for k, v in {"function": "foldmerge.merge", "data": describe(data), "method": method, "seed": seed,
                              "augment": augment, "calibrate": calibrate, "select": describe(select),
                              "held_out": describe(held_out) if held_out else None,
                              "options": describe(options)}.items() if v is not None}
    if calibrate not in CALIBRATE:
        raise ValueError(f"calibrate must be one of {', '.join(CALIBRATE)}, got {calibrate!r}")
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, (list, tuple)) or len(models) < 2:
        raise ValueError("merge needs a list of two or more models (TaskModels or model directories)")
    models = [load(m) if isinstance(m, (str, os.PathLike)) else m for m in models]
    _check_sources(models)
    models = [merge_form(m) for m in models]
    names = [t.name for m in models for t in m.tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a task ({', '.join(names)}); heads would collide")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    sample = {"given": "tensors"}
    if isinstance(data, bool):
        raise ValueError("data must be per-model tensors or a number of images per task")
    if isinstance(data, int):
        augment = default_augment(method, models) if augment is None else augment
        if data < 1:
            raise ValueError("the merge sample needs at least one image per task")
        if isinstance(augment, bool) or not isinstance(augment, int) or augment < 0:
            raise ValueError(f"augment must be an integer >= 0, got {augment!r}")
        sample = {"per_task": data, "augment": augment, "seed": seed}
        data = merge_sample(models, data, seed, augment)
    elif augment:
        raise ValueError("augment applies to a drawn sample (data as an int), not to given tensors")
    _check_data(models, data)
    fn = get_method(method)             # resolved once; an unknown method fails here, before any launch
    given = isinstance(held_out, (list, tuple))
    if not given and (isinstance(held_out, bool) or not isinstance(held_out, int) or held_out < 0):
        raise ValueError(f"held_out must be an integer >= 0 or per-model tensors, got {held_out!r}")
    if given or held_out:
        import inspect
        if "held_out" not in inspect.signature(fn).parameters:
            raise ValueError(f"held-out early stopping applies to fs-merge and distill, not to {method!r}")
        if given:
            _check_data(models, list(held_out))
            sample["held_out"] = [len(h) for h in held_out]
        elif "per_task" not in sample:
            raise ValueError("held_out as a count applies to a drawn sample (data as an int); give tensors instead")
        else:
            sample["held_out"] = held_out
            held_out = held_out_sample(models, sample["per_task"], held_out, seed)
        options = {**options, "held_out": list(held_out)}
    ck = _checkpoint(models, data, method, seed, sample, calibrate, select, options, engine,
                     checkpoint_every, checkpoint_dir, resume)
    from .checkpoint import checkpointing
    with checkpointing(ck):
        merged = _merge_checked(models, data, fn, method, seed, sample, engine, calibrate, select, options)
    merged.meta["call"] = call
    if ck is not None:
        merged.meta["checkpoint"] = {"every": ck.every, "resumed": resume}
        if not keep_checkpoint:
            ck.remove()
    return merged


def _checkpoint(models, data, method, seed, sample, calibrate, select, options, engine, every, where, resume):
    """The run's Checkpoint (None: none asked for), fingerprinted by everything that fixes the run."""
    if not every and not resume:
        return None
    if where is None:
        raise ValueError("checkpoints need a checkpoint directory")
    if engine is not None:
        raise ValueError("checkpoints and --resume run in this process only, not under --accelerator")
    import hashlib
    from .checkpoint import Checkpoint
    from .provenance import describe

    def digest(tensors):
        h = hashlib.sha256()
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    fingerprint = {"method": method, "seed": seed, "sample": sample, "calibrate": calibrate,
                   "select": describe(select), "options": describe(options),
                   "sources": [digest(m.state_dict().values()) for m in models], "data": digest(data)}
    return Checkpoint(where, every or None, fingerprint, resume=resume)


def _merge_checked(models, data, fn, method, seed, sample, engine, calibrate, select, options):
    start = time.perf_counter()
    chosen = None
    if select:
        import inspect
        from .selection import choose
        accepted = set(inspect.signature(fn).parameters)
        for name in select:
            if name not in accepted or name == "seed":
                raise ValueError(f"--select {name}: not an option of method {method!r}")
            if name in options:
                raise ValueError(f"--select {name}: also given as an option; give one or the other")
        picked, chosen = choose(lambda d, c: _run(models, d, fn, seed, {**options, **c}, engine), models, data,
                                dict(select))
        options = {**options, **picked}
    merged = _run(models, data, fn, seed, options, engine)
    merged.meta.setdefault("method", method)
    if chosen is not None:
        merged.meta["select"] = chosen
    merged.meta["calibration"] = calibrate_heads(merged, models, data) if calibrate == "routing" else {"calibrate": "none"}
    merged.meta["seed"] = seed
    merged.meta["merge_sample"] = sample
    merged.meta["wall_seconds"] = time.perf_counter() - start
    from .io import nonfinite
    bad = nonfinite(merged.state_dict())
    if bad:
        raise ValueError(f"the {method} merge produced non-finite weights ({bad}); nothing was saved. "
                         "A lower learning rate or rank usually avoids it")
    from .provenance import environment, source_record
    merged.meta["sources"] = [source_record(m) for m in models]
    merged.meta["provenance"] = {**environment(), "device": engine.accelerator if engine else "cpu",
                                 "precision": engine.precision if engine else "32-true"}
    return merged


def _check_sources(models) -> None:
    from .io import nonfinite
    from .model import TaskModel
    for k, m in enumerate(models):
        if not isinstance(m, TaskModel):
            raise ValueError(f"model {k + 1} is a {type(m).__name__}, not a TaskModel or a model directory")
        bad = nonfinite(m.state_dict())
        if bad:
            raise ValueError(f"model {k + 1} ({m.meta.get('path', 'in memory')}): {bad}")


@torch.no_grad()
def _check_data(models, data) -> None:
    """Each model's data: a non-empty, finite tensor (images, or token ids) that the model takes."""
    from .model import as_input
    if not isinstance(data, (list, tuple)) or not all(torch.is_tensor(d) for d in data):
        raise ValueError("data must be a list of tensors, one per model, or a number of images per task")
    if len(data) != len(models):
        raise ValueError(f"got {len(data)} data tensors for {len(models)} models")
    for k, (m, d) in enumerate(zip(models, data)):
        if d.ndim == 0 or len(d) == 0:
            raise ValueError(f"data tensor {k + 1} is empty (shape {tuple(d.shape)})")
        if d.dtype == torch.bool or d.is_complex():
            raise ValueError(f"data tensor {k + 1} has dtype {d.dtype}; expected floating-point inputs "
                             "(or integer token ids)")
        if d.is_floating_point() and not bool(torch.isfinite(d).all()):
            raise ValueError(f"data tensor {k + 1} holds NaN or Inf")
        was = m.training
        m.eval()
        try:
            p = next(m.parameters())
            m.features(as_input(d[:1], p))
        except (RuntimeError, ValueError, IndexError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if not d.is_floating_point() and "index out of range" in first:
                raise ValueError(f"data tensor {k + 1} holds token ids up to {int(d.max())}, past model {k + 1}'s "
                                 "vocabulary (a different tokenizer?)") from None
            raise ValueError(f"data tensor {k + 1} has shape {tuple(d.shape)}, which model {k + 1} does not take "
                             f"({first[:120]})") from None
        finally:
            m.train(was)


def calibrate_heads(merged, models, data: list[torch.Tensor]) -> dict:
    """The routing calibration of `merged`'s heads (in place), each head grouped with the source
    model it came from; see `foldmerge.calibrate`. A model that picks its head itself (a gated
    model's `route`) is left as it is."""
    if hasattr(merged, "route"):
        return {"calibrate": "none", "why": "the gate chooses the head"}
    from .calibrate import calibrate_routing
    groups = [k for k, m in enumerate(models) for _ in m.tasks]
    device = next(merged.parameters()).device
    return calibrate_routing(merged, [d.to(device) for d in data], groups)


def _run(models, data, fn, seed, options, engine):
    """One merge by the method, in this process or under `engine`."""
    if engine is None:
        return _merge_here(models, data, fn, seed, options)
    config, weights, meta = engine.run(_merge_on_device, models, data, fn, seed, options)
    merged = _rebuild(config, weights, meta)
    merged.meta["engine"] = {"accelerator": engine.accelerator, "devices": engine.devices,
                             "precision": engine.precision}
    return merged


def _merge_here(models, data, fn, seed, options):
    torch.manual_seed(seed)
    return fn(models, data, seed=seed, **options)


def _merge_on_device(models, data, fn, seed, options):
    """One rank of an engine run: sources and data on this rank's device, result on the CPU."""
    from . import engine
    device = engine.current().device
    models = [m.to(device) for m in models]
    data = [d.to(device) for d in data]
    if options.get("held_out") is not None:
        options = {**options, "held_out": [h.to(device) for h in options["held_out"]]}
    merged = _merge_here(models, data, fn, seed, options)
    # sent back to the launching process by value (a spawned rank's shared tensors die with it),
    # as the safetensors bytes the model files use
    from safetensors.torch import save
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    return merged.config(), save(state), merged.meta


def _rebuild(config, weights: bytes, meta):
    from safetensors.torch import load
    from .model import TaskModel
    merged = TaskModel.from_config(config)
    tensors = load(weights)
    merged.to(next(iter(tensors.values())).dtype)
    merged.load_state_dict(tensors)
    merged.meta = meta
    return merged


def evaluate(model, tasks: list[Task | str] | None = None, split: str = "test") -> dict:
    from .evaluation import evaluate as _evaluate
    return _evaluate(model, tasks, split=split)
