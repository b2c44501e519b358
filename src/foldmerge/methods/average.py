"""Weight averaging: the mean of every backbone parameter; heads are kept as they are.

Meaningful for models that share an initialization; for models from different
initializations it is the baseline that collapses (FS-Merge paper, Table 2).
"""
from __future__ import annotations

import torch

from ..model import TaskModel
from .common import check_same_backbone, copy_heads


def merge(models, data=None, weights: list[float] | None = None, seed: int = 0):
    check_same_backbone(models, "weight averaging")
    weights = weights or [1.0 / len(models)] * len(models)
    merged = TaskModel.for_merge(models)
    with torch.no_grad():
        states = [m.backbone.state_dict() for m in models]
        avg = {k: sum(w * s[k] for w, s in zip(weights, states)) for k in states[0]}
        merged.backbone.load_state_dict(avg)
        copy_heads(merged, models)
    merged.meta = {"method": "average", "weights": weights}
    return merged
