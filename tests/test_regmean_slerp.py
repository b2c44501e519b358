"""RegMean and SLERP: closed forms on tiny problems, identities, and input checks."""
import math

import pytest
import torch
from torch.nn import functional as F

import foldmerge
from foldmerge.methods import get_method
from foldmerge.methods.slerp import slerp
from foldmerge.model import TaskModel


def merge_as_made(*args, **kwargs):
    """foldmerge.merge without the routing calibration: the heads as the method made them."""
    return foldmerge.merge(*args, calibrate="none", **kwargs)


TASKS = ["mnist:0-4", "mnist:5-9", "fmnist:0-4"]
CFG = {"in_dim": 6, "hidden": [5, 4]}


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def models(n=2, cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return [TaskModel("mlp", cfg, [TASKS[k]]).to(torch.float64) for k in range(n)]


def copies(model, n):
    out = []
    for k in range(n):
        m = TaskModel("mlp", model.backbone_config, [TASKS[k]]).to(torch.float64)
        m.load_state_dict(model.state_dict())
        out.append(m)
    return out


def sample(n=2, rows=8, dim=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, dim, generator=g, dtype=torch.float64) + k for k in range(n)]


def gram(x, alpha):
    g = x.T @ x
    return alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))


def expected_regmean(src, data, alpha):
    """By hand: layer-1 inputs are the data, layer-2 inputs relu(layer1(data)) of each model."""
    inputs = [[x, F.relu(m.backbone.layers[0](x))] for m, x in zip(src, data)]
    out = []
    for l in range(2):
        gs = [gram(inputs[k][l], alpha) for k in range(len(src))]
        ws = [m.backbone.layers[l].weight for m in src]
        rhs = sum(g @ w.T for g, w in zip(gs, ws))
        out.append(torch.linalg.solve(sum(gs), rhs).T)
    return out


# --------------------------------------------------------------------------- RegMean
@pytest.mark.parametrize("alpha", [1.0, 0.5])
@torch.no_grad()
def test_regmean_equals_closed_form(alpha):
    src, data = models(), sample()
    merged = merge_as_made(src, data, method="regmean", alpha=alpha)
    want = expected_regmean(src, data, alpha)
    for l, w in enumerate(want):
        torch.testing.assert_close(merged.backbone.layers[l].weight, w, atol=1e-10, rtol=0)
        torch.testing.assert_close(merged.backbone.layers[l].bias,
                                   (src[0].backbone.layers[l].bias + src[1].backbone.layers[l].bias) / 2,
                                   atol=1e-12, rtol=0)
    assert merged.backbone.layers[0].weight.dtype == torch.float64
    assert merged.meta["method"] == "regmean" and merged.meta["alpha"] == alpha
    assert [t.name for t in merged.tasks] == TASKS[:2]
    for dst, m in zip(merged.heads, src):
        torch.testing.assert_close(dst.weight, m.heads[0].weight, atol=0, rtol=0)
        torch.testing.assert_close(dst.bias, m.heads[0].bias, atol=0, rtol=0)


@torch.no_grad()
def test_regmean_not_the_average_in_general():
    src, data = models(), sample()
    merged = foldmerge.merge(src, data, method="regmean", alpha=1.0)
    avg = (src[0].backbone.layers[0].weight + src[1].backbone.layers[0].weight) / 2
    assert (merged.backbone.layers[0].weight - avg).abs().max() > 1e-3


@torch.no_grad()
def test_regmean_equal_grams_give_the_average():
    # Same input data ⇒ identical layer-1 inputs ⇒ identical Grams ⇒ layer 1 is the plain average,
    # for alpha = 0 (diagonal Grams) and any other alpha alike.
    src = models()
    x = sample(1)[0]
    for alpha in (0.0, 0.9):
        merged = foldmerge.merge(src, [x, x], method="regmean", alpha=alpha)
        avg = (src[0].backbone.layers[0].weight + src[1].backbone.layers[0].weight) / 2
        torch.testing.assert_close(merged.backbone.layers[0].weight, avg, atol=1e-12, rtol=0)


@torch.no_grad()
def test_regmean_alpha_zero_is_a_per_input_weighted_mean():
    src, data = models(), sample()
    merged = foldmerge.merge(src, data, method="regmean", alpha=0.0)
    d = [(x ** 2).sum(0) for x in data]            # diag of each Gram of layer-1 inputs
    w = [m.backbone.layers[0].weight for m in src]
    want = (d[0] * w[0] + d[1] * w[1]) / (d[0] + d[1])
    torch.testing.assert_close(merged.backbone.layers[0].weight, want, atol=1e-12, rtol=0)


@torch.no_grad()
def test_regmean_of_identical_models_is_the_model():
    a = models(1)[0]
    src = copies(a, 3)
    x = torch.randn(20, 6, dtype=torch.float64)
    merged = merge_as_made(src, sample(3), method="regmean")
    for l in range(2):
        torch.testing.assert_close(merged.backbone.layers[l].weight, a.backbone.layers[l].weight, atol=1e-10, rtol=0)
    for out in merged(x):
        torch.testing.assert_close(out, a(x)[0], atol=1e-10, rtol=0)


@torch.no_grad()
def test_regmean_input_never_seen_takes_the_average():
    # A feature that is zero everywhere (MNIST's blank border) leaves the system singular there.
    src, data = models(), sample()
    for x in data:
        x[:, 2] = 0
    merged = foldmerge.merge(src, data, method="regmean", alpha=1.0)
    w = [m.backbone.layers[0].weight for m in src]
    torch.testing.assert_close(merged.backbone.layers[0].weight[:, 2], (w[0][:, 2] + w[1][:, 2]) / 2,
                               atol=1e-12, rtol=0)
    assert torch.isfinite(merged.backbone.layers[1].weight).all()
    assert merged.meta["fallback_layers"] == []
    # the other columns still solve the reduced system exactly
    keep = [0, 1, 3, 4, 5]
    gs = [x[:, keep].T @ x[:, keep] for x in data]
    want = torch.linalg.solve(sum(gs), sum(g @ wk[:, keep].T for g, wk in zip(gs, w))).T
    torch.testing.assert_close(merged.backbone.layers[0].weight[:, keep], want, atol=1e-10, rtol=0)


@torch.no_grad()
def test_regmean_rank_deficient_falls_back_finite():
    src = models()
    data = sample(rows=2)                           # 2+2 rows < 6 inputs, alpha 1: singular
    merged = foldmerge.merge(src, data, method="regmean", alpha=1.0)
    assert 0 in merged.meta["fallback_layers"]
    assert all(torch.isfinite(p).all() for p in merged.parameters())
    # the fallback is the vanishing-ridge limit: (G + eps I)^-1 (B + eps W_avg^T)
    w = [m.backbone.layers[0].weight for m in src]
    G = sum(x.T @ x for x in data)
    B = sum(x.T @ x @ wk.T for x, wk in zip(data, w))
    eps = 1e-7
    ridge = torch.linalg.solve(G + eps * torch.eye(6, dtype=G.dtype), B + eps * (w[0] + w[1]).T / 2).T
    torch.testing.assert_close(merged.backbone.layers[0].weight, ridge, atol=1e-5, rtol=0)


def test_regmean_rejects_bad_input():
    a, b = models()
    c = TaskModel("mlp", {"in_dim": 6, "hidden": [5, 3]}, [TASKS[1]]).to(torch.float64)
    with pytest.raises(ValueError, match="identical backbones"):
        get_method("regmean")([a, c], sample())
    with pytest.raises(ValueError, match="one data tensor per model"):
        get_method("regmean")([a, b], sample(1))
    with pytest.raises(ValueError, match="alpha"):
        get_method("regmean")([a, b], sample(), alpha=1.5)


# ----------------------------------------------------------------------------- SLERP
def test_slerp_orthogonal_unit_vectors():
    a = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(slerp(a, b, 0.5), (a + b) / math.sqrt(2), atol=1e-15, rtol=0)
    torch.testing.assert_close(slerp(a, b, 0.0), a, atol=1e-15, rtol=0)
    torch.testing.assert_close(slerp(a, b, 1.0), b, atol=1e-15, rtol=0)
    # at t = 1/3 the angle is 30° from a
    torch.testing.assert_close(slerp(a, b, 1 / 3), torch.tensor([math.sqrt(3) / 2, 0.5, 0.0], dtype=torch.float64),
                               atol=1e-15, rtol=0)


def test_slerp_parallel_and_zero_fall_back_to_lerp():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(slerp(a, 3 * a, 0.25), 1.5 * a, atol=1e-14, rtol=0)
    torch.testing.assert_close(slerp(a, -a, 0.5), torch.zeros_like(a), atol=1e-14, rtol=0)
    torch.testing.assert_close(slerp(torch.zeros_like(a), a, 0.5), 0.5 * a, atol=1e-14, rtol=0)


@torch.no_grad()
def test_slerp_of_a_model_and_its_copy_is_the_model():
    a = models(1)[0]
    for n in (2, 3):
        merged = foldmerge.merge(copies(a, n), sample(n), method="slerp")
        for k, v in a.backbone.state_dict().items():
            torch.testing.assert_close(merged.backbone.state_dict()[k], v, atol=1e-12, rtol=0)
        assert len(merged.heads) == n


@torch.no_grad()
def test_slerp_merge_t_and_heads():
    src = models()
    sa, sb = (m.backbone.state_dict() for m in src)
    m0 = merge_as_made(src, sample(), method="slerp", t=0.0)
    m5 = merge_as_made(src, sample(), method="slerp")
    for k in sa:
        torch.testing.assert_close(m0.backbone.state_dict()[k], sa[k], atol=1e-12, rtol=0)
        torch.testing.assert_close(m5.backbone.state_dict()[k], slerp(sa[k], sb[k], 0.5), atol=0, rtol=0)
    # unlike the plain average, slerp does not shrink the norm of two non-parallel tensors
    w = m5.backbone.layers[0].weight
    assert w.norm() > ((sa["layers.0.weight"] + sb["layers.0.weight"]) / 2).norm()
    for dst, m in zip(m5.heads, src):
        torch.testing.assert_close(dst.weight, m.heads[0].weight, atol=0, rtol=0)
    assert m5.meta["method"] == "slerp" and m5.meta["t"] == 0.5


@torch.no_grad()
def test_slerp_three_models_is_a_running_spherical_mean():
    src = models(3)
    merged = foldmerge.merge(src, sample(3), method="slerp")
    s = [m.backbone.state_dict() for m in src]
    for k in s[0]:
        want = slerp(slerp(s[0][k], s[1][k], 0.5), s[2][k], 1 / 3)
        torch.testing.assert_close(merged.backbone.state_dict()[k], want, atol=1e-12, rtol=0)


def test_slerp_rejects_bad_input():
    a, b = models()
    c = TaskModel("mlp", {"in_dim": 6, "hidden": [5, 3]}, [TASKS[1]]).to(torch.float64)
    with pytest.raises(ValueError, match="identical backbones"):
        get_method("slerp")([a, c], sample())
    with pytest.raises(ValueError, match="two models only"):
        get_method("slerp")(models(3), sample(3), t=0.3)
    with pytest.raises(ValueError, match="at least two"):
        get_method("slerp")([a], sample(1))


def test_identical_backbones_are_identical_whatever_the_key_order():
    a = TaskModel("mlp", {"in_dim": 20, "hidden": [8]}, ["mnist:0-4"])
    b = TaskModel("mlp", {"hidden": [8], "in_dim": 20}, ["mnist:5-9"])
    for method in ("average", "slerp"):
        assert foldmerge.merge([a, b], [torch.randn(4, 20)] * 2, method=method).backbone.hidden == [8]
    with pytest.raises(ValueError, match="identical backbones"):
        foldmerge.merge([a, TaskModel("mlp", {"in_dim": 20, "hidden": [9]}, ["mnist:5-9"])],
                        [torch.randn(4, 20)] * 2, method="average")


def test_regmean_default_alpha_follows_the_family_row_and_is_recorded():
    from foldmerge.methods import regmean
    src = models(2)
    assert merge_as_made(src, sample(2), method="regmean").meta["alpha"] == 0.5
    vit = TaskModel("vit", {"image_size": 28, "channels": 1, "patch": 7, "width": 8, "depth": 1, "heads": 2,
                            "mlp_dim": 8, "out_dim": 8}, ["mnist:0-4"])
    assert regmean.merge.resolve([vit, vit], {})["alpha"] == 0.9
    student = merge_as_made(src, sample(2), method="distill", init="regmean", epochs=0)
    assert student.meta["regmean_alpha"] == 0.5
