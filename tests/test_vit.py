"""The ViT family: shapes, patch projection = strided convolution, layer list, clear errors."""
import pytest
import torch
from torch.nn import functional as F

import foldmerge
from foldmerge.arch import vit
from foldmerge.model import TaskModel

CFG = {"image_size": 28, "channels": 1, "patch": 7, "width": 16, "depth": 2, "heads": 2, "mlp_dim": 32,
       "out_dim": 8}


def model(task="mnist:0-4", seed=0, **over):
    torch.manual_seed(seed)
    return TaskModel("vit", {**CFG, **over}, [task])


def test_forward_shapes_and_heads():
    m = model()
    x = torch.randn(3, 1, 28, 28)
    assert m.features(x).shape == (3, 8)
    assert [o.shape for o in m(x)] == [(3, 5)]


def test_patch_projection_is_a_strided_convolution():
    b = model().backbone
    x = torch.randn(2, 1, 28, 28)
    conv_w = b.patch_proj.weight.reshape(16, 1, 7, 7)
    conv = F.conv2d(x, conv_w, b.patch_proj.bias, stride=7).flatten(2).transpose(1, 2)
    assert torch.allclose(b.patch_proj(vit.patchify(x, 7)), conv, atol=1e-5)


def test_cls_token_reads_every_patch():
    m = model()
    x = torch.randn(1, 1, 28, 28)
    y = x.clone()
    y[..., 21:, 21:] += 1.0                       # change the last patch only
    assert not torch.allclose(m.features(x), m.features(y))


def test_linear_layers_in_forward_order():
    b = model().backbone
    layers = vit.linear_layers(b)
    assert len(layers) == 1 + 6 * 2 + 1
    assert layers[0] is b.patch_proj and layers[-1] is b.proj


def test_parameter_wise_baselines_run_on_vits():
    a, c = model("mnist:0-4", 0), model("mnist:5-9", 1)
    data = [torch.randn(6, 1, 28, 28), torch.randn(6, 1, 28, 28)]
    avg = foldmerge.merge([a, c], data, method="average")
    x = torch.randn(2, 1, 28, 28)
    assert avg.features(x).shape == (2, 8)
    assert torch.allclose(avg.backbone.pos, (a.backbone.pos + c.backbone.pos) / 2)
    rm = foldmerge.merge([a, c], data, method="regmean", alpha=0.9)
    assert torch.isfinite(rm.features(x)).all()


def test_clear_errors():
    with pytest.raises(ValueError, match="not divisible by its 3 attention heads"):
        model(heads=3)
    with pytest.raises(ValueError, match="patch size"):
        model(patch=5)
    with pytest.raises(ValueError, match="different attention head counts"):
        vit.check_compatible([model(), model(heads=4)])
    a, c = model("mnist:0-4", 0), model("mnist:5-9", 1)
    with pytest.raises(ValueError, match="no Foldable SuperNet for 'vit'"):
        foldmerge.merge([a, c], [torch.randn(4, 1, 28, 28)] * 2, method="fs-merge")
