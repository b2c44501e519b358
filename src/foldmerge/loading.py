"""Reading a model directory, foldmerge's or Hugging Face's, into a TaskModel.

foldmerge's (`config.json` with `arch`, `model.safetensors`) are read by `foldmerge.io`; Hugging
Face's (`config.json` with `model_type`) by `foldmerge.hf`. Either way the model's `meta["path"]`
records where it came from, and the weights' SHA-256 is taken when they are read, so a merge
records the weights it merged even if the file changes afterwards.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import hf
from .data import Task
from .gated import GatedModel
from .io import CONFIG, WEIGHTS, ModelFileError, read_model_files
from .model import TaskModel
from .provenance import file_sha256


def load(path: str | os.PathLike, task=None, allow_pickle: bool = False) -> TaskModel:
    """The model at `path`. `task`: a Hugging Face model's task where its config does not record one
    (foldmerge's models record theirs: a different one is refused)."""
    path = Path(path)
    if hf.is_hf_dir(path):
        model = hf.load_hf(path, task)
        model.meta["sha256"] = hf.weights_sha256(path)
    else:
        cfg, state, pickled = read_model_files(path, allow_pickle)
        try:
            model = (GatedModel if cfg.get("kind") == "gated" else TaskModel).from_config(cfg)
        except (TypeError, ValueError, KeyError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelFileError(f"{path / CONFIG} describes no valid model: {first}") from None
        try:
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
    return model
