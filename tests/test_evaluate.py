"""The evaluation protocol on a model whose predictions we control."""
import pytest
import torch
from torch import nn

from foldmerge.data import Task
from foldmerge.evaluation import Ensemble, evaluate, random_guess
from foldmerge.model import TaskModel


class Oracle(nn.Module):
    """Head 0 is always right on task 0; head 1 always predicts class 0; joint scores favour head 0."""

    def __init__(self):
        super().__init__()
        self.tasks = [Task.parse("mnist:0-4"), Task.parse("mnist:5-9")]

    def forward(self, x):
        n = len(x)
        y = self.current[:n]
        self.current = self.current[n:]
        h0 = torch.nn.functional.one_hot(y, 5).float() * 2.0
        h1 = torch.zeros(n, 5)
        h1[:, 0] = 1.0
        return [h0, h1]


def test_per_task_and_joint():
    model = Oracle()
    t0, t1 = model.tasks
    y0, y1 = t0.split("test")[1], t1.split("test")[1]
    # evaluate walks tasks in order, in batches; feed it each task's true labels
    model.current = torch.cat([y0, y1])
    r = evaluate(model, batch_size=10**6)
    assert r["per_task"]["mnist:0-4"] == pytest.approx(100.0)
    assert r["per_task"]["mnist:5-9"] == pytest.approx(100.0 * (y1 == 0).float().mean().item())
    assert r["joint"]["mnist:0-4"] == pytest.approx(100.0)          # head 0 wins with score 2
    # on task 1, argmax lands in head 0 (score 2 > 1): never right
    assert r["joint"]["mnist:5-9"] == pytest.approx(0.0)
    assert r["per_task_mean"] == pytest.approx(sum(r["per_task"].values()) / 2)


def test_random_guess_levels():
    g = random_guess(["mnist:0-4", "mnist:5-9"])
    assert g["per_task_mean"] == pytest.approx(20.0) and g["joint_mean"] == pytest.approx(10.0)


def test_missing_head_is_an_error():
    m = TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, ["mnist:0-4"])
    with pytest.raises(ValueError, match="no head"):
        evaluate(m, ["mnist:5-9"])


def test_ensemble_averages_scaled_features():
    torch.manual_seed(0)
    a = TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, ["mnist:0-4"])
    b = TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, ["mnist:5-9"])
    x = torch.randn(7, 1, 28, 28)
    fa, fb = a.features(x), b.features(x)
    avg = (fa / fa.abs().mean() + fb / fb.abs().mean()) / 2
    out = Ensemble([a, b], normalize=True)(x)
    torch.testing.assert_close(out[0], a.heads[0](avg))
    torch.testing.assert_close(out[1], b.heads[0](avg))
    plain = Ensemble([a, b])(x)                      # MLPs (chains of layers): the plain average by default
    torch.testing.assert_close(plain[0], a.heads[0]((fa + fb) / 2))
    vit = {"image_size": 28, "channels": 1, "patch": 7, "width": 8, "depth": 1, "heads": 2, "mlp_dim": 8,
           "out_dim": 8}
    assert Ensemble([TaskModel("vit", vit, ["mnist:0-4"]), TaskModel("vit", vit, ["mnist:5-9"])]).normalize
    c = TaskModel("mlp", {"in_dim": 784, "hidden": [9]}, ["fmnist:0-4"])
    with pytest.raises(ValueError, match="equal feature sizes"):
        Ensemble([a, c])


def test_evaluation_runs_in_eval_mode_and_gives_each_module_its_mode_back():
    torch.manual_seed(0)
    m = TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, ["mnist:0-4"])
    m.train()
    m.heads.eval()                      # a mix of modes, each given back as it was
    seen = []
    m.backbone.register_forward_hook(lambda mod, i, o: seen.append(mod.training))
    x, y = torch.randn(6, 1, 28, 28), torch.randint(5, (6,))
    evaluate(m, labelled={"mnist:0-4": (x, y)})
    assert seen and not any(seen)
    assert m.training and m.backbone.training and not any(h.training for h in m.heads)
