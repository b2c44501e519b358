"""A user's own model: the README's example runs as written, and the torch.fx tracer derives
specs that merge exactly as the hand-written ones, or refuses with an error naming the node."""
import re
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn

import foldmerge
from foldmerge.arch import mlp
from foldmerge.model import TaskModel
from foldmerge.trace import TraceError, traced_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "own_model.py"


def test_the_docs_show_the_example_file_verbatim():
    page = (ROOT / "docs" / "own-model.md").read_text()
    section = page[page.index("## A worked example"):]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks and blocks[0] == EXAMPLE.read_text()


def test_the_example_runs_and_merges_above_chance(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(\S+)\s+per-task ([\d.]+)", out, flags=re.M))
    assert set(rows) == {"originals", "average", "zipit", "fs-merge"}
    assert all(float(v) > 50.0 for v in rows.values())          # two 5-class tasks: chance is 20 %


def example():
    return runpy.run_path(str(EXAMPLE))          # the definitions (and the registration), no training


def pair(arch, config, seed=0):
    out = []
    for k, task in enumerate(["mnist:0-4", "mnist:5-9"]):
        torch.manual_seed(seed + k)
        out.append(TaskModel(arch, config, [task]).double())
    return out


def same_weights(src, arch):
    """Copies of `src` as models of architecture `arch` (same weights, heads and tasks)."""
    out = []
    for m in src:
        c = TaskModel(arch, m.backbone_config, m.tasks).double()
        c.load_state_dict(m.state_dict())
        out.append(c)
    return out


def sample(in_dim=784):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(24, 1, 28, 28, generator=g, dtype=torch.float64) + k for k in range(2)]


@pytest.mark.parametrize("method,opts", [("zipit", {}), ("permute", {}), ("opt", {}),
                                         ("fs-merge", dict(init="random", epochs=5, lr=0.05)),
                                         ("fs-merge", dict(param="diag+lowrank(3)", epochs=5, lr=0.05))])
def test_traced_specs_merge_exactly_as_the_hand_written_ones(method, opts):
    ns = example()
    foldmerge.register_traced("residual-mlp-traced", build=lambda c: ns["ResidualMLP"](**c))
    foldmerge.register_traced("mlp-traced", build=lambda c: mlp.Backbone(**c), defaults="mlp")
    for arch, traced, config in (("residual-mlp", "residual-mlp-traced", {"width": 16, "hidden": 24, "blocks": 2}),
                                 ("mlp", "mlp-traced", {"in_dim": 784, "hidden": [16, 12]})):
        src = pair(arch, config)
        hand = foldmerge.merge(src, sample(), method=method, **opts)
        auto = foldmerge.merge(same_weights(src, traced), sample(), method=method, **opts)
        for (k, a), (k2, b) in zip(hand.state_dict().items(), auto.state_dict().items()):
            assert k == k2
            torch.testing.assert_close(b, a, rtol=0, atol=1e-10, msg=f"{arch} {method} {k}")


def test_local_fs_merge_reads_the_spec_s_relu_chain_not_a_family_name():
    """A traced MLP merges by FS-Merge local exactly as the hand-written MLP; a model that is not a
    chain of Linear -> ReLU layers merges space by space, whatever its name."""
    foldmerge.register_traced("mlp-traced-local", build=lambda c: mlp.Backbone(**c), defaults="mlp")
    config = {"in_dim": 784, "hidden": [16, 12]}
    assert [m for m, _ in traced_spec("t", mlp.Backbone(**config)).relu_layers] == ["layers.0", "layers.1"]
    src = pair("mlp", config)
    opts = dict(method="fs-merge", variant="local", epochs=5, lr=0.05)
    hand = foldmerge.merge(src, sample(), **opts)
    auto = foldmerge.merge(same_weights(src, "mlp-traced-local"), sample(), **opts)
    for (k, a), (k2, b) in zip(hand.state_dict().items(), auto.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10, msg=k)
    ns = example()
    assert traced_spec("r", ns["ResidualMLP"](width=16, hidden=24, blocks=2)).relu_layers == ()
    residual = foldmerge.merge(pair("residual-mlp", {"width": 16, "hidden": 24, "blocks": 2}), sample(), **opts)
    assert residual.meta["variant"] == "local"      # not a chain: one (M, U) per space instead


def test_the_traced_spec_of_an_mlp_is_the_mlps():
    spec = traced_spec("t", mlp.Backbone(784, [16, 12]))
    assert [(p.key, p.axes) for p in spec.params] == [
        ("layers.0.weight", ("layers.0", "input")), ("layers.0.bias", ("layers.0",)),
        ("layers.1.weight", ("layers.1", "layers.0")), ("layers.1.bias", ("layers.1",))]
    assert spec.output == "layers.1" and spec.is_chain()
    assert spec.validate(mlp.Backbone(784, [16, 12])) == {"input": 784, "layers.0": 16, "layers.1": 12}


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.q(x) @ self.k(x).transpose(-1, -2)


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x)


class Reshapes(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x).reshape(-1, 2, 4)


class RawParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.a(x) * self.scale


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], -1)


class InputSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x) + x


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else x


@pytest.mark.parametrize("model,message", [
    (Attention(), "node 'transpose' .* is not a Linear, LayerNorm"),
    (Conv(), "node 'conv' .* is a Conv2d"),
    (Reshapes(), "reshapes a merged tensor"),
    (RawParameter(), "reads a parameter or buffer outside nn.Linear"),
    (Concat(), "node 'cat'"),
    (InputSkip(), "adds the shared input to a merged tensor"),
    (Branches(), "torch.fx cannot trace it"),
])
def test_the_tracer_refuses_what_it_cannot_merge_with_the_node(model, message):
    with pytest.raises(TraceError, match=message):
        traced_spec("user", model)
