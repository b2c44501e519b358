"""Opt: optimal-transport fusion of transformers (Imfeld, Graldi, Giordano, Hofmann, Anagnostidis,
Singh: "Transformer Fusion with Optimal Transport", ICLR 2024), for our ViTs, written as a foldable map.

Every model k ≥ 1 is aligned to model 0 (the anchor) and the aligned weights are averaged.
Alignments are transport maps between neurons, computed from activations on the merge data
(all tasks' samples): neuron i of a model is the vector of its activations over the
selected tokens of every example; the cost between two neurons is their squared Euclidean
distance (divided by its maximum); marginals are uniform; λ = 0 gives an exact (hard, a
permutation for equal widths) plan by `ot.emd`, λ > 0 a soft one by Sinkhorn (`ot.sinkhorn`,
entropic regularization λ). T_k (d_0 × d_k) is the plan scaled so each row sums to 1:
(T_k f_k)_i is the mass-weighted mean of model k's neurons matched to anchor neuron i.

Where the maps sit (DESIGN §3, the same places as FS-Merge's M and U):
  residual stream  one T_res per model from the stream's activations after the embedding
                   and after every block (one stream, so one alignment), used for the patch
                   projection, CLS and positions, every residual write (W_O, W_2) and read
                   (Q/K/V, W_1, the final LayerNorm) and the LayerNorm parameters.
  Q and K          per block and per head, one map from q and k activations together (a
                   common map keeps q·k); V per head, used again at W_O's input.
  MLP              per block, T_mlp from the GELU outputs.
  output           not aligned: the heads are frozen class embeddings, a shared space.
Merge maps M = [I/n, T_1/n, …]; unmerge U[k] = T̂_kᵀ with T̂_k the plan scaled so each
column sums to 1 (the transpose for a permutation); merged LayerNorms (γ_0 + Σ T_k γ_k)/n.

Token filter (which tokens' activations define a neuron): 'cls' (the CLS token only),
'full' (every token), or 'window-K' (our reading of the paper's windows: the CLS token and
the K patch tokens nearest the image centre).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .common import sources_arch


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


@torch.no_grad()
def activations(backbone, x: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Residual stream, q, k, v and GELU outputs of every block (examples·tokens x width)."""
    def sel(t):
        return t[:, tokens].reshape(-1, t.shape[-1]).to(torch.float64)

    h = backbone.tokens(x)
    out = {"res": [sel(h)], "q": [], "k": [], "v": [], "mlp": []}
    for blk in backbone.blocks:
        u = blk.ln1(h)
        q, k, v = blk.q(u), blk.k(u), blk.v(u)
        out["q"].append(sel(q))
        out["k"].append(sel(k))
        out["v"].append(sel(v))
        h = h + blk.attention(u)
        g = F.gelu(blk.fc1(blk.ln2(h)))
        out["mlp"].append(sel(g))
        h = h + blk.fc2(g)
        out["res"].append(sel(h))
    return out


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


def _per_head(acts_a: list[torch.Tensor], acts_b: list[torch.Tensor], heads: int, reg: float) -> torch.Tensor:
    """Block-diagonal map: one transport per attention head (activations stacked over sources)."""
    d = acts_a[0].shape[1]
    hd = d // heads
    t = torch.zeros(d, d, dtype=torch.float64)
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        t[s, s] = transport(torch.cat([a[:, s] for a in acts_a]), torch.cat([b[:, s] for b in acts_b]), reg)
    return t


def _cols_to_one(t: torch.Tensor) -> torch.Tensor:
    return t / t.sum(0, keepdim=True).clamp_min(1e-300)


def merge(models, data, filter: str = "full", reg: float = 0.0, seed: int = 0):
    """OT fusion of ViTs of equal shape; see the module docstring. `reg` is the paper's λ."""
    from ..arch.vit import SuperNet
    if sources_arch(models) != "vit":
        raise ValueError("opt (OT fusion) is implemented for ViTs; use zipit or permute for MLPs")
    bbs = [m.backbone for m in models]
    shapes = {(b.width, b.mlp_dim, b.out_dim) for b in bbs}
    if len(shapes) != 1:
        raise ValueError(f"opt needs ViTs of one shape (width, mlp, out), got {sorted(shapes)}")
    if reg < 0:
        raise ValueError(f"reg (λ) must be >= 0, got {reg!r}")
    if data is None or len(data) != len(models):
        raise ValueError("opt needs one data tensor per model")
    x = torch.cat(list(data))
    grid = bbs[0].image_size // bbs[0].patch
    tokens = _tokens_for(filter, grid * grid + 1, grid)
    sn = SuperNet(models, param="full", init="first", seed=seed)
    dtype = sn.M_in.dtype
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        acts = [activations(b, x.to(dtype), tokens) for b in bbs]
    finally:
        for m, w in zip(models, was):
            m.train(w)
    n, depth, heads = len(models), bbs[0].depth, bbs[0].heads
    eye_d = torch.eye(bbs[0].width, dtype=torch.float64)
    eye_m = torch.eye(bbs[0].mlp_dim, dtype=torch.float64)
    anchor = acts[0]
    t_res = [eye_d] + [transport(torch.cat(anchor["res"]), torch.cat(a["res"]), reg) for a in acts[1:]]
    t_qk = [[eye_d] + [_per_head([anchor["q"][l], anchor["k"][l]], [a["q"][l], a["k"][l]], heads, reg)
                       for a in acts[1:]] for l in range(depth)]
    t_v = [[eye_d] + [_per_head([anchor["v"][l]], [a["v"][l]], heads, reg) for a in acts[1:]]
           for l in range(depth)]
    t_mlp = [[eye_m] + [transport(anchor["mlp"][l], a["mlp"][l], reg) for a in acts[1:]] for l in range(depth)]

    def merge_map(ts):
        return torch.cat([t / n for t in ts], dim=1)

    def unmerge_map(ts):                      # S blocks (d* x d_k) = U[k]ᵀ
        return torch.cat([_cols_to_one(t) for t in ts], dim=1)

    def merged_norm(ln, norms):
        with torch.no_grad():
            ln.weight.copy_(sum(t @ nm.weight.to(torch.float64) for t, nm in zip(t_res, norms)) / n)
            ln.bias.copy_(sum(t @ nm.bias.to(torch.float64) for t, nm in zip(t_res, norms)) / n)

    sn.M_in.set_dense(merge_map(t_res))
    for l, blk in enumerate(sn.blocks):
        blk.U_att.set_dense(unmerge_map(t_res))
        blk.M_q.set_dense(merge_map(t_qk[l]))
        blk.M_k.set_dense(merge_map(t_qk[l]))
        blk.M_v.set_dense(merge_map(t_v[l]))
        blk.U_o.set_dense(unmerge_map(t_v[l]))
        blk.M_o.set_dense(merge_map(t_res))
        blk.U_1.set_dense(unmerge_map(t_res))
        blk.M_1.set_dense(merge_map(t_mlp[l]))
        blk.U_2.set_dense(unmerge_map(t_mlp[l]))
        blk.M_2.set_dense(merge_map(t_res))
        merged_norm(blk.ln1, [b.blocks[l].ln1 for b in bbs])
        merged_norm(blk.ln2, [b.blocks[l].ln2 for b in bbs])
    merged_norm(sn.ln_post, [b.ln_post for b in bbs])
    sn.U_post.set_dense(unmerge_map(t_res))
    eye_o = torch.eye(bbs[0].out_dim, dtype=torch.float64)
    sn.M_proj.set_dense(merge_map([eye_o] * n))
    sn.U_out.set_dense(torch.cat([eye_o] * n, dim=1))
    merged = sn.fold()
    merged.meta = {"method": "opt", "filter": filter, "reg": reg, "merge_examples": [len(d) for d in data],
                   "hard": reg == 0}
    return merged
