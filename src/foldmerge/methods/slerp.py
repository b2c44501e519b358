"""SLERP: spherical linear interpolation (Shoemake 1985, "Animating rotation with quaternion
curves"), applied per tensor of the backbone, the usual baseline for merging two models.

Every backbone tensor is flattened to a vector; for two vectors a, b and t ∈ [0, 1]

    slerp(a, b, t) = sin((1 − t)Ω) / sin Ω · a + sin(tΩ) / sin Ω · b,
    cos Ω = ⟨a/|a|, b/|b|⟩,

applied to the raw vectors (not normalized: the standard form for model merging), falling
back to linear interpolation (1 − t)·a + t·b when the vectors are (nearly) parallel or
antiparallel, |cos Ω| > 1 − 1e-6, or either is zero. t = 0 returns a, t = 1 returns b.

More than two models (our definition): a running spherical mean over the models in order,

    m_1 = v_1,   m_i = slerp(m_{i−1}, v_i, t = 1/i),

so each model enters with the weight it would have in a running arithmetic mean; for two
models it is slerp(v_1, v_2, 0.5). `t` may only be set for two models. Heads are copied,
never merged; the backbones must have identical configurations.
"""
from __future__ import annotations

import math

import torch

from ..model import TaskModel
from ..options import Number, Option, Rule, method
from .common import check_same_backbone, copy_heads

PARALLEL_EPS = 1e-6


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two same-shape tensors, taken as flat vectors (float64 inside)."""
    if a.shape != b.shape:
        raise ValueError(f"slerp needs tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    va, vb = a.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
    na, nb = va.norm(), vb.norm()
    lerp = (1.0 - t) * va + t * vb
    if na == 0 or nb == 0:
        out = lerp
    else:
        cos = float(torch.dot(va / na, vb / nb).clamp(-1.0, 1.0))
        if abs(cos) > 1.0 - PARALLEL_EPS:
            out = lerp
        else:
            omega = math.acos(cos)
            s = math.sin(omega)
            out = math.sin((1.0 - t) * omega) / s * va + math.sin(t * omega) / s * vb
    return out.reshape(a.shape).to(a.dtype)


OPTIONS = (Option("t", Number(0, 1), "two models: the interpolation point",
                  Rule(lambda c: 0.5 if len(c.models) == 2 else None,
                       "0.5, the midpoint, for two models; more than two merge by a running spherical mean")),)


@method("slerp", OPTIONS, "spherical interpolation of every backbone tensor", data="none")
def merge(models, data, seed, context, t):
    check_same_backbone(models, "SLERP")
    if t is not None and len(models) != 2:
        raise ValueError(f"the SLERP option t is defined for two models only; got {len(models)} "
                         "(more than two are merged by a running spherical mean)")
    merged = TaskModel.for_merge(models)
    with torch.no_grad():
        states = [m.backbone.state_dict() for m in models]
        out = {}
        for key, v in states[0].items():
            if not v.is_floating_point():
                out[key] = v.clone()
                continue
            if len(models) == 2:
                out[key] = slerp(v, states[1][key], 0.5 if t is None else float(t))
            else:
                m = v.to(torch.float64)
                for i, s in enumerate(states[1:], start=2):
                    m = slerp(m, s[key], 1.0 / i)
                out[key] = m.to(v.dtype)
        merged.backbone.load_state_dict(out)
        copy_heads(merged, models)
    merged.meta = {"method": "slerp", "t": (0.5 if t is None else float(t)) if len(models) == 2 else None,
                   "combine": "pair" if len(models) == 2 else "running spherical mean, t_i = 1/i"}
    return merged
