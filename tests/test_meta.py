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


def test_a_drawn_sample_is_recorded_and_regmean_gets_its_augmented_images_by_default(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")
    srcs = []
    for k, t in enumerate(["mnist:0-4", "mnist:5-9"]):
        torch.manual_seed(k)
        srcs.append(TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, [t]))
    merged = foldmerge.merge(srcs, 4, method="regmean")
    assert merged.meta["merge_sample"] == {"per_task": 4, "augment": 1024, "seed": 0}
    assert merged.meta["merge_examples"] == [4 + 1024] * 2
    plain = foldmerge.merge(srcs, 4, method="regmean", augment=0)
    assert plain.meta["merge_examples"] == [4, 4]
    assert foldmerge.merge(srcs, 4, method="average").meta["merge_sample"]["augment"] == 0
    given = foldmerge.merge(srcs, [torch.zeros(3, 784)] * 2, method="average")
    assert given.meta["merge_sample"] == {"given": "tensors"}
    with pytest.raises(ValueError, match="drawn sample"):
        foldmerge.merge(srcs, [torch.zeros(3, 784)] * 2, method="average", augment=8)


@pytest.mark.parametrize("method", ["fs-merge", "distill"])
def test_transformers_get_the_vit_benchs_validated_training_defaults(method, monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")
    cfg = {"image_size": 8, "channels": 1, "patch": 4, "width": 8, "depth": 1, "heads": 2, "mlp_dim": 16,
           "out_dim": 8}
    srcs = []
    for k, t in enumerate(["mnist:0-4", "mnist:5-9"]):
        torch.manual_seed(k)
        srcs.append(TaskModel("vit", cfg, [t]))
    data = [torch.randn(6, 1, 8, 8) for _ in range(2)]
    merged = foldmerge.merge(srcs, data, method=method, epochs=1)
    train = merged.meta["train"]
    assert (train["optimizer"], train["batch_size"], train["lr"], train["weight_decay"]) == ("adamw", 128, 1e-3, 0.001)
    assert merged.meta["target_scale"] == "none"
    mlps = [TaskModel("mlp", {"in_dim": 20, "hidden": [4]}, [t]) for t in ["mnist:0-4", "mnist:5-9"]]
    plain = foldmerge.merge(mlps, [torch.randn(6, 20)] * 2, method=method, epochs=1)
    assert (plain.meta["train"]["optimizer"], plain.meta["train"]["lr"]) == ("sgd", 0.1)
    assert plain.meta["target_scale"] == "match"
