"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

For sources fine-tuned from one pre-trained model θ_base, the task vector of source k is
τ_k = θ_k − θ_base, and the merge adds them back, scaled by λ:

    θ = θ_base + λ · Σ_k τ_k.

λ = 1/n is weight averaging; the gating-merge paper (Ye et al., appendix C.2) reports
λ ∈ {1, 0.75, 0.5, 0.25} and keeps the best. Every backbone parameter is merged this way;
heads are kept, one per task. Meaningless for sources from different initializations.
"""
from __future__ import annotations

from .common import check_base, merged_from_state, task_vectors

# λ when none is given: `foldmerge bench gating` chooses λ on the tasks' validation splits from
# the paper's grid; this is the value it picked most often (README, "Merging models from one start").
DEFAULT_LAMBDA = 0.5


def merge(models, data=None, base=None, lam: float | None = None, seed: int = 0):
    check_base(models, base, "task arithmetic")
    lam = DEFAULT_LAMBDA if lam is None else float(lam)
    if not lam > 0:
        raise ValueError(f"task arithmetic's lambda must be positive, got {lam!r}")
    theta, taus = task_vectors(models, base)
    state = {k: theta[k] + lam * sum(t[k] for t in taus) for k in theta}
    return merged_from_state(models, state, {"method": "task-arithmetic", "lam": lam})
