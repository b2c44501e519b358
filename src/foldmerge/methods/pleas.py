"""PLeaS (Nasery, Hayase, Koh, Oh: "PLeaS: Merging Models with Permutations and Least Squares",
CVPR 2025) on any merge spec.

Two steps:

1. Partial permutations under a width budget. For every merged space of width d the merged
   width is d* = round(d·(1 + budget)) (budget 0: a full permutation merge at d; 1: nothing
   merged, every neuron kept, 2d). The features of model 1 and model 2 are matched by the
   assignment that maximizes their total correlation (`linear_sum_assignment`, within each
   head of a split space); the 2d − d* best-correlated matched pairs are merged (averaged),
   every other neuron is kept on its own. For n > 2 models, ZipIt!'s greedy matching with
   cross-model merges only (α = 0, β = 0) down to d* clusters. This gives M (averaging each
   cluster) and U (copying it back), and a merged model folded from them.
2. Least squares, layer by layer. For every layer y = W x + b of the spec, in order, with
   X* the merged model's inputs of that layer (its earlier layers already solved) on all
   merge data and Y* = M·concat(Y_k) the "permuted features", the sources' outputs of that
   layer mapped by the space's merge map (a merged neuron's target is the mean of its
   cluster's neurons), the merged layer becomes

       [W* b*] = argmin ‖X* W*ᵀ + b* − Y*‖² + ridge·‖W*‖²     (a conv: X* its input patches)

   solved by the normal equations from Grams accumulated in chunks.

`budget` is one number for every space or {space: number}, the per-layer budget; a family
whose widths are tied (a ViT's q/k/v to its residual stream) takes budget 0 only.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from ..model import CHUNK, as_input
from ..options import Either, Number, Option, method
from . import align
from .common import layer_outputs, layer_rows
from .zipit import correlation, maps_from_clusters, zipit_clusters

DEFAULT_BUDGET = 0.0
DEFAULT_RIDGE = 1e-4


def _budgets(value) -> dict:
    """A budget per space: {space: number in [0, 1]}."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"expected a number in [0, 1] or a mapping of space names to numbers, got {value!r}")
    return {k: Number(0, 1).check(v) for k, v in value.items()}


OPTIONS = (
    Option("budget", Either(Number(0, 1), _budgets, "a mapping {space: number} (Python, YAML)"),
           "extra merged width per space as a share of one model's (1 keeps every neuron)", DEFAULT_BUDGET,
           "one model's size, the setting every other merge is compared at"),
    Option("ridge", Number(low=0), "ridge of the layer-wise least squares, relative", DEFAULT_RIDGE,
           "a small ridge that keeps the solves finite"),
)


def merged_width(d: int, budget: float) -> int:
    if not 0.0 <= float(budget) <= 1.0:
        raise ValueError(f"a PLeaS width budget must lie in [0, 1] (extra width as a fraction), got {budget!r}")
    return int(round(d * (1.0 + float(budget))))


def partial_clusters(feats: list[torch.Tensor], out_dim: int) -> list[list[int]]:
    """Clusters of the concatenated features at `out_dim` (see the module docstring, step 1)."""
    widths = [f.shape[1] for f in feats]
    corr = correlation(feats)
    if len(feats) == 2:
        d0 = widths[0]
        cross = corr[:d0, d0:]
        rows, cols = linear_sum_assignment(cross.numpy(), maximize=True)
        order = sorted(range(len(rows)), key=lambda i: -float(cross[rows[i], cols[i]]))
        merge = max(sum(widths) - out_dim, 0)
        if merge > len(rows):
            raise ValueError(f"a merged width of {out_dim} needs more matches than two {widths} layers have")
        taken = {int(rows[i]): d0 + int(cols[i]) for i in order[:merge]}
        used = set(taken.values())
        clusters = [[i, taken[i]] if i in taken else [i] for i in range(d0)]
        clusters += [[j] for j in range(d0, sum(widths)) if j not in used]
        return sorted(clusters, key=lambda c: c[0])
    owner = torch.cat([torch.full((d,), k, dtype=torch.long) for k, d in enumerate(widths)])
    return zipit_clusters(corr, owner, out_dim, alpha=0.0, beta=0.0)


def partial_maps(models, data, budget) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    spec = models[0].spec
    feats = align.observe(models, data)
    maps = {}
    for s in align.merged_spaces(spec):
        b = budget.get(s, DEFAULT_BUDGET) if isinstance(budget, dict) else budget
        heads = spec.space(s).heads

        def fn(f, b=b):
            clusters = partial_clusters(f, merged_width(f[0].shape[1], b))
            return maps_from_clusters(clusters, sum(x.shape[1] for x in f), f[0].dtype)
        m, u, _ = align.per_head(fn, feats[s], heads)
        maps[s] = (m, u)
    return maps


@torch.no_grad()
def _layer_grams(merged, models, module: str, m_out: torch.Tensor, x: torch.Tensor, bias: bool = True):
    """(XᵀX, XᵀY) of one layer, X = [merged inputs (rows), 1 if `bias`], Y = sources' outputs mapped by m_out."""
    layers = [mod.backbone.get_submodule(module) for mod in [merged] + list(models)]
    seen: list = [None] * len(layers)
    handles = [layers[0].register_forward_pre_hook(lambda _m, args: seen.__setitem__(0, args[0]))]
    for i, layer in enumerate(layers[1:], start=1):
        handles.append(layer.register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out)))
    xtx = xty = None
    try:
        for mod in [merged] + list(models):
            mod.eval()
        for part in x.split(CHUNK):
            for mod in [merged] + list(models):
                mod.backbone(as_input(part, next(mod.backbone.parameters())))
            rows = layer_rows(layers[0], seen[0]).to(torch.float64)
            if bias:
                rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
            y = torch.cat([layer_outputs(layers[i], seen[i]).to(torch.float64) for i in range(1, len(layers))], 1)
            y = y @ m_out.T
            xtx = rows.T @ rows if xtx is None else xtx + rows.T @ rows
            xty = rows.T @ y if xty is None else xty + rows.T @ y
    finally:
        for h in handles:
            h.remove()
    return xtx, xty


def least_squares(xtx: torch.Tensor, xty: torch.Tensor, ridge: float = DEFAULT_RIDGE, bias: bool = True) -> torch.Tensor:
    """θ = argmin ‖Xθ − Y‖² + ridge·s·‖θ_W‖² from XᵀX and XᵀY (with `bias` the last column of X is the
    bias's ones, not penalized; s = the mean diagonal of XᵀX, so that the ridge is scale-free)."""
    d = xtx.shape[0]
    pen = torch.ones(d, dtype=xtx.dtype)
    if bias:
        pen[-1] = 0.0
    scale = xtx.diagonal()[:d - int(bias)].mean().clamp_min(1e-12)
    return torch.linalg.solve(xtx + torch.diag(pen) * ridge * scale, xty)


@method("pleas", OPTIONS, "PLeaS: partial permutations, then each layer's least-squares fit")
def merge(models, data, seed, context, budget, ridge):
    """PLeaS: partial permutations under `budget`, then layer-wise least squares; see the module docstring."""
    align.check_sources(models, data, "PLeaS")
    spec = models[0].spec
    widened = [s for s in align.merged_spaces(spec)
               if float(budget.get(s, DEFAULT_BUDGET) if isinstance(budget, dict) else budget) > 0]
    tied = [s for s in widened if spec.resize_spaces is None and s not in spec.width_spaces]
    if tied:
        raise ValueError(f"a PLeaS budget > 0 widens space {tied[0]!r}, whose width the {spec.name} ties to "
                         f"another's; give it budget 0 (families whose spaces resize apart: MLPs, ResNets)")
    maps = partial_maps(models, data, budget)
    merged = align.merge_with_maps(models, maps, seed)
    x = torch.cat(list(data))
    keys = {p.key for p in spec.params}
    solved = 0
    for p in spec.layer_weights():
        bias = p.module + ".bias" in keys
        grams = _layer_grams(merged, models, p.module, maps[spec.written_space(p)][0], x, bias)
        theta = least_squares(*grams, float(ridge), bias)
        layer = merged.backbone.get_submodule(p.module)
        with torch.no_grad():
            layer.weight.copy_(theta[:theta.shape[0] - int(bias)].T.reshape(layer.weight.shape).to(layer.weight))
            if bias:
                layer.bias.copy_(theta[-1].to(layer.bias))
        solved += 1
    merged.meta = {"method": "pleas", "budget": budget, "ridge": float(ridge), "solved_layers": solved,
                   "widths": {s: m.shape[0] for s, (m, _) in maps.items()}, "merge_examples": [len(d) for d in data]}
    return merged
