"""A merge's meta records every value it used: resolved defaults, never None."""
import pytest
import torch

import foldmerge
from foldmerge.model import TaskModel


def nones(d, path=""):
    out = []
    for k, v in d.items():
        if v is None:
            out.append(path + k)
        elif isinstance(v, dict):
            out += nones(v, f"{path}{k}.")
    return out


@pytest.mark.parametrize("method,opts", [("average", {}), ("slerp", {}), ("regmean", {}), ("zipit", {}),
                                         ("permute", {}), ("opt", {}), ("distill", {"epochs": 2}),
                                         ("fs-merge", {"epochs": 2}), ("fs-merge", {"epochs": 2, "variant": "local"}),
                                         ("fs-merge", {"epochs": 2, "init": "zipit"})])
def test_meta_has_no_unresolved_value(method, opts, monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")
    srcs = []
    for k, t in enumerate(["mnist:0-4", "mnist:5-9"]):
        torch.manual_seed(k)
        srcs.append(TaskModel("mlp", {"in_dim": 20, "hidden": [8, 8]}, [t]))
    data = [torch.randn(16, 20, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    merged = foldmerge.merge(srcs, data, method=method, **opts)
    assert nones(merged.meta) == []
    if "epochs" in opts:
        assert merged.meta["train"]["batch_size"] == 32          # full batch: the whole sample
