"""Reading and writing models: safetensors weights plus a small JSON config.

A model directory holds `model.safetensors` and `config.json`. Writes go to a temporary
directory that is renamed into place, so an interrupted save leaves nothing half-written.
Pickle checkpoints (.pt/.pth/.bin/.ckpt) are refused unless the caller opts in, and even then
they are read with torch's weights-only unpickler (a checkpoint that needs more is refused),
because loading a pickle can run arbitrary code. No tensor holding NaN or Inf is read or written.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import pickle
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from safetensors.torch import load_file

from .errors import ModelFileError
from .schema import ModelConfig, check

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


def nonfinite(state: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with the first tensor of `state` that holds NaN or Inf (None: all finite)."""
    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"tensor {name!r} holds {int((~torch.isfinite(t)).sum())} NaN/Inf value(s) of {t.numel()}"
    return None


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """A one-line error naming the first tensor of `state` that holds NaN or Inf."""
    bad = nonfinite(state)
    if bad:
        raise ModelFileError(f"{where}: {bad}")


TMP_TAG = ".foldmerge-tmp-"      # hidden siblings a save writes and then renames in or removes


# the first line of every report.md foldmerge writes, by which a report folder is known as ours
REPORT_SIGNATURE = "<!-- written by foldmerge report; the next report written here replaces this page -->"
# What each kind of directory foldmerge writes holds, by which an existing one is known as ours (the
# file, and what its text says: a Hugging Face model's config.json or a user's report.md is not ours):
# only a directory of the same kind (or an empty one) is ever replaced.
KINDS = {"model": (CONFIG, "a foldmerge model directory", lambda text: '"arch"' in text),
         "checkpoint": ("state.json", "a foldmerge checkpoint", lambda text: '"fingerprint"' in text),
         "report": ("report.md", "a foldmerge report", lambda text: text.startswith(REPORT_SIGNATURE))}


def _is_model_dir(path: Path) -> bool:
    return is_kind(path, "model")


def is_kind(path: Path, kind: str) -> bool:
    """Whether `path` holds what foldmerge writes as a directory of this kind: its file, and in it what
    foldmerge writes there (one line, not the whole file, is read: a marker, not a validation)."""
    marker, _, ours = KINDS[kind]
    try:
        with open(Path(path) / marker, encoding="utf-8", errors="replace") as f:
            return ours(f.read(1 << 16))
    except OSError:
        return False


def real(path) -> Path:
    """`path` resolved through its links; a loop of links or a name that is not UTF-8 in one line
    (model files record their paths as UTF-8 text)."""
    _utf8(path, path)
    try:
        resolved = Path(path).resolve()
    except (RuntimeError, OSError) as e:         # RuntimeError: a loop of symbolic links
        raise ModelFileError(f"{path}: {str(e).splitlines()[0] if str(e) else 'cannot resolve it'}") from None
    _utf8(resolved, path)                        # a link may lead to a name that is not UTF-8
    return resolved


def _utf8(path, given) -> None:
    try:
        os.fsdecode(path).encode("utf-8")
    except UnicodeEncodeError:
        where = "" if path == given else f" (where {os.fsdecode(given)!r} leads)"
        raise ModelFileError(f"the path {os.fsdecode(path)!r}{where} is not valid UTF-8; rename it") from None


def _input_paths(given) -> list[Path]:
    """Where an input really lies: the path resolved through links, and for a folder, where each of
    its entries resolves to (a model folder may hold links to files elsewhere). A `FILE:COLUMN`
    data reference is its file."""
    p = Path(given)
    if not p.exists() and not p.is_symlink() and ":" in str(given):
        p = Path(str(given).rsplit(":", 1)[0])
    found = [real(p)]
    if p.is_dir():
        try:
            found += [real(e) for e in p.iterdir() if e.is_symlink()]
        except OSError:
            pass
    return found


def identity(path: str | os.PathLike) -> tuple | None:
    """What is at `path` now (None: nothing), to tell at the final swap whether it changed since
    the checks before the work: a directory swapped in or written into has another identity."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def check_target(out: str | os.PathLike, force: bool = False, inputs=(), kind: str = "model",
                 flag: str = "--out") -> Path:
    """Refuse, before any work, a directory that a write would not be allowed to replace: one that
    is, lies inside or holds an input (a model, a data file, a result; links followed), a file, an
    existing directory of this kind without `force`, one that holds other things, or a place this
    process cannot write. Every path foldmerge writes or removes passes here."""
    target = real(out)
    for given in inputs:
        for src in _input_paths(given):
            if target == src or src in target.parents:
                raise ModelFileError(f"{flag} {out} is {'the input ' if target == src else 'inside the input '}"
                                     f"{given}; foldmerge never writes over its inputs")
            if target in src.parents:
                raise ModelFileError(f"{flag} {out} holds the input {given}; writing there would replace it, "
                                     "so it is refused")
    marker, what, _ = KINDS[kind]
    if target.is_symlink() or target.exists():
        if not target.is_dir():
            raise ModelFileError(f"{target} exists and is not a directory")
        if is_kind(target, kind):
            if not force:
                raise ModelFileError(f"{target} already holds {what.replace('a foldmerge ', 'a ')}; "
                                     "pass --force to replace it")
        elif any(target.iterdir()):
            raise ModelFileError(f"{target} exists and is not {what}; refusing to write into it")
    parent = next(p for p in target.parents if p.exists())      # where the new directory will be made
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ModelFileError(f"cannot write to {parent}: permission denied")
    return target


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where
    the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def tmp_beside(out: Path) -> Path:
    """A new hidden directory beside `out` to write into before `swap_in`, once what killed
    earlier writes to `out` left there is removed; its name carries this process's id."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(out)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_TAG}{os.getpid()}-", dir=out.parent))


def _clear_stale(out: Path) -> None:
    """Remove what an earlier save to `out` that was killed left beside it (its process gone)."""
    for p in out.parent.glob(f".{out.name}{TMP_TAG}*"):
        if "-old-" in p.name and not out.exists():
            continue                  # the only copy of a model whose replace was cut short: keep it
        try:
            pid = int(p.name[len(f".{out.name}{TMP_TAG}"):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


class TargetChanged(ModelFileError):
    """What is at the output changed after the checks before the work (another process wrote there)."""


def swap_in(tmp: Path, out: Path, expect: tuple | None | bool = False) -> None:
    """Put the directory `tmp` at `out` (a sibling), replacing what is there atomically (one
    exchange where the system has it; elsewhere old aside, then new in), and remove the old.
    `expect`: the `identity` `out` had when it was checked before the work; if it changed since,
    nothing is replaced (False: no such check)."""
    if expect is not False and identity(out) != expect:
        raise TargetChanged(f"{out} {'appeared' if expect is None else 'changed'} while this run worked (another "
                            "process wrote there); nothing was replaced: run again (with --force to replace what "
                            "is there now)")
    if not out.exists():
        try:
            os.rename(tmp, out)          # never onto a directory that appeared meanwhile with files in it
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise TargetChanged(f"{out} appeared while this run worked (another process wrote there); "
                                    "nothing was replaced: run again") from None
            raise
        return
    if _exchange(tmp, out):                  # tmp now holds the old directory
        old = tmp
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_TAG}{os.getpid()}-old-", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
        os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def carry_over(old: Path, new: Path, own: frozenset = frozenset()) -> None:
    """Copy into `new` everything `old` holds that `new` does not, at every depth (a folder both hold
    is walked into): what replaces a directory keeps the files put there by someone else. A file both
    hold is the new one (written by this run); `own`: names at the top of `old` that an earlier run of
    the same kind wrote, replaced or dropped."""
    for entry in old.iterdir():
        if entry.name in own:
            continue
        there = new / entry.name
        if not there.exists() and not there.is_symlink():
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, there, symlinks=True)
            else:
                shutil.copy2(entry, there, follow_symlinks=False)
        elif entry.is_dir() and not entry.is_symlink() and there.is_dir() and not there.is_symlink():
            carry_over(entry, there)


def write_tensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """A safetensors file of `tensors` (names in sorted order), written one tensor at a time: the
    header first (every shape and offset is known beforehand), then each tensor's bytes straight from
    its memory. safetensors' own `save_file` first copies every tensor into one buffer, a second model
    in memory; this holds at most one tensor's contiguous copy (none for a contiguous CPU tensor, a
    memory-mapped one included). I/O failures (a full disk) are OSErrors like every other write's."""
    names = sorted(tensors)
    header, offset = {}, 0
    for name in names:
        t = tensors[name]
        if t.dtype not in SAFETENSORS_DTYPE:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} has no safetensors code")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPE[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)             # the data starts 8-byte aligned, as safetensors writes it
    _write_file(path, [len(blob).to_bytes(8, "little"), blob] + [tensors[n] for n in names])


def _write_file(path, parts: list) -> None:
    """Bytes and tensors (their memory, as it is), one after the other: where every tensor file is written."""
    with open(path, "wb") as f:
        for part in parts:
            if isinstance(part, torch.Tensor):
                part = part.detach().cpu().contiguous().reshape(-1)
                if not part.numel():
                    continue
                part = memoryview(part.view(torch.uint8).numpy())
            f.write(part)


def save_model(model, out_dir: str | os.PathLike, meta: dict[str, Any] | None = None,
               overwrite: bool = True, extra=None, expect: tuple | None | bool = False) -> Path:
    """Write `model` to `out_dir`. Nothing non-finite is written. An existing model there is
    replaced atomically: the new directory is written beside it and swapped in with one
    rename (at every instant a complete model is at `out_dir`); any other files the old
    directory held are carried into the new one, never deleted. `extra(dir)` writes more into
    the new directory before the swap (a merge's Hugging Face export), replacing what the old
    one held under those names. `expect`: as `swap_in`'s."""
    out = real(out_dir)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    check_finite(state, f"refusing to save {out}")
    if out.exists() and not overwrite:
        raise ModelFileError(f"{out} already exists")
    if out.exists() and not out.is_dir():
        raise ModelFileError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not _is_model_dir(out):
        # Only ever replace an earlier model directory, never an unrelated folder.
        raise ModelFileError(f"{out} exists and is not a foldmerge model directory; refusing to overwrite it")
    tmp = tmp_beside(out)
    try:
        write_tensors(state, tmp / WEIGHTS)
        cfg = model.config()
        cfg["meta"] = meta or {}
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        # mkdtemp makes a private (0700) folder; give the model the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in (WEIGHTS, CONFIG):
            os.chmod(tmp / f, 0o666 & ~umask)
        if extra is not None:
            extra(tmp)
        if out.exists():
            carry_over(out, tmp)                     # the user's other files come along, at every depth
        swap_in(tmp, out, expect)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file a user gave (a config, an index, a result), or one line saying why it cannot be read:
    not JSON, not text, or nested too deeply for the parser."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path} is not valid JSON: {e.msg} (line {e.lineno}; truncated?)") from None
    except UnicodeDecodeError:
        raise ModelFileError(f"{path} is not a text file") from None
    except RecursionError:
        raise ModelFileError(f"{path} is nested too deeply to be a config or a result") from None


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    return _read_config(Path(path)).get("meta", {})


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG
    if not cfg_path.is_file():
        raise ModelFileError(f"{path} is not a foldmerge model directory (no {CONFIG})")
    return check(ModelConfig, read_json(cfg_path), cfg_path)


def read_model_files(path: str | os.PathLike, allow_pickle: bool = False,
                     lazy: bool = False) -> tuple[dict, dict, Path | None]:
    """(config, tensors, the pickle read or None) of a directory written by `save_model`: every check
    of the files themselves (`foldmerge.loading.load` builds the model from them). `lazy`: the
    safetensors file memory-mapped (`map_tensors`); a pickle is read whole."""
    path = Path(path)
    if not path.exists():
        aside = sorted(real(path).parent.glob(f".{path.name}{TMP_TAG}*-old-*/{CONFIG}"))
        if aside:        # a replace without an atomic swap (not Linux) was killed between its renames
            raise ModelFileError(f"{path} does not exist; an interrupted replace left the previous model at "
                                 f"{aside[0].parent} (rename it back)")
        raise ModelFileError(f"{path} does not exist")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise ModelFileError(f"{path} is a pickle checkpoint; refusing to load it (it can run code). "
                                 f"If you trust it, put it in a directory beside a {CONFIG} and pass --allow-pickle")
        raise ModelFileError(f"{path} is a file; expected a model directory with {CONFIG} and {WEIGHTS}")
    cfg = _read_config(path)
    weights = path / WEIGHTS
    pickled = None
    if not weights.is_file():
        pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles and not allow_pickle:
            raise ModelFileError(f"{path} holds a pickle checkpoint ({pickles[0].name}), not {WEIGHTS}; "
                                 "refusing to load it. Pass --allow-pickle if you trust it")
        if not pickles:
            raise ModelFileError(f"{path} has no {WEIGHTS}")
        pickled = pickles[0]
        state = load_pickle(pickled)
    elif lazy:
        state = map_tensors(weights)
    else:
        try:
            state = load_file(str(weights))
        except Exception as e:  # safetensors raises several types for corrupt files
            raise ModelFileError(f"{weights} is not a valid safetensors file: {e}") from None
    check_finite(state, f"{path}")
    return cfg, state, pickled


# safetensors' dtype names
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
SAFETENSORS_DTYPE = {v: k for k, v in DTYPES.items()}


def map_tensors(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as views of one read-only memory map of it, each in its stored
    dtype. Nothing is read until a tensor is used, and what is read stays the file's pages, which the
    system drops again under memory pressure: a merge that uses one layer at a time holds about one
    layer of the file. The map is read-only, so a write into one of these tensors is stopped by the
    hardware (a crash), never a changed input."""
    file = Path(file)
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > file.stat().st_size - 8:
                raise ValueError("no header")
            header = json.loads(f.read(n))
        start, size, out = 8 + n, file.stat().st_size, {}
        whole = np.memmap(file, dtype=np.uint8, mode="r")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (a, b) = DTYPES[info["dtype"]], [int(d) for d in info["shape"]], info["data_offsets"]
            count = int(np.prod(shape)) if shape else 1
            if not 0 <= a <= b or start + b > size or b - a != count * dtype.itemsize:
                raise ValueError(f"tensor {name!r} has offsets that do not fit its shape")
            with warnings.catch_warnings():          # the map is read-only on purpose (docstring)
                warnings.simplefilter("ignore")
                t = torch.frombuffer(whole[start + a:start + b], dtype=dtype) if b > a else torch.empty(0, dtype=dtype)
            out[name] = t.view(shape)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFileError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0][:160]})") from None
    return out


def release_freed_memory() -> None:
    """Have glibc's malloc give large freed blocks back to the system from now on (a fixed mmap threshold
    of 128 KiB, as MALLOC_MMAP_THRESHOLD_=131072 would: by default the threshold rises to the size of the
    largest block freed, up to 32 MiB, and blocks below it stay with the process, fragmented, for reuse)
    and trim what it keeps now. A merge of memory-mapped sources (`--lazy`) makes and frees one
    parameter's arithmetic after another: averaging two 351 MiB Llamas (bench scaling's width 1024) and
    saving the merge peaked at 414 MiB of private memory without this, 98-107 MiB with it (fresh
    processes). A bench measuring a merge in a process that merged before needs it too, or the merge
    reuses what an earlier one freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)                # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):               # not glibc: as it comes
        pass


class MappedTensors:
    """Tensors kept in the pages of a temporary file instead of the process's own memory: one shared,
    writable memory map of a file that is unlinked as soon as it is mapped (nothing is left on disk, even
    if the process is killed; the space returns when the map is dropped). What a merge writes there the
    system writes back and drops under memory pressure, as it drops a memory-mapped source's pages, so a
    merge of memory-mapped sources (`--lazy`) does not hold the merged model in its own memory either.
    `sizes`: name -> (shape, dtype) of every tensor to come; `put(name, t)` copies t in and returns the
    mapped tensor. The file lies in the system's temporary folder (TMPDIR, else /tmp)."""

    def __init__(self, sizes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.slots, end = {}, 0
        for name, (shape, dtype) in sizes.items():
            end += -end % 64                       # every tensor starts aligned
            n = int(np.prod(shape)) * dtype.itemsize
            self.slots[name] = (end, n, tuple(shape), dtype)
            end += n
        fd, path = tempfile.mkstemp(prefix="foldmerge-merged-")
        try:
            os.ftruncate(fd, max(end, 1))
            self._map = np.memmap(path, dtype=np.uint8, mode="r+", shape=(max(end, 1),))
        finally:
            os.close(fd)
            os.unlink(path)

    def put(self, name: str, t: torch.Tensor) -> torch.Tensor:
        a, n, shape, dtype = self.slots[name]
        if not n:
            return torch.empty(shape, dtype=dtype)
        view = torch.frombuffer(self._map[a:a + n], dtype=dtype).view(shape)
        view.copy_(t)
        return view


@contextmanager
def parameters_on_meta():
    """Modules built inside hold their parameters on the meta device (shapes, no memory; buffers stay
    real): a model then takes its tensors with `load_state_dict(…, assign=True)`, as they are."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, None if param is None else nn.Parameter(param.to("meta"), param.requires_grad))
    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A pickle checkpoint read with torch's weights-only unpickler: tensors and plain
    containers only, so loading it cannot run code; anything more is refused."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelFileError(f"{file} needs more than tensors to load and was refused (weights_only=True: "
                             f"{first[:160]}); convert it to safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ModelFileError(f"{file} holds no mapping of names to tensors")
    return state
