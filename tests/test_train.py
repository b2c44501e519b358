"""The one training loop's schedule: the cosine warmup is a fraction of training."""
import pytest

from foldmerge.bench.mlp import e1_warmup
from foldmerge.train import TrainConfig, lr_factor


def factors(cfg, steps_per_epoch=1):
    total = cfg.epochs * steps_per_epoch
    return [lr_factor(cfg, s, total, steps_per_epoch) for s in range(total)]


def test_a_ten_epoch_run_leaves_its_warmup_and_anneals():
    f = factors(TrainConfig(epochs=10))                 # 20 epochs of warmup would have been the whole run
    assert f[0] == pytest.approx(1.0)                   # 0.02 of 10 steps rounds to no warmup step
    assert f[-1] < 0.05 and all(a >= b for a, b in zip(f, f[1:]))
    g = factors(TrainConfig(epochs=100, warmup=0.1), steps_per_epoch=3)
    peak = g.index(max(g))
    assert peak == 29 and g[0] == pytest.approx(1 / 30) and g[-1] < 0.01    # 10 % of 300 steps warm up


def test_the_default_warmup_is_the_papers_20_of_1000_epochs():
    f = factors(TrainConfig(epochs=1000))
    assert f.index(max(f)) == 19 and f[19] == pytest.approx(1.0)
    # the MLP bench keeps E.1's 20 epochs for every run length
    for epochs in (1000, 15000, 10000, 100):
        assert int(round(e1_warmup(epochs)["warmup"] * epochs)) == 20
    assert 0 < e1_warmup(5)["warmup"] < 1


def test_warmup_outside_a_fraction_is_an_error():
    for bad in (-0.1, 1.0, 20):
        with pytest.raises(ValueError, match="fraction of training"):
            TrainConfig(warmup=bad)
