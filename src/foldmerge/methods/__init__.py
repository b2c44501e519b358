"""Merging methods: one module each, one signature `merge(models, data, **options) -> TaskModel`.

`models` are TaskModels (one or more heads each); `data` is one unlabeled tensor of
inputs per model, drawn from that model's task(s). The result is a TaskModel with every
head of every source, and a `meta` dict saying how it was made. Every method reads the
architecture from the models' merge spec (`model.spec`), never from the family's name.
"""
from __future__ import annotations

from functools import cache
from typing import Callable


@cache
def registry() -> dict[str, Callable]:
    """name -> merge function, built once per process."""
    from . import (average, cca, distill, fs_merge, gating, opt, permute, pleas, regmean, slerp, task_arithmetic, ties,
                   weight_matching, zipit)
    return {"fs-merge": fs_merge.merge, "distill": distill.merge, "average": average.merge,
            "regmean": regmean.merge, "slerp": slerp.merge, "zipit": zipit.merge, "permute": permute.merge,
            "weight-matching": weight_matching.merge, "cca": cca.merge, "pleas": pleas.merge,
            "opt": opt.merge, "task-arithmetic": task_arithmetic.merge, "ties": ties.merge, "gating": gating.merge}


def get_method(name: str) -> Callable:
    methods = registry()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(methods))}")
    return methods[name]
