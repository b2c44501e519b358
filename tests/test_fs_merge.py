"""FS-Merge training: the objective goes down, the two forms agree, options behave."""
import pytest
import torch

import foldmerge
from foldmerge.arch.mlp import SuperNet
from foldmerge.methods.common import reconstruction_loss as _recon_loss, target_scales as _scales
from foldmerge.model import TaskModel


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def sources(hiddens=([24, 16], [24, 16]), dtype=torch.float32):
    torch.manual_seed(0)
    tasks = ["mnist:0-4", "mnist:5-9", "fmnist:0-4"]
    return [TaskModel("mlp", {"in_dim": 20, "hidden": list(h)}, [tasks[k]]).to(dtype) for k, h in enumerate(hiddens)]


def sample(n_models, n=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 20, generator=g, dtype=dtype) + k for k in range(n_models)]


@pytest.mark.parametrize("variant,init,param", [("global", "first", "full"), ("global", "random", "diag+lowrank(4)"),
                                                ("local", "random", "full"), ("local", "first", "diag")])
def test_short_merge_reduces_reconstruction_loss(variant, init, param):
    src = sources()
    merged = foldmerge.merge(src, sample(2), method="fs-merge", variant=variant, init=init, param=param,
                             epochs=300, lr=0.05, schedule="constant")
    assert merged.meta["final_loss"] < 0.8 * merged.meta["initial_loss"]
    assert merged.backbone.hidden == [24, 16]
    assert [t.name for t in merged.tasks] == ["mnist:0-4", "mnist:5-9"]


def test_three_models_and_a_new_target_width():
    src = sources(([24, 16], [20, 12], [24, 10]))
    merged = foldmerge.merge(src, sample(3), method="fs-merge", variant="global", widths=[18, 14],
                             param="diag+lowrank(4)", epochs=20, lr=0.05)
    assert merged.backbone.hidden == [18, 14]
    out = merged(torch.randn(4, 20))
    assert len(out) == 3 and all(o.shape == (4, 5) for o in out)
    assert merged.meta["final_loss"] < merged.meta["initial_loss"]


def test_folded_and_supernet_forms_give_same_loss_and_gradients():
    src = sources(dtype=torch.float64)
    x = sample(2, dtype=torch.float64)
    xs = torch.cat(x)
    targets = [m.features(xs).detach() for m in src]
    grads = {}
    for form in ("folded", "supernet"):
        sn = SuperNet(src, param="diag+lowrank(3)", init="random", seed=5)
        loss = _recon_loss(sn.reconstruct(sn(xs, form=form)), targets, None)
        loss.backward()
        grads[form] = (loss.detach(), [p.grad.clone() for p in sn.parameters()])
    torch.testing.assert_close(grads["folded"][0], grads["supernet"][0], rtol=0, atol=1e-10)
    for a, b in zip(grads["folded"][1], grads["supernet"][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_zero_epochs_with_first_init_returns_model_one():
    src = sources()
    merged = foldmerge.merge(src, sample(2), method="fs-merge", variant="global", init="first",
                             epochs=0, target_scale="none")
    x = torch.randn(6, 20)
    assert torch.equal(merged(x)[0], src[0](x)[0])


def test_own_task_loss_scores_only_each_inputs_own_model():
    r = [torch.zeros(4, 3), torch.zeros(4, 2)]
    t = [torch.ones(4, 3), torch.full((4, 2), 10.0)]
    owner = torch.tensor([0, 0, 1, 1])
    # model 0 scored on rows 0-1 (error 1 per entry), model 1 on rows 2-3 (error 100 per entry)
    expected = (2 * 3 * 1.0 + 2 * 2 * 100.0) / (2 * 3 + 2 * 2)
    assert _recon_loss(r, t, owner).item() == pytest.approx(expected)
    assert _recon_loss(r, t, None).item() == pytest.approx((12 * 1.0 + 8 * 100.0) / 20)


def test_target_scales():
    a, b = torch.full((3, 2), 2.0), torch.full((3, 2), -8.0)
    assert _scales([a, b], "match") == pytest.approx([1.0, 0.25])
    assert _scales([a, b], 0.5) == pytest.approx([0.25, 0.0625])
    assert _scales([a, b], "none") == [1.0, 1.0]
    with pytest.raises(ValueError):
        _scales([a, b], "big")


def test_bad_options_are_clear_errors():
    src = sources()
    with pytest.raises(ValueError, match="variant"):
        foldmerge.merge(src, sample(2), variant="sideways")
    with pytest.raises(ValueError, match="targets"):
        foldmerge.merge(src, sample(2), targets="some")
    with pytest.raises(ValueError, match="unknown method"):
        foldmerge.merge(src, sample(2), method="magic")
    with pytest.raises(ValueError, match="share a task"):
        foldmerge.merge([src[0], src[0]], sample(2))
