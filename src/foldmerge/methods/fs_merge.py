"""FS-Merge: train a Foldable SuperNet to reconstruct the sources' features, then fold it.

local  (paper eq. 3, MLPs): per hidden layer l, from the sources' own pre-activations
       z_l^1‖…‖z_l^n, learn M_l, U_l so that U_l · relu(M_l · z) reconstructs f_l^1‖…‖f_l^n.
global (paper eq. 4): learn every M, U together so that U_L · f*_L reconstructs the last
       representation layer of each source.
targets: 'all'      every input is scored against every source's features (MLP default);
         'own-task' an input of task k only against source k (transformer default, B.2).
target_scale: 'match' (scale each source's targets to the first source's mean |f|, paper E.1),
         a number (scale every source's targets to that mean |f|), or 'none'. Whatever U
         learns to produce on scaled targets is scaled back before folding (as the authors do).
"""
from __future__ import annotations

import time

import torch
from torch.nn import functional as F

from ..arch import get_arch
from ..foldable import merge_features, unmerge_features
from ..train import TrainConfig, fit
from .common import cat_with_owner, sources_arch

# Appendix E.1, bold values of the MNIST grid.
DEFAULTS = {
    "local": dict(init="random", param="full", epochs=15000, lr=0.1, momentum=0.9, targets="all"),
    "global": dict(init="first", param="full", epochs=1000, lr=0.1, momentum=0.9, targets="all"),
}


def _scales(targets: list[torch.Tensor], how) -> list[float]:
    means = [t.abs().mean().clamp_min(1e-12).item() for t in targets]
    if how in (None, "none", 0, 0.0):
        return [1.0] * len(targets)
    if how == "match":
        return [means[0] / m for m in means]
    try:
        level = float(how)
    except (TypeError, ValueError):
        raise ValueError(f"target_scale must be 'match', 'none' or a number, got {how!r}") from None
    return [level / m for m in means]


def _recon_loss(recon: list[torch.Tensor], targets: list[torch.Tensor], owner: torch.Tensor | None):
    """Mean squared error over the scored entries (all, or only each input's own task)."""
    total, count = 0.0, 0
    for k, (r, t) in enumerate(zip(recon, targets)):
        if owner is not None:
            keep = owner == k
            r, t = r[keep], t[keep]
        total = total + ((r - t) ** 2).sum()
        count += t.numel()
    return total / max(count, 1)


def merge(models, data, variant: str = "global", param: str | None = None, init: str | None = None,
          widths: list[int] | None = None, epochs: int | None = None, lr: float | None = None,
          momentum: float | None = None, schedule: str = "cosine", weight_decay: float = 0.0,
          targets: str | None = None, target_scale="match", form: str = "folded", seed: int = 0,
          batch_size: int | None = None):
    if variant not in DEFAULTS:
        raise ValueError(f"FS-Merge variant must be 'local' or 'global', got {variant!r}")
    d = DEFAULTS[variant]
    param = param or d["param"]
    init = init or d["init"]
    targets = targets or d["targets"]
    if targets not in ("all", "own-task"):
        raise ValueError(f"targets must be 'all' or 'own-task', got {targets!r}")
    cfg = TrainConfig(epochs=d["epochs"] if epochs is None else epochs, lr=d["lr"] if lr is None else lr,
                      momentum=d["momentum"] if momentum is None else momentum, schedule=schedule,
                      weight_decay=weight_decay, batch_size=batch_size, seed=seed)
    arch = get_arch(sources_arch(models))
    torch.manual_seed(seed)
    supernet = arch.SuperNet(models, widths=widths, param=param, init=init, seed=seed)
    x, owner = cat_with_owner(data)
    start = time.perf_counter()
    if variant == "local":
        history = _train_local(supernet, models, x, owner if targets == "own-task" else None,
                               cfg, target_scale)
    else:
        history = _train_global(supernet, models, x, owner if targets == "own-task" else None,
                                cfg, target_scale, form)
    merged = supernet.fold()
    merged.meta = {
        "method": "fs-merge", "variant": variant, "param": param, "init": init, "targets": targets,
        "target_scale": target_scale, "form": form, "widths": supernet.widths,
        "train": cfg.as_dict(), "train_seconds": time.perf_counter() - start,
        "learnable_parameters": sum(p.numel() for p in supernet.parameters()),
        "final_loss": history[-1] if history else None,
        "initial_loss": history[0] if history else None,
        "merge_examples": [len(t) for t in data],
    }
    return merged


def _train_global(supernet, models, x, owner, cfg, target_scale, form):
    with torch.no_grad():
        feats = [m.features(x) for m in models]
    scales = _scales(feats, target_scale)
    feats = [f * s for f, s in zip(feats, scales)]
    args = [x, *feats] + ([owner] if owner is not None else [])

    def loss_fn(xb, *rest):
        tb = list(rest[:len(feats)])
        ob = rest[len(feats)] if owner is not None else None
        return _recon_loss(supernet.reconstruct(supernet(xb, form=form)), tb, ob)

    history = fit(supernet.parameters(), loss_fn, args, cfg, desc="FS-Merge global")
    for k, s in enumerate(scales):
        supernet.U[-1].scale_block(k, 1.0 / s)
    return history


def _train_local(supernet, models, x, owner, cfg, target_scale):
    if not hasattr(supernet, "M") or any(m.arch != "mlp" for m in models):
        raise ValueError("local FS-Merge is defined for MLPs; use --variant global for other architectures")
    with torch.no_grad():
        pre = [m.backbone.preactivations(x) for m in models]   # [model][layer]
    history: list[float] = []
    for l in range(supernet.depth):
        z = [p[l] for p in pre]
        tgt = [F.relu(zk) for zk in z]
        scales = _scales(tgt, target_scale)
        tgt = [t * s for t, s in zip(tgt, scales)]
        M, U = supernet.M[l], supernet.U[l]
        n = len(z)
        ob_index = 2 * n

        def loss_fn(*batch, M=M, U=U, n=n):
            zb, tb = list(batch[:n]), list(batch[n:2 * n])
            ob = batch[ob_index] if len(batch) > ob_index else None
            recon = unmerge_features(U, F.relu(merge_features(M, zb)))
            return _recon_loss(recon, tb, ob)

        args = [*z, *tgt] + ([owner] if owner is not None else [])
        history += fit(list(M.parameters()) + list(U.parameters()), loss_fn, args, cfg,
                       desc=f"FS-Merge local, layer {l + 1}/{supernet.depth}")
        for k, s in enumerate(scales):
            U.scale_block(k, 1.0 / s)
    return history
