"""The merge spec: validation with clear errors, and the generic SuperNet built from a spec
against the hand-written MLP and ViT SuperNets it replaces."""
import pytest
import torch
from torch import nn

from foldmerge.arch import mlp, vit
from foldmerge.model import TaskModel
from foldmerge.spec import ArchSpec, Norm, Param, Probe, Space, SpecError
from foldmerge.supernet import SuperNet

TASKS = ["mnist:0-4", "mnist:5-9", "fmnist:0-4"]
VIT = {"image_size": 28, "channels": 1, "patch": 7, "width": 16, "depth": 2, "heads": 2, "mlp_dim": 32, "out_dim": 8}


def mlps(hiddens, in_dim=20):
    torch.manual_seed(0)
    return [TaskModel("mlp", {"in_dim": in_dim, "hidden": h}, [TASKS[k]]).double() for k, h in enumerate(hiddens)]


def vits(n, widths=None):
    widths = widths or [16] * n
    out = []
    for k in range(n):
        torch.manual_seed(k)
        out.append(TaskModel("vit", {**VIT, "width": widths[k], "mlp_dim": 2 * widths[k]}, [TASKS[k]],
                             head="class-embedding").double())
    return out


def copy_maps(pairs):
    with torch.no_grad():
        for old, new in pairs:
            for name in old._param_names():
                getattr(new, name).copy_(getattr(old, name))


def perturb(module, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def map_grad(m, name):
    bank = m.__dict__.get("_bank")
    return bank._parameters[name].grad[m.__dict__["_slot"]] if bank is not None else getattr(m, name).grad


def assert_same_supernets(old, new, x, targets_of, pairs, norm_pairs=()):
    from foldmerge.methods.common import reconstruction_loss
    for form in ("folded", "supernet"):
        torch.testing.assert_close(new(x, form=form), old(x, form=form), rtol=0, atol=1e-10)
    a, b = old.fold(), new.fold()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(vb, va, rtol=0, atol=1e-10, msg=ka)
    for sn in (old, new):
        sn.zero_grad(set_to_none=True)
        reconstruction_loss(sn.reconstruct(sn(x)), targets_of(x), None).backward()
    for m_old, m_new in pairs:
        for name in m_old._param_names():
            torch.testing.assert_close(map_grad(m_new, name), map_grad(m_old, name), rtol=1e-9, atol=1e-12)
    for p_old, p_new in norm_pairs:
        torch.testing.assert_close(p_new.grad, p_old.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("param", ["full", "diag", "diag+lowrank(3)"])
@pytest.mark.parametrize("hiddens,widths", [([[16, 12], [16, 12]], None), ([[16, 12], [24, 10], [16, 8]], [14, 9])])
def test_generic_supernet_equals_the_mlp_supernet(param, hiddens, widths):
    src = mlps(hiddens)
    old = mlp.SuperNet(src, widths=widths, param=param, init="random", seed=3).double()
    new = SuperNet(src, widths=widths, param=param, init="random", seed=3)
    perturb(old)
    depth = len(hiddens[0])
    pairs = [(old.M[l], new.merge_map(f"layers.{l}")) for l in range(depth)]
    pairs += [(old.U[l], new.unmerge_map(f"layers.{l + 1}:in" if l < depth - 1 else "output")) for l in range(depth)]
    copy_maps(pairs)
    x = torch.randn(7, 20, dtype=torch.float64)
    assert_same_supernets(old, new, x, lambda x: [s.features(x) for s in src], pairs)


@pytest.mark.parametrize("param", ["full", "diag+lowrank(3)"])
@pytest.mark.parametrize("n,widths,target", [(2, [16, 16], None), (3, [16, 24, 12], [12, 24])])
def test_generic_supernet_equals_the_vit_supernet(param, n, widths, target):
    src = vits(n, widths)
    old = vit.SuperNet(src, widths=target, param=param, init="random", seed=3).double()
    new = SuperNet(src, widths=target, param=param, init="random", seed=3)
    perturb(old)
    pairs = [(old.M_in, new.merge_map("embed")), (old.U_post, new.unmerge_map("proj:in")),
             (old.M_proj, new.merge_map("proj")), (old.U_out, new.unmerge_map("output"))]
    for l, blk in enumerate(old.blocks):
        b = f"blocks.{l}"
        pairs += [(blk.U_att, new.unmerge_map(f"{b}.ln1")), (blk.M_q, new.merge_map(f"{b}.q")),
                  (blk.M_k, new.merge_map(f"{b}.k")), (blk.M_v, new.merge_map(f"{b}.v")),
                  (blk.U_o, new.unmerge_map(f"{b}.o:in")), (blk.M_o, new.merge_map(f"{b}.o")),
                  (blk.U_1, new.unmerge_map(f"{b}.fc1:in")), (blk.M_1, new.merge_map(f"{b}.fc1")),
                  (blk.U_2, new.unmerge_map(f"{b}.fc2:in")), (blk.M_2, new.merge_map(f"{b}.fc2"))]
    copy_maps(pairs)
    norms = [(f"blocks.{l}.{ln}", getattr(blk, ln)) for l, blk in enumerate(old.blocks) for ln in ("ln1", "ln2")]
    norm_pairs = [(getattr(ln, attr), new.norm(f"{key}.{attr}")) for key, ln in norms + [("ln_post", old.ln_post)]
                  for attr in ("weight", "bias")]
    with torch.no_grad():
        for p_old, p_new in norm_pairs:
            p_new.copy_(p_old)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    assert_same_supernets(old, new, x, lambda x: [s.features(x) for s in src], pairs, norm_pairs)


# ------------------------------------------------------------------------------ validation
class Tiny(nn.Module):
    def __init__(self, width=8, hidden=6):
        super().__init__()
        self.a = nn.Linear(4, width)
        self.b = nn.Linear(width, hidden)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x):
        return self.norm(self.b(torch.relu(self.a(x))))


def tiny_spec(**over):
    kw = dict(name="tiny", spaces=[Space("x", shared=True), Space("h"), Space("o", heads=2)],
              params=[Param("a.weight", ("h", "x")), Param("a.bias", ("h",)), Param("b.weight", ("o", "h")),
                      Param("b.bias", ("o",))],
              norms=[Norm("norm", "o")], probes=[Probe("h", "b", "in")], output="o")
    kw.update(over)
    return ArchSpec(**kw)


def test_a_valid_spec_gives_every_spaces_width():
    assert tiny_spec().validate(Tiny()) == {"x": 4, "h": 8, "o": 6}


@pytest.mark.parametrize("over,model,message", [
    (dict(params=[Param("a.weight", ("h", "x")), Param("a.bias", ("h",)), Param("b.weight", ("o", "h"))]),
     Tiny(), "'b.bias' of the model is not in the spec"),
    (dict(params=[Param("a.weight", ("h", "x")), Param("a.bias", ("h",)), Param("b.weight", ("o", "h")),
                  Param("b.bias", ("o",)), Param("c.weight", ("o", "h"))]), Tiny(), "no parameter 'c.weight'"),
    (dict(params=[Param("a.weight", ("h", "x")), Param("a.bias", ("h",)), Param("b.weight", ("o", "hidden")),
                  Param("b.bias", ("o",))]), None, "'b.weight' names an unknown space 'hidden'"),
    (dict(params=[Param("a.weight", ("h",)), Param("a.bias", ("h",)), Param("b.weight", ("o", "h")),
                  Param("b.bias", ("o",))]), Tiny(), "'a.weight' has 2 dimensions but the spec gives it 1"),
    (dict(params=[Param("a.weight", ("h", "x")), Param("a.bias", ("h",)), Param("b.weight", ("o", "x")),
                  Param("b.bias", ("o",))]), Tiny(), "'b.weight' gives space 'x' width 8"),
    (dict(params=[Param("a.weight", ("h", "x")), Param("a.bias", ("h",)), Param("b.weight", ("o", "g")),
                  Param("b.bias", ("o",))], spaces=[Space("x", shared=True), Space("h"), Space("g"), Space("o")]),
     None, "space 'g' is read but no parameter writes it"),
    (dict(params=[Param("a.weight", ("x", "h")), Param("a.bias", ("h",)), Param("b.weight", ("o", "h")),
                  Param("b.bias", ("o",))]), None, "'a.weight' writes the shared space 'x'"),
    (dict(spaces=[Space("x", shared=True), Space("h"), Space("o", heads=4)]), Tiny(), "6 wide, not divisible by its 4 heads"),
    (dict(params=[Param("a.weight", ("h", "x")), Param("a.bias", ("h",), merge_at="elsewhere"),
                  Param("b.weight", ("o", "h")), Param("b.bias", ("o",))]), None, "bias 'a.bias' is merged at"),
    (dict(output="x"), None, "output space 'x' is not a merged space"),
])
def test_a_malformed_spec_is_a_clear_error_naming_the_parameter(over, model, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec = tiny_spec(**over)
        spec.validate(model)


def test_family_specs_describe_their_models():
    m = TaskModel("mlp", {"in_dim": 20, "hidden": [16, 12]}, ["mnist:0-4"])
    assert m.spec.validate(m.backbone) == {"input": 20, "h0": 16, "h1": 12}
    v = TaskModel("vit", VIT, ["mnist:0-4"])
    widths = v.spec.validate(v.backbone)
    assert widths["res"] == 16 and widths["mlp1"] == 32 and widths["qk0"] == 16 and widths["pixels"] == 49
    assert v.spec.space("qk0").heads == 2 and not v.spec.is_chain() and m.spec.is_chain()
