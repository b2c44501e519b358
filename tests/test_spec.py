"""The merge spec: validation with clear errors, and the generic SuperNet built from a spec
against the paper's MLP and ViT SuperNets written out by hand."""
import pytest
import torch
from test_foldable import perturb
from torch import nn

from foldmerge.arch import vit
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


# The paper's SuperNets written out by hand with dense maps (the MLP of section 2.1, the ViT of
# appendix B.1), reading the generic SuperNet's maps by site: the reference its forms must equal.
def merge_dense(m, feats):
    return torch.cat(feats, -1) @ m.dense().T


def unmerge_dense(u, merged):
    return list((merged @ u.dense()).split(u.in_dims, -1))


def mlp_reference(sn, src, x):
    f, depth = x.flatten(1), len(src[0].backbone.hidden)
    for l in range(depth):
        inputs = unmerge_dense(sn.unmerge_map(f"layers.{l}:in"), f) if l else [f] * len(src)
        f = torch.relu(merge_dense(sn.merge_map(f"layers.{l}"),
                                   [s.backbone.layers[l](u) for s, u in zip(src, inputs)]))
    return f


def vit_reference(sn, src, x):
    from torch.nn import functional as F
    bbs = [s.backbone for s in src]

    def norm(key, t):
        return F.layer_norm(t, t.shape[-1:], sn.norm(f"{key}.weight"), sn.norm(f"{key}.bias"))

    h = merge_dense(sn.merge_map("embed"), [b.tokens(x) for b in bbs])       # M_in: patches, CLS, positions
    for l in range(len(bbs[0].blocks)):
        b, blocks = f"blocks.{l}", [bb.blocks[l] for bb in bbs]
        u = unmerge_dense(sn.unmerge_map(f"{b}.ln1"), norm(f"{b}.ln1", h))     # one U for Q, K, V
        q, k, v = (merge_dense(sn.merge_map(f"{b}.{name}"), [getattr(s, name)(uk) for s, uk in zip(blocks, u)])
                   for name in ("q", "k", "v"))
        a = vit.multihead(q, k, v, blocks[0].heads)
        h = h + merge_dense(sn.merge_map(f"{b}.o"), [s.o(ak) for s, ak in zip(blocks, unmerge_dense(
            sn.unmerge_map(f"{b}.o:in"), a))])
        u = unmerge_dense(sn.unmerge_map(f"{b}.fc1:in"), norm(f"{b}.ln2", h))
        g = F.gelu(merge_dense(sn.merge_map(f"{b}.fc1"), [s.fc1(uk) for s, uk in zip(blocks, u)]))
        h = h + merge_dense(sn.merge_map(f"{b}.fc2"), [s.fc2(gk) for s, gk in zip(blocks, unmerge_dense(
            sn.unmerge_map(f"{b}.fc2:in"), g))])
    c = unmerge_dense(sn.unmerge_map("proj:in"), norm("ln_post", h[:, 0]))
    return merge_dense(sn.merge_map("proj"), [bb.proj(ck) for bb, ck in zip(bbs, c)])


def assert_equals_reference(sn, src, x, reference):
    from foldmerge.methods.common import reconstruction_loss
    ref = reference(sn, src, x)
    for form in ("folded", "supernet"):
        torch.testing.assert_close(sn(x, form=form), ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(sn.fold().features(x), ref, rtol=0, atol=1e-10)
    targets = [s.features(x).detach() for s in src]
    params = [p for p in sn.parameters() if p.requires_grad]
    want = torch.autograd.grad(reconstruction_loss(unmerge_dense(sn.output_map, ref), targets, None), params)
    got = torch.autograd.grad(reconstruction_loss(sn.reconstruct(sn(x)), targets, None), params)
    assert len(params) >= 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("param", ["full", "diag", "diag+lowrank(3)"])
@pytest.mark.parametrize("hiddens,widths", [([[16, 12], [16, 12]], None), ([[16, 12], [24, 10], [16, 8]], [14, 9])])
def test_generic_supernet_is_the_papers_mlp_supernet(param, hiddens, widths):
    src = mlps(hiddens)
    sn = SuperNet(src, widths=widths, param=param, init="random", seed=3)
    perturb(sn)
    assert_equals_reference(sn, src, torch.randn(7, 20, dtype=torch.float64), mlp_reference)


@pytest.mark.parametrize("param", ["full", "diag+lowrank(3)"])
@pytest.mark.parametrize("n,widths,target", [(2, [16, 16], None), (3, [16, 24, 12], [12, 24])])
def test_generic_supernet_is_the_papers_vit_supernet(param, n, widths, target):
    src = vits(n, widths)
    sn = SuperNet(src, widths=target, param=param, init="random", seed=3)
    perturb(sn)
    assert_equals_reference(sn, src, torch.randn(3, 1, 28, 28, dtype=torch.float64), vit_reference)


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
