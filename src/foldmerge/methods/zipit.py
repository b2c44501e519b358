"""ZipIt! (Stoica, Bolya, Bjorner, Ramesh, Hearn, Hoffman, ICLR 2024) for any merge spec, as a foldable map.

For every merged space of the architecture (an MLP's hidden layers; a ViT's residual stream,
each block's q/k, v and MLP spaces and its features), ZipIt! looks at the activations
f^1 … f^n of the ORIGINAL source models at the spec's probes (an MLP's post-ReLU features, a
ViT's residual stream after the embedding and every block, …) on all merge data (the samples
of every task, concatenated), computes the Pearson correlation of the concatenated features
[f^1 … f^n] (Σd x Σd), and greedily "zips" the most correlated features together until Σd
features have become d* clusters (d* = model 1's width; a space split into attention heads is
zipped head by head, so features never move between heads):

  repeat until d* clusters remain:
      take the pair of current clusters (a, b) with the highest similarity, a before b;
      merge b into a;
      similarity of the new cluster to every other cluster c:
          alpha > 0:  alpha · min(sim(a, c), sim(b, c))        ("repeated matches", α)
          alpha <= 0: as above without scaling, but the new cluster may no more be matched
                      with any cluster whose origin is the origin of a or of b
      a merge whose two clusters have the same origin (model) is a within-model merge; each
      model may make int(((Σd − d*) // n) · beta) of them ("budget", β); once a model's budget
      is spent, no two clusters of that origin may be merged.

A cluster's "origin" is the model of its earliest feature (features are ordered model 0's,
then model 1's, …), as in the authors' code. The maps follow from the clusters, ordered by
their earliest feature:

  M[p, i] = 1/|cluster p| for every feature i in cluster p   (merge = average of the cluster)
  U[i, p] = 1            for every feature i in cluster p   (unmerge = copy back)

so for pure pairs U = 2Mᵀ (FS-Merge paper, appendix A.2). Every parameter of a space takes
that space's maps (`align.merge_with_maps`): W* = M_out·blockdiag(W_k)·U_in, b* = M_out·b,
merged norms M·concat(γ_k), heads adapted as head_k·U_out[k] (docs/architecture.md).

Partial zipping (`stop_layer = s`, chains of layers such as an MLP's, or of stages such as a
ResNet's: the spec's `chain_stages`): hidden layers (stages) 1…s are zipped; the later layers are left unzipped, i.e. they keep every model's neurons side by side:
d*_l = Σ_k d_l^k with M_l = I and U_l = I. That is the multi-head model of the paper (the
first unzipped layer reads each model's unmerged input U_s[k]·f*_s, the later ones are
block-diagonal, head k reads model k's block), written as one plain, wider MLP — still a
special case of the foldable map. stop_layer = 0 zips nothing (the exact ensemble of
features); None (default) zips every hidden layer.

Where this differs from the authors' code (`matching_functions.match_tensors_zipit`), on purpose:
- beta = 0 allows no within-model merge at all. The authors' loop decrements a budget and only
  then bans further within-model merges, so with a budget of 0 one within-model merge per model
  still slips through; the paper says a budget of 0 "yields a permutation-merge".
- alpha <= 0 bans the new cluster from every cluster whose origin is one of the two origins
  involved, found by each cluster's current origin; the authors index those rows by the models' original column blocks even after
  columns were removed, which stops matching the intended rows after the first merge.
- merge matrix entries are exactly 1/|cluster| (the authors divide by |cluster| + 1e-5).
- when the bans leave no allowed pair before d* clusters remain (possible for n > 2), the merge
  is taken on the unbanned similarities and counted in meta["spaces"][…]["forced_merges"];
  the authors' loop then takes argmax 0 of an all −inf matrix, merges cluster 0 with itself
  and so drops it from the maps.
- the correlation is computed from centered features (same quantity, E[ffᵀ] − μμᵀ, fewer
  rounding errors); a feature with zero variance on the data correlates 0 with everything.
Kept as the authors do, although it looks unintended: with alpha > 0 a negative similarity is
also multiplied by alpha, i.e. moved towards 0, which makes a merged cluster MORE attractive
to anti-correlated features. It only matters once every remaining pair is anti-correlated.
Repeated matches (alpha > 0) are allowed for two models too, as in the authors' code, so with
alpha > 0 a cluster may hold more than one feature of a model even when beta = 0.
"""
from __future__ import annotations

import torch

from ..options import Integer, Number, Option, method
from . import align
from .common import by_family
from .repair import RESET, reset_statistics

# The matching's own defaults (zipit_clusters, zipit_maps): the authors' `a` of
# match_tensors_zipit, and cross-model merges only. A merge's defaults are by family (OPTIONS).
DEFAULT_ALPHA = 0.3
DEFAULT_BETA = 0.0

OPTIONS = (
    Option("alpha", Number(), "repeated-match factor: a merged cluster's similarity is alpha times its "
           "members' least", by_family("alpha", "zipit", ("zipit",))),
    Option("beta", Number(0, 1), "within-model merge budget (0: across models only, a permutation)",
           by_family("beta", "zipit", ("zipit",))),
    Option("stop_layer", Integer(0), "zip the hidden layers (a ResNet's stages) 1..N only, keeping the rest per "
           "model (partial zipping; 0 zips nothing); unset: all"),
    RESET,
)


# ----------------------------------------------------------------------------- correlation
def correlation(features: list[torch.Tensor]) -> torch.Tensor:
    """Pearson correlation (float64, Σd x Σd) of the concatenated features [f^1 … f^n].

    features[k] is (examples x d_k), the same examples for every k. Covariance is the
    population one, E[ffᵀ] − μμᵀ (computed from centered features), divided by the outer
    product of the standard deviations; a zero-variance feature correlates 0 with everything.
    """
    if not features:
        raise ValueError("correlation needs at least one feature matrix")
    rows = {f.shape[0] for f in features}
    if len(rows) != 1:
        raise ValueError(f"every model's features must come from the same examples; got row counts {sorted(rows)}")
    f = torch.cat([x.reshape(x.shape[0], -1) for x in features], dim=1).to(torch.float64)
    if f.shape[0] < 2:
        raise ValueError("a correlation needs at least two examples")
    fc = f - f.mean(0, keepdim=True)
    cov = fc.T @ fc / f.shape[0]
    std = cov.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(std, std)
    live = denom > 0
    corr = torch.where(live, cov / torch.where(live, denom, torch.ones_like(denom)), torch.zeros_like(cov))
    return ((corr + corr.T) / 2).clamp(-1.0, 1.0)


# ------------------------------------------------------------------------- greedy matching
def zipit_clusters(corr: torch.Tensor, owner: torch.Tensor, out_dim: int, alpha: float = DEFAULT_ALPHA,
                   beta: float = DEFAULT_BETA, history: list | None = None) -> list[list[int]]:
    """ZipIt!'s greedy matching on a (Σd x Σd) similarity matrix.

    owner[i] is the model of feature i (non-decreasing: model 0's features first). Returns
    out_dim clusters (lists of feature indices), ordered by their first feature. If `history`
    is a list, one dict per merge is appended: the two clusters (by first feature), their
    similarity, whether it was a within-model merge and whether it was forced (see below).

    Forced merges: for n > 2 models the bans (spent budgets; alpha <= 0 closing clusters to
    their origins) can leave no allowed pair before d* clusters remain — e.g. a cluster holding
    a feature of model 2 is banned from every other cluster holding one. The authors' loop
    then picks index 0 of an all −inf matrix (a cluster with itself); here the merge is taken
    on the same similarities without the bans instead, and marked forced in the history.
    """
    total = corr.shape[0]
    if corr.shape != (total, total) or owner.shape != (total,):
        raise ValueError("corr must be square and owner must give one model per feature")
    if not 1 <= out_dim <= total:
        raise ValueError(f"target width {out_dim} must lie in 1…{total} (the total number of features)")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta!r}")
    owner = owner.to(torch.long).cpu()
    if total > 1 and bool((owner[1:] < owner[:-1]).any()):
        raise ValueError("features must be ordered by model (model 0's first)")
    n = int(owner.max()) + 1
    alpha = float(alpha)
    neg = -torch.inf
    free = corr.detach().to(torch.float64).cpu().clone()   # similarities without any ban
    free.fill_diagonal_(neg)
    sims = free.clone()                                     # … and with the bans
    origin = owner.clone()           # origin of the cluster whose first feature is i
    active = torch.ones(total, dtype=torch.bool)
    members = [[i] for i in range(total)]

    to_remove = total - out_dim
    budget = [int((to_remove // n) * float(beta) + 1e-4)] * n

    def ban_within(k: int) -> None:
        sel = origin == k
        sims[sel.unsqueeze(1) & sel.unsqueeze(0)] = neg

    for k in range(n):
        if budget[k] <= 0:
            ban_within(k)

    for _ in range(to_remove):
        flat = int(torch.argmax(sims))
        i, j = divmod(flat, total)
        forced = bool(sims[i, j] == neg)
        if forced:
            flat = int(torch.argmax(free))
            i, j = divmod(flat, total)
        a, b = min(i, j), max(i, j)
        oa, ob = int(origin[a]), int(origin[b])
        if history is not None:
            history.append({"a": a, "b": b, "similarity": float((free if forced else sims)[a, b]),
                            "within": oa == ob, "forced": forced})
        new = torch.minimum(sims[a], sims[b])
        new_free = torch.minimum(free[a], free[b])
        if alpha > 0:
            new = new * alpha
            new_free = new_free * alpha
        else:
            new[(origin == oa) | (origin == ob)] = neg
        # b disappears into a; a keeps its index and its origin.
        for mat, row in ((sims, new), (free, new_free)):
            mat[b, :] = neg
            mat[:, b] = neg
            row[a] = neg
            row[b] = neg
            mat[a, :] = row
            mat[:, a] = row
        active[b] = False
        members[a].extend(members[b])
        members[b] = []
        if oa == ob:
            budget[oa] -= 1
            if budget[oa] <= 0:
                ban_within(oa)
    return [sorted(members[i]) for i in range(total) if active[i]]


def maps_from_clusters(clusters: list[list[int]], total: int, dtype=torch.float64):
    """M (d* x Σd) averaging every cluster, U (Σd x d*) copying it back."""
    m = torch.zeros(len(clusters), total, dtype=dtype)
    u = torch.zeros(total, len(clusters), dtype=dtype)
    for p, mem in enumerate(clusters):
        m[p, mem] = 1.0 / len(mem)
        u[mem, p] = 1.0
    return m, u


def zipit_maps(features: list[torch.Tensor], out_dim: int, alpha: float = DEFAULT_ALPHA,
               beta: float = DEFAULT_BETA) -> tuple[torch.Tensor, torch.Tensor]:
    """ZipIt!'s merge and unmerge matrices for one layer.

    features: one (examples x d_k) tensor per model (post-activation features on the same
    examples). Returns M dense (out_dim x Σd) and U dense (Σd x out_dim), on the CPU, in the
    features' floating dtype.
    """
    if len(features) < 1:
        raise ValueError("zipit_maps needs the features of at least one model")
    widths = [f.reshape(f.shape[0], -1).shape[1] for f in features]
    owner = torch.cat([torch.full((d,), k, dtype=torch.long) for k, d in enumerate(widths)])
    clusters = zipit_clusters(correlation(features), owner, int(out_dim), alpha, beta)
    dtype = features[0].dtype if features[0].is_floating_point() else torch.float32
    return maps_from_clusters(clusters, sum(widths), dtype)


# ------------------------------------------------------------------------------ the method
def space_maps(models, data, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA,
               stop_layer: int | None = None) -> tuple[dict, dict]:
    """ZipIt!'s (M, U) of every merged space of the models' spec, and statistics per space.

    Each space is zipped to model 1's width, within each head for a split space; with
    `stop_layer` (chains of layers such as an MLP's) the spaces after the first `stop_layer`
    are left unzipped (M = U = I, every model's features side by side)."""
    spec = models[0].spec
    spaces = align.merged_spaces(spec)
    zipped = spaces
    if stop_layer is not None:
        chain = spec.chain_stages()
        if not chain:
            raise ValueError(f"stop_layer (partial zipping) needs a chain of layers or stages (an MLP, a ResNet); "
                             f"the {spec.name} is one residual stream")
        if not 0 <= int(stop_layer) <= len(chain):
            raise ValueError(f"stop_layer must lie in 0…{len(chain)} (number of zipped "
                             f"{'hidden layers' if spec.stages is None else 'stages'}), got {stop_layer!r}")
        zipped = [s for group in chain[:int(stop_layer)] for s in group]
    feats = align.observe(models, data)
    maps, stats = {}, {}
    for s in spaces:
        if s not in zipped:
            maps[s] = align.identity_maps(feats[s])
            stats[s] = {"zipped": False}
            continue
        heads = spec.space(s).heads

        def zip_head(f):
            widths = [x.shape[1] for x in f]
            owner = torch.cat([torch.full((d,), k, dtype=torch.long) for k, d in enumerate(widths)])
            history: list = []
            clusters = zipit_clusters(correlation(f), owner, widths[0], alpha, beta, history)
            return (*maps_from_clusters(clusters, sum(widths), f[0].dtype), clusters, history)

        m, u, extra = align.per_head(zip_head, feats[s], heads)
        sizes = [len(c) for clusters, _ in extra for c in clusters]
        history = [h for _, hist in extra for h in hist]
        maps[s] = (m, u)
        stats[s] = {"zipped": True, "max_cluster": max(sizes), "singletons": sum(1 for z in sizes if z == 1),
                    "within_merges": sum(1 for h in history if h["within"]),
                    "forced_merges": sum(1 for h in history if h["forced"]),
                    "mean_merge_similarity": sum(h["similarity"] for h in history) / max(len(history), 1)}
    return maps, stats


@method("zipit", OPTIONS, "ZipIt!: zip correlated features within and across models")
def merge(models, data, seed, context, alpha, beta, stop_layer, reset_bn):
    """ZipIt! merge of models of any spec; see the module docstring. `reset_bn`: the BatchNorm reset
    on the merge data (`foldmerge.methods.repair`). seed is unused (ZipIt! is deterministic)."""
    align.check_sources(models, data, "ZipIt!")
    maps, stats = space_maps(models, data, alpha, beta, stop_layer)
    merged = align.merge_with_maps(models, maps, seed)
    if reset_bn:
        reset_statistics(merged, models, data, maps)
    merged.meta = {"method": "zipit", "alpha": alpha, "beta": beta,
                   "stop_layer": "all" if stop_layer is None else stop_layer, "reset_bn": bool(reset_bn),
                   "widths": {s: m.shape[0] for s, (m, _) in maps.items()}, "spaces": stats,
                   "merge_examples": [len(d) for d in data]}
    return merged
