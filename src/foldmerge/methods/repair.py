"""BatchNorm reset after an alignment merge (ZipIt!'s `reset_bn_stats`; REPAIR, Jordan et al. 2023).

A merged network whose neurons average several models' neurons has channels whose statistics
have collapsed (averaging decorrelated neurons shrinks their variance), which is why ZipIt!
and Git Re-Basin recompute BatchNorm statistics on data after merging. Our ResNets merge in
fused form (every BatchNorm folded into its conv), so the reset is written on the convs
themselves, which makes it apply to any family (an MLP's linears too):

    for every layer y = W x + b of the spec, in order, on the merge sample:
        target   mean t_μ = M·concat(μ_k), std t_σ = M·concat(σ_k)    (μ_k, σ_k: source k's
                 outputs of that layer per channel; M: the merge map of the layer's space)
        measured mean μ*, std σ* of the merged layer's outputs (the earlier layers already reset)
        W ← (t_σ/σ*)·W,  b ← (b − μ*)·t_σ/σ* + t_μ

A source channel's statistics are what its BatchNorm produced (β, |γ|, on this sample), so this
is ZipIt!'s reset (merged γ, β, recomputed normalization) up to how a merged channel weighs its
sources, and REPAIR's rescaling with the averaged statistics as the target.
"""
from __future__ import annotations

import torch

from ..model import CHUNK, as_input
from ..options import Option, Rule, YesNo
from .common import layer_outputs


def wants_reset(models, data) -> bool:
    """The default: reset exactly when the sources were BatchNorm nets (fused before merging,
    `meta["fused_batchnorm"]`) and there is data to reset on."""
    return data is not None and any(m.meta.get("fused_batchnorm") for m in models)


RESET = Option("reset_bn", YesNo(), "reset every layer's channel statistics on the merge sample after merging "
               "(ZipIt!'s BatchNorm reset, REPAIR)",
               Rule(lambda c: wants_reset(c.models, c.data),
                    "yes for sources with BatchNorm (ResNets) given data, no otherwise: bench cnn's evidence "
                    "(docs/benchmarks/cnn.md)"))


@torch.no_grad()
def channel_stats(model, module_names: list[str], x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (mean, std) per output channel} of layers of `model`'s backbone on x (float64, eval
    mode), all in one pass."""
    modules = {name: model.backbone.get_submodule(name) for name in module_names}
    sums: dict[str, list] = {name: [0.0, 0.0, 0] for name in module_names}

    def hook_for(name):
        def hook(module, _args, out):
            rows = layer_outputs(module, out).to(torch.float64)
            acc = sums[name]
            acc[0] = acc[0] + rows.sum(0)
            acc[1] = acc[1] + (rows ** 2).sum(0)
            acc[2] += rows.shape[0]
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in modules.items()]
    was = model.training
    try:
        model.eval()
        p = next(model.backbone.parameters())
        for part in x.split(CHUNK):
            model.backbone(as_input(part, p))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    out = {}
    for name, (s1, s2, count) in sums.items():
        mean = s1 / count
        out[name] = (mean, (s2 / count - mean ** 2).clamp_min(0).sqrt())
    return out


@torch.no_grad()
def reset_statistics(merged, models, data, maps: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     eps: float = 1e-5) -> int:
    """Reset every layer of `merged` (in place) as the module docstring says; returns how many."""
    spec = merged.spec
    keys = {p.key for p in spec.params}
    x = torch.cat(list(data))
    layers = [p for p in spec.layer_weights() if p.module + ".bias" in keys]
    names = [p.module for p in layers]
    src = [channel_stats(s, names, x) for s in models]
    for p in layers:
        m = maps[spec.written_space(p)][0]
        t_mean = m @ torch.cat([st[p.module][0] for st in src]).to(m)
        t_std = m @ torch.cat([st[p.module][1] for st in src]).to(m)
        mean, std = channel_stats(merged, [p.module], x)[p.module]     # after the earlier layers' resets
        a = t_std / (std + eps)
        layer = merged.backbone.get_submodule(p.module)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.mul_(a.reshape(shape).to(layer.weight))
        layer.bias.copy_(((layer.bias.to(a) - mean) * a + t_mean).to(layer.bias))
    return len(layers)
