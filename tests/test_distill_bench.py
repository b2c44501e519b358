"""Distillation, FS-Merge with ZipIt! init, the batched local objective, and the MLP bench's pieces."""
import json

import pytest
import torch
from torch.nn import functional as F

import foldmerge
from foldmerge.bench import mlp as bench
from foldmerge.context import FeatureCache
from foldmerge.foldable import merge_features, unmerge_features
from foldmerge.methods import distill, fs_merge
from foldmerge.methods.common import reconstruction_loss
from foldmerge.model import TaskModel
from foldmerge.supernet import SuperNet
from foldmerge.train import TrainConfig


def merge_as_made(*args, **kwargs):
    """foldmerge.merge without the routing calibration: the heads as the method made them."""
    return foldmerge.merge(*args, calibrate="none", **kwargs)


def sources(hidden=(16, 12), n=2):
    torch.manual_seed(0)
    tasks = ["mnist:0-4", "mnist:5-9", "fmnist:0-4"]
    return [TaskModel("mlp", {"in_dim": 20, "hidden": list(hidden)}, [tasks[k]]) for k in range(n)]


def sample(n_models, n=24):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 20, generator=g) + k for k in range(n_models)]


def logits(model, x):
    with torch.no_grad():
        return model(x)


# ------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("init", ["first", "average", "regmean"])
def test_distill_zero_epochs_is_its_student_init(init):
    src, data = sources(), sample(2)
    merged = merge_as_made(src, data, method="distill", init=init, epochs=0)
    x = torch.randn(7, 20)
    if init == "first":
        ref_features = src[0].features(x)
    elif init == "average":
        ref_features = merge_as_made(src, data, method="average").features(x)
    else:
        ref_features = merge_as_made(src, data, method="regmean").features(x)      # the same default α
    assert torch.allclose(merged.features(x), ref_features, atol=1e-6)
    # U starts as [I; I]: every head reads the student's features unchanged.
    for out, head in zip(logits(merged, x), [h for m in src for h in m.heads]):
        assert torch.allclose(out, head(ref_features), atol=1e-5)


def test_distill_trains_every_student_weight_and_folds_u_into_the_heads():
    src, data = sources(), sample(2)
    merged = foldmerge.merge(src, data, method="distill", init="first", epochs=200, lr=0.05,
                             schedule="constant", target_scale="none")
    assert merged.meta["final_loss"] < 0.5 * merged.meta["initial_loss"]
    assert not torch.equal(merged.backbone.layers[0].weight, src[0].backbone.layers[0].weight)


@pytest.mark.parametrize("method", ["distill", "fs-merge"])
def test_target_scaling_never_changes_the_init(method):
    """Targets of source k are scaled by s_k for training; U[k] is scaled by s_k before and by
    1/s_k after, so zero epochs give back the init exactly, scaled or not."""
    from foldmerge.methods.common import target_scales
    src, data = sources(), sample(2)
    x = torch.cat(data)
    assert target_scales([m.features(x) for m in src], "match")[1] != 1.0
    plain = foldmerge.merge(src, data, method=method, init="first", epochs=0, target_scale="none")
    scaled = foldmerge.merge(src, data, method=method, init="first", epochs=0, target_scale="match")
    for a, b in zip(logits(plain, x), logits(scaled, x)):
        assert torch.allclose(a, b, atol=1e-6)


def test_distill_shares_fs_merge_objective_and_loop():
    # Same objective and loop object: both call common.fit_reconstruction, which trains through the
    # merge's context (by default the one loop, train.fit).
    from foldmerge import train
    from foldmerge.context import Context
    from foldmerge.methods import common
    assert distill.fit_reconstruction is fs_merge.fit_reconstruction is common.fit_reconstruction
    assert Context().fit is train.fit


def test_distill_bad_options():
    src, data = sources(), sample(2)
    with pytest.raises(ValueError, match="--init: expected one of first, average, regmean, random"):
        foldmerge.merge(src, data, method="distill", init="zipit", epochs=0)
    with pytest.raises(ValueError, match="targets"):
        foldmerge.merge(src, data, method="distill", targets="mine", epochs=0)
    with pytest.raises(ValueError, match="identical backbones"):
        foldmerge.merge([src[0], sources((16, 10))[1]], data, method="distill", epochs=0)


# ---------------------------------------------------------------------- ZipIt! init
@pytest.mark.parametrize("variant", ["local", "global"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_fs_merge_zipit_init_before_training_is_zipit(variant, beta):
    src, data = sources(), sample(2)
    z = foldmerge.merge(src, data, method="zipit", alpha=0.3, beta=beta)
    fs = foldmerge.merge(src, data, method="fs-merge", variant=variant, init="zipit", epochs=0,
                         zipit_alpha=0.3, zipit_beta=beta)
    x = torch.randn(9, 20)
    for a, b in zip(logits(z, x), logits(fs, x)):
        assert torch.allclose(a, b, atol=1e-5)


def test_fs_merge_zipit_init_improves_its_objective_and_needs_full_maps():
    src, data = sources(), sample(2)
    merged = foldmerge.merge(src, data, method="fs-merge", variant="local", init="zipit", epochs=200,
                             lr=0.05, schedule="constant")
    assert merged.meta["final_loss"] < merged.meta["initial_loss"]
    from foldmerge.arch import defaults  # meta records the values used, not None
    assert (merged.meta["zipit_alpha"], merged.meta["zipit_beta"]) == (0.3, 0.5) == \
        tuple(defaults.value("mlp", ("zipit",), k)[0] for k in ("alpha", "beta"))
    with pytest.raises(ValueError, match="needs param 'full'"):
        foldmerge.merge(src, data, method="fs-merge", init="zipit", param="diag", epochs=0)


# --------------------------------------------------------------- batched local objective
@pytest.mark.parametrize("own", [False, True])
def test_batched_local_loss_equals_the_per_layer_losses(own):
    src, data = sources((16, 16, 16)), sample(2)
    sn = SuperNet(src, param="full", init="random", seed=3)
    x = torch.cat(data)
    owner = torch.cat([torch.full((len(d),), k) for k, d in enumerate(data)]) if own else None
    pre = [m.backbone.preactivations(x) for m in src]
    z = [[p[l] for p in pre] for l in range(3)]
    tgt = [[F.relu(t) for t in zl] for zl in z]
    maps = [(sn.merge_map(f"layers.{l}"), sn.unmerge_map(f"layers.{l + 1}:in" if l < 2 else "output"))
            for l in range(3)]
    expected = sum(reconstruction_loss(unmerge_features(U, F.relu(merge_features(M, z[l]))), tgt[l], owner)
                   for l, (M, U) in enumerate(maps))
    loss_fn = fs_merge._batched_local_loss(maps, owner, maps[0][0].in_dims)
    got = loss_fn(*fs_merge._batched_local_data(z, tgt, owner))
    assert torch.allclose(got, expected, rtol=1e-5)


def test_local_layers_train_as_if_alone():
    """Training all layers in one loop gives each layer the update it would get on its own."""
    src, data = sources((16, 16)), sample(2)
    cfg = dict(variant="local", init="average", epochs=50, lr=0.05, schedule="cosine")
    both = foldmerge.merge(src, data, method="fs-merge", **cfg)
    # Layer 1 alone: a one-layer source pair made of the first layers gives the same M_1, U_1.
    one = [TaskModel("mlp", {"in_dim": 20, "hidden": [16]}, [m.tasks[0]]) for m in src]
    for o, m in zip(one, src):
        o.backbone.layers[0].load_state_dict(m.backbone.layers[0].state_dict())
    first = foldmerge.merge(one, data, method="fs-merge", **cfg)
    assert torch.allclose(both.backbone.layers[0].weight, first.backbone.layers[0].weight, atol=1e-5)


# ----------------------------------------------------------------------------- bench
def test_paper_data_file_names_its_tables_and_is_labelled():
    for dataset, vary in [("mnist", "depth"), ("mnist", "width"), ("fmnist", "depth"), ("fmnist", "width")]:
        ref = bench.paper_reference(dataset, vary)
        assert ref["per_task"]["table"].startswith("Table")
        assert ref["per_task"]["values"] == bench.VALUES[vary]
        for row, cells in ref["per_task"]["rows"].items():
            assert len(cells) == 5 and all(0 < c[0] <= 100 for c in cells), row
    t2 = bench.paper_reference("mnist", "depth")["per_task"]
    assert t2["table"] == "Table 2"
    assert bench.paper_value({"per_task": t2}, "per_task", "zipit", 1) == pytest.approx(96.35)
    assert bench.paper_value({"per_task": t2}, "per_task", "slerp", 1) is None
    from importlib import resources
    raw = json.loads(resources.files("foldmerge").joinpath("bench/paper_mlp.json").read_text())
    assert "PAPER" in raw["_what"] and "not measured here" in raw["_what"]


def test_aggregate_mean_and_sample_std():
    rows = [{"method": "zipit", "value": 1, "seed": s, "per_task": v, "joint": None, "seconds": 1.0}
            for s, v in enumerate([90.0, 92.0, 94.0])]
    table = bench.aggregate(rows, [1, 2])
    cell = table["per_task"]["zipit"]["1"]
    assert cell["mean"] == pytest.approx(92.0) and cell["std"] == pytest.approx(2.0) and cell["n"] == 3
    assert "2" not in table["per_task"]["zipit"] and "zipit" not in table["joint"]


def test_method_plan_uses_the_bold_values_and_the_tuned_ones():
    tuned = {"regmean_alpha": 0.7, "regmean_augment": 512, "zipit_alpha": 0.5, "zipit_beta": 0.25, "distill_init": "average",
             "distill_lr": 0.03, "opt_reg": 0.02}
    plan = {name: (method, opts) for name, method, opts in bench.method_plan("mnist", tuned)}
    assert plan["fs-merge local"][1] == {"variant": "local", "init": "random", "epochs": 15000, "lr": 0.1,
                                         "momentum": 0.9, "warmup": 20 / 15000}       # E.1: 20 epochs
    assert plan["fs-merge global"][1]["epochs"] == 1000 and plan["fs-merge global"][1]["init"] == "first"
    assert plan["regmean"][1] == {"alpha": 0.7, "augment": 512}
    assert plan["fs-merge local, zipit init"][1]["zipit_beta"] == 0.25
    assert plan["opt"][1] == {"reg": 0.02}
    assert dict((n, o) for n, _, o in bench.method_plan("fmnist", tuned))["fs-merge local"]["epochs"] == 20000
    # every planned option is declared by its method
    from foldmerge.methods import get_method
    for name, (method, opts) in plan.items():
        accepted = {o.name for o in get_method(method).options}
        assert set(opts) - {"augment"} <= accepted, name        # augment: the merge sample's option


def test_a_cached_choice_lacking_a_row_is_completed_by_searching_that_row_alone(monkeypatch, tmp_path):
    import json
    seen = []

    def fake_merge(sources, data, method, seed, **opts):
        seen.append(method)
        m = TaskModel("mlp", {"in_dim": 20, "hidden": [4]}, ["mnist:0-4"])
        m.meta = {"opts": opts}
        return m

    monkeypatch.setattr(bench, "merge", fake_merge)
    monkeypatch.setattr("foldmerge.bench.merge_sample", lambda sources, n, seed, augment=0: [])
    monkeypatch.setattr(bench, "get_sources", lambda *a: [])
    monkeypatch.setattr(bench, "evaluate", lambda m, split: {"per_task_mean": 90.0 + m.meta["opts"]["reg"]})
    old = {k: v for k, v in bench._placeholder_tuning().items() if k != "opt_reg"}
    path = bench.tuned_path("mnist", [128, 128], tmp_path)
    path.write_text(json.dumps({**old, "trials": [{"method": "regmean"}]}))
    tuned = bench.load_or_tune("mnist", [128, 128], tmp_path, retune=False)
    assert seen == ["opt"] * len(bench.GRID["opt_reg"]) and tuned["opt_reg"] == max(bench.GRID["opt_reg"])
    assert {k: tuned[k] for k in old} == old and len(tuned["trials"]) == 1 + len(bench.GRID["opt_reg"])
    assert json.loads(path.read_text())["opt_reg"] == tuned["opt_reg"]
    seen.clear()
    bench.load_or_tune("mnist", [128, 128], tmp_path, retune=False)            # complete now: nothing searched
    assert seen == []
    # `--methods opt permute` reads only OT's λ: a fresh cache searches that alone
    assert bench.searches_for("mnist", ["opt", "permute"]) == ["opt_reg"]
    assert bench.searches_for("mnist", ["fs-merge"]) == ["zipit_alpha"]
    assert bench.searches_for("mnist", ["distill"]) == ["regmean_alpha", "distill_init"]
    assert bench.searches_for("mnist", None) == list(bench.SEARCHES)
    fresh = tmp_path / "fresh"
    only = bench.load_or_tune("mnist", [128, 128], fresh, retune=False, searches=["opt_reg"])
    assert seen == ["opt"] * len(bench.GRID["opt_reg"]) and "regmean_alpha" not in only
    # every setting has its own choice: another depth searches afresh
    seen.clear()
    bench.load_or_tune("mnist", [128] * 4, fresh, retune=False, searches=["opt_reg"])
    assert seen == ["opt"] * len(bench.GRID["opt_reg"])


def test_bench_rejects_bad_arguments(capsys):
    from foldmerge.cli import main
    assert main(["bench", "defaults", "--datasets", "cifar", "--threads", "1"]) == 2
    assert "unknown 'cifar'" in capsys.readouterr().err
    assert main(["bench", "select", "--settings", "cifar d2", "--threads", "1"]) == 2
    assert "unknown 'cifar d2'" in capsys.readouterr().err
    assert main(["bench", "mlp", "--seeds", "0"]) == 2
    assert "expected a positive integer" in capsys.readouterr().err
    assert main(["bench", "mlp", "--methods", "nonsense", "--out", "/tmp/unused-bench"]) == 2
    assert "unknown bench method" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["folded", "supernet"])
@pytest.mark.parametrize("param", ["full", "diag+lowrank(3)"])
def test_starting_from_the_cached_outputs_of_the_first_layer_is_the_same_function(form, param):
    src = sources((16, 12))
    wide = [TaskModel("mlp", {"in_dim": 40, "hidden": [16, 12]}, [m.tasks[0]]) for m in src]   # 40 > 2 x 16
    sn = SuperNet(wide, param=param, init="random", seed=2)
    x = torch.randn(10, 40)
    fixed = sn.fixed_inputs(x, chunk=3)
    assert [tuple(z.shape) for z in fixed] == [(10, 32)]
    direct = sn(x, form=form)
    cached = sn(x, form=form, fixed=fixed)
    assert torch.allclose(direct, cached, atol=1e-5)
    for out in (direct, cached):
        sum(r.sum() for r in sn.reconstruct(out)).backward()
    # the gradient reaches layer 1's M through the cached path too
    assert all(p.grad is not None for p in sn.parameters() if p.requires_grad)
    assert SuperNet(src, param=param).fixed_inputs(torch.randn(4, 20)) is None       # 20 < 2 x 16: no gain


def test_teacher_features_are_computed_once_per_model_and_sample():
    teacher_features = FeatureCache()
    src = sources()
    x = torch.randn(7, 20)
    calls = []
    original = src[0].features
    src[0].features = lambda z: calls.append(1) or original(z)
    first = teacher_features(src[0], x)
    assert teacher_features(src[0], x.clone()) is first and len(calls) == 1    # same content: reused
    teacher_features(src[0], x + 1)                                          # another sample: recomputed
    assert teacher_features(src[0], x) is first and len(calls) == 2          # ... and both kept (FS-Merge seq.)
    with torch.no_grad():
        src[0].backbone.layers[0].weight.mul_(2)                             # an edited model: recomputed
    edited = teacher_features(src[0], x)
    assert len(calls) == 3 and torch.allclose(edited, original(x))


def test_features_in_chunks_keeps_at_most_the_last_samples():
    from foldmerge.model import features_in_chunks
    src = sources()
    x = torch.randn(7, 20)
    torch.testing.assert_close(features_in_chunks(src[0], x, chunk=3), src[0].features(x))
    cache = FeatureCache(per_model=2)
    a, b = cache(src[0], x), cache(src[0], x + 1)
    assert cache(src[0], x) is a                                             # a is now the most recent
    cache(src[0], x + 2)                                                     # evicts b, the least recent
    assert cache(src[0], x) is a and cache(src[0], x + 1) is not b


def test_a_context_with_another_loop_trains_nothing_and_train_step_is_fits_step():
    from foldmerge.context import Context
    from foldmerge.train import fit, make_optimizer, train_step
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    x = torch.randn(8, 3)
    loss_fn = lambda xb: ((xb @ w) ** 2).mean()                                 # noqa: E731
    cfg = TrainConfig(epochs=1, lr=0.1, batch_size=None, schedule="constant")
    before = w.detach().clone()
    fits = []
    record = Context(fit=lambda params, loss, data, cfg, **_: fits.append((params, loss, data, cfg)) or [])
    assert record.train([w], loss_fn, [x], cfg) == []
    assert torch.equal(w, before) and fits[0][1] is loss_fn and fits[0][3] is cfg
    history = fit([w], loss_fn, [x], cfg)                        # outside: trains again
    after_fit = w.detach().clone()
    with torch.no_grad():
        w.copy_(before)
    opt = make_optimizer([w], cfg)
    assert train_step(opt, [w], loss_fn, [x]) == pytest.approx(history[0])
    assert torch.allclose(w, after_fit)                           # one full-batch step = one epoch of fit


def test_teacher_features_run_in_eval_mode_and_see_buffers():
    # dropout and BatchNorm: a teacher left in train mode still gives its eval-mode features, and
    # a changed running statistic (a buffer, not a parameter) is recomputed
    teacher_features = FeatureCache()
    m = sources()[0]
    m.backbone = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.BatchNorm1d(16), torch.nn.Dropout(0.5))
    x = torch.randn(9, 20)
    m.eval()
    want = m.features(x)
    m.train()
    got = teacher_features(m, x)
    assert torch.equal(got, want) and m.training                  # eval-mode features; the mode is restored
    with torch.no_grad():
        m.backbone[1].running_mean.add_(1.0)
    m.eval()
    assert torch.equal(teacher_features(m, x), m.features(x)) and not torch.equal(teacher_features(m, x), want)


def test_defaults_bench_runs_every_method_with_no_option(monkeypatch, tmp_path):
    from foldmerge.bench import defaults
    seen = []

    def tiny_sources(dataset, hidden, seed, cache, tasks=None):
        torch.manual_seed(seed)
        seen.append((dataset, tuple(hidden), tuple(tasks)))
        return [TaskModel("mlp", {"in_dim": 784, "hidden": [8] * len(hidden)}, [t]) for t in tasks]

    monkeypatch.setattr(defaults, "get_sources", tiny_sources)
    result = defaults.run_bench(datasets=("mnist",), depths=(1,), methods=["average", "zipit", "regmean"],
                                out=str(tmp_path))
    assert seen == [("mnist", (128,), ("mnist:0-4", "mnist:5-9")),
                    ("mnist", (128,), ("mnist:0,2,4,6,8", "mnist:1,3,5,7,9"))]
    rows = {(r["setting"], r["method"]): r for r in result["rows"]}
    assert len(rows) == 2 * 5                       # originals, ensemble, average, zipit, regmean per split
    z = rows[("mnist:0-4 / mnist:5-9, depth 1", "zipit")]
    assert (z["options"]["alpha"], z["options"]["beta"]) == (0.3, 0.5)     # resolved defaults, recorded
    assert z["options"]["augment"] == 0
    r = rows[("mnist:0-4 / mnist:5-9, depth 1", "regmean")]
    assert r["options"]["augment"] == 1024
    assert z["joint_uncalibrated"] is not None and 0 <= z["joint"] <= 100
    cells = defaults.table(result)
    assert set(cells["zipit"]) == set(result["settings"]) | {"mean"}
    with pytest.raises(ValueError, match="unknown bench method"):
        defaults.run_bench(datasets=("mnist",), methods=["nonsense"], out=str(tmp_path))


def test_every_setting_of_the_mlp_bench_uses_the_choice_made_on_its_own_validation(monkeypatch, tmp_path):
    asked, ran = [], []

    def fake_tune(dataset, hidden, cache, retune, searches, threads):
        asked.append(list(hidden))
        return {**bench._placeholder_tuning(), "regmean_alpha": len(hidden) / 10, "chosen_on": f"h{hidden}"}

    def fake_unit(dataset, vary, value, seed, tuned, *rest):
        ran.append((value, tuned["regmean_alpha"]))
        return [{"method": "regmean", "value": value, "seed": seed, "per_task": 90.0, "joint": 80.0,
                 "seconds": 1.0}]

    monkeypatch.setattr(bench, "load_or_tune", fake_tune)
    monkeypatch.setattr(bench, "run_unit", fake_unit)
    result = bench.run_bench(values=[1, 3], seeds=2, methods=["regmean"], jobs=1, out=str(tmp_path))
    assert sorted(asked) == [[128], [128] * 3]
    assert sorted(ran) == [(1, 0.1), (1, 0.1), (3, 0.3), (3, 0.3)]
    assert result["hyperparameters"]["3"]["regmean_alpha"] == 0.3
    assert result["plan"]["1"][0]["options"]["alpha"] == 0.1
