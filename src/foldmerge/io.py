"""Reading and writing models: safetensors weights plus a small JSON config.

A model directory holds `model.safetensors` and `config.json`. Writes go to a temporary
directory that is renamed into place, so an interrupted save leaves nothing half-written.
Pickle checkpoints (.pt/.pth/.bin/.ckpt) are refused unless the caller opts in, because
loading a pickle runs arbitrary code.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


class ModelFileError(RuntimeError):
    """A model path is missing, malformed or unsafe; the message says which and why."""


def save_model(model, out_dir: str | os.PathLike, meta: dict[str, Any] | None = None,
               overwrite: bool = True) -> Path:
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise ModelFileError(f"{out} already exists")
    if out.exists() and not out.is_dir():
        raise ModelFileError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (out / CONFIG).is_file():
        # Only ever replace an earlier model directory, never an unrelated folder.
        raise ModelFileError(f"{out} exists and is not a foldmerge model directory; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        cfg = model.config()
        cfg["meta"] = meta or {}
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        # mkdtemp makes a private (0700) folder; give the model the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in (WEIGHTS, CONFIG):
            os.chmod(tmp / f, 0o666 & ~umask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    return _read_config(Path(path)).get("meta", {})


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise ModelFileError(f"{path} is not a foldmerge model directory (no {CONFIG})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{cfg_path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    for key in ("arch", "backbone", "tasks"):
        if key not in cfg:
            raise ModelFileError(f"{cfg_path} lacks the key {key!r}")
    return cfg


def load_model(path: str | os.PathLike, allow_pickle: bool = False):
    """Load a TaskModel from a directory written by `save_model`."""
    from .model import TaskModel
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path} does not exist")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise ModelFileError(f"{path} is a pickle checkpoint; refusing to load it (it can run code). "
                                 f"If you trust it, put it in a directory beside a {CONFIG} and pass --allow-pickle")
        raise ModelFileError(f"{path} is a file; expected a model directory with {CONFIG} and {WEIGHTS}")
    cfg = _read_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles and not allow_pickle:
            raise ModelFileError(f"{path} holds a pickle checkpoint ({pickles[0].name}), not {WEIGHTS}; "
                                 "refusing to load it. Pass --allow-pickle if you trust it")
        if pickles:
            state = torch.load(pickles[0], map_location="cpu", weights_only=False)
        else:
            raise ModelFileError(f"{path} has no {WEIGHTS}")
    else:
        try:
            state = load_file(str(weights))
        except Exception as e:  # safetensors raises several types for corrupt files
            raise ModelFileError(f"{weights} is not a valid safetensors file: {e}") from None
    try:
        model = TaskModel.from_config(cfg)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{path / CONFIG} describes no valid model: {e}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "shape or key mismatch"
        raise ModelFileError(f"{weights} does not match {CONFIG}: {first}") from None
    model.meta = dict(cfg.get("meta") or {})
    model.eval()
    return model
