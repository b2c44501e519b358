"""The one training loop's schedule: the cosine warmup is a fraction of training."""
import pytest
import torch

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


def test_weight_decay_pulls_what_its_option_says():
    """decay 'all': every parameter shrinks toward zero; 'matrices': only those of two or more axes
    (a diagonal, a norm gain, a bias keep their values); 'to-start': every parameter toward where
    it began (decoupled: p <- p - lr * wd * (p - p_start) after each step)."""
    from foldmerge.train import TrainConfig, fit

    def run(decay, optimizer="adamw"):
        torch.manual_seed(0)
        vec, mat = torch.nn.Parameter(torch.randn(5) + 2), torch.nn.Parameter(torch.randn(3, 4) + 2)
        start = [vec.detach().clone(), mat.detach().clone()]
        c = torch.randn(5), torch.randn(3, 4)
        cfg = TrainConfig(epochs=1, lr=0.1, weight_decay=0.5, optimizer=optimizer, momentum=0.0,
                          schedule="constant", decay=decay)
        fit([vec, mat], lambda x: (vec * c[0]).sum() + (mat * c[1]).sum() + 0 * x.sum(), [torch.zeros(2, 1)], cfg)
        return start, c, [vec.detach(), mat.detach()]

    start, c, (vec, mat) = run("matrices", "sgd")
    torch.testing.assert_close(vec, start[0] - 0.1 * c[0])                         # no decay on one axis
    torch.testing.assert_close(mat, start[1] - 0.1 * (c[1] + 0.5 * start[1]))       # SGD's own decay
    start, c, (vec, mat) = run("all", "sgd")
    torch.testing.assert_close(vec, start[0] - 0.1 * (c[0] + 0.5 * start[0]))
    start, c, (vec, mat) = run("to-start", "sgd")
    for s, ck, p in zip(start, c, (vec, mat)):                       # the step, then 5 % of it taken back
        torch.testing.assert_close(p, s - 0.1 * ck * (1 - 0.1 * 0.5))
    start, _, (vec, mat) = run("to-start")
    adam_all = run("all")[2]
    assert not torch.allclose(adam_all[0], vec)                      # AdamW's own pulls toward zero
    with pytest.raises(ValueError, match="decay must be one of"):
        TrainConfig(decay="zero")
