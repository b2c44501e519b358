"""Architecture families. Each module describes one family as data the methods work on:

  Backbone(**config)   the plain model (the features before the task heads), `out_dim` attribute
  spec(config)         its merge spec (`foldmerge.spec.ArchSpec`): spaces, parameters with the
                       spaces of their axes, norms, probes, how to build and resize it

A Hugging Face family whose names are regular is a table instead (`arch/families/*.json`, read by
`arch.encoder`). A user's own architecture joins with `register_arch(name, spec)`: `spec(config)` returns its
ArchSpec, whose `build(config)` makes the backbone.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

from . import encoder, mlp, resnet, vit

_FAMILIES: dict[str, Callable] = {}


def _builtin() -> dict[str, Callable]:
    if not _FAMILIES:
        _FAMILIES.update({"mlp": mlp.spec, "vit": vit.spec, "resnet": resnet.spec})
        # the Hugging Face encoders, each described by a table (arch/families/*.json)
        _FAMILIES.update({name: partial(encoder.spec, name) for name in encoder.tables()})
    return _FAMILIES


def register_arch(name: str, spec: Callable) -> None:
    """Make `TaskModel(name, config, …)` build and merge models described by `spec(config)`."""
    families = _builtin()
    if not callable(spec):
        raise TypeError("register_arch needs a function config -> ArchSpec")
    families[name] = spec


def arch_spec(name: str, config: dict):
    """The merge spec of architecture `name` at `config`."""
    families = _builtin()
    if name not in families:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(families))}")
    spec = families[name](dict(config))
    if spec.name != name:
        raise ValueError(f"the spec registered as {name!r} calls itself {spec.name!r}")
    return spec
