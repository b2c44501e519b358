"""Reading a model directory, foldmerge's or Hugging Face's, into a TaskModel.

foldmerge's (`config.json` with `arch`, `model.safetensors`) are read by `foldmerge.io`; Hugging
Face's (`config.json` with `model_type`) by `foldmerge.hf`. Either way the model's `meta["path"]`
records where it came from, and the weights' SHA-256 is taken when they are read, so a merge
records the weights it merged even if the file changes afterwards.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import hf
from .data import Task
from .gated import GatedModel
from .io import CONFIG, WEIGHTS, ModelFileError, nonfinite, parameters_on_meta, read_model_files, release_freed_memory
from .model import TaskModel
from .provenance import file_sha256


def load(path: str | os.PathLike, task=None, allow_pickle: bool = False, lazy: bool = False) -> TaskModel:
    """The model at `path`. `task`: a Hugging Face model's task where its config does not record one
    (foldmerge's models record theirs: a different one is refused). `lazy`: its tensors are read-only
    views of a memory map of its safetensors files, in their stored dtype (`io.map_tensors`)."""
    path = Path(path) if os.path.exists(path) else hf.cached(path)
    if hf.is_hf_dir(path):
        model = hf.load_hf(path, task, allow_pickle, lazy)
        model.meta["sha256"] = hf.weights_sha256(path, model.meta.get("loaded_from_pickle"))
    else:
        cfg, state, pickled = read_model_files(path, allow_pickle, lazy)
        kind = GatedModel if cfg.get("kind") == "gated" else TaskModel
        try:
            # shapes first: a config that declares huge layers allocates nothing (and torch's notes on
            # empty layers are not printed: what is wrong with them is said in one line below)
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                shapes = {k: tuple(v.shape) for k, v in kind.from_config(cfg).state_dict().items()}
        except (TypeError, ValueError, KeyError, RuntimeError, NotImplementedError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelFileError(f"{path / CONFIG} describes no valid model: {first}") from None
        wrong = next((k for k in shapes if k in state and tuple(state[k].shape) != shapes[k]), None)
        if wrong is not None:
            raise ModelFileError(f"{path / WEIGHTS} does not match {CONFIG}: {wrong!r} is "
                                 f"{tuple(state[wrong].shape)}, the config makes it {shapes[wrong]}")
        try:
            if lazy:            # the model takes the mapped tensors as they are (no copy, their dtype)
                with parameters_on_meta():
                    model = kind.from_config(cfg)
                model.load_state_dict(state, assign=True)
            else:
                model = kind.from_config(cfg)
                model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else "shape or key mismatch"
            raise ModelFileError(f"{path / WEIGHTS} does not match {CONFIG}: {first}") from None
        model.meta = dict(cfg.get("meta") or {})
        weights = pickled or path / WEIGHTS
        model.meta["sha256"] = file_sha256(weights)
        if pickled is not None:
            model.meta["loaded_from_pickle"] = str(pickled.resolve())
        if task is not None and Task.parse(task).name not in [t.name for t in model.tasks]:
            raise ModelFileError(f"{path} records its task ({', '.join(t.name for t in model.tasks)}); "
                                 f"--tasks gave {task}")
        model.eval()
    model.meta["path"] = str(path)
    if lazy:                  # its tensors are a file's read-only map: merges fold it parameter by parameter
        model.meta["lazy"] = True
    return model


def load_sources(models, tasks=None, allow_pickle: bool = False, lazy: bool = False) -> list[TaskModel]:
    """The models of a merge as TaskModels (paths loaded: ours or Hugging Face's, whose tokenizers must
    agree; `tasks[k]` for model k; `lazy`: memory-mapped, `load`), each checked to hold finite weights."""
    if lazy:
        release_freed_memory()
    hf_paths = [p for p in models if isinstance(p, (str, os.PathLike)) and hf.is_hf_dir(p)]
    if hf_paths:
        hf.check_tokenizers(hf_paths)
    out = []
    for k, m in enumerate(models):
        if isinstance(m, (str, os.PathLike)):
            m = load(m, tasks[k] if tasks else None, allow_pickle, lazy)
        elif not isinstance(m, TaskModel):
            raise ValueError(f"model {k + 1} is a {type(m).__name__}, not a TaskModel or a model directory")
        bad = nonfinite(m.state_dict())
        if bad:
            raise ValueError(f"model {k + 1} ({m.meta.get('path', 'in memory')}): {bad}")
        out.append(m)
    return out


def read_option_files(given: dict, models=(), tensors=(), allow_pickle: bool = False) -> dict:
    """`given` (a method's options) with the options named in `models` and `tensors` that hold a path
    read: a model in the form a merge reads (a model given in memory too), tensors (.safetensors) as a dict."""
    out = dict(given)
    for name in models:
        if isinstance(given.get(name), str):
            out[name] = load(given[name], allow_pickle=allow_pickle).merge_form()
        elif isinstance(given.get(name), TaskModel):      # given in memory: the same form as the sources
            out[name] = given[name].merge_form()
    for name in tensors:
        if isinstance(given.get(name), str):
            try:
                out[name] = load_file(given[name])
            except (OSError, SafetensorError) as e:
                raise ValueError(f"--{name.replace('_', '-')} {given[name]}: not a readable .safetensors file "
                                 f"({str(e).splitlines()[0]})") from None
    return out
