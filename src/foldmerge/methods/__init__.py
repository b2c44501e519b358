"""Merging methods: one module each, its merge function a `foldmerge.options.Method` that declares its options.

`METHODS[name](models, data, seed=…, **options)`: `models` are TaskModels (one or more heads each);
`data` is one unlabeled tensor of inputs per model, drawn from that model's task(s). The result is
a TaskModel with every head of every source, and a `meta` dict saying how it was made (its
resolved options in `meta["options"]`). Every method reads the architecture from the models'
merge spec (`model.spec`), never from the family's name.
"""
from __future__ import annotations

from ..errors import did_you_mean
from ..options import Method
from . import (
    average,
    cca,
    distill,
    fs_merge,
    gating,
    opt,
    permute,
    pleas,
    regmean,
    slerp,
    task_arithmetic,
    ties,
    weight_matching,
    zipit,
)

# in the order `foldmerge merge --help` lists them: the flagship, its baseline, then by family of method
METHODS: dict[str, Method] = {m.name: m for m in (
    fs_merge.merge, distill.merge,
    zipit.merge, permute.merge, weight_matching.merge, opt.merge, cca.merge, pleas.merge, regmean.merge,
    average.merge, slerp.merge,
    task_arithmetic.merge, ties.merge, gating.merge)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}{did_you_mean(name, METHODS)}; available: {', '.join(METHODS)}")
    return METHODS[name]
