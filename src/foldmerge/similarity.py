"""Multi-task weight similarity (Ye et al., "Merging Vision Transformers from Different Tasks and
Domains", eq. 4): how alike the sources' weights are, module by module.

    Sim(L | W_1 … W_N) = Σ_{i<j} CosineSim(W_i, W_j)

over the flattened weights of one module of every source. The gating merge sends the m
attention and the m MLP modules with the lowest similarity through its gate. A module's
"weights" are its weight matrices (biases and norm vectors left out). Strategies (the paper's
Table 9), `concat-combined` being the paper's choice:

  concat-*:   the module's matrices concatenated into one vector per source;
  separate-*: the sum of each matrix's own similarity;
  *-combined: an MLP block's two layers are one module;
  *-separate: each MLP layer is a module of its own (attention stays one module).
"""
from __future__ import annotations

import itertools

import torch
from torch.nn import functional as F

STRATEGIES = ("concat-combined", "concat-separate", "separate-combined", "separate-separate")
DEFAULT_STRATEGY = "concat-combined"


def total_cosine(vectors: list[torch.Tensor]) -> float:
    """Σ_{i<j} cos(v_i, v_j) of flattened tensors (eq. 4)."""
    flat = [v.reshape(-1).to(torch.float64) for v in vectors]
    return float(sum(F.cosine_similarity(a, b, dim=0) for a, b in itertools.combinations(flat, 2)))


def _matrices(keys, state) -> list[str]:
    mats = [k for k in keys if state[k].dim() >= 2]
    return mats or list(keys)


def pieces(spec, kind: str, strategy: str = DEFAULT_STRATEGY) -> list[tuple[str, tuple[str, ...]]]:
    """(name, parameter keys) of the modules of `kind` ("attention" or "mlp") that the strategy
    compares and the gate may take: spec units, or with *-separate an MLP unit's layers one by one."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown similarity strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    out = []
    for u in spec.units_of(kind):
        if kind == "mlp" and strategy.endswith("-separate"):
            modules = dict.fromkeys(k.rpartition(".")[0] for k in u.keys)
            out += [(m, tuple(k for k in u.keys if k.rpartition(".")[0] == m)) for m in modules]
        else:
            out.append((u.name, tuple(u.keys)))
    return out


@torch.no_grad()
def similarities(models, kind: str, strategy: str = DEFAULT_STRATEGY) -> list[tuple[str, tuple[str, ...], float]]:
    """(name, keys, Sim) of every module of `kind` across `models`' backbones, in spec order."""
    states = [m.backbone.state_dict() for m in models]
    out = []
    for name, keys in pieces(models[0].spec, kind, strategy):
        mats = _matrices(keys, states[0])
        if strategy.startswith("concat"):
            sim = total_cosine([torch.cat([s[k].reshape(-1) for k in mats]) for s in states])
        else:
            sim = sum(total_cosine([s[k] for s in states]) for k in mats)
        out.append((name, keys, sim))
    return out


def lowest(models, kind: str, m: int, strategy: str = DEFAULT_STRATEGY) -> list[tuple[str, tuple[str, ...], float]]:
    """The m modules of `kind` with the lowest similarity (fewer if there are fewer), in spec order."""
    sims = similarities(models, kind, strategy)
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    chosen = sorted(sorted(range(len(sims)), key=lambda i: sims[i][2])[:m])
    return [sims[i] for i in chosen]
