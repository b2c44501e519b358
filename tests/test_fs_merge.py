"""FS-Merge training: the objective goes down, the two forms agree, options behave."""
import pytest
import torch
from torch.nn import functional as F

import foldmerge
from foldmerge.methods.common import reconstruction_loss as _recon_loss
from foldmerge.methods.common import target_scales as _scales
from foldmerge.model import TaskModel
from foldmerge.supernet import SuperNet


def merge_as_made(*args, **kwargs):
    """foldmerge.merge without the routing calibration: the heads as the method made them."""
    return foldmerge.merge(*args, calibrate="none", **kwargs)


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


def test_local_fs_merge_of_a_residual_stream_learns_each_space_alone():
    """On a residual stream (a ViT), local FS-Merge learns one (M, U) per space from that space's own
    activations: from `first` with no epochs it folds to model 1 exactly; trained, the spaces'
    reconstruction error falls below the start's."""
    vit = {"width": 16, "depth": 2, "heads": 2, "mlp_dim": 16, "out_dim": 8}
    src = [TaskModel("vit", vit, [t]) for t in ("mnist:0-4", "mnist:5-9")]
    x = [torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    same = foldmerge.merge(src, x, method="fs-merge", variant="local", init="first", epochs=0, calibrate="none")
    torch.testing.assert_close(same.features(x[0]), src[0].features(x[0]), rtol=1e-5, atol=1e-5)
    trained = foldmerge.merge(src, x, method="fs-merge", variant="local", init="average", epochs=30, lr=0.01,
                              calibrate="none")
    assert trained.meta["variant"] == "local" and trained.meta["final_loss"] < 0.8 * trained.meta["initial_loss"]
    with pytest.raises(ValueError, match="init 'zipit' applies to the global variant"):
        foldmerge.merge(src, x, method="fs-merge", variant="local", init="zipit", param="full", epochs=1)


def test_local_fs_merge_samples_the_same_rows_of_every_source():
    """`rows`: at most about that many activation rows per probe and task, the same inputs and positions
    in every source (a model observed twice gives the same rows), recorded in meta; an MLP's local variant
    reads that many examples per task."""
    from foldmerge.methods import align
    vit = {"width": 16, "depth": 2, "heads": 2, "mlp_dim": 16, "out_dim": 8}
    a = TaskModel("vit", vit, ["mnist:0-4"])
    x = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    whole = align.observe([a, a], [x])
    some = align.observe([a, a], [x], rows=30, chunk=16)
    probes = sum(p.space == "mlp0" for p in a.spec.probes)
    assert len(whole["mlp0"][0]) > 30 * probes and 30 * probes <= len(some["mlp0"][0]) <= 33 * probes
    assert torch.equal(some["mlp0"][0], some["mlp0"][1])
    assert all(any(torch.equal(r, w) for w in whole["mlp0"][0]) for r in some["mlp0"][0][:5])   # rows, not mixes
    src = [a, TaskModel("vit", vit, ["mnist:5-9"])]
    merged = foldmerge.merge(src, [x[:20], x[20:]], method="fs-merge", variant="local", rows=50, epochs=2,
                             calibrate="none")
    assert merged.meta["rows"] == 50
    mlp = foldmerge.merge(sources(), sample(2), method="fs-merge", variant="local", rows=8, epochs=1)
    assert mlp.meta["merge_examples"] == [8, 8]


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
    merged = merge_as_made(src, sample(2), method="fs-merge", variant="global", init="first",
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
    with pytest.raises(ValueError, match="both named"):
        foldmerge.merge([src[0], src[0]], sample(2), same_task="no")
    with pytest.raises(ValueError, match="same-task: expected one of"):
        foldmerge.merge(src, sample(2), same_task="maybe")


def _same_model(a, b, atol=0.0):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=atol, msg=ka)


@pytest.mark.parametrize("param", ["full", "diag+lowrank(4)"])
def test_seq_of_two_models_is_global(param):
    src = sources(dtype=torch.float64)
    opts = dict(method="fs-merge", param=param, epochs=40, lr=0.05, schedule="constant")
    seq = foldmerge.merge(src, sample(2, dtype=torch.float64), variant="seq", **opts)
    glob = foldmerge.merge(src, sample(2, dtype=torch.float64), variant="global", **opts)
    _same_model(seq, glob)
    assert len(seq.meta["stages"]) == 1


def test_seq_starts_each_stage_from_the_last_merge_and_keeps_earlier_tasks():
    src = sources(([24, 16], [24, 16], [24, 16]), dtype=torch.float64)
    data = sample(3, dtype=torch.float64)
    opts = dict(method="fs-merge", param="diag+lowrank(4)", epochs=40, lr=0.05, schedule="constant")
    first_two = merge_as_made(src[:2], data[:2], variant="global", **opts)
    # a last stage of 0 epochs is its 'first' init: the merge of models 1 and 2, plus head 3 unchanged
    seq0 = merge_as_made(src, data, variant="seq", last_epochs=0, **opts)
    x = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(seq0.features(x), first_two.features(x), rtol=0, atol=1e-12)
    for a, b in zip(seq0(x)[:2], first_two(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(seq0.heads[2].weight, src[2].heads[0].weight)
    # trained: each stage lowers its loss; a stage optimizes a two-model SuperNet only
    seq = merge_as_made(src, data, variant="seq", **opts)
    assert [t.name for t in seq.tasks] == [t.name for s in src for t in s.tasks]
    assert all(s["final_loss"] < s["initial_loss"] for s in seq.meta["stages"])
    two = SuperNet(src[:2], param="diag+lowrank(4)")
    assert seq.meta["learnable_parameters"] == sum(p.numel() for p in two.parameters() if p.requires_grad)
    glob3 = merge_as_made(src, data, variant="global", **opts)
    assert glob3.meta["learnable_parameters"] > seq.meta["learnable_parameters"]


def test_seq_bad_options():
    src = sources()
    with pytest.raises(ValueError, match="init must be 'first'"):
        foldmerge.merge(src, sample(2), method="fs-merge", variant="seq", init="random", epochs=1)
    with pytest.raises(ValueError, match="--last-epochs applies only when variant is seq"):
        foldmerge.merge(src, sample(2), method="fs-merge", variant="global", last_epochs=3, epochs=1)


def test_target_scaling_is_undone_when_training_fails():
    # the output map's blocks are scaled for training; an error mid-training must not leave them scaled
    from foldmerge.context import Context
    from foldmerge.foldable import FoldMap
    from foldmerge.methods.common import fit_reconstruction
    from foldmerge.train import TrainConfig
    src = sources()
    x = torch.cat(sample(2))
    u = FoldMap(16, [16, 16], "full", "random", "unmerge", torch.Generator().manual_seed(0))
    before = u.dense().clone()

    def broken(xb):
        raise RuntimeError("out of memory, say")

    with pytest.raises(RuntimeError, match="out of memory"):
        fit_reconstruction(list(u.parameters()), broken, u, src, x, None, TrainConfig(epochs=1), "match", "test",
                           Context())
    torch.testing.assert_close(u.dense(), before, rtol=1e-6, atol=0)
    assert _scales([m.features(x) for m in src], "match")[1] != pytest.approx(1.0)   # it was scaled


def test_a_rank_given_as_a_share_of_the_width_is_that_share_of_each_map():
    from foldmerge.foldable import FoldMap
    from foldmerge.methods.fs_merge import PARAM
    assert FoldMap(64, [64, 64], "diag+lowrank(25%)").rank == 16
    assert FoldMap(2, [2, 2], "diag+lowrank(10%)").rank == 1                 # at least one
    for bad in ("diag+lowrank(0%)", "diag+lowrank(101%)", "diag+lowrank(5.5%)", "diag+lowrank(%)"):
        with pytest.raises(ValueError):
            PARAM.parse(bad)
    assert PARAM.parse("diag+lowrank(100%)") == "diag+lowrank(100%)"
    torch.manual_seed(0)
    vits = [TaskModel("vit", {"image_size": 8, "channels": 1, "patch": 4, "width": 8, "depth": 1, "heads": 2,
                              "mlp_dim": 16, "out_dim": 8}, [t]) for t in ("mnist:0-4", "mnist:5-9")]
    sn = SuperNet(vits, param="diag+lowrank(50%)")
    assert {(m.out_dim, m.rank) for m in sn.maps} == {(8, 4), (16, 8)}


def test_the_permute_init_starts_at_the_mean_of_the_sources_permuted_onto_the_first():
    """init 'permute' at zero epochs is the permute merge (the mean of model 1 and model 2 permuted
    onto it), with any parameterization, and each permuted source computes what it did."""
    from foldmerge.methods.fs_merge import _permuted_onto_first
    torch.manual_seed(0)
    models = [TaskModel("mlp", {"in_dim": 12, "hidden": [10, 10]}, [t]) for t in ("mnist:0-4", "mnist:5-9")]
    data = [torch.randn(40, 12), torch.randn(40, 12)]
    permuted = _permuted_onto_first(models, data)
    x = torch.randn(5, 12)
    assert permuted[0] is models[0]
    torch.testing.assert_close(permuted[1](x)[0], models[1](x)[0])
    assert not torch.allclose(permuted[1].backbone.state_dict()["layers.0.weight"],
                              models[1].backbone.state_dict()["layers.0.weight"])
    reference = foldmerge.merge(models, data, method="permute", calibrate="none")
    for param in ("full", "diag"):
        start = foldmerge.merge(models, data, method="fs-merge", init="permute", param=param, epochs=0,
                                calibrate="none")
        for a, b in zip(start(x), reference(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert start.meta["init"] == "permute"


@pytest.mark.parametrize("w", [0.0, 0.25, 1.0])
def test_logit_weight_mixes_the_features_and_the_logits_errors(w):
    """The first epoch's loss (full batch: scored before the step) is (1 - w) * the features' mean
    squared error + w * that of the logits each source's heads give on both."""
    torch.manual_seed(0)
    models = [TaskModel("mlp", {"in_dim": 12, "hidden": [10, 10]}, [t]) for t in ("mnist:0-4", "mnist:5-9")]
    x = [torch.randn(20, 12), torch.randn(20, 12)]
    merged = foldmerge.merge(models, x, method="fs-merge", init="random", epochs=1, lr=1e-9, target_scale="none",
                             logit_weight=w, calibrate="none", seed=3)
    sn = SuperNet(models, param="full", init="random", seed=3)
    xs = torch.cat(x)
    with torch.no_grad():
        recon = sn.reconstruct(sn(xs))
        targets = [m.features(xs) for m in models]
        feats = _recon_loss(recon, targets, None)
        heads = [m.heads[0].weight for m in models]
        logits = _recon_loss([r @ h.T for r, h in zip(recon, heads)], [t @ h.T for t, h in zip(targets, heads)], None)
    assert merged.meta["initial_loss"] == pytest.approx(float((1 - w) * feats + w * logits), rel=1e-5)
    assert merged.meta["train"]["logit_weight"] == w


def test_the_permute_init_keeps_the_space_shared_class_embedding_heads_read():
    """Sources with frozen class-embedding heads already share their output space (the heads are one
    matrix): the permute init permutes every other space, never that one, and each permuted source still
    computes what it did."""
    from foldmerge.methods.fs_merge import _permuted_onto_first
    models = []
    for k, t in enumerate(("mnist:0-4", "mnist:0-4")):
        torch.manual_seed(k)
        models.append(TaskModel("mlp", {"in_dim": 12, "hidden": [10, 10]}, [t], head="class-embedding"))
    data = [torch.randn(40, 12), torch.randn(40, 12)]
    permuted = _permuted_onto_first(models, data)
    x = torch.randn(5, 12)
    torch.testing.assert_close(permuted[1](x)[0], models[1](x)[0])
    torch.testing.assert_close(permuted[1].features(x), models[1].features(x))       # the output space untouched
    assert not torch.allclose(permuted[1].backbone.state_dict()["layers.0.weight"],
                              models[1].backbone.state_dict()["layers.0.weight"])


@pytest.mark.parametrize("method", ["fs-merge", "distill"])
def test_logit_loss_kl_scores_the_kl_divergence_of_each_heads_prediction(method):
    """With --logit-weight 1 --logit-loss kl the first epoch's loss (full batch, scored before the step) is the
    mean KL divergence from each source head's softmax (biases included) to the same head's on the
    reconstructed features; without logit weight the option is refused."""
    torch.manual_seed(0)
    models = [TaskModel("mlp", {"in_dim": 12, "hidden": [10, 10]}, [t]) for t in ("mnist:0-4", "mnist:5-9")]
    x = [torch.randn(20, 12), torch.randn(20, 12)]
    opts = dict(epochs=1, lr=1e-9, target_scale="match", calibrate="none", seed=3,
                **({"init": "random"} if method == "fs-merge" else {}))
    merged = foldmerge.merge(models, x, method=method, logit_weight=1.0, logit_loss="kl", **opts)
    xs = torch.cat(x)
    with torch.no_grad():
        if method == "fs-merge":
            sn = SuperNet(models, param=merged.meta["param"], init="random", seed=3)
            recon = sn.reconstruct(sn(xs))
        else:
            recon = [m.features(xs) for m in models[:1]] * 2          # the student starts as model 1, U = [I; I]
        kl = sum(F.kl_div(F.log_softmax(m.heads[0](r), -1), F.log_softmax(m(xs)[0], -1), log_target=True,
                          reduction="sum") for m, r in zip(models, recon)) / (2 * len(xs))
    assert merged.meta["initial_loss"] == pytest.approx(float(kl), rel=1e-4)
    with pytest.raises(ValueError, match="logit_weight 0"):
        foldmerge.merge(models, x, method=method, logit_loss="kl", **opts)
