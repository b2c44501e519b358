"""Architecture families. Each module describes one family as data the methods work on:

  Backbone(**config)     the plain model (features before the heads), `out_dim` attribute
  SuperNet(sources, …)   its Foldable SuperNet: forward in folded or SuperNet form, fold(),
                         reconstruct(f*), output_map (the map folded into the heads)
  linear_layers(backbone)  the foldable linear layers in order, for layer-wise methods
"""
from __future__ import annotations

from types import ModuleType


def get_arch(name: str) -> ModuleType:
    from . import mlp, vit
    families = {"mlp": mlp, "vit": vit}
    if name not in families:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(families))}")
    return families[name]
