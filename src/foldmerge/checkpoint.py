"""Resumable training: the state of one run's training loops, written atomically every N epochs.

A run (one merge, or one source model) may train several times: FS-Merge seq. trains a stage
per source, a ViT source pre-trains then fine-tunes. The loops of a run are numbered in the
order they start, which the code fixes, so a resumed run meets them in the same order. A
loop that had finished is not trained again: its parameters are set to the saved final values
and its loss history returned. The loop that was running continues from its last saved epoch
with its parameters, optimizer state (momentum / Adam moments), schedule step, shuffling
generator and torch's global RNG restored, so the resumed run ends bit-identical to one that
was never stopped (same machine, same threads).

The checkpoint directory (`<out>.resume/`) holds `state.safetensors` (every tensor) and
`state.json` (the rest, a fingerprint of the run: a resume of a different run is refused, and an
integrity hash over both files: an edited or damaged checkpoint is refused).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from .io import real, swap_in, tmp_beside, write_tensors
from .schema import CheckpointState, check

TENSORS, STATE = "state.safetensors", "state.json"
# tests: SIGKILL this process right after its N-th checkpoint is written
KILL_AFTER = "FOLDMERGE_TEST_KILL_AFTER_CHECKPOINT"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of another run."""


def checkpoint_dir(out: str | os.PathLike) -> Path:
    out = real(out)
    return out.with_name(out.name + ".resume")


class Checkpoint:
    def __init__(self, path: str | os.PathLike, every: int | None, fingerprint: dict, resume: bool = False):
        """`every`: epochs between saves (None on a resume: the interval the run was started with)."""
        if every is not None and every < 1:
            raise ValueError(f"checkpoint interval must be a positive number of epochs, got {every}")
        if every is None and not resume:
            raise ValueError("a checkpoint needs an interval (epochs between saves)")
        self.path, self.every, self.resumed = Path(path), every, resume
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self.index = -1                      # the loops started so far in this process
        self.finished: dict[int, dict] = {}  # loop -> {"params": [...], "history": [...]}
        self.current: dict | None = None     # the loop that was running when the state was saved
        self.saves = 0
        if resume:
            self._load()
        elif (self.path / STATE).is_file():
            raise CheckpointError(f"{self.path} holds the checkpoint of an unfinished run; pass --resume to "
                                  "continue it, or remove it")
        elif self.path.is_symlink() or self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            # the checkpoint is swapped in there and removed at the end: never over someone's files
            raise CheckpointError(f"{self.path} exists and is not a foldmerge checkpoint; checkpoints are written "
                                  "there, so move it away first")

    # ----------------------------------------------------------------- reading
    def _load(self) -> None:
        if not (self.path / STATE).is_file():
            raise CheckpointError(f"nothing to resume: no checkpoint at {self.path}")
        try:
            meta = json.loads((self.path / STATE).read_text())
            if not isinstance(meta, dict) or meta.get("integrity") != _integrity(self.path / TENSORS, meta):
                raise CheckpointError(f"{self.path} was changed after it was written (its integrity hash does not "
                                      "match its contents); it cannot be resumed")
            check(CheckpointState, meta, self.path / STATE)
            tensors = load_file(str(self.path / TENSORS))
        except CheckpointError:
            raise
        except Exception as e:   # json, schema, safetensors and OS errors of several types
            raise CheckpointError(f"{self.path} is not a readable checkpoint: {str(e).splitlines()[0]}") from None
        if meta.get("fingerprint") != self.fingerprint:
            # named by this run's keys only: the file's own keys may be anything
            diff = sorted(k for k in self.fingerprint if meta["fingerprint"].get(k) != self.fingerprint[k])
            raise CheckpointError(f"{self.path} was written by a different run (it differs in "
                                  f"{', '.join(diff) or 'its fingerprint'}); resume with the same command")
        self.every = self.every or meta["every"]
        for j, history in meta["finished"].items():
            j = int(j)
            self.finished[j] = {"history": history, "params": _list(tensors, f"done{j}.p")}
        cur = meta.get("current")
        if cur is not None:
            missing = [k for k in ("cur.generator", "cur.rng") if k not in tensors]
            if missing:
                raise CheckpointError(f"{self.path / TENSORS}: the tensor {missing[0]!r} is missing")
            cur["params"] = _list(tensors, "cur.p")
            cur["opt_tensors"] = {k[len("cur.opt."):]: v for k, v in tensors.items() if k.startswith("cur.opt.")}
            cur["generator"], cur["rng"] = tensors["cur.generator"], tensors["cur.rng"]
        self.current = cur

    # ------------------------------------------------------------ in `fit`
    def begin(self) -> int:
        self.index += 1
        return self.index

    def restore_finished(self, idx: int, params) -> list[float] | None:
        """A loop that had finished: its final parameters set, its history returned (None: it had not)."""
        done = self.finished.get(idx)
        if done is None:
            return None
        _set(params, done["params"])
        return list(done["history"])

    def restore(self, idx: int, params, opt, generator) -> tuple[int, int, list[float]]:
        """(epoch, step, history) to continue loop `idx` from; (0, 0, []) if it had not started."""
        cur = self.current
        if cur is None or cur["fit"] != idx:
            return 0, 0, []
        _set(params, cur["params"])
        _check_groups(self.path, cur["param_groups"], opt.state_dict()["param_groups"])
        try:
            state = {int(i): {k: cur["opt_tensors"].get(f"{i}.{k}", v) for k, v in entries.items()}
                     for i, entries in cur["opt_state"].items()}
            opt.load_state_dict({"state": state, "param_groups": cur["param_groups"]})
            generator.set_state(cur["generator"])
            torch.set_rng_state(cur["rng"])
        except (ValueError, RuntimeError, KeyError, TypeError) as e:
            # a state that fits the schema but not this run's optimizer (a hand-made checkpoint)
            raise CheckpointError(f"{self.path}: the optimizer or generator state does not fit this run "
                                  f"({(str(e).splitlines() or [type(e).__name__])[0][:100]})") from None
        return cur["epoch"], cur["step"], list(cur["history"])

    def due(self, epoch: int, epochs: int) -> bool:
        return epoch % self.every == 0 and epoch < epochs

    def save(self, idx: int, epoch: int, step: int, params, opt, generator, history: list[float]) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for j, done in self.finished.items():
            tensors.update({f"done{j}.p{i}": p for i, p in enumerate(done["params"])})
        tensors.update({f"cur.p{i}": p.detach() for i, p in enumerate(params)})
        sd = opt.state_dict()
        opt_state = {}
        for i, entries in sd["state"].items():
            opt_state[str(i)] = {}
            for k, v in entries.items():
                if torch.is_tensor(v):
                    tensors[f"cur.opt.{i}.{k}"] = v
                    opt_state[str(i)][k] = None          # read from the tensor file
                else:
                    opt_state[str(i)][k] = v
        tensors["cur.generator"], tensors["cur.rng"] = generator.get_state(), torch.get_rng_state()
        meta = {"fingerprint": self.fingerprint, "every": self.every, "finished": {str(j): d["history"] for j, d in self.finished.items()},
                "current": {"fit": idx, "epoch": epoch, "step": step, "history": history, "opt_state": opt_state,
                            "param_groups": sd["param_groups"]}}
        self._write({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta)
        self.saves += 1
        if os.environ.get(KILL_AFTER) == str(self.saves):
            os.kill(os.getpid(), signal.SIGKILL)

    def finish(self, idx: int, params, history: list[float]) -> None:
        self.finished[idx] = {"params": [p.detach().clone() for p in params], "history": list(history)}

    def _write(self, tensors: dict, meta: dict) -> None:
        tmp = tmp_beside(self.path)
        try:
            write_tensors(tensors, tmp / TENSORS)
            meta = json.loads(json.dumps(meta, default=float))
            meta["integrity"] = _integrity(tmp / TENSORS, meta)
            (tmp / STATE).write_text(json.dumps(meta) + "\n")
            swap_in(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def remove(self) -> None:
        """The run finished and its result is saved: the checkpoint it wrote or resumed from is no
        longer needed. Only a directory that holds a checkpoint and nothing else is removed."""
        if (self.saves or self.resumed) and not self.path.is_symlink() and (self.path / STATE).is_file() \
                and {p.name for p in self.path.iterdir()} <= {STATE, TENSORS}:
            shutil.rmtree(self.path, ignore_errors=True)


def _check_groups(path: Path, saved: list, fresh: list) -> None:
    """The optimizer's hyperparameters as saved must be this run's: the fingerprint fixes the options,
    so every value equals the fresh optimizer's but the learning rate, which the schedule moves (a
    finite number >= 0). Only a hand-made checkpoint differs."""
    fresh = json.loads(json.dumps(fresh, default=float))        # as the checkpoint wrote them
    def lr_ok(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    ok = len(saved) == len(fresh) and all(
        isinstance(s, dict) and set(s) == set(f) and lr_ok(s.get("lr")) and
        all(s[k] == f[k] for k in f if k != "lr") for s, f in zip(saved, fresh))
    if not ok:
        raise CheckpointError(f"{path}: the saved optimizer settings are not this run's (edited by hand?); it "
                              "cannot be resumed")


def _integrity(tensor_file: Path, meta: dict) -> str:
    """SHA-256 over the tensor file's bytes and the state (all of state.json but this hash): an edited,
    truncated or swapped checkpoint is refused rather than resumed into a different model."""
    h = hashlib.sha256()
    with open(tensor_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(json.dumps({k: v for k, v in meta.items() if k != "integrity"}, sort_keys=True).encode())
    return h.hexdigest()


def _list(tensors: dict, prefix: str) -> list[torch.Tensor]:
    n = sum(1 for k in tensors if k.startswith(prefix) and k[len(prefix):].isdigit())
    return [tensors[f"{prefix}{i}"] for i in range(n)]


@torch.no_grad()
def _set(params, values) -> None:
    if len(params) != len(values) or any(p.shape != v.shape for p, v in zip(params, values)):
        raise CheckpointError("the checkpoint's parameters do not fit this run's (was it made by another version?)")
    for p, v in zip(params, values):
        p.copy_(v)
