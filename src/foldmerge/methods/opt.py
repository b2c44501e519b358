"""Opt: optimal-transport fusion (Imfeld, Graldi, Giordano, Hofmann, Anagnostidis, Singh: "Transformer
Fusion with Optimal Transport", ICLR 2024), for any merge spec, written as a foldable map.

Every model k ≥ 1 is aligned to model 0 (the anchor) and the aligned weights are averaged.
Alignments are transport maps between neurons, computed from activations on the merge data
(all tasks' samples): neuron i of a model is the vector of its activations over the
selected tokens of every example; the cost between two neurons is their squared Euclidean
distance (divided by its maximum); marginals are uniform; λ = 0 gives an exact (hard, a
permutation for equal widths) plan by `ot.emd`, λ > 0 a soft one by Sinkhorn (`ot.sinkhorn`,
entropic regularization λ). T_k (d_0 × d_k) is the plan scaled so each row sums to 1:
(T_k f_k)_i is the mass-weighted mean of model k's neurons matched to anchor neuron i.

Where the maps sit: one alignment per merged space of the merge spec (the same places as
FS-Merge's M and U, tied across a space's parameters), from the activations at its probes:
  MLPs             one map per hidden layer, from its post-ReLU features.
  ViTs             the residual stream: one T_res from the stream after the embedding and after
                   every block (one stream, so one alignment), used for the patch projection,
                   CLS and positions, every residual write (W_O, W_2) and read (Q/K/V, W_1,
                   the final LayerNorm) and the LayerNorm parameters; Q and K: per block and per
                   head, one map from q and k activations together (a common map keeps q·k);
                   V per head, used again at W_O's input; the MLP per block from the GELU outputs.
  output           the features: not aligned when every source's heads are frozen class
                   embeddings (the models' outputs already live in one space), aligned otherwise.
Merge maps M = [I/n, T_1/n, …]; unmerge U[k] = T̂_kᵀ with T̂_k the plan scaled so each
column sums to 1 (the transpose for a permutation); merged LayerNorms (γ_0 + Σ T_k γ_k)/n.

Token filter (which tokens' activations define a neuron, for models with token sequences):
'cls' (the CLS token only), 'full' (every token), or 'window-K' (our reading of the paper's
windows: the CLS token and the K patch tokens nearest the image centre). A probe without a
token axis (an MLP's) always reads its whole activation.
"""
from __future__ import annotations

import torch

from ..options import Grammar, Number, Option, method
from . import align

# POT (ot) is imported when a transport plan is computed: it adds about 1.8 s to the start of every
# command that lists the methods (measured here), and only this method uses it

OPTIONS = (
    Option("filter", Grammar(r"cls|full|window-[1-9][0-9]*", "cls | full | window-K, K >= 1", "FILTER", "cls"),
           "the tokens whose activations define a neuron", "full", "every token"),
    Option("reg", Number(low=0), "Sinkhorn regularization lambda (0: exact transport, a hard alignment)", 0.0,
           "the exact plan"),
)


def _tokens_for(filter_: str, n_tokens: int, grid: int) -> torch.Tensor:
    if filter_ == "cls":
        return torch.tensor([0])
    if filter_ == "full":
        return torch.arange(n_tokens)
    if filter_.startswith("window-"):
        try:
            k = int(filter_.split("-", 1)[1])
        except ValueError:
            k = -1
        if not 1 <= k <= n_tokens - 1:
            raise ValueError(f"filter {filter_!r}: the window must hold 1…{n_tokens - 1} patch tokens")
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        c = (grid - 1) / 2
        dist = ((rows - c) ** 2 + (cols - c) ** 2).flatten()
        nearest = torch.argsort(dist, stable=True)[:k] + 1
        return torch.cat([torch.tensor([0]), nearest.sort().values])
    raise ValueError(f"unknown token filter {filter_!r}; use cls, full or window-K")


def transport(anchor: torch.Tensor, other: torch.Tensor, reg: float) -> torch.Tensor:
    """T (d_anchor x d_other), rows summing to 1, from activations (samples x neurons)."""
    import ot
    cost = torch.cdist(anchor.T.contiguous(), other.T.contiguous()) ** 2
    cost = cost / cost.max().clamp_min(1e-12)
    a = torch.full((anchor.shape[1],), 1.0 / anchor.shape[1], dtype=torch.float64)
    b = torch.full((other.shape[1],), 1.0 / other.shape[1], dtype=torch.float64)
    if reg > 0:
        plan = ot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), reg, numItermax=5000)
    else:
        plan = ot.emd(a.numpy(), b.numpy(), cost.numpy())
    plan = torch.as_tensor(plan, dtype=torch.float64)
    return plan / plan.sum(1, keepdim=True).clamp_min(1e-300)


def _cols_to_one(t: torch.Tensor) -> torch.Tensor:
    return t / t.sum(0, keepdim=True).clamp_min(1e-300)


@method("opt", OPTIONS, "optimal-transport fusion: align every model to model 1 by transport plans, then average")
def merge(models, data, seed, context, filter, reg):
    """OT fusion of models of one shape; see the module docstring. `reg` is the paper's λ."""
    align.check_sources(models, data, "opt")
    spec = models[0].spec
    tokens_seen = []

    def select(t):
        if t.dim() == 3:              # (examples, tokens, d): the filter's tokens
            grid = int(round((t.shape[1] - 1) ** 0.5))
            t = t[:, _tokens_for(filter, t.shape[1], grid)]
            tokens_seen.append(True)
        return t.reshape(-1, t.shape[-1])

    feats = align.observe(models, data, select)
    if filter != "full" and not tokens_seen:
        raise ValueError(f"filter {filter!r} selects tokens, but the {spec.name}'s activations have no token axis")
    n = len(models)
    shared_out = all(m.head_kind == "class-embedding" for m in models)
    maps = {}
    for s in align.merged_spaces(spec):
        if s == spec.output and shared_out:
            maps[s] = _maps([torch.eye(f.shape[1], dtype=torch.float64) for f in feats[s]], n)
            continue
        m, u, _ = align.per_head(lambda f: _maps([torch.eye(f[0].shape[1], dtype=torch.float64)]
                                                 + [transport(f[0], fk, reg) for fk in f[1:]], n),
                                 feats[s], spec.space(s).heads)
        maps[s] = (m, u)
    merged = align.merge_with_maps(models, maps, seed)
    merged.meta = {"method": "opt", "filter": filter, "reg": reg, "merge_examples": [len(d) for d in data],
                   "hard": reg == 0}
    return merged


def _maps(ts: list[torch.Tensor], n: int):
    """M = [T_0/n, T_1/n, …] and U = [T̂_0ᵀ; T̂_1ᵀ; …] (T̂: columns summing to 1)."""
    return torch.cat([t / n for t in ts], dim=1), torch.cat([_cols_to_one(t) for t in ts], dim=1).T
