"""Early stopping on held-out data (FS-Merge paper F.8): the best epoch's parameters are kept."""
import pytest
import torch

import foldmerge
from foldmerge.api import held_out_sample, merge_sample
from foldmerge.model import TaskModel
from foldmerge.train import EarlyStop, TrainConfig, fit


def test_fit_keeps_the_epoch_with_the_lowest_held_out_loss():
    w = torch.nn.Parameter(torch.zeros(()))
    seen = []

    def held():                       # held-out optimum at 1, training's at 2: it overshoots
        loss = float((w - 1.0) ** 2)
        seen.append(loss)
        return loss

    stop = EarlyStop(loss=held, patience=None)
    cfg = TrainConfig(epochs=30, lr=0.05, momentum=0.0, schedule="constant")
    fit([w], lambda x: ((w - 2.0) ** 2) * x.mean(), [torch.ones(4)], cfg, early_stop=stop)
    assert stop.epochs_run == 30 and len(seen) == 31           # the start and every epoch scored
    assert stop.best_loss == min(seen) and seen.index(min(seen)) == stop.best_epoch
    assert 0 < stop.best_epoch < 30
    assert float((w.detach() - 1.0) ** 2) == pytest.approx(stop.best_loss, abs=1e-12)    # its parameters are back


def test_patience_stops_training_once_the_held_out_loss_stops_improving():
    w = torch.nn.Parameter(torch.zeros(()))
    stop = EarlyStop(loss=lambda: float((w - 1.0) ** 2), patience=3)
    cfg = TrainConfig(epochs=200, lr=0.05, momentum=0.0, schedule="constant")
    history = fit([w], lambda x: ((w - 2.0) ** 2) * x.mean(), [torch.ones(4)], cfg, early_stop=stop)
    assert stop.epochs_run == stop.best_epoch + 3 == len(history) < 200


def mlp_pair():
    torch.manual_seed(0)
    return [TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, [t]) for t in ("mnist:0-4", "mnist:5-9")]


def test_held_out_examples_are_disjoint_from_the_merge_sample():
    models = mlp_pair()
    data, held = merge_sample(models, 20, seed=3), held_out_sample(models, 20, 15, seed=3)
    assert [len(h) for h in held] == [15, 15]
    for d, h in zip(data, held):
        flat_d, flat_h = d.flatten(1), h.flatten(1)
        assert not any(bool((flat_d == row).all(1).any()) for row in flat_h)


@pytest.mark.parametrize("method", ["fs-merge", "distill"])
def test_merge_with_held_out_records_its_early_stop(method):
    models = mlp_pair()
    merged = foldmerge.merge(models, 16, method=method, held_out=16, epochs=12, patience=4, calibrate="none")
    stop = merged.meta["early_stop"]
    assert stop["held_out_examples"] == [16, 16] and stop["patience"] == 4
    assert stop["epochs_run"] <= 12 and 0 <= stop["best_epoch"] <= stop["epochs_run"]
    assert merged.meta["merge_sample"]["held_out"] == 16
    plain = foldmerge.merge(models, 16, method=method, epochs=12, calibrate="none")
    assert "early_stop" not in plain.meta


def test_held_out_is_refused_where_it_does_not_apply():
    models = mlp_pair()
    with pytest.raises(ValueError, match="applies to fs-merge and distill"):
        foldmerge.merge(models, 8, method="regmean", held_out=8)
    with pytest.raises(ValueError, match="patience applies only with held-out"):
        foldmerge.merge(models, 8, method="distill", patience=3, epochs=1)
    with pytest.raises(ValueError, match="not local"):
        foldmerge.merge(models, 8, method="fs-merge", variant="local", held_out=8, epochs=1)
