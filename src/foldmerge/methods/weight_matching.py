"""Git Re-Basin weight matching (Ainsworth, Hayase, Srinivasa, ICLR 2023, Algorithm 1) on any merge spec.

No data: every merged space s of model k > 1 gets a permutation P_s that brings its weights
closest to model 1's,

    max_P  Σ_params ⟨ θ_1[p],  π(θ_k[p]) ⟩       π: every axis of p permuted by its space's P,

by coordinate descent: visiting the spaces in a random order, each P_s is the linear
assignment that maximizes Σ_{p with an axis in s} (θ_1[p] along s) · (θ_k[p] along s with its
other axes permuted)ᵀ, until a whole pass changes nothing (or `max_iter` passes). The spec's
`PermutationSpec` is the spec itself: a parameter's axes name their spaces (a conv's kernel
axes and a table's token axis are unpermuted and just flattened), norm vectors are included;
a space split into attention heads is permuted within each head. The heads of the tasks are
outside the backbone and carry over through the last U.

The merge is then model 1 and the permuted models averaged, M = [I/n, P_2/n, …], U = [I; P_2ᵀ; …],
folded like every alignment map (`align.merge_with_maps`), with an optional BatchNorm reset
(`reset_bn`: `foldmerge.methods.repair`), which the authors apply before evaluating.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from ..options import Integer, Option, method
from . import align
from .repair import RESET, reset_statistics

MAX_ITER = 100
OPTIONS = (RESET, Option("max_iter", Integer(1), "passes over the spaces at most (each pass re-matches every "
                         "space given the others)", MAX_ITER, "Git Re-Basin's weight matching code"))


def _along(t: torch.Tensor, axis: int) -> torch.Tensor:
    """t with `axis` first, flattened to (d x rest)."""
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def _assignment(cost: torch.Tensor, heads: int) -> torch.Tensor:
    """perm maximizing Σ_i cost[i, perm[i]], matching within contiguous heads only."""
    d = cost.shape[0]
    perm = torch.empty(d, dtype=torch.long)
    w = d // heads
    for h in range(heads):
        block = cost[h * w:(h + 1) * w, h * w:(h + 1) * w]
        rows, cols = linear_sum_assignment(block.numpy(), maximize=True)
        perm[h * w + torch.as_tensor(rows)] = h * w + torch.as_tensor(cols, dtype=torch.long)
    return perm


@torch.no_grad()
def match_weights(spec, ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor], seed: int = 0,
                  max_iter: int = MAX_ITER) -> tuple[dict[str, torch.Tensor], int]:
    """({space: perm} with (P θ_other)[i] = θ_other[perm[i]], passes made) for two state dicts."""
    entries = [(p.key, p.axes) for p in spec.params] + [(k, (s,) + (None,) * (ref[k].dim() - 1))
                                                         for k, s in spec.norm_params() if k in ref]
    spaces = [s for s in align.merged_spaces(spec) if any(s in axes for _, axes in entries)]
    merged = set(spaces)
    width = {s: next(ref[k].shape[axes.index(s)] for k, axes in entries if s in axes) for s in spaces}
    perms = {s: torch.arange(width[s]) for s in spaces}
    a = {k: ref[k].detach().to(torch.float64).cpu() for k, _ in entries}
    b = {k: other[k].detach().to(torch.float64).cpu() for k, _ in entries}

    def permuted(key, axes, skip):
        t = b[key]
        for i, s in enumerate(axes):
            if s in merged and s != skip:
                t = t.index_select(i, perms[s])
        return t

    g = torch.Generator().manual_seed(int(seed))
    passes = 0
    for passes in range(1, max_iter + 1):
        changed = False
        for j in torch.randperm(len(spaces), generator=g).tolist():
            s = spaces[j]
            cost = torch.zeros(width[s], width[s], dtype=torch.float64)
            for key, axes in entries:
                for i, ax in enumerate(axes):
                    if ax == s:
                        cost += _along(a[key], i) @ _along(permuted(key, axes, s), i).T
            new = _assignment(cost, spec.space(s).heads)
            if not torch.equal(new, perms[s]):
                old_score = cost[torch.arange(width[s]), perms[s]].sum()
                if cost[torch.arange(width[s]), new].sum() > old_score + 1e-12:
                    perms[s], changed = new, True
        if not changed:
            break
    return perms, passes


@method("weight-matching", OPTIONS, "Git Re-Basin: permute every model onto model 1 by its weights, then average",
        data="optional")
def merge(models, data, seed, context, reset_bn, max_iter):
    """Weight matching of every model to model 1, then the average; see the module docstring.
    data is needed only for `reset_bn`."""
    spec = align.sources_spec(models)
    if reset_bn:
        align.check_sources(models, data, "weight matching with reset_bn")
    else:
        align.check_widths(models, "weight matching")
    states = [dict(m.backbone.named_parameters()) for m in models]
    n = len(models)
    perms_k, passes = [None], []
    for st in states[1:]:
        perms, count = match_weights(spec, states[0], st, seed, max_iter)
        perms_k.append(perms)
        passes.append(count)
    widths = spec.validate(models[0].backbone)
    maps = {s: align.averaging_maps(widths[s], [1.0 / n] * n, [None] + [p.get(s) for p in perms_k[1:]])
            for s in align.merged_spaces(spec)}
    merged = align.merge_with_maps(models, maps, seed)
    resets = reset_statistics(merged, models, data, maps) if reset_bn else 0
    merged.meta = {"method": "weight-matching", "passes": passes, "reset_bn": bool(reset_bn), "reset_layers": resets,
                   "fixed_points": {s: [int((p[s] == torch.arange(len(p[s]))).sum()) for p in perms_k[1:]]
                                    for s in maps if s in perms_k[1]}}
    return merged
