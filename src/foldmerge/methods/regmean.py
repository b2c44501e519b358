"""RegMean: Regression Mean (Jin, Ren, Preotiuc-Pietro, Cheng: "Dataless Knowledge Fusion by
Merging Weights of Language Models", ICLR 2023), as the FS-Merge authors run it.

For every linear layer y = W x + b of the backbone (the merge spec's `layer_weights`: an MLP's
hidden layers, every linear map of a ViT, every conv of a ResNet, whose input rows are its
patches and whose weight is flattened to (out x in·kh·kw); heads are outside the backbone and
are copied, never merged),
RegMean picks the W* that best reproduces, on each model's own inputs, what every source
layer computes:

    W* = argmin_W  Σ_k ‖X_k Wᵀ − X_k W_kᵀ‖²

where X_k (examples × in) holds the layer's inputs computed by model k itself on data[k],
the merge sample of model k's own task. With the Gram matrices G_k = X_kᵀ X_k (summed over
examples, not normalized) the closed form, in PyTorch's (out × in) weight convention, is

    W*ᵀ = (Σ_k G_k)⁻¹ Σ_k G_k W_kᵀ.

The off-diagonal entries of every Gram are scaled by α before summing (the paper's
regularization; α = 1 is the plain regression, α = 0 a per-input-feature weighted mean):

    G_k ← α · G_k + (1 − α) · diag(G_k).

Biases and every other backbone parameter are plainly averaged. Default α: 0.5 for chains of
layers (MLPs), 0.9 for residual architectures (ViTs), from the benches' validation (below).

Singular systems: an input feature that is zero in every example of every model (MNIST's
blank border pixels, a ReLU unit dead on the whole sample) leaves its row and column of
Σ G_k zero, so the data say nothing about that column of W*. Such columns take the plain
average and the system is solved over the remaining features (the limit of a vanishing
ridge term ε‖W − W_avg‖² that pulls W* towards the plain average).
If what remains is still singular (α = 1 with fewer examples than inputs) the solution
falls back to pinv(G)·B plus the plain average projected onto the null space of G (the
same limit); `meta["fallback_layers"]` lists where that happened.
"""
from __future__ import annotations

import torch

from ..model import TaskModel, as_input, features_in_chunks
from ..options import Number, Option, method
from .common import by_family, check_same_backbone, copy_heads, layer_rows


def _check(models, data, alpha: float) -> None:
    check_same_backbone(models, "RegMean")
    if data is None or len(data) != len(models):
        raise ValueError(f"RegMean needs one data tensor per model; got "
                         f"{0 if data is None else len(data)} for {len(models)} models")
    if any(len(d) == 0 for d in data):
        raise ValueError("RegMean needs at least one example per model")


def linear_layers(model) -> list[torch.nn.Module]:
    """The nn.Linear / nn.Conv2d modules of the spec's layers y = W x + b, in spec order."""
    out = []
    for p in model.spec.layer_weights():
        module = model.backbone.get_submodule(p.module)
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            raise ValueError(f"RegMean fits nn.Linear and nn.Conv2d layers; {p.key!r} of the {model.arch} is neither")
        out.append(module)
    return out


@torch.no_grad()
def input_grams(model, x: torch.Tensor) -> list[torch.Tensor]:
    """G_l = X_lᵀ X_l (float64, unnormalized) of the inputs of every foldable layer of `model`'s
    backbone, when `model` itself runs on `x`; a conv's rows are its input patches (`layer_rows`),
    one per output position, so that its flattened weight (out x in·kh·kw) is a linear layer's."""
    layers = linear_layers(model)
    sizes = [l.weight[0].numel() for l in layers]
    grams = [torch.zeros(d, d, dtype=torch.float64, device=l.weight.device) for d, l in zip(sizes, layers)]

    def hook_for(i):
        def hook(module, args):
            inp = layer_rows(module, args[0]).to(torch.float64)
            grams[i].add_(inp.T @ inp)
        return hook

    handles = [l.register_forward_pre_hook(hook_for(i)) for i, l in enumerate(layers)]
    was_training = model.training
    try:
        model.eval()
        p = next(model.backbone.parameters())
        features_in_chunks(model, as_input(x, p))      # the hooks add up every chunk
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return grams


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """α · G + (1 − α) · diag(G)."""
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


def regmean_weight(grams: list[torch.Tensor], weights: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """W* (out × in, float64) from the (already α-scaled) Grams and the (out × in) weights.

    Returns (W*, fell_back): fell_back is True when the pseudo-inverse path was needed."""
    G = sum(grams)
    ws = [w.to(torch.float64) for w in weights]
    B = sum(g @ w.T for g, w in zip(grams, ws))               # in × out
    avg_t = (sum(ws) / len(ws)).T                              # in × out
    active = torch.diagonal(G) > 0                             # zero diagonal ⇒ zero row/column (G ⪰ 0)
    out = avg_t.clone()
    if not bool(active.any()):
        return out.T, False
    Ga, Ba = G[active][:, active], B[active]
    # Rank test on the symmetric PSD system (round-off hides exact singularity from solve).
    evals, evecs = torch.linalg.eigh(Ga)
    tol = evals.abs().max() * Ga.shape[0] * torch.finfo(torch.float64).eps
    fell_back = bool(evals.min() <= tol)
    if not fell_back:
        sol = torch.linalg.solve(Ga, Ba)
    else:
        keep = evals > tol
        vr, vn = evecs[:, keep], evecs[:, ~keep]
        sol = vr @ ((vr.T @ Ba) / evals[keep, None]) + vn @ (vn.T @ avg_t[active])
    out[active] = sol
    return out.T, fell_back


OPTIONS = (Option("alpha", Number(0, 1), "scale of the Grams' off-diagonal entries (1: plain regression)",
                  by_family("alpha", "regmean", ("regmean",))),)


@method("regmean", OPTIONS, "each layer's least-squares fit to every source's outputs on its own data")
def merge(models, data, seed, context, alpha):
    _check(models, data, alpha)
    alpha = float(alpha)
    merged = TaskModel.for_merge(models)

    # Grams of every model's own inputs, on its own task's data.
    grams = [input_grams(m, x) for m, x in zip(models, data)]          # [model][layer]
    with torch.no_grad():
        states = [m.backbone.state_dict() for m in models]
        avg = {}
        for key, v in states[0].items():
            if v.is_floating_point():
                avg[key] = (sum(s[key].to(torch.float64) for s in states) / len(states)).to(v.dtype)
            else:
                avg[key] = v.clone()
        merged.backbone.load_state_dict(avg)

        fallback = []
        src_layers = [linear_layers(m) for m in models]
        for l, dst in enumerate(linear_layers(merged)):
            g = [scale_off_diagonal(grams[k][l], alpha) for k in range(len(models))]
            w, fell_back = regmean_weight(g, [layers[l].weight.flatten(1) for layers in src_layers])
            dst.weight.copy_(w.reshape(dst.weight.shape).to(dtype=dst.weight.dtype, device=dst.weight.device))
            if fell_back:
                fallback.append(l)

        copy_heads(merged, models)
    merged.meta = {"method": "regmean", "alpha": alpha, "merge_examples": [len(d) for d in data],
                   "fallback_layers": fallback}
    return merged
