"""Multi-layer perceptrons and their merge spec (FS-Merge paper, section 2.1).

Backbone: x (flattened) -> [Linear -> ReLU] x L; the features f_L are the last hidden
layer's post-activations. The class head sits outside the backbone and is never merged.

The spec makes every hidden layer a space, so the Foldable SuperNet (`foldmerge.supernet`) of
n sources with hidden widths d_l^k and target widths d_l^* is

    f*_0 = x
    f*_l = relu( M_l · (blockdiag(W_l^k) · U_{l-1} · f*_{l-1} + concat(b_l^k)) )
    reconstruction of model k's f_L:  U_L[k] · f*_L

with U_0 = [I; I; …] because every model sees the same input (a shared space: no U).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..schema import strict_arguments
from ..spec import ArchSpec, Param, Probe, Space, Unit


class Backbone(nn.Module):
    @strict_arguments            # the signature is the schema of a config's `backbone`
    def __init__(self, in_dim: int = 784, hidden: list[int] | tuple[int, ...] = (128,)):
        super().__init__()
        if not hidden:
            raise ValueError("an MLP needs at least one hidden layer")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in [in_dim, *hidden]):
            raise ValueError(f"MLP sizes must be positive integers, got in_dim {in_dim!r}, hidden {list(hidden)!r}")
        self.in_dim = int(in_dim)
        self.hidden = [int(h) for h in hidden]
        dims = [self.in_dim] + self.hidden
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out_dim = self.hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(1)
        for layer in self.layers:
            f = F.relu(layer(f))
        return f

    def preactivations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """z_1 … z_L (before ReLU) of every hidden layer."""
        zs, f = [], x.flatten(1)
        for layer in self.layers:
            z = layer(f)
            zs.append(z)
            f = F.relu(z)
        return zs


def spec(config: dict) -> ArchSpec:
    """The MLP as data: the shared input, one space per hidden layer; layer l writes h_l and
    reads h_{l-1} (the input for l = 0); h_l is observed where layer l + 1 reads it (after
    the ReLU), the last one as the backbone's output."""
    depth = len(config.get("hidden", DEFAULTS["hidden"]))
    spaces = [Space("input", shared=True)] + [Space(f"h{l}") for l in range(depth)]
    params, probes = [], []
    for l in range(depth):
        params += [Param(f"layers.{l}.weight", (f"h{l}", f"h{l - 1}" if l else "input")),
                   Param(f"layers.{l}.bias", (f"h{l}",))]
        probes.append(Probe(f"h{l}", f"layers.{l + 1}", "in") if l < depth - 1 else Probe(f"h{l}", "", "out"))
    units = [Unit(f"layers.{l}", "mlp", (f"layers.{l}.weight", f"layers.{l}.bias")) for l in range(depth)]
    return ArchSpec("mlp", spaces, params, probes=probes, output=f"h{depth - 1}", build=lambda c: Backbone(**c),
                    resize=resize, width_spaces=tuple(f"h{l}" for l in range(depth)), check=check_compatible,
                    units=units, defaults="mlp", relu_layers=tuple((f"layers.{l}", f"h{l}") for l in range(depth)))


DEFAULTS = {"in_dim": 784, "hidden": (128,)}


def resize(config: dict, widths: list[int]) -> dict:
    """The configuration with hidden widths `widths` (one per hidden layer)."""
    depth = len(config.get("hidden", DEFAULTS["hidden"]))
    if len(widths) != depth:
        raise ValueError(f"target widths {list(widths)} do not match the source depth {depth}: give one per hidden layer")
    if any(w < 1 for w in widths):
        raise ValueError(f"target widths must be positive, got {list(widths)}")
    return {**config, "hidden": [int(w) for w in widths]}


def check_compatible(configs: list[dict]) -> None:
    """Same depth and input size; otherwise a clear error (widths may differ)."""
    depths = [len(c.get("hidden", DEFAULTS["hidden"])) for c in configs]
    if len(set(depths)) != 1:
        raise ValueError(f"cannot merge MLPs of different depths {depths}: "
                         "FS-Merge folds layer by layer, so every model needs the same number of hidden layers")
    ins = [c.get("in_dim", DEFAULTS["in_dim"]) for c in configs]
    if len(set(ins)) != 1:
        raise ValueError(f"cannot merge MLPs with different input sizes {ins}")
