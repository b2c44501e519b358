"""ZipIt! and Permute: the maps have the promised structure, a permuted copy is recovered
exactly, the fold orientation is W* = ½(W_0 + P W_1 P_prevᵀ), partial zipping is what it says."""
import pytest
import torch
from torch.nn import functional as F

import foldmerge
from foldmerge.methods.align import observe
from foldmerge.methods.permute import permutation_maps
from foldmerge.methods.zipit import correlation, zipit_clusters, zipit_maps
from foldmerge.model import TaskModel


def merge_as_made(*args, **kwargs):
    """foldmerge.merge without the routing calibration: the heads as the method made them."""
    return foldmerge.merge(*args, calibrate="none", **kwargs)


TASKS = ["mnist:0-4", "mnist:5-9", "fmnist:0-4"]


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def hidden_features(models, data):
    """feats[l][k]: post-ReLU features of hidden layer l of model k on all merge data (the MLP spec's probes)."""
    feats = observe(models, data)
    return [feats[f"h{l}"] for l in range(len(models[0].backbone.hidden))]


def model(hidden, task, seed, in_dim=20):
    torch.manual_seed(seed)
    return TaskModel("mlp", {"in_dim": in_dim, "hidden": list(hidden)}, [task]).to(torch.float64)


def sample(n_models, n=64, in_dim=20):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, in_dim, generator=g, dtype=torch.float64) + 0.3 * k for k in range(n_models)]


def permuted_copy(src, task, seed):
    """An exact functional copy of src with every hidden layer's neurons permuted.

    Returns the copy and the permutations perm[l], with copy neuron j = src neuron perm[l][j]."""
    dst = TaskModel("mlp", src.backbone_config, [task]).to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    perms, prev = [], None
    with torch.no_grad():
        for ls, ld in zip(src.backbone.layers, dst.backbone.layers):
            p = torch.randperm(ls.out_features, generator=g)
            w = ls.weight[p]
            ld.weight.copy_(w if prev is None else w[:, prev])
            ld.bias.copy_(ls.bias[p])
            perms.append(p)
            prev = p
        dst.heads[0].weight.copy_(src.heads[0].weight[:, prev])
        dst.heads[0].bias.copy_(src.heads[0].bias)
    return dst, perms


def features_of(hidden, n=256, seed=0, models=2):
    srcs = [model(hidden, TASKS[k], seed + k) for k in range(models)]
    return hidden_features(srcs, sample(models, n))


# ------------------------------------------------------------------------------- zipit_maps
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_zipit_maps_average_clusters_and_copy_back(alpha, beta):
    feats = features_of([24])[0]
    m, u = zipit_maps(feats, 24, alpha=alpha, beta=beta)
    assert m.shape == (24, 48) and u.shape == (48, 24)
    torch.testing.assert_close(m.sum(1), torch.ones(24, dtype=m.dtype), rtol=0, atol=1e-12)
    # every feature lands in exactly one cluster
    torch.testing.assert_close(u.sum(1), torch.ones(48, dtype=u.dtype), rtol=0, atol=0)
    sizes = u.sum(0)
    # U is the 0/1 indicator of M's support; M's entries are 1/|cluster|
    torch.testing.assert_close(u, (m > 0).to(u.dtype).T, rtol=0, atol=0)
    torch.testing.assert_close(m, u.T / sizes[:, None], rtol=0, atol=1e-12)
    pairs = sizes == 2
    torch.testing.assert_close(u[:, pairs], 2 * m[pairs].T, rtol=0, atol=1e-12)


def test_zipit_beta0_without_repeated_matches_is_a_permutation_merge():
    feats = features_of([32])[0]
    m, u = zipit_maps(feats, 32, alpha=0.0, beta=0.0)
    u0, u1 = u[:32], u[32:]
    eye = torch.eye(32, dtype=u.dtype)
    for block in (u0, u1):       # each a permutation matrix: every cluster has one feature of each model
        torch.testing.assert_close(block.sum(0), torch.ones(32, dtype=u.dtype), rtol=0, atol=0)
        torch.testing.assert_close(block @ block.T, eye, rtol=0, atol=0)
    torch.testing.assert_close(u0, eye, rtol=0, atol=0)     # clusters follow model 0's order
    torch.testing.assert_close(u, 2 * m.T, rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_zipit_beta_spends_at_most_the_within_model_budget(alpha):
    feats = features_of([32])[0]
    owner = torch.tensor([0] * 32 + [1] * 32)
    counts = {}
    for beta, budget in [(0.0, 0), (0.25, 4), (1.0, 16)]:
        history = []
        clusters = zipit_clusters(correlation(feats), owner, 32, alpha=alpha, beta=beta, history=history)
        assert len(history) == 32 and len(clusters) == 32
        assert not any(h["forced"] for h in history)
        origin = {h["a"]: int(owner[h["a"]]) for h in history}
        within = [sum(1 for h in history if h["within"] and origin[h["a"]] == k) for k in (0, 1)]
        assert all(w <= budget for w in within), (beta, within)
        counts[beta] = sum(within)
        # a model's features never meet in one cluster unless a within-model merge happened
        if beta == 0.0:
            assert within == [0, 0]
            if alpha == 0.0:
                assert all(len(c) == 2 and owner[c[0]] != owner[c[1]] for c in clusters)
    # on two independent random models the budget does get used
    assert counts[1.0] > 0


def test_zipit_greedy_picks_most_correlated_pairs_by_hand():
    # features 0,1 of model 0; 2,3 of model 1. Pairs (0,3) and (1,2) are the strong ones.
    corr = torch.tensor([[1.0, 0.2, 0.1, 0.9],
                         [0.2, 1.0, 0.8, 0.3],
                         [0.1, 0.8, 1.0, 0.5],
                         [0.9, 0.3, 0.5, 1.0]], dtype=torch.float64)
    owner = torch.tensor([0, 0, 1, 1])
    assert zipit_clusters(corr, owner, 2, alpha=0.0, beta=0.0) == [[0, 3], [1, 2]]
    # alpha: after (0,3) merges its similarity to 2 becomes 0.5·min(0.1, 0.5) = 0.05 < 0.8
    assert zipit_clusters(corr, owner, 2, alpha=0.5, beta=0.0) == [[0, 3], [1, 2]]
    # a within-model budget (beta=1: one merge per model) does not change the strongest pairs
    assert zipit_clusters(corr, owner, 2, alpha=0.0, beta=1.0) == [[0, 3], [1, 2]]
    # down to one cluster with repeated matches: all four features end in one cluster
    assert zipit_clusters(corr, owner, 1, alpha=1.0, beta=1.0) == [[0, 1, 2, 3]]


def test_zipit_repeated_matches_scale_by_alpha():
    # 4 models, one feature each, two merges. (0,1) merge first (0.9); the new cluster's
    # similarity to feature 2 is alpha·min(0.8, 0.8) and competes with the pair (2,3) at 0.3.
    corr = torch.tensor([[1.0, 0.9, 0.8, 0.0],
                         [0.9, 1.0, 0.8, 0.0],
                         [0.8, 0.8, 1.0, 0.3],
                         [0.0, 0.0, 0.3, 1.0]], dtype=torch.float64)
    owner = torch.tensor([0, 1, 2, 3])
    assert zipit_clusters(corr, owner, 2, alpha=0.3) == [[0, 1], [2, 3]]        # 0.24 < 0.3
    assert zipit_clusters(corr, owner, 2, alpha=0.5) == [[0, 1, 2], [3]]        # 0.40 > 0.3
    # alpha <= 0: no discount, but the cluster is closed to the models it came from (0 and 1) only
    assert zipit_clusters(corr, owner, 2, alpha=0.0) == [[0, 1, 2], [3]]


def test_zipit_forced_merge_when_bans_leave_no_pair():
    # model 0 has one feature, model 1 two; one cluster wanted, no within-model budget.
    # After (0,1) merge, the cluster (origin 0) is banned from feature 2 through feature 1
    # (a within-model pair of model 1): the last merge is forced, and recorded as such.
    corr = torch.tensor([[1.0, 0.9, 0.5],
                         [0.9, 1.0, 0.7],
                         [0.5, 0.7, 1.0]], dtype=torch.float64)
    history = []
    assert zipit_clusters(corr, torch.tensor([0, 1, 1]), 1, alpha=0.3, beta=0.0, history=history) == [[0, 1, 2]]
    assert [h["forced"] for h in history] == [False, True]
    assert history[1]["similarity"] == pytest.approx(0.3 * 0.5)


def test_correlation_guards_dead_features():
    f = torch.randn(50, 3, dtype=torch.float64)
    f[:, 1] = 0.0
    c = correlation([f, f.clone()])
    assert torch.isfinite(c).all()
    assert (c[1] == 0).all() and (c[:, 4] == 0).all()
    torch.testing.assert_close(c[0, 3], torch.tensor(1.0, dtype=torch.float64))
    ref = torch.corrcoef(f[:, [0, 2]].T)
    torch.testing.assert_close(c[[0, 2]][:, [0, 2]], ref)


# ------------------------------------------------------------------- permuted-copy recovery
@pytest.mark.parametrize("method,opts", [("zipit", {"beta": 0.0}), ("zipit", {"beta": 0.0, "alpha": 0.0}),
                                         ("permute", {}), ("opt", {"reg": 0.0})])
def test_permuted_copy_is_recovered_exactly(method, opts):
    a = model([16, 12], TASKS[0], 0)
    b, _ = permuted_copy(a, TASKS[1], seed=3)
    data = sample(2, 128)
    x = torch.cat(data)
    torch.testing.assert_close(b(x)[0], a(x)[0], rtol=0, atol=1e-12)     # b is a functional copy
    merged = merge_as_made([a, b], data, method=method, **opts)
    assert merged.backbone.hidden == [16, 12]
    for lm, la in zip(merged.backbone.layers, a.backbone.layers):
        torch.testing.assert_close(lm.weight, la.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(lm.bias, la.bias, rtol=0, atol=1e-6)
    out = merged(x)
    torch.testing.assert_close(out[0], a(x)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], a(x)[0], rtol=0, atol=1e-6)      # b's head sees its own order again


def test_permute_fold_orientation_is_average_of_permuted_weights():
    a, b = model([10, 8], TASKS[0], 0), model([10, 8], TASKS[1], 1)
    data = sample(2, 128)
    merged = merge_as_made([a, b], data, method="permute")
    feats = hidden_features([a, b], data)
    perms = [permutation_maps(f0, f1)[2] for f0, f1 in feats]
    eye = [torch.eye(10, dtype=torch.float64), torch.eye(8, dtype=torch.float64)]
    ps = [e[p] for e, p in zip(eye, perms)]                   # P[i, π(i)] = 1
    prev = None
    for l, (la, lb, lm) in enumerate(zip(a.backbone.layers, b.backbone.layers, merged.backbone.layers)):
        w1 = ps[l] @ lb.weight if prev is None else ps[l] @ lb.weight @ prev.T
        torch.testing.assert_close(lm.weight, (la.weight + w1) / 2, rtol=0, atol=1e-12)
        torch.testing.assert_close(lm.bias, (la.bias + ps[l] @ lb.bias) / 2, rtol=0, atol=1e-12)
        prev = ps[l]
    torch.testing.assert_close(merged.heads[0].weight, a.heads[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(merged.heads[1].weight, b.heads[0].weight @ ps[-1].T, rtol=0, atol=1e-12)
    # and the assignment maximizes the summed correlation: no better than the identity pairing of
    # the matched features exists, so the matched total beats a few random permutations
    c = correlation(feats[0])[:10, 10:]
    best = c[torch.arange(10), perms[0]].sum()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert best >= c[torch.arange(10), torch.randperm(10, generator=g)].sum() - 1e-12


# ----------------------------------------------------------------------------- partial zipping
def test_partial_zip_is_the_multi_head_model():
    a, b = model([16, 12], TASKS[0], 0), model([16, 12], TASKS[1], 1)
    data = sample(2, 128)
    x = torch.cat(data)
    merged = merge_as_made([a, b], data, method="zipit", stop_layer=1, alpha=0.3, beta=0.25)
    assert merged.backbone.hidden == [16, 24]
    feats = hidden_features([a, b], data)
    m, u = zipit_maps(feats[0], 16, alpha=0.3, beta=0.25)
    la = [a.backbone.layers[0], b.backbone.layers[0]]
    w1 = m @ torch.block_diag(la[0].weight, la[1].weight) @ torch.cat([torch.eye(20, dtype=torch.float64)] * 2)
    f1 = F.relu(x @ w1.T + m @ torch.cat([la[0].bias, la[1].bias]))
    out = merged(x)
    for k, src in enumerate([a, b]):
        inp = f1 @ u[16 * k:16 * (k + 1)].T                  # U_1[k] · f*_1: model k's unmerged input
        f2 = F.relu(src.backbone.layers[1](inp))             # model k's own, unzipped layer 2
        torch.testing.assert_close(out[k], src.heads[0](f2), rtol=0, atol=1e-10)


def test_stop_layer_zero_is_the_exact_ensemble_of_features():
    a, b = model([16, 12], TASKS[0], 0), model([16, 12], TASKS[1], 1)
    data = sample(2, 64)
    x = torch.cat(data)
    merged = merge_as_made([a, b], data, method="zipit", stop_layer=0)
    assert merged.backbone.hidden == [32, 24]
    out = merged(x)
    torch.testing.assert_close(out[0], a(x)[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(out[1], b(x)[0], rtol=0, atol=1e-10)


def test_zipit_three_models_reaches_the_source_width():
    srcs = [model([16, 12], TASKS[k], k) for k in range(3)]
    merged = foldmerge.merge(srcs, sample(3), method="zipit", alpha=0.3, beta=0.0)
    assert merged.backbone.hidden == [16, 12]
    assert [t.name for t in merged.tasks] == TASKS
    assert all(o.shape == (5, 5) for o in merged(sample(1, 5)[0]))


def test_zipit_defaults_follow_the_family_row_and_are_recorded():
    from foldmerge.methods import zipit
    srcs = [model([16, 12], TASKS[k], k) for k in range(2)]
    merged = foldmerge.merge(srcs, sample(2), method="zipit")
    assert (merged.meta["alpha"], merged.meta["beta"]) == (0.3, 0.5)
    assert merged.meta["options"] == {"alpha": 0.3, "beta": 0.5, "reset_bn": False}
    vit = TaskModel("vit", {"image_size": 28, "channels": 1, "patch": 7, "width": 8, "depth": 1, "heads": 2,
                            "mlp_dim": 8, "out_dim": 8}, ["mnist:0-4"])
    resolved = zipit.merge.resolve([vit, vit], {})
    assert (resolved["alpha"], resolved["beta"]) == (0.3, 0.125)
    assert zipit.merge.resolve([vit, vit], {"alpha": 0.7})["alpha"] == 0.7


# ------------------------------------------------------------------------------------ errors
def test_errors():
    srcs = [model([16, 12], TASKS[k], k) for k in range(3)]
    with pytest.raises(ValueError, match="exactly two"):
        foldmerge.merge(srcs, sample(3), method="permute")
    narrow = model([16, 10], TASKS[1], 1)
    for method in ("permute", "zipit"):
        with pytest.raises(ValueError, match="identical hidden widths"):
            foldmerge.merge([srcs[0], narrow], sample(2), method=method)
    with pytest.raises(ValueError, match="stop_layer"):
        foldmerge.merge(srcs[:2], sample(2), method="zipit", stop_layer=3)
    with pytest.raises(ValueError, match="beta"):
        foldmerge.merge(srcs[:2], sample(2), method="zipit", beta=2.0)


def test_opt_on_mlps_has_no_tokens_to_filter():
    srcs = [model([16, 12], TASKS[k], k) for k in range(2)]
    soft = foldmerge.merge(srcs, sample(2), method="opt", reg=0.05)
    assert soft.backbone.hidden == [16, 12] and torch.isfinite(soft(sample(1, 3)[0])[0]).all()
    with pytest.raises(ValueError, match="no token axis"):
        foldmerge.merge(srcs, sample(2), method="opt", filter="cls")
