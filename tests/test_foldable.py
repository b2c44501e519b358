"""Exactness of the foldable map: folding equals the SuperNet, and the structured inits fold
to what they claim to (model 1; the weight average)."""
import pytest
import torch
from torch.nn import functional as F

from foldmerge.foldable import (
    FoldMap,
    fold_groups,
    fold_linear,
    fold_linears,
    merge_features,
    pack_maps,
    parse_param,
    unmerge_features,
)
from foldmerge.model import TaskModel
from foldmerge.supernet import SuperNet

TASKS = ["mnist:0-4", "mnist:5-9", "fmnist:0-4"]
PARAMS = ["full", "diag", "diag+lowrank(3)"]


def make_sources(hiddens, in_dim=20, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return [TaskModel("mlp", {"in_dim": in_dim, "hidden": h}, [TASKS[k]]).to(dtype)
            for k, h in enumerate(hiddens)]


def perturb(module, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def supernet_logits(sn, x):
    """The SuperNet as drawn in the paper (wide, dense M and U), then the original heads on U_L·f*."""
    recon = sn.reconstruct(sn(x, form="supernet"))
    return [F.linear(recon[sn.head_owner[i]], *sn.head(i)) for i in range(len(sn.head_owner))]


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("hiddens,widths", [
    ([[16], [16]], None),
    ([[16, 12], [16, 12], [16, 12]], None),
    ([[8, 8, 8], [8, 8, 8]], None),
    ([[16, 12], [24, 10], [16, 8]], [14, 9]),      # different widths into another target width
])
def test_folded_model_equals_supernet(param, hiddens, widths):
    sources = make_sources(hiddens)
    for init in ("first", "average", "random"):
        sn = SuperNet(sources, widths=widths, param=param, init=init, seed=3).double()
        perturb(sn)                                   # away from the structured init
        x = torch.randn(9, 20, dtype=torch.float64)
        folded = sn.fold()
        assert folded.backbone.hidden == (widths or hiddens[0])
        for a, b in zip(folded(x), supernet_logits(sn, x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        # the folded-form training forward is the same function too
        torch.testing.assert_close(sn(x, form="folded"), sn(x, form="supernet"), rtol=0, atol=1e-10)


@pytest.mark.parametrize("param", PARAMS)
def test_folded_equals_supernet_float32(param):
    sources = make_sources([[32, 16], [32, 16]], dtype=torch.float32)
    sn = SuperNet(sources, param=param, init="random", seed=0)
    perturb(sn, 0.05)
    x = torch.randn(16, 20)
    for a, b in zip(sn.fold()(x), supernet_logits(sn, x)):
        assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("n", [2, 3])
def test_first_init_folds_to_model_one(param, n):
    sources = make_sources([[16, 12]] * n)
    merged = SuperNet(sources, param=param, init="first").fold()
    for got, want in zip(merged.backbone.layers, sources[0].backbone.layers):
        assert torch.equal(got.weight, want.weight) and torch.equal(got.bias, want.bias)
    x = torch.randn(5, 20, dtype=torch.float64)
    assert torch.equal(merged(x)[0], sources[0](x)[0])
    # U = [I; I; …] leaves every head unchanged
    for got, src in zip(merged.heads, sources):
        assert torch.equal(got.weight, src.heads[0].weight)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("n", [2, 3])
def test_average_init_folds_to_weight_average(param, n):
    sources = make_sources([[16, 12]] * n)
    merged = SuperNet(sources, param=param, init="average").fold()
    for l, layer in enumerate(merged.backbone.layers):
        w = sum(s.backbone.layers[l].weight for s in sources) / n
        b = sum(s.backbone.layers[l].bias for s in sources) / n
        torch.testing.assert_close(layer.weight, w, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.bias, b, rtol=0, atol=1e-12)


def test_depth_mismatch_is_a_clear_error():
    sources = make_sources([[16], [16, 16]])
    with pytest.raises(ValueError, match="different depths"):
        SuperNet(sources)


def test_target_width_count_must_match_depth():
    with pytest.raises(ValueError, match="depth"):
        SuperNet(make_sources([[16, 16], [16, 16]]), widths=[16])


@pytest.mark.parametrize("param", PARAMS)
def test_block_ops_match_dense_matrix(param):
    g = torch.Generator().manual_seed(0)
    # unequal widths (block by block), equal widths wider and narrower than d* = 6 (all blocks at once)
    for dims in ([4, 7, 6], [5, 5, 5], [8, 8, 8]):
        m = FoldMap(6, dims, param, "random", "merge", g).double()
        perturb(m)
        s = m.dense()
        assert s.shape == (6, sum(dims))
        feats = [torch.randn(2, 3, d, dtype=torch.float64) for d in dims]
        torch.testing.assert_close(merge_features(m, feats), torch.cat(feats, -1) @ s.T)
        y = torch.randn(2, 3, 6, dtype=torch.float64)
        torch.testing.assert_close(torch.cat(unmerge_features(m, y), -1), y @ s)
    m = FoldMap(6, [4, 7, 6], param, "random", "merge", g).double()
    perturb(m)
    s = m.dense()
    # fold_linear = M · blockdiag(W) · U with dense matrices
    u = FoldMap(5, [3, 2, 4], param, "random", "unmerge", g).double()
    perturb(u)
    ws = [torch.randn(d_out, d_in, dtype=torch.float64) for d_out, d_in in zip((4, 7, 6), (3, 2, 4))]
    bs = [torch.randn(d, dtype=torch.float64) for d in (4, 7, 6)]
    w_star, b_star = fold_linear(m, ws, u, bs)
    torch.testing.assert_close(w_star, s @ torch.block_diag(*ws) @ u.dense().T)
    torch.testing.assert_close(b_star, s @ torch.cat(bs))


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("param", PARAMS)
def test_batched_fold_equals_layer_by_layer(param, packed):
    # fold_linears groups same-shaped layers (equal and unequal source widths, shared U,
    # no U, no bias) and must give exactly what folding each layer alone gives.
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731

    def fm(out, ins, role):
        m = FoldMap(out, ins, param, "random", role, g).double()
        perturb(m)
        return m

    u_shared, u_uneq = fm(5, [4, 4], "unmerge"), fm(5, [3, 6], "unmerge")
    jobs = [(fm(6, [4, 4], "merge"), [rnd(4, 4), rnd(4, 4)], u_shared, [rnd(4), rnd(4)]) for _ in range(3)]
    jobs += [(fm(6, [2, 7], "merge"), [rnd(2, 3), rnd(7, 6)], u_uneq, [rnd(2), rnd(7)]) for _ in range(2)]
    jobs += [(fm(6, [4, 4], "merge"), [rnd(4, 9), rnd(4, 9)], None, None)]
    jobs += [(fm(6, [4, 4], "merge"), [rnd(4, 4), rnd(4, 4)], fm(5, [4, 4], "unmerge"), None)]   # U, no bias:
    assert [0, 1, 2, 6] in fold_groups(jobs)            # folded with the first three, with a zero bias
    jobs += [(fm(3, [4, 4], "merge"), [rnd(4, 8), rnd(4, 8)], fm(5, [8, 8], "unmerge"), [rnd(4), rnd(4)])
             for _ in range(2)]                                      # d* smaller than the sources' widths
    jobs += [(None, [rnd(4, 4)], fm(5, [4], "unmerge"), [rnd(4)])]   # one model: nothing merged on the output side
    if packed:   # maps in shared banks, read out of order and repeated (u_shared serves three layers)
        holder = torch.nn.ModuleList(m for job in reversed(jobs) for m in (job[0], job[2]) if m is not None)
        banks = pack_maps(holder)
        assert len(banks) < len({id(m) for m in holder})
    loss, reference = 0.0, 0.0      # a random linear function of every folded tensor, for the gradients
    for (w, b), job in zip(fold_linears(jobs), jobs):
        w1, b1 = fold_linear(*job)
        m, ws, u, bs = job
        dense_u = u.dense().T if u is not None else torch.cat([torch.eye(9, dtype=torch.float64)] * 2)
        dense_m = m.dense() if m is not None else torch.eye(4, dtype=torch.float64)
        w_ref = dense_m @ torch.block_diag(*ws) @ dense_u
        torch.testing.assert_close(w, w_ref)
        torch.testing.assert_close(w, w1)
        r = rnd(*w.shape)
        loss, reference = loss + (w * r).sum(), reference + (w_ref * r).sum()
        assert (b is None) == (bs is None)
        if bs is not None:
            b_ref = dense_m @ torch.cat(bs)
            torch.testing.assert_close(b, b_ref)
            r = rnd(*b.shape)
            loss, reference = loss + (b * r).sum(), reference + (b_ref * r).sum()
    # the gradients reaching every map (the structured fold's backward is written by hand)
    maps = list({id(m): m for job in jobs for m in (job[0], job[2]) if m is not None}.values())
    params = list(banks.parameters()) if packed else [p for m in maps for p in m.parameters()]
    grads = torch.autograd.grad(loss, params)
    for got, want in zip(grads, torch.autograd.grad(reference, params)):
        torch.testing.assert_close(got, want)


def test_scale_block_scales_only_that_block():
    m = FoldMap(5, [5, 5], "diag+lowrank(2)", "random", "unmerge", torch.Generator().manual_seed(0)).double()
    perturb(m)
    before = m.dense().clone()
    m.scale_block(1, 0.5)
    after = m.dense()
    torch.testing.assert_close(after[:, :5], before[:, :5])
    torch.testing.assert_close(after[:, 5:], 0.5 * before[:, 5:])


def test_parse_param():
    assert parse_param("full") == ("full", 0)
    assert parse_param("diag+lowrank(12)") == ("diag+lowrank", 12)
    assert parse_param("lowrank8") == ("diag+lowrank", 8)
    for bad in ("dense", "diag+lowrank(0)", "lowrank(x)"):
        with pytest.raises(ValueError):
            parse_param(bad)


@pytest.mark.parametrize("param", PARAMS)
def test_packed_maps_read_and_write_their_bank(param):
    # A packed map computes what it did before packing; in-place edits (scale_block,
    # set_dense) land in the bank, and gradients reach the bank's parameters.
    g = torch.Generator().manual_seed(3)
    maps = torch.nn.ModuleList(FoldMap(5, [4, 6], param, "random", "merge", g).double() for _ in range(3))
    for m in maps:
        perturb(m)
    before = [m.dense().clone() for m in maps]
    n_params = sum(p.numel() for p in maps.parameters())
    banks = pack_maps(maps)
    assert len(banks) == 1 and sum(p.numel() for p in banks.parameters()) == n_params
    assert not list(maps[0].parameters(recurse=False))
    for m, d in zip(maps, before):
        torch.testing.assert_close(m.dense(), d, atol=0, rtol=0)
    maps[1].scale_block(1, 0.5)
    torch.testing.assert_close(maps[1].dense()[:, 4:], 0.5 * before[1][:, 4:])
    torch.testing.assert_close(maps[2].dense(), before[2], atol=0, rtol=0)
    if param == "full":
        maps[0].set_dense(torch.ones(5, 10, dtype=torch.float64))
        assert torch.equal(banks[0].weight[0], torch.ones(5, 10, dtype=torch.float64))
    merge_features(maps[2], [torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)]).sum().backward()
    grads = [p.grad for p in banks[0].parameters()]
    assert all(gr is not None for gr in grads)
    assert all(gr[:2].abs().sum() == 0 for gr in grads)          # only map 2's slice was used


def test_fold_sees_source_weights_changed_in_place():
    # the stacked frozen source weights are reused between steps only while they are unchanged
    g = torch.Generator().manual_seed(4)
    m = FoldMap(4, [4, 4], "diag+lowrank(2)", "random", "merge", g).double()
    u = FoldMap(3, [3, 3], "diag+lowrank(2)", "random", "unmerge", g).double()
    perturb(m), perturb(u)
    ws = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    bs = [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2)]
    fold_linear(m, ws, u, bs)
    ws[1].mul_(2.0)
    bs[0].add_(1.0)
    w, b = fold_linear(m, ws, u, bs)
    torch.testing.assert_close(w, m.dense() @ torch.block_diag(*ws) @ u.dense().T)
    torch.testing.assert_close(b, m.dense() @ torch.cat(bs))
