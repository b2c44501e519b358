"""Permute: activation matching (Git Re-Basin style, the "Permute" baseline of the ZipIt! paper).

Two MLPs only. For every hidden layer l, the post-ReLU features of both ORIGINAL models on
all merge data (every task's sample, concatenated) give the cross-correlation C (d x d,
C[i, j] = corr(f^0_i, f^1_j)); `scipy.optimize.linear_sum_assignment(C, maximize=True)` gives the
permutation π that maps model 0's neuron i to model 1's neuron π(i). With the permutation
matrix P (P[i, π(i)] = 1, so (P f^1)_i = f^1_{π(i)}):

    M_l = [I/2, P_l/2]     (d x 2d: average neuron i of model 0 with its match in model 1)
    U_l = [I; P_lᵀ]        (2d x d: model 0 reads f*, model 1 reads Pᵀ f*)

and the fold W*_l = M_l·blockdiag(W_l^0, W_l^1)·U_{l-1} = ½(W_l^0 + P_l W_l^1 P_{l-1}ᵀ),
b*_l = ½(b_l^0 + P_l b_l^1): model 1 permuted into model 0's order, then averaged. The heads
are folded with the last U: head_0 unchanged, head_1 · P_Lᵀ. Same matching as the authors'
`match_tensors_permute`, written as a foldable map (DESIGN §1).
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from .zipit import build_folded, check_mlp_sources, correlation, hidden_features


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
    eye = torch.eye(d0, dtype=dtype)
    p = eye[perm]                                   # P[i, π(i)] = 1
    m = torch.cat([eye / 2, p / 2], dim=1)
    u = torch.cat([eye, p.T], dim=0)
    return m, u, perm


def merge(models, data, seed: int = 0):
    """Permute-and-average two MLPs of identical widths; see the module docstring."""
    if len(models) != 2:
        raise ValueError(f"permute merges exactly two models, got {len(models)}; use zipit for more")
    check_mlp_sources(models, data, "permute")
    feats = hidden_features(models, data)
    maps, perms = [], []
    for f0, f1 in feats:
        m, u, perm = permutation_maps(f0, f1)
        maps.append((m, u))
        perms.append(perm)
    merged = build_folded(models, maps, seed)
    merged.meta = {"method": "permute", "widths": list(merged.backbone.hidden),
                   "fixed_points": [int((p == torch.arange(len(p))).sum()) for p in perms],
                   "merge_examples": [len(d) for d in data]}
    return merged
