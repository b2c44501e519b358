"""CNNs with BatchNorm: the ResNet spec, conv folding, BatchNorm fusion and reset, and the alignment
methods on conv nets (ZipIt!, permute, Git Re-Basin weight matching, CCA Merge, PLeaS, RegMean)."""
import pytest
import torch
from torch.nn import functional as F

from foldmerge import merge, merge_form
from foldmerge.evaluation import SourceHeads
from foldmerge.methods import align, cca, get_method, pleas, regmean, weight_matching, zipit
from foldmerge.methods.repair import channel_stats, reset_statistics
from foldmerge.model import TaskModel
from foldmerge.supernet import SuperNet

TINY = {"base": 4, "blocks": 2, "stages": 2}


def resnet(task, seed, dtype=torch.float64, config=TINY, fused=True):
    torch.manual_seed(seed)
    m = TaskModel("resnet", config, [task], head="class-embedding").to(dtype)
    m.train()
    with torch.no_grad():                 # BatchNorm statistics that are not the identity
        for _ in range(3):
            m(torch.randn(16, 1, 12, 12, dtype=dtype) * 2 + 0.5)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
    m.eval()
    return m.merge_form() if fused else m


def pair(dtype=torch.float64):
    return [resnet("mnist:0-4", 0, dtype), resnet("mnist:5-9", 1, dtype)]


def data(n=12, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 1, 12, 12, generator=g, dtype=dtype) for _ in range(2)]


def permuted_copy(model, task, seed=3):
    """`model` with the channels of every merged space permuted: the same function, other weights."""
    spec = model.spec
    g = torch.Generator().manual_seed(seed)
    widths = spec.validate(model.backbone)
    perms = {s: torch.randperm(widths[s], generator=g) for s in align.merged_spaces(spec)}
    out = TaskModel(model.arch, model.backbone_config, [task], head="class-embedding").to(torch.float64)
    state = dict(model.backbone.named_parameters())
    with torch.no_grad():
        for p in spec.params:
            t = state[p.key]
            for i, s in enumerate(p.axes):
                if s in perms:
                    t = t.index_select(i, perms[s])
            out.backbone.get_parameter(p.key).copy_(t)
        out.heads[0].weight.copy_(model.heads[0].weight[:, perms[spec.output]])
    return out, perms


def test_fuse_batchnorm_is_exact_and_merge_fuses_by_itself():
    m = resnet("mnist:0-4", 0, fused=False)
    x = data()[0]
    f = m.merge_form()
    assert f.backbone_config["batchnorm"] is False and m.backbone_config.get("batchnorm", True) is True
    assert torch.allclose(f.features(x), m.features(x), atol=1e-12)
    assert merge_form(m).backbone_config["batchnorm"] is False
    b = resnet("mnist:5-9", 1, fused=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    merged = merge([m, b], data(), method="zipit")
    assert merged.backbone_config["batchnorm"] is False
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())     # inputs untouched
    with pytest.raises(ValueError, match="fused form"):
        zipit.merge([m, b], data())          # a method given BatchNorm models directly: one clear line


@pytest.mark.parametrize("param,init", [("full", "random"), ("diag", "average"), ("diag+lowrank(3)", "average")])
def test_folded_cnn_equals_supernet_values_and_gradients(param, init):
    sn = SuperNet(pair(), param=param, init=init, seed=1)
    x = data(5)[0]
    a, b = sn(x), sn(x, form="supernet")
    assert torch.allclose(a, b, atol=1e-10)
    params = list(sn.parameters())
    ga = torch.autograd.grad(a.square().sum(), params, allow_unused=True)
    gb = torch.autograd.grad(b.square().sum(), params, allow_unused=True)
    for u, v in zip(ga, gb):
        assert (u is None) == (v is None)
        if u is not None:
            assert torch.allclose(u, v, atol=1e-10)


def test_first_init_folds_to_model_one_and_a_folded_conv_is_a_plain_conv():
    models = pair()
    folded = SuperNet(models, param="diag", init="first").fold()
    x = data(4)[0]
    assert torch.equal(folded.features(x), models[0].features(x))
    assert isinstance(folded.backbone.stem, torch.nn.Conv2d)
    # the fold is M·blockdiag(W_k)·U at every kernel location
    sn = SuperNet(models, param="full", init="random", seed=2)
    st = sn.folded_state()
    key = "blocks.0.conv1.weight"
    m, u = sn.merge_map("blocks.0.conv1").dense(), sn.unmerge_map("blocks.0.conv1:in").dense().T
    w = [sn.source(key, k) for k in range(2)]
    for i in range(3):
        for j in range(3):
            want = m @ torch.block_diag(w[0][:, :, i, j], w[1][:, :, i, j]) @ u
            assert torch.allclose(st[key][:, :, i, j], want, atol=1e-12)


def test_partial_zip_of_stages_widths_flops_and_the_ensemble_at_zero():
    models, d = pair(), data()
    x = d[0]
    full = zipit.merge(models, d, reset_bn=False)
    part = zipit.merge(models, d, stop_layer=1, reset_bn=False)
    none = zipit.merge(models, d, stop_layer=0, reset_bn=False)
    assert "widths" not in full.backbone_config or full.backbone_config["widths"] == [4, 8]
    assert part.backbone_config["widths"] == [4, 16] and part.backbone_config["hidden"] == [[4, 4], [16, 16]]
    ens = SourceHeads(models)
    for got, want in zip(none(x), ens(x)):
        assert torch.allclose(got, want, atol=1e-10)
    from foldmerge.bench import image_mflops
    assert image_mflops(full) < image_mflops(part) < image_mflops(none)
    with pytest.raises(ValueError, match="stop_layer must lie in 0…2"):
        zipit.merge(models, d, stop_layer=3)


def test_reset_brings_every_layer_to_its_target_statistics():
    models, d = pair(), data(20)
    feats = align.observe(models, d)
    maps = {s: zipit.zipit_maps(feats[s], feats[s][0].shape[1]) for s in align.merged_spaces(models[0].spec)}
    merged = align.merge_with_maps(models, maps)
    assert reset_statistics(merged, models, d, maps) == len(models[0].spec.layer_weights())
    x = torch.cat(d)
    for p in models[0].spec.layer_weights():          # after every reset, each layer sits at its target
        m = maps[models[0].spec.written_space(p)][0]
        src = [channel_stats(s, [p.module], x)[p.module] for s in models]
        mean, std = channel_stats(merged, [p.module], x)[p.module]
        assert torch.allclose(mean, m @ torch.cat([a for a, _ in src]), atol=1e-6)
        assert torch.allclose(std, m @ torch.cat([b for _, b in src]), atol=1e-4)


@pytest.mark.parametrize("method", ["weight-matching", "permute", "cca"])
def test_a_permuted_copy_is_recovered_and_the_merge_is_the_model(method):
    a = resnet("mnist:0-4", 0)
    b, perms = permuted_copy(a, "mnist:5-9")
    x = torch.cat(data(20))
    assert torch.allclose(b(x)[0], a(x)[0], atol=1e-10)
    if method == "weight-matching":
        found, _ = weight_matching.match_weights(a.spec, dict(a.backbone.named_parameters()),
                                                 dict(b.backbone.named_parameters()))
        inv = {s: torch.argsort(p) for s, p in perms.items()}       # b[i] = a[perm[i]]: a = b[argsort]
        assert all(torch.equal(found[s], inv[s]) for s in perms)
    opts = {"reg": 1e-9} if method == "cca" else {"reset_bn": False}
    merged = get_method(method)([a, b], data(20), **opts)
    tol = 1e-6 if method == "cca" else 1e-10
    assert torch.allclose(merged(x)[0], a(x)[0], atol=tol)
    assert torch.allclose(merged(x)[1], b(x)[0], atol=tol)


def test_weight_matching_needs_no_data_and_reset_needs_it():
    models = pair()
    merged = weight_matching.merge(models)
    assert merged.meta["method"] == "weight-matching" and merged.meta["passes"][0] >= 1
    assert merged.meta["reset_bn"] is False             # no data: no reset, even for BatchNorm sources
    with pytest.raises(ValueError, match="one data tensor per model"):
        weight_matching.merge(models, reset_bn=True)


def test_cca_directions_whiten_and_diagonalize():
    g = torch.Generator().manual_seed(0)
    fa = torch.randn(400, 6, generator=g, dtype=torch.float64)
    fb = fa @ torch.randn(6, 6, generator=g, dtype=torch.float64) * 0.5 + torch.randn(400, 6, generator=g,
                                                                                        dtype=torch.float64)
    pa, pb, rho = cca.cca(fa, fb, reg=1e-12)
    ca, cb = (fa - fa.mean(0)) @ pa, (fb - fb.mean(0)) @ pb
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.allclose(ca.T @ ca / 400, eye, atol=1e-8) and torch.allclose(cb.T @ cb / 400, eye, atol=1e-8)
    assert torch.allclose(ca.T @ cb / 400, torch.diag(rho), atol=1e-8)
    # the canonical correlations, independently: eigenvalues of Σaa⁻¹ Σab Σbb⁻¹ Σba are ρ²
    a, b = fa - fa.mean(0), fb - fb.mean(0)
    saa, sbb, sab = a.T @ a, b.T @ b, a.T @ b
    ev = torch.linalg.eigvals(torch.linalg.solve(saa, sab) @ torch.linalg.solve(sbb, sab.T)).real
    assert torch.allclose(ev.sort(descending=True).values.clamp_min(0).sqrt(), rho, atol=1e-8)
    assert bool((rho[:-1] >= rho[1:] - 1e-12).all())


def test_pleas_respects_the_width_budget():
    models, d = pair(), data(20)
    for budget, widths in ((0.0, [4, 8]), (0.5, [6, 12]), (1.0, [8, 16])):
        merged = pleas.merge(models, d, budget=budget)
        assert [merged.meta["widths"][f"res{s}"] for s in range(2)] == widths
        assert merged.spec.validate(merged.backbone)["s1b1"] == widths[1]
    merged = pleas.merge(models, d, budget={"res0": 1.0})
    assert merged.meta["widths"]["res0"] == 8 and merged.meta["widths"]["res1"] == 8
    with pytest.raises(ValueError, match=r"--budget: expected a number in \[0, 1\]"):
        pleas.merge(models, d, budget=1.5)
    clusters = pleas.partial_clusters([torch.randn(50, 6), torch.randn(50, 6)], 9)
    assert len(clusters) == 9 and sum(len(c) == 2 for c in clusters) == 3
    assert all(len({i >= 6 for i in c}) == len(c) for c in clusters)     # a pair is one neuron of each model


def test_pleas_layers_are_least_squares_optima():
    """Every merged layer satisfies the normal equations of ‖X* W*ᵀ + b* − M·Y‖² (ridge 0) where X*
    are the merged model's own inputs of the layer: computed here independently with hooks."""
    torch.manual_seed(0)
    models = [TaskModel("mlp", {"in_dim": 10, "hidden": [8, 6]}, [t]).double() for t in ("mnist:0-4", "mnist:5-9")]
    d = [torch.randn(40, 10, dtype=torch.float64) for _ in range(2)]
    merged = pleas.merge(models, d, budget=0.25, ridge=0.0)
    x = torch.cat(d)
    maps = pleas.partial_maps(models, d, 0.25)
    for l, layer in enumerate(merged.backbone.layers):
        inp = x if l == 0 else F.relu(merged.backbone.preactivations(x)[l - 1])
        y = torch.cat([m.backbone.preactivations(x)[l] for m in models], dim=1) @ maps[f"h{l}"][0].T
        resid = inp @ layer.weight.T + layer.bias - y
        xb = torch.cat([inp, torch.ones(len(inp), 1, dtype=inp.dtype)], dim=1)
        assert (xb.T @ resid).abs().max() < 1e-8


def test_regmean_on_convs_is_its_closed_form_over_patches():
    models, d = pair(), data(10)
    merged = regmean.merge(models, d, alpha=1.0)
    # the stem reads the pixels: its Gram is the Gram of 3x3 pixel patches
    grams = [(lambda c: c.T @ c)(F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 9)) for x in d]
    ws = [m.backbone.stem.weight.flatten(1) for m in models]
    want = torch.linalg.solve(sum(grams), sum(g @ w.T for g, w in zip(grams, ws))).T
    assert torch.allclose(merged.backbone.stem.weight.flatten(1), want, atol=1e-8)


def test_the_reset_is_the_default_for_batchnorm_sources_only():
    bn = [resnet("mnist:0-4", 0), resnet("mnist:5-9", 1)]           # fused: meta["fused_batchnorm"]
    assert all(m.meta.get("fused_batchnorm") for m in bn)
    d = data()
    assert zipit.merge(bn, d).meta["reset_bn"] is True
    assert zipit.merge(bn, d, reset_bn=False).meta["reset_bn"] is False
    mlps = [TaskModel("mlp", {"in_dim": 144, "hidden": [8]}, [t]).double() for t in ("mnist:0-4", "mnist:5-9")]
    assert zipit.merge(mlps, [x.flatten(1) for x in d]).meta["reset_bn"] is False


def test_every_method_merges_resnets_through_the_api():
    models = [resnet("mnist:0-4", 0, torch.float32, fused=False), resnet("mnist:5-9", 1, torch.float32, fused=False)]
    d = data(8, torch.float32)
    for method, opts in [("average", {"reset_bn": True}), ("weight-matching", {"reset_bn": True}),
                         ("permute", {"reset_bn": True}), ("zipit", {"reset_bn": True, "stop_layer": 1}),
                         ("cca", {}), ("pleas", {"budget": 0.5}), ("regmean", {}), ("distill", {"epochs": 1}),
                         ("fs-merge", {"epochs": 1, "param": "diag+lowrank(2)"})]:
        merged = merge(models, d, method=method, **opts)
        out = merged(d[0])
        assert len(out) == 2 and all(torch.isfinite(o).all() for o in out), method


def test_bench_cnn_cell_on_a_toy_scale(monkeypatch, tmp_path, capsys):
    """One bench cell end to end on tiny ResNets and 300 images per split: rows, resumable cells, report."""
    from foldmerge.bench import cnn as bench
    from foldmerge.data import Task
    split = Task.split
    monkeypatch.setattr(Task, "split", lambda self, which: tuple(t[:300] for t in split(self, which)))
    monkeypatch.setattr(bench, "RESNET", {**bench.RESNET, "base": 2})
    monkeypatch.setattr(bench, "SOURCE_TRAINING", {"epochs": 1, "limit": 200})
    monkeypatch.setattr(bench, "PER_TASK", 16)
    monkeypatch.setattr(bench, "TRAINED_EPOCHS", 1)
    methods = ["W.Avg", "ZipIt! 2/3", "PLeaS", "FS-Merge diag (first)"]
    result = bench.run_bench(pairs=("mnist",), widths=(1,), seeds=1, methods=methods, out=str(tmp_path))
    names = [r["method"] for r in result["table"]]
    assert names == ["Originals", "Ensemble"] + methods
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["ZipIt! 2/3"]["mflops"] > rows["W.Avg"]["mflops"] and rows["Ensemble"]["joint"] is not None
    assert all(0 <= r["avg"] <= 100 for r in result["rows"])
    again = bench.run_cell("mnist", 1, 0, tmp_path, methods)          # measured cells are read back, not rerun
    assert [r["seconds"] for r in again] == [r["seconds"] for r in result["rows"]]
    bench.print_report(result, "foldmerge bench cnn (toy)")
    assert "ResNet-8 x1, mnist:0-4 + mnist:5-9" in capsys.readouterr().out


def test_cli_trains_resnet_sources_and_merges_them(tmp_path, monkeypatch, capsys):
    from foldmerge import cli
    from foldmerge.data import Task
    split = Task.split
    monkeypatch.setattr(Task, "split", lambda self, which: tuple(t[:200] for t in split(self, which)))
    out = tmp_path / "src"
    assert cli.main(["train-sources", "--arch", "resnet", "--base", "2", "--tasks", "mnist:0-4", "mnist:5-9",
                     "--epochs", "1", "--limit", "100", "--out", str(out)]) == 0
    a, b = out / "mnist_0-4-s0", out / "mnist_5-9-s1"
    assert cli.main(["merge", str(a), str(b), "--method", "zipit", "--reset-bn", "yes", "--stop-layer", "2",
                     "--per-task", "8", "--out", str(tmp_path / "z")]) == 0
    assert cli.main(["merge", str(a), str(b), "--method", "pleas", "--budget", "0.5", "--per-task", "8",
                     "--out", str(tmp_path / "p")]) == 0
    assert cli.main(["eval", str(tmp_path / "p")]) == 0
    assert cli.main(["merge", str(a), str(b), "--method", "cca", "--budget", "0.5", "--per-task", "8",
                     "--out", str(tmp_path / "c")]) == 2
    assert "--budget does not apply" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_cca_and_pleas_run_on_vits_where_the_spec_allows():
    torch.manual_seed(0)
    models = [TaskModel("vit", {"width": 16, "depth": 1, "heads": 2, "mlp_dim": 16, "out_dim": 8}, [t],
                        head="class-embedding") for t in ("mnist:0-4", "mnist:5-9")]
    d = [torch.randn(10, 1, 28, 28) for _ in models]
    assert set(cca.merge(models, d).meta["spaces"]) == {"res", "feat", "qk0", "v0", "mlp0"}
    assert pleas.merge(models, d).meta["solved_layers"] == 8     # patch embedding, q, k, v, o, fc1, fc2, proj (no bias)
    with pytest.raises(ValueError, match="ties to another"):
        pleas.merge(models, d, budget=0.5)


@pytest.mark.parametrize("method", ["task-arithmetic", "ties"])
def test_task_arithmetic_and_ties_take_a_batchnorm_base_in_memory(method):
    # the base is converted to the form a merge reads, as the sources are (BatchNorm folded), and
    # float64 models read float64 data: with both unconverted the merge always failed
    base = resnet("mnist:0-9", 0, fused=False)
    src = [resnet("mnist:0-4", 1, fused=False), resnet("mnist:5-9", 2, fused=False)]
    merged = merge(src, method=method, base=base, fidelity=8)
    assert merged.meta["method"] == method and set(merged.meta["fidelity"]) == {"mnist:0-4", "mnist:5-9"}
    folded = base.merge_form().backbone.state_dict()
    if method == "task-arithmetic":       # sources equal to the base: zero task vectors give the folded base
        copies = [resnet("mnist:0-4", 3, fused=False), resnet("mnist:5-9", 4, fused=False)]
        for c in copies:
            c.backbone.load_state_dict(base.backbone.state_dict())
        same = merge(copies, method=method, base=base, fidelity=0)
        for k, v in same.backbone.state_dict().items():
            torch.testing.assert_close(v, folded[k], rtol=0, atol=1e-12, msg=k)
