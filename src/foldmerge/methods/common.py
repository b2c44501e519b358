"""Helpers every merging method shares."""
from __future__ import annotations

import torch


def sources_arch(models) -> str:
    archs = {m.arch for m in models}
    if len(archs) != 1:
        raise ValueError(f"cannot merge models of different architectures: {sorted(archs)}")
    if len(models) < 2:
        raise ValueError("merging needs at least two models")
    return archs.pop()


def cat_with_owner(data: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the per-model merge samples; owner[i] = index of the model whose task x[i] is from."""
    x = torch.cat(list(data))
    owner = torch.cat([torch.full((len(d),), k, dtype=torch.long) for k, d in enumerate(data)])
    return x, owner


def check_same_backbone(models, method: str) -> None:
    """Parameter-wise methods (average, SLERP, RegMean) need identical backbones and head layouts."""
    sources_arch(models)
    cfgs = {str(m.backbone_config) for m in models}
    if len(cfgs) != 1:
        raise ValueError(f"{method} needs identical backbones; got " + " vs ".join(sorted(cfgs)))
    if len({m.head_bias for m in models}) != 1:
        raise ValueError(f"{method} needs sources whose heads all have, or all lack, a bias")
