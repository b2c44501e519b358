"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023).

For sources fine-tuned from one pre-trained model θ_base, the task vector of source k is
τ_k = θ_k − θ_base, and the merge adds them back, scaled by λ:

    θ = θ_base + λ · Σ_k τ_k.

λ = 1/n is weight averaging; the gating-merge paper (Ye et al., appendix C.2) reports
λ ∈ {1, 0.75, 0.5, 0.25} and keeps the best. Every backbone parameter is merged this way;
heads are kept, one per task. Meaningless for sources from different initializations.
"""
from __future__ import annotations

from ..options import Number, Option, method
from .common import BASE, check_base, merged_from_state, task_vectors

DEFAULT_LAMBDA = 0.5
OPTIONS = (BASE, Option("lam", Number(positive=True), "lambda, the scale of the summed task vectors", DEFAULT_LAMBDA,
                        "the value bench gating's validation picked most often from the paper's grid"))


@method("task-arithmetic", OPTIONS, "the base plus lambda times the sum of the task vectors (one start)",
        data="none")
def merge(models, data, seed, context, base, lam):
    check_base(models, base, "task arithmetic")
    theta, taus = task_vectors(models, base)
    state = {k: theta[k] + lam * sum(t[k] for t in taus) for k in theta}
    return merged_from_state(models, state, {"method": "task-arithmetic", "lam": lam})
