"""TIES-merging (Yadav et al., "Resolving Interference When Merging Models", NeurIPS 2023).

From the task vectors τ_k = θ_k − θ_base of sources fine-tuned from one pre-trained model:

  1. trim:        keep the `density` share of each τ_k's entries with the largest magnitude
                  (over the whole backbone, as the authors' code ranks them), zero the rest;
  2. elect sign:  γ = sign(Σ_k τ̂_k) per entry (the sign with the larger total mass);
  3. disjoint mean: per entry, the mean of the τ̂_k that are non-zero and agree with γ
                  (zero where none does);

    θ = θ_base + λ · τ_m.

Defaults density 0.2 and λ = 1, the paper's (section 6, "we use k = 20 and λ = 1 unless
validated"). Heads are kept, one per task.
"""
from __future__ import annotations

import torch

from ..options import Number, Option, method
from .common import BASE, check_base, merged_from_state, task_vectors

DEFAULT_DENSITY = 0.2
DEFAULT_LAMBDA = 1.0
OPTIONS = (
    BASE,
    Option("density", Number(0, 1, positive=True), "the share of each task vector's entries kept (largest magnitude)",
           DEFAULT_DENSITY, "the TIES paper, section 6"),
    Option("lam", Number(positive=True), "lambda, the scale of the merged task vector", DEFAULT_LAMBDA,
           "the TIES paper, section 6"),
)


def trim(tau: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """τ with all but its `density` share of largest-magnitude entries set to zero (ties keep all equal ones)."""
    flat = torch.cat([v.reshape(-1) for v in tau.values()])
    k = max(1, int(round(density * flat.numel())))
    threshold = flat.abs().kthvalue(flat.numel() - k + 1).values
    return {n: torch.where(v.abs() >= threshold, v, torch.zeros_like(v)) for n, v in tau.items()}


def ties_vector(taus: list[dict[str, torch.Tensor]], density: float) -> dict[str, torch.Tensor]:
    """τ_m: trimmed, sign-elected, disjointly averaged task vectors."""
    trimmed = [trim(t, density) for t in taus]
    out = {}
    for n in taus[0]:
        stack = torch.stack([t[n] for t in trimmed])
        sign = torch.sign(stack.sum(0))
        agree = (torch.sign(stack) == sign) & (stack != 0)
        count = agree.sum(0)
        out[n] = torch.where(count > 0, (stack * agree).sum(0) / count.clamp_min(1), torch.zeros_like(stack[0]))
    return out


@method("ties", OPTIONS, "TIES: trim, elect signs and average the task vectors (one start)", data="none")
def merge(models, data, seed, context, base, density, lam):
    check_base(models, base, "TIES")
    theta, taus = task_vectors(models, base)
    tau = ties_vector(taus, density)
    state = {k: theta[k] + lam * tau[k] for k in theta}
    return merged_from_state(models, state, {"method": "ties", "density": density, "lam": lam})
