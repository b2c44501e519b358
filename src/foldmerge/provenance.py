"""What a saved model records about how it was made: the software, the machine, the inputs.

Every merge's `meta` gets `provenance` (package, torch and Python versions, the git commit when
run from a checkout, threads, platform) and, for each source, its absolute path and the SHA-256
of its weights file, so that a merged model names exactly what it came from.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from .version import __version__


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout this package runs from (with '+dirty' if it has changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict:
    return {"foldmerge": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "git_commit": git_commit() or "not a git checkout",
            "threads": torch.get_num_threads(), "argv": list(sys.argv), "machine": machine()}


def machine() -> str:
    """The CPU model and core count (and the GPU, if torch sees one), in words."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    words = f"{cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        words += f", {torch.cuda.get_device_name(0)}"
    return words


def file_sha256(path: Path) -> str:
    """The file's SHA-256 (read when a model is loaded: what was merged, not what is there later)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_record(model) -> dict:
    """A source as its merge records it: the absolute path and the hash its weights had when they
    were read (`foldmerge.loading.load`), if it came from a file; otherwise that it was given in memory."""
    path = model.meta.get("path")
    if not path:
        return {"path": "in memory", "tasks": [t.name for t in model.tasks]}
    record = {"path": str(Path(path).resolve()), "tasks": [t.name for t in model.tasks]}
    if model.meta.get("sha256"):
        record["sha256"] = model.meta["sha256"]
    if model.meta.get("loaded_from_pickle"):
        record["loaded_from_pickle"] = True
    return record


def describe(value):
    """A JSON-friendly stand-in for an API argument (tensors by shape, models by their tasks)."""
    if torch.is_tensor(value):
        return {"tensor": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): describe(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return str(Path(value).resolve())
    if hasattr(value, "tasks"):
        return {"model": value.meta.get("path", "in memory") if isinstance(getattr(value, "meta", None), dict)
                else "in memory", "tasks": [t.name for t in value.tasks]}
    return type(value).__name__
