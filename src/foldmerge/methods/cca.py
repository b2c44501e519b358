"""CCA Merge (Horoi, Camacho, Belilovsky, Wolf: "Harmony in Diversity: Merging Neural Networks with
Canonical Correlation Analysis", ICML 2024) on any merge spec, as a foldable map.

Permutation matching pairs one neuron with one neuron; CCA Merge aligns whole feature spaces
with a linear map. For every merged space, on the activations of model 1 (A) and model k (B)
at the spec's probes (all merge data), canonical correlation analysis finds directions
P_A, P_B (d x d) with

    (X_A P_A)ᵀ(X_A P_A) / N = I,   (X_B P_B)ᵀ(X_B P_B) / N = I,
    (X_A P_A)ᵀ(X_B P_B) / N = diag(ρ_1 ≥ ρ_2 ≥ …)   (the canonical correlations)

(X centered; Σ_AA, Σ_BB regularized by `reg`·mean eigenvalue·I, as the paper regularizes
them). Both models' features are then expressed in model A's coordinates,
X_A ≈ X_B·P_B·P_A⁻¹, i.e. f_A ≈ T_k f_B with T_k = (P_B P_A⁻¹)ᵀ, and averaged:

    M = [I/n, T_2/n, …, T_n/n]      U = [I; T_2⁻¹; …; T_n⁻¹]

so W* = (1/n) Σ_k T_k^out · W_k · (T_k^in)⁻¹: every model transformed into model 1's
coordinates, then averaged (the paper's merge for n models: each aligned to a reference).
Spaces split into attention heads are aligned within each head. The heads of the tasks carry
over through the last U.
"""
from __future__ import annotations

import torch

from ..options import Number, Option, method
from . import align

# the ridge keeps the whitening of directions a ReLU layer barely uses from amplifying noise: at 1e-4,
# CCA Merge fell below weight averaging even in its own setting (two MLPs of one task)
DEFAULT_REG = 0.1
OPTIONS = (Option("reg", Number(positive=True), "covariance regularization, relative to the mean eigenvalue",
                  DEFAULT_REG, "examples/cca_ridge.py: the best mean validation accuracy of 1e-4…10 over an MLP "
                  "pair of one task and three of disjoint tasks (docs/results/examples/cca-ridge.json); the "
                  "authors search their ridge per experiment"),)


def _inv_sqrt(s: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(s)
    return evecs @ torch.diag(evals.clamp_min(1e-300).rsqrt()) @ evecs.T


def cca(fa: torch.Tensor, fb: torch.Tensor, reg: float = DEFAULT_REG):
    """(P_A, P_B, ρ) of two (examples x d) feature matrices, float64; see the module docstring."""
    fa = fa.to(torch.float64) - fa.to(torch.float64).mean(0)
    fb = fb.to(torch.float64) - fb.to(torch.float64).mean(0)
    n = fa.shape[0]

    def cov(x):
        s = x.T @ x / n
        return s + reg * s.diagonal().mean().clamp_min(1e-12) * torch.eye(s.shape[0], dtype=s.dtype)

    wa, wb = _inv_sqrt(cov(fa)), _inv_sqrt(cov(fb))
    u, rho, vt = torch.linalg.svd(wa @ (fa.T @ fb / n) @ wb)
    return wa @ u, wb @ vt.T, rho


def cca_maps(feats: list[torch.Tensor], reg: float = DEFAULT_REG):
    """(M, U, [ρ of every model k > 1 against model 1]) for one space."""
    d = feats[0].shape[1]
    if any(f.shape[1] != d for f in feats):
        raise ValueError("CCA Merge needs layers of equal width")
    n = len(feats)
    eye = torch.eye(d, dtype=torch.float64)
    ts, rhos = [eye], []
    for fb in feats[1:]:
        pa, pb, rho = cca(feats[0], fb, reg)
        ts.append(torch.linalg.solve(pa.T, pb.T))        # T = (P_B P_A⁻¹)ᵀ = P_A⁻ᵀ P_Bᵀ
        rhos.append(rho)
    m = torch.cat([t / n for t in ts], dim=1)
    u = torch.cat([torch.linalg.inv(t) for t in ts], dim=0)
    return m, u, rhos


@method("cca", OPTIONS, "CCA Merge: align every model to model 1 by canonical correlations, then average")
def merge(models, data, seed, context, reg):
    """CCA Merge of models of any spec (identical widths); see the module docstring."""
    align.check_sources(models, data, "CCA Merge")
    spec = models[0].spec
    feats = align.observe(models, data)
    maps, stats = {}, {}
    for s in align.merged_spaces(spec):
        m, u, extra = align.per_head(lambda f: cca_maps(f, float(reg)), feats[s], spec.space(s).heads)
        maps[s] = (m, u)
        rho = torch.cat([torch.cat(r) for (r,) in extra])
        stats[s] = {"mean_canonical_correlation": float(rho.mean())}
    merged = align.merge_with_maps(models, maps, seed)
    merged.meta = {"method": "cca", "reg": float(reg), "spaces": stats, "merge_examples": [len(d) for d in data]}
    return merged
