"""Weight averaging: the mean of every backbone parameter; heads are kept as they are.

Meaningful for models that share an initialization; for models from different
initializations it is the baseline that collapses (FS-Merge paper, Table 2).
"""
from __future__ import annotations

import torch

from ..io import MappedTensors
from ..model import TaskModel
from ..options import Lazy, ListOf, Number, Option, Rule, method
from . import align
from .common import check_same_backbone, copy_heads
from .repair import RESET, reset_statistics

OPTIONS = (
    Option("weights", ListOf(Number(low=0)), "one weight per model",
           Rule(lambda c: [1.0 / len(c.models)] * len(c.models), "1/n each: the plain mean")),
    RESET,
)


@method("average", OPTIONS, "the weighted mean of the backbones (for models from one start)", data="optional",
        lazy=Lazy())
def merge(models, data, seed, context, weights, reset_bn):
    """The weighted mean of the backbones; `reset_bn` then resets every layer's statistics on
    `data` (`foldmerge.methods.repair`, the maps being the averaging M = [w_1 I, …, w_n I])."""
    check_same_backbone(models, "weight averaging")
    if weights is not None and len(weights) != len(models):
        raise ValueError(f"weights needs one weight per model ({len(models)}), got {len(weights)}")
    if weights is not None and not sum(weights) > 0:
        raise ValueError("weights must not all be 0")
    weights = list(weights) if weights else [1.0 / len(models)] * len(models)
    merged = TaskModel.shaped_for_merge(models)      # allocated once: each mean is assigned, not copied
    with torch.no_grad():
        states = [m.backbone.state_dict() for m in models]
        # memory-mapped sources (--lazy): each mean goes to a temporary file's pages as it is made
        keep = MappedTensors({k: (tuple(v.shape), v.dtype) for k, v in states[0].items()}).put \
            if align.read_lazily(models) else lambda k, mean: mean
        avg = {k: keep(k, sum(w * s[k] for w, s in zip(weights, states))) for k in states[0]}
        merged.backbone.load_state_dict(avg, assign=True)
        copy_heads(merged, models, assign=True)
    if reset_bn:
        align.check_sources(models, data, "weight averaging with reset_bn")
        widths = models[0].spec.validate(models[0].backbone)
        maps = {s: align.averaging_maps(widths[s], weights, [None] * len(models))
                for s in align.merged_spaces(models[0].spec)}
        reset_statistics(merged, models, data, maps)
    merged.meta = {"method": "average", "weights": weights, "reset_bn": bool(reset_bn)}
    return merged
