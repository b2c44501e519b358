"""The one training loop: source-model training, FS-Merge and distillation all run through `fit`.

It is deliberately plain: an optimizer, a per-step learning-rate schedule, minibatches
(or the whole data at once, i.e. gradient descent as in the FS-Merge paper's MLP runs),
and a loss function supplied by the caller.
"""
from __future__ import annotations

import math
import time
from functools import partial
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from . import engine
from .progress import bar, status

SCHEDULES = ("constant", "step", "cosine")
# training stops as diverged when an epoch's loss is not finite or exceeds this many times the
# first epoch's (itself floored at 1e-3, so a start at ~0 does not make every rise a divergence)
DIVERGED_FACTOR = 100.0


class TrainingDiverged(ValueError):
    """Training's loss became non-finite or grew far past its start; the message says when."""


@dataclass
class EarlyStop:
    """Early stopping on held-out data (FS-Merge paper F.8): `loss()` (no gradients needed) is
    scored after every epoch; training stops once it has not improved for `patience` epochs (None:
    runs every epoch), and the parameters of the best epoch are put back. `fit` fills in
    `best_epoch` (1-based; 0: the start was best), `best_loss` and `epochs_run`."""
    loss: Callable[[], float]
    patience: int | None = 20
    best_epoch: int = 0
    best_loss: float = math.inf
    epochs_run: int = 0

    def as_dict(self) -> dict:
        return {"patience": self.patience, "best_epoch": self.best_epoch, "best_loss": self.best_loss,
                "epochs_run": self.epochs_run}


OPTIMIZERS = ("sgd", "adamw")
# what weight decay pulls: every parameter toward zero (the optimizers' own), only the matrices (a
# parameter of one axis, such as an identity-initialized diagonal, a norm's gain or a bias, keeps its
# value), or every parameter toward its value when training began (decoupled, as AdamW's)
DECAYS = ("all", "matrices", "to-start")
LOGIT_LOSSES = ("mse", "kl")


@dataclass
class TrainConfig:
    epochs: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    schedule: str = "cosine"      # cosine: one cycle after a linear warmup (paper E.1)
    # warmup length as a fraction of all steps (cosine only): 0.02 is the paper's 20 epochs of its
    # 1000-epoch MLP runs (E.1), and scales with a run, so a 10-epoch run leaves warmup too
    warmup: float = 0.02
    step_gamma: float = 0.9       # step: the LR is multiplied by gamma at 1/3 and 2/3 of training
    batch_size: int | None = None  # None: the whole data each step (gradient descent)
    seed: int = 0
    decay: str = "all"            # DECAYS
    # a reconstruction objective (FS-Merge, distillation): the share of the sources' logits in it, the
    # rest the features' (0: the features alone, paper eq. 4)
    logit_weight: float = 0.0
    # the logits' error: their squared error (biases cancel) or the KL divergence from each source's
    # predicted distribution to the merge's (a language model's distillation)
    logit_loss: str = "mse"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.logit_weight <= 1.0:
            raise ValueError(f"logit_weight is a share in [0, 1], got {self.logit_weight!r}")
        if self.logit_loss not in LOGIT_LOSSES:
            raise ValueError(f"logit_loss must be one of {LOGIT_LOSSES}, got {self.logit_loss!r}")
        if self.logit_loss != "mse" and not self.logit_weight:
            raise ValueError(f"logit_loss {self.logit_loss} scores the logits, which weigh nothing at logit_weight 0")
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not all(math.isfinite(float(v)) for v in (self.lr, self.momentum, self.weight_decay, self.warmup)):
            raise ValueError("lr, momentum, weight decay and warmup must be finite numbers")
        if self.epochs < 0 or self.lr <= 0:
            raise ValueError("epochs must be >= 0 and lr > 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch size must be positive, got {self.batch_size}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError("momentum and weight decay must be >= 0")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup is a fraction of training in [0, 1), got {self.warmup!r}")

    @classmethod
    def adamw(cls, epochs: int, lr: float, batch_size: int, seed: int = 0, weight_decay: float = 0.01) -> "TrainConfig":
        """AdamW over one cosine cycle without warmup: how transformer sources, the gate and its trunk train."""
        return cls(epochs=epochs, lr=lr, optimizer="adamw", weight_decay=weight_decay, schedule="cosine", warmup=0,
                   batch_size=batch_size, seed=seed)

    def as_dict(self, examples: int | None = None) -> dict:
        """The fields; with `examples`, a full-batch run records the batch it used (never None)."""
        d = asdict(self)
        if examples is not None and d["batch_size"] is None:
            d["batch_size"] = examples
        return d


def lr_factor(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        drops = sum(step >= total * f for f in (1 / 3, 2 / 3))
        return cfg.step_gamma ** drops
    warm = min(int(round(cfg.warmup * total)), max(total - 1, 0))
    if step < warm:
        return (step + 1) / warm
    rest = max(total - warm, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / rest))


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer; its own weight decay for decay "all", on the matrices alone for "matrices", none
    for "to-start" (`decay_to_start` does it)."""
    params = list(params)
    if cfg.decay == "matrices":
        groups = [{"params": [p for p in params if p.dim() >= 2]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    else:
        groups = params
    wd = 0.0 if cfg.decay == "to-start" else cfg.weight_decay
    # foreach: one multi-tensor kernel per update step instead of a Python loop over tensors
    # (torch picks it only on CUDA by default; FS-Merge has many small map tensors)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=wd, foreach=True)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd, foreach=True)


@torch.no_grad()
def decay_to_start(params, start, lr: float, weight_decay: float) -> None:
    """p <- p - lr * weight_decay * (p - p_start): AdamW's decoupled decay, toward where p began."""
    if weight_decay:
        for p, p0 in zip(params, start):
            p.sub_(p - p0, alpha=lr * weight_decay)


def train_step(opt: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], loss_fn: Callable[..., torch.Tensor],
               batch: Sequence[torch.Tensor], fabric=None, sharded=None) -> float:
    """One optimizer step on `batch` (the body of `fit`'s loop); returns the batch's loss.
    `sharded` (an `engine.Sharded`): the loss runs through it, and every rank runs it (FSDP's gathers
    are collective), a rank with no share of the batch on one example weighted 0."""
    opt.zero_grad(set_to_none=True)
    part, weight = engine.shard(batch, fabric)
    if sharded is not None:
        if not len(part[0]):
            part = [t[:1] for t in batch]
        with engine.autocast(fabric):
            loss = sharded(loss_fn, *part)
        (loss * weight).backward()
    elif len(part[0]):
        with engine.autocast(fabric):
            loss = loss_fn(*part)
        loss.backward()
    else:                           # more ranks than examples: this rank adds nothing
        loss = torch.zeros(())
    batch_loss = engine.average_gradients(params, loss, weight, fabric, sharded is not None)
    opt.step()
    return batch_loss


def fit(params: Sequence[torch.nn.Parameter], loss_fn: Callable[..., torch.Tensor],
        data: Sequence[torch.Tensor], cfg: TrainConfig, desc: str = "training",
        early_stop: EarlyStop | None = None, fabric=None, checkpoint=None, modules=None,
        parallel: str = "ddp") -> list[float]:
    """Minimize loss_fn(*batch) over `data` (tensors sharing their first dimension).

    Returns the mean loss of every epoch. With a Fabric of a device run (`foldmerge.engine`) the
    batch is shared among the ranks and their gradients averaged; otherwise plain PyTorch.
    `early_stop`: stop on a held-out loss and keep the best epoch's parameters (`EarlyStop`).
    `checkpoint`: a `foldmerge.checkpoint.Checkpoint` to save to every N epochs and resume from.
    `parallel` "fsdp" (a Fabric of two or more ranks): `modules`, the modules holding `params` and
    everything the loss runs, are sharded over the ranks while training (`engine.Sharded`).
    """
    params = [p for p in params if p.requires_grad]
    if parallel == "fsdp" and fabric is not None and fabric.world_size > 1:
        if modules is None:
            raise ValueError(f"{desc} does not train under parallel 'fsdp' (its modules are not named); use 'ddp'")
        sharded = engine.Sharded(fabric, modules, params)
        held_out_loss = early_stop.loss if early_stop is not None else None
        try:
            if early_stop is not None:                  # scored with the parameters gathered too
                early_stop.loss = partial(sharded, held_out_loss)
            return _fit(sharded.params, loss_fn, data, cfg, desc, early_stop, fabric, checkpoint, sharded)
        finally:
            sharded.gather()
            if early_stop is not None:
                early_stop.loss = held_out_loss
    return _fit(params, loss_fn, data, cfg, desc, early_stop, fabric, checkpoint, None)


def _fit(params, loss_fn, data, cfg: TrainConfig, desc: str, early_stop, fabric, checkpoint, sharded) -> list[float]:
    ck = checkpoint
    if ck and early_stop is not None:
        raise ValueError("early stopping on held-out data does not combine with checkpoints / --resume")
    if early_stop is not None:
        best = _held_out(early_stop, params, 0, None)
    idx = ck.begin() if ck else None
    if ck:
        done = ck.restore_finished(idx, params)
        if done is not None:            # finished before the run was stopped: as it ended
            return done
    n = len(data[0])
    bs = n if not cfg.batch_size or cfg.batch_size >= n else cfg.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total = cfg.epochs * steps_per_epoch
    opt = make_optimizer(params, cfg)
    begun = [p.detach().clone() for p in params] if cfg.decay == "to-start" else None   # before any restore
    g = torch.Generator().manual_seed(cfg.seed)
    start, step, history = ck.restore(idx, params, opt, g) if ck else (0, 0, [])
    show_every = max(1, cfg.epochs // 200) if bs == n else 1
    began = time.perf_counter()
    with bar(cfg.epochs if bs == n else total, desc) as progress:
        if start:
            progress.advance(start if bs == n else start * steps_per_epoch, info=f"resumed at epoch {start}")
        for epoch in range(start, cfg.epochs):
            order = torch.randperm(n, generator=g) if bs < n else None
            epoch_loss = 0.0
            for i in range(steps_per_epoch):
                batch = data if order is None else [t[order[i * bs:(i + 1) * bs]] for t in data]
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * lr_factor(cfg, step, total, steps_per_epoch)
                batch_loss = train_step(opt, params, loss_fn, batch, fabric, sharded)
                if begun is not None:
                    decay_to_start(params, begun, opt.param_groups[0]["lr"], cfg.weight_decay)
                step += 1
                epoch_loss += batch_loss * len(batch[0])
                if bs < n:
                    progress.advance(1)
            history.append(epoch_loss / n)
            _check_diverged(history, cfg, desc)
            if bs == n:
                info = {"info": f"loss {history[-1]:.4g}"} if len(history) % show_every == 0 else {}
                progress.advance(1, **info)
            if ck and ck.due(epoch + 1, cfg.epochs):
                ck.save(idx, epoch + 1, step, params, opt, g, history)
            if early_stop is not None:
                best = _held_out(early_stop, params, epoch + 1, best)
                if early_stop.patience is not None and epoch + 1 - early_stop.best_epoch >= early_stop.patience:
                    break
    if early_stop is not None:
        with torch.no_grad():               # the best epoch's parameters
            for p, b in zip(params, best):
                p.copy_(b)
    if ck:
        ck.finish(idx, params, history)
    if history:     # the bar is gone when it ends (transient): one line says how it went
        status(f"{desc}: {len(history)} epochs, last loss {history[-1]:.4g}, {time.perf_counter() - began:.0f} s")
    return history


def _held_out(stop: EarlyStop, params, epoch: int, best):
    """Score the held-out loss after `epoch`; a copy of the parameters if it is the best so far."""
    with torch.no_grad():
        loss = float(stop.loss())
    stop.epochs_run = epoch
    if best is None or loss < stop.best_loss:
        stop.best_loss, stop.best_epoch = loss, epoch
        return [p.detach().clone() for p in params]
    return best


def _check_diverged(history: list[float], cfg: TrainConfig, desc: str) -> None:
    loss, start = history[-1], history[0]
    if math.isfinite(loss) and (len(history) == 1 or loss <= DIVERGED_FACTOR * max(start, 1e-3)):
        return
    what = f"became {loss}" if not math.isfinite(loss) else f"grew from {start:.4g} to {loss:.4g}"
    raise TrainingDiverged(
        f"{desc} diverged: the loss {what} by epoch {len(history)} of {cfg.epochs} (lr {cfg.lr:g}, "
        f"{cfg.optimizer}); the learning rate is likely too high (for FS-Merge also a large low-rank rank): "
        "lower --lr; nothing was saved")
