"""Routing calibration: per-task predictions never change, the heads become comparable."""
import pytest
import torch

import foldmerge
from foldmerge import calibrate
from foldmerge.api import calibrate_heads
from foldmerge.model import TaskModel


def two_task_model(head="linear"):
    """A merged-looking model with two heads; head 1 is made loud on every input, so raw routing
    sends task 0's inputs to head 1."""
    torch.manual_seed(0)
    m = TaskModel("mlp", {"in_dim": 20, "hidden": [16]}, ["mnist:0-4", "mnist:5-9"], head=head)
    with torch.no_grad():
        m.heads[1].weight.mul_(4.0)
        if m.heads[1].bias is not None:
            m.heads[1].bias.add_(2.0)
    return m


def sample():
    """Two tasks' inputs that the backbone can tell apart (shifted means)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(64, 20, generator=g) + 1.5
    b = torch.randn(64, 20, generator=g) - 1.5
    return [a, b]


def routing(model, data):
    with torch.no_grad():
        hits = 0
        for k, d in enumerate(data):
            z = torch.cat(model(d), 1)
            hits += int(((z.argmax(1) >= 5).long() == k).sum())
    return hits / sum(len(d) for d in data)


@pytest.mark.parametrize("head", ["linear", "class-embedding"])
def test_calibration_keeps_every_per_task_prediction_and_routes_better(head):
    model, data = two_task_model(head), sample()
    x = torch.randn(300, 20) * 2
    before = [l.clone() for l in model(x)]
    raw_routing = routing(model, data)
    meta = calibrate_heads(model, [_Source(["mnist:0-4"]), _Source(["mnist:5-9"])], data)
    assert meta["kept"] and meta["held_out_routing"]["after"] >= meta["held_out_routing"]["before"]
    after = model(x)
    for b, a, s in zip(before, after, meta["scales"]):
        assert torch.equal(b.argmax(1), a.argmax(1))                 # per-task: the same prediction
        shift = a / s - b                                            # a_j (l + v·f + c) / a_j - l
        assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-4)   # one offset per head
    assert routing(model, data) > raw_routing
    if head == "class-embedding":
        assert all(h.bias is None for h in model.heads)


class _Source:
    """Stands in for a source model: calibrate_heads reads only its tasks."""

    def __init__(self, tasks):
        self.tasks = tasks


def test_worse_held_out_routing_keeps_the_heads(monkeypatch):
    model, data = two_task_model(), sample()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fit = calibrate._fit

    def misroute(*args):                  # the fitted offsets reversed: every input to the other head
        v, c, log_a = fit(*args)
        return -20 * v, -20 * c, log_a

    monkeypatch.setattr(calibrate, "_fit", misroute)
    meta = calibrate.calibrate_routing(model, data, [0, 1])
    assert not meta["kept"] and meta["reason"] == "held-out routing got worse"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_merge_calibrates_by_default_and_records_it():
    torch.manual_seed(0)
    a = TaskModel("mlp", {"in_dim": 20, "hidden": [16]}, ["mnist:0-4"])
    b = TaskModel("mlp", {"in_dim": 20, "hidden": [16]}, ["mnist:5-9"])
    data = sample()
    plain = foldmerge.merge([a, b], data, method="average", calibrate="none")
    assert plain.meta["calibration"] == {"calibrate": "none"}
    for h, s in zip(plain.heads, [a.heads[0], b.heads[0]]):          # average keeps the heads as they are
        assert torch.equal(h.weight, s.weight)
    merged = foldmerge.merge([a, b], data, method="average")
    assert merged.meta["calibration"]["calibrate"] == "routing"
    x = torch.randn(50, 20)
    for p, m in zip(plain(x), merged(x)):
        assert torch.equal(p.argmax(1), m.argmax(1))
    with pytest.raises(ValueError, match="--calibrate: expected one of routing, none"):
        foldmerge.merge([a, b], data, method="average", calibrate="temperature")
