"""The fidelity report: per task, on held-out unlabeled examples, how often the merge predicts what
its source predicts and the KL divergence between them; its sample, disjoint from the merge's."""
import pytest
import torch

import foldmerge
from foldmerge.api import fidelity_sample, merge_sample
from foldmerge.data.tasks import Task
from foldmerge.model import TaskModel


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def twins():
    """Two models of different tasks whose backbones are one: their average is each of them."""
    torch.manual_seed(0)
    a = TaskModel("mlp", {"in_dim": 784, "hidden": [16]}, ["mnist:0-4"])
    b = TaskModel("mlp", {"in_dim": 784, "hidden": [16]}, ["mnist:5-9"])
    b.backbone.load_state_dict(a.backbone.state_dict())
    return a, b


def test_a_merge_equal_to_its_sources_agrees_fully_and_diverges_not():
    merged = foldmerge.merge(list(twins()), data=8, method="average", calibrate="none", fidelity=16)
    fid = merged.meta["fidelity"]
    assert sorted(fid) == ["mnist:0-4", "mnist:5-9"]
    for task in fid.values():
        assert task["agreement"] == 100.0 and abs(task["kl"]) < 1e-6 and task["examples"] == 16


def test_a_merge_unlike_its_sources_is_reported_so():
    a, b = twins()
    torch.manual_seed(1)
    b.backbone.load_state_dict(TaskModel("mlp", {"in_dim": 784, "hidden": [16]}, ["mnist:5-9"]).backbone.state_dict())
    merged = foldmerge.merge([a, b], data=8, method="average", calibrate="none", fidelity=32)
    assert any(t["kl"] > 1e-3 for t in merged.meta["fidelity"].values())


def test_fidelity_zero_records_none():
    merged = foldmerge.merge(list(twins()), data=8, method="average", fidelity=0)
    assert "fidelity" not in merged.meta


def test_thefidelity_sample_follows_the_merge_sample_and_shrinks_to_what_is_left(monkeypatch):
    models = list(twins())
    seen = torch.cat(merge_sample(models, 8, seed=3)).flatten(1)
    fid = fidelity_sample(models, 8, 16, seed=3)
    assert [len(f) for f in fid] == [16, 16]
    for f in fid:                                       # no example the merge read
        assert not (torch.cdist(f.flatten(1), seen) == 0).any()
    split = Task.split
    monkeypatch.setattr(Task, "split", lambda self, which: tuple(t[:20] for t in split(self, which)))
    assert [len(f) for f in fidelity_sample(models, 8, 16, seed=3)] == [12, 12]
    assert fidelity_sample(models, 20, 16, seed=3) is None
