"""Permute: activation matching (Git Re-Basin style, the "Permute" baseline of the ZipIt! paper).

Two models of any merge spec. For every merged space (an MLP's hidden layers; a ViT's residual
stream, q/k, v and MLP spaces, features), the activations of both ORIGINAL models at the spec's
probes on all merge data (every task's sample, concatenated) give the cross-correlation C
(d x d, C[i, j] = corr(f^0_i, f^1_j)); `scipy.optimize.linear_sum_assignment(C, maximize=True)`
gives the permutation π that maps model 0's neuron i to model 1's neuron π(i) (within each
head of a space split into attention heads). With the permutation matrix P (P[i, π(i)] = 1,
so (P f^1)_i = f^1_{π(i)}):

    M = [I/2, P/2]     (d x 2d: average neuron i of model 0 with its match in model 1)
    U = [I; Pᵀ]        (2d x d: model 0 reads f*, model 1 reads Pᵀ f*)

and the fold of a weight from space a to space b, W* = M_b·blockdiag(W^0, W^1)·U_a =
½(W^0 + P_b W^1 P_aᵀ), b* = ½(b^0 + P_b b^1): model 1 permuted into model 0's order, then
averaged. The heads are folded with the last U: head_0 unchanged, head_1 · P_outᵀ. Same
matching as the authors' `match_tensors_permute`, written as a foldable map (docs/architecture.md).
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from ..options import Lazy, method
from . import align
from .repair import RESET, reset_statistics
from .zipit import correlation


def permutation_maps(f0: torch.Tensor, f1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M (d x 2d), U (2d x d), perm) for two models' (examples x d) features; perm[i] = π(i)."""
    d0, d1 = f0.shape[1], f1.shape[1]
    if d0 != d1:
        raise ValueError(f"permute needs layers of equal width, got {d0} and {d1}")
    corr = correlation([f0, f1])[:d0, d0:]
    rows, cols = linear_sum_assignment(corr.numpy(), maximize=True)
    perm = torch.empty(d0, dtype=torch.long)
    perm[torch.as_tensor(rows, dtype=torch.long)] = torch.as_tensor(cols, dtype=torch.long)
    dtype = f0.dtype if f0.is_floating_point() else torch.float32
    m, u = align.averaging_maps(d0, [0.5, 0.5], [None, perm])     # P[i, π(i)] = 1
    return m.to(dtype), u.to(dtype), perm


@method("permute", (RESET,), "permute model 2's neurons onto model 1's by activation correlation, then average",
        lazy=Lazy())
def merge(models, data, seed, context, reset_bn):
    """Permute-and-average two models of identical widths; see the module docstring. `reset_bn`:
    the BatchNorm reset on the merge data (`foldmerge.methods.repair`)."""
    if len(models) != 2:
        raise ValueError(f"permute merges exactly two models, got {len(models)}; use zipit for more")
    align.check_sources(models, data, "permute")
    if reset_bn and align.read_lazily(models):
        raise ValueError("reset_bn reads every space's maps after the fold, which --lazy releases layer by layer; "
                         "merge without --lazy to reset BatchNorm statistics")
    spec = models[0].spec
    feats = align.features_of(models, data)
    fixed = {}

    def space_maps(s):           # a space's permutation, when the fold first reads it (align.SpaceMaps)
        m, u, perms = align.per_head(lambda f: permutation_maps(f[0], f[1]), feats(s), spec.space(s).heads)
        fixed[s] = sum(int((p == torch.arange(len(p))).sum()) for (p,) in perms)
        return m, u
    maps = align.SpaceMaps(align.merged_spaces(spec), space_maps)
    merged = align.merge_with_maps(models, maps, seed)
    if reset_bn:
        reset_statistics(merged, models, data, maps)
    merged.meta = {"method": "permute", "fixed_points": fixed, "reset_bn": bool(reset_bn),
                   "merge_examples": [len(d) for d in data]}
    return merged
