"""The ViT family: shapes, patch projection = strided convolution, layer list, clear errors."""
import pytest
import torch
from torch.nn import functional as F

import foldmerge
from foldmerge.arch import vit
from foldmerge.model import TaskModel
from foldmerge.supernet import SuperNet


def merge_as_made(*args, **kwargs):
    """foldmerge.merge without the routing calibration: the heads as the method made them."""
    return foldmerge.merge(*args, calibrate="none", **kwargs)


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
    from foldmerge.methods.regmean import linear_layers
    m = model()
    layers = linear_layers(m)
    assert len(layers) == 1 + 6 * 2 + 1
    assert layers[0] is m.backbone.patch_proj and layers[-1] is m.backbone.proj


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
        vit.check_compatible([model().backbone_config, model(heads=4).backbone_config])
    with pytest.raises(ValueError, match="not divisible by the 2 attention heads"):
        SuperNet([model(), model("mnist:5-9", 1)], widths=[15])
    with pytest.raises(ValueError, match="one or two target widths"):      # never silently dropped
        SuperNet([model(), model("mnist:5-9", 1)], widths=[8, 16, 99])


# ------------------------------------------------------------------- Foldable SuperNet
TASKS = ["mnist:0-4", "mnist:5-9", "fmnist:0-4"]


def sources64(n, widths=None, mlps=None):
    widths = widths or [16] * n
    mlps = mlps or [32] * n
    return [model(TASKS[k], k, width=widths[k], mlp_dim=mlps[k]).double() for k in range(n)]


@pytest.mark.parametrize("param", ["full", "diag", "diag+lowrank(3)"])
@pytest.mark.parametrize("n,widths,target", [(2, [16, 16], None), (3, [16, 16, 16], None),
                                             (2, [16, 24], [20, 40]), (3, [16, 24, 12], [12, 24])])
def test_folded_vit_equals_supernet(param, n, widths, target):
    src = sources64(n, widths, [2 * w for w in widths])
    sn = SuperNet(src, widths=target, param=param, init="random", seed=3).double()
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    wide = sn(x, form="supernet")
    folded = sn(x, form="folded")
    plain = sn.fold()
    assert torch.allclose(wide, folded, atol=1e-10)
    assert torch.allclose(plain.features(x), wide, atol=1e-10)
    assert plain.backbone.width == (target[0] if target else widths[0])
    # heads: head_k(U_out[k] f*) == folded head k
    recon = sn.reconstruct(wide)
    for i, (k, out) in enumerate(zip(sn.head_owner, plain(x))):
        assert torch.allclose(out, F.linear(recon[k], *sn.head(i)), atol=1e-10)


@pytest.mark.parametrize("overwrite", [False, True])
def test_folded_vit_follows_its_sources_when_converted(overwrite):
    # The fold plan is built once per SuperNet from the names of its source tensors: `.double()`
    # replaces them (its own copies; under torch's overwrite mode too), in-place edits change them.
    src = [model(TASKS[k], k) for k in range(2)]
    sn = SuperNet(src, param="diag+lowrank(3)", init="random", seed=3)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(sn(x, form="folded"), sn(x, form="supernet"))      # float32, plan built
    torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    try:
        sn = sn.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    x = x.double()
    assert torch.allclose(sn(x, form="folded"), sn(x, form="supernet"), atol=1e-10)
    assert all(p.dtype == torch.float32 for s in src for p in s.parameters())     # the callers' models stay
    # the stacked sources are cached too: an in-place edit of a source (contents, not storage) is seen
    with torch.no_grad():
        for k in range(2):
            sn.source("patch_proj.weight", k).mul_(1.5)
            sn.source("pos", k).add_(0.1)
            sn.source("blocks.1.fc2.bias", k).sub_(0.2)
    assert torch.allclose(sn(x, form="folded"), sn(x, form="supernet"), atol=1e-10)


def test_replacing_any_sources_tensor_is_folded():
    # every step reads the current tensors: replacing model 2's (not only model 1's) is seen
    sn = SuperNet([model(TASKS[k], k).double() for k in range(2)], param="diag+lowrank(3)", init="random", seed=3)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    before = sn(x, form="folded").detach()
    name = sn._src["blocks.1.fc1.weight"][1]
    setattr(sn, name, torch.randn_like(sn.source("blocks.1.fc1.weight", 1)))
    after = sn(x, form="folded")
    assert not torch.allclose(after, before)
    assert torch.allclose(after, sn(x, form="supernet"), atol=1e-10)


def test_a_supernet_never_changes_its_inputs():
    src = [model(TASKS[k], k) for k in range(2)]
    snapshot = [{k: (v.clone(), v.requires_grad, v.dtype) for k, v in s.named_parameters()} for s in src]
    sn = SuperNet(src, param="diag+lowrank(3)", init="random", seed=3).double()
    sn(torch.randn(2, 1, 28, 28, dtype=torch.float64)).sum().backward()
    foldmerge.merge(src, [torch.randn(4, 1, 28, 28)] * 2, method="fs-merge", epochs=2, lr=1e-3)
    for s, snap in zip(src, snapshot):
        for k, v in s.named_parameters():
            value, flag, dtype = snap[k]
            assert v.requires_grad == flag and v.dtype == dtype and torch.equal(v, value), k
            assert v.grad is None


@pytest.mark.parametrize("param", ["full", "diag", "diag+lowrank(3)"])
@pytest.mark.parametrize("n,widths,target", [(2, [16, 16], None), (3, [16, 24, 12], [12, 24])])
def test_vit_folded_and_supernet_forms_give_same_loss_and_gradients(param, n, widths, target):
    # training in folded form is training the SuperNet: same loss, same gradient for every map and norm
    from foldmerge.methods.common import reconstruction_loss
    src = sources64(n, widths, [2 * w for w in widths])
    sn = SuperNet(src, widths=target, param=param, init="random", seed=4).double()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    owner = torch.arange(6) % n
    targets = [s.features(x).detach() for s in src]
    got = {}
    for form in ("folded", "supernet"):
        sn.zero_grad(set_to_none=True)
        loss = reconstruction_loss(sn.reconstruct(sn(x, form=form)), targets, owner)
        loss.backward()
        got[form] = (loss.detach(), {k: p.grad.clone() for k, p in sn.named_parameters() if p.requires_grad})
    torch.testing.assert_close(got["folded"][0], got["supernet"][0], rtol=0, atol=1e-10)
    assert got["folded"][1].keys() == got["supernet"][1].keys() and len(got["folded"][1]) > 10
    for k, g in got["folded"][1].items():
        torch.testing.assert_close(g, got["supernet"][1][k], rtol=1e-7, atol=1e-10, msg=k)
    assert all(not b.requires_grad for b in sn.buffers())


@pytest.mark.parametrize("param", ["diag", "diag+lowrank(3)"])
def test_vit_folded_form_runs_under_bf16_autocast(param):
    # the structured fold runs in float32 inside autocast (its hand-written backward mixes no
    # dtypes); the step's other matmuls are bfloat16, so the gradients agree only roughly
    from foldmerge.methods.common import reconstruction_loss
    src = [s.float() for s in sources64(2, [16, 16], [32, 32])]
    sn = SuperNet(src, param=param, init="random", seed=4)
    x = torch.randn(6, 1, 28, 28)
    targets = [s.features(x).detach() for s in src]
    grads = {}
    for bf16 in (False, True):
        sn.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = reconstruction_loss(sn.reconstruct(sn(x, form="folded")), targets, torch.arange(6) % 2)
        loss.backward()
        grads[bf16] = torch.cat([p.grad.flatten() for p in sn.parameters() if p.requires_grad])
    assert grads[True].dtype == torch.float32
    assert (grads[True] - grads[False]).norm() < 0.1 * grads[False].norm()


def test_vit_distillation_output_map_is_fixed_by_default_and_heads_stay_shared():
    src = [TaskModel("vit", CFG, [TASKS[k]], head="class-embedding") for k in range(2)]
    data = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    opts = dict(method="distill", init="first", epochs=3, lr=1e-3, optimizer="adamw", batch_size=8)
    fixed = merge_as_made(src, data, **opts)
    assert fixed.meta["output_map"] == "fixed" and fixed.meta["targets"] == "own-task"
    assert fixed.meta["learnable_parameters"] == sum(p.numel() for p in src[0].backbone.parameters())
    for head, source_head in zip(fixed.heads, [h for s in src for h in s.heads]):
        assert torch.equal(head.weight, source_head.weight)      # the shared class embeddings
    learned = merge_as_made(src, data, output_map="learned", **opts)
    assert learned.meta["learnable_parameters"] == fixed.meta["learnable_parameters"] + 8 * 16
    assert not torch.equal(learned.heads[1].weight, src[1].heads[0].weight)
    with pytest.raises(ValueError, match="--output-map: expected one of learned, fixed"):
        merge_as_made(src, data, output_map="free", **opts)


@pytest.mark.parametrize("param", ["full", "diag+lowrank(4)"])
@pytest.mark.parametrize("n", [2, 3])
def test_vit_first_init_folds_to_model_one(param, n):
    src = sources64(n)
    plain = SuperNet(src, param=param, init="first").double().fold()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    assert torch.equal(plain.features(x), src[0].features(x))
    assert torch.equal(plain(x)[0], src[0](x)[0])


def test_vit_global_fs_merge_trains_and_folds():
    src = [model(TASKS[k], k) for k in range(2)]
    data = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    merged = foldmerge.merge(src, data, method="fs-merge", variant="global", epochs=60, lr=0.05,
                             schedule="constant")
    assert merged.meta["param"] == "diag+lowrank(16)" and merged.meta["targets"] == "own-task"
    assert merged.meta["final_loss"] < merged.meta["initial_loss"]
    # learnable: the maps and merged norms only, never the frozen source weights
    sn = SuperNet(src, param="diag+lowrank(16)")
    maps = sum(getattr(m, name).numel() for m in sn.modules() if type(m).__name__ == "FoldMap"
               for name in m._param_names())
    norms = sum(p.numel() for p in sn.norm_params)
    assert norms == (2 * 2 + 1) * 2 * 16        # two LayerNorms a block and the final one, weight and bias
    assert merged.meta["learnable_parameters"] == maps + norms
    assert merged.arch == "vit" and merged.backbone.width == 16


def test_vit_mismatch_errors_are_clear():
    a = model("mnist:0-4", 0)
    with pytest.raises(ValueError, match="different depths"):
        SuperNet([a, model("mnist:5-9", 1, depth=3)])
    with pytest.raises(ValueError, match="different attention head counts"):
        SuperNet([a, model("mnist:5-9", 1, heads=4)])


def test_class_embedding_heads_are_fixed_shared_and_frozen(tmp_path):
    from foldmerge.model import class_embeddings
    a = TaskModel("vit", CFG, ["mnist:0-4"], head="class-embedding")
    b = TaskModel("vit", CFG, ["mnist:0-4"], head="class-embedding")
    c = TaskModel("vit", CFG, ["mnist/rot90:0-4"], head="class-embedding")
    assert torch.equal(a.heads[0].weight, b.heads[0].weight)          # same task, same head
    assert not torch.allclose(a.heads[0].weight, c.heads[0].weight)    # another task, another head
    assert a.heads[0].bias is None and not a.heads[0].weight.requires_grad
    assert torch.allclose(class_embeddings("mnist:0-4", 8).norm(dim=1), torch.ones(5))
    a.save(tmp_path / "m")
    back = foldmerge.load(tmp_path / "m")
    assert back.head_kind == "class-embedding" and torch.equal(back.heads[0].weight, a.heads[0].weight)


def test_two_stage_vit_source_training_learns():
    from foldmerge.sources import train_vit_source
    m = train_vit_source("mnist:0-4", CFG, seed=0, pretrain_task="fmnist:0-4", pretrain_epochs=1,
                         epochs=2, limit=600)
    assert m.meta["pretrain_task"] == "fmnist:0-4" and m.head_kind == "class-embedding"
    assert m.meta["val_accuracy"] > 40.0          # far above the 20% of guessing, from 600 images


# ------------------------------------------------------------------------------ opt (OT fusion)
def permuted_copy(m, seed=5):
    """The same function with the residual stream, each head's q/k and v dims and the MLP
    hidden units permuted (a ViT has these symmetries)."""
    import copy
    g = torch.Generator().manual_seed(seed)
    b = copy.deepcopy(m)
    bb = b.backbone
    d, heads, md = bb.width, bb.heads, bb.mlp_dim
    hd = d // heads
    P = torch.randperm(d, generator=g)

    def within_heads():
        return torch.cat([h * hd + torch.randperm(hd, generator=g) for h in range(heads)])

    with torch.no_grad():
        bb.patch_proj.weight.copy_(bb.patch_proj.weight[P]); bb.patch_proj.bias.copy_(bb.patch_proj.bias[P])
        bb.cls.copy_(bb.cls[P]); bb.pos.copy_(bb.pos[:, P])
        for blk in bb.blocks:
            qk, v, hm = within_heads(), within_heads(), torch.randperm(md, generator=g)
            for ln in (blk.ln1, blk.ln2):
                ln.weight.copy_(ln.weight[P]); ln.bias.copy_(ln.bias[P])
            for lin, rows in ((blk.q, qk), (blk.k, qk), (blk.v, v)):
                lin.weight.copy_(lin.weight[rows][:, P]); lin.bias.copy_(lin.bias[rows])
            blk.o.weight.copy_(blk.o.weight[P][:, v]); blk.o.bias.copy_(blk.o.bias[P])
            blk.fc1.weight.copy_(blk.fc1.weight[hm][:, P]); blk.fc1.bias.copy_(blk.fc1.bias[hm])
            blk.fc2.weight.copy_(blk.fc2.weight[P][:, hm]); blk.fc2.bias.copy_(blk.fc2.bias[P])
        bb.ln_post.weight.copy_(bb.ln_post.weight[P]); bb.ln_post.bias.copy_(bb.ln_post.bias[P])
        bb.proj.weight.copy_(bb.proj.weight[:, P])
    return b


def test_opt_hard_alignment_recovers_a_permuted_copy_exactly():
    a = model("mnist:0-4", 0).double()
    b = permuted_copy(a)
    b.tasks = [foldmerge.data.Task.parse("mnist:5-9")]
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    assert torch.allclose(a.features(x), b.features(x), atol=1e-10)          # the copy is the same function
    assert not torch.allclose(a.backbone.blocks[0].fc1.weight, b.backbone.blocks[0].fc1.weight)
    assert not torch.allclose(foldmerge.merge([a, b], [x, x], method="average").features(x), a.features(x), atol=1e-3)
    data = [torch.randn(12, 1, 28, 28, dtype=torch.float64) for _ in range(2)]
    fused = foldmerge.merge([a, b], data, method="opt", filter="full", reg=0.0)
    assert torch.allclose(fused.features(x), a.features(x), atol=1e-8)


@pytest.mark.parametrize("filter_,reg", [("cls", 0.0), ("window-4", 0.05), ("full", 0.05)])
def test_opt_runs_soft_and_windowed(filter_, reg):
    a, c = model("mnist:0-4", 0), model("mnist:5-9", 1)
    data = [torch.randn(6, 1, 28, 28) for _ in range(2)]
    fused = foldmerge.merge([a, c], data, method="opt", filter=filter_, reg=reg)
    assert torch.isfinite(fused.features(torch.randn(2, 1, 28, 28))).all()
    assert fused.meta["hard"] == (reg == 0.0)


def test_opt_bad_input():
    a, c = model("mnist:0-4", 0), model("mnist:5-9", 1)
    data = [torch.randn(4, 1, 28, 28)] * 2
    with pytest.raises(ValueError, match=r"--filter: expected cls \| full \| window-K"):
        foldmerge.merge([a, c], data, method="opt", filter="rows")
    with pytest.raises(ValueError, match="window must hold"):
        foldmerge.merge([a, c], data, method="opt", filter="window-99")
    with pytest.raises(ValueError, match="identical hidden widths; space 'mlp0' is"):
        foldmerge.merge([a, model("mnist:5-9", 1, mlp_dim=48)], data, method="opt")


def test_vit_bench_plan_options_are_accepted_and_bad_arguments_are_clear(capsys):
    from foldmerge.bench import vit as bench_vit
    from foldmerge.cli import main
    from foldmerge.methods import get_method
    for name, method, opts in bench_vit.method_plan():
        assert set(opts) <= {o.name for o in get_method(method).options}, name
    assert len({t for pair in bench_vit.PAIRS for t in pair} | {bench_vit.PRETRAIN_TASK}) >= 6
    assert main(["bench", "vit", "--pairs", "9"]) == 2
    assert "--pairs must lie" in capsys.readouterr().err
    # groups: disjoint tasks with their own seeds; FS-Merge seq. only where more than two models merge
    assert bench_vit.groups("groups4") == [[0, 1, 2, 3], [4, 5, 6, 7]] and bench_vit.groups("groups8") == [list(range(8))]
    assert len(set(bench_vit.TASKS)) == 8 and bench_vit.PRETRAIN_TASK not in bench_vit.TASKS
    assert "fs-merge seq diag+lowrank(12)" in [n for n, _, _ in bench_vit.method_plan(group_size=4)]
    assert "fs-merge seq diag+lowrank(12)" not in [n for n, _, _ in bench_vit.method_plan()]
    seq = dict((n, o) for n, _, o in bench_vit.method_plan(group_size=4))["fs-merge seq diag+lowrank(12)"]
    assert seq["variant"] == "seq" and set(seq) <= {o.name for o in get_method("fs-merge").options}
    low = dict((n, o) for n, _, o in bench_vit.method_plan(group_size=4))["fs-merge diag+lowrank(12)"]
    assert seq["last_epochs"] == low["epochs"] and seq["epochs"] == low["epochs"] // 4 and seq["lr"] == low["lr"]


def test_vit_bench_tuning_picks_the_best_validation_trial(monkeypatch):
    from foldmerge.bench import vit as bench_vit
    scores = {("regmean", 0.5): 60.0, ("distill", (2, 1e-3)): 70.0, ("fs-merge diag", (1, 1e-2)): 80.0}
    seen = []

    def fake_merge(sources, data, method, seed, **opts):
        seen.append((method, opts))
        m = model()
        m.meta = {"wall_seconds": 0.0, "opts": opts, "method": method}
        return m

    def fake_eval(merged, split="test"):
        assert split == "val"                      # never chosen on test
        o = merged.meta["opts"]
        key = {"regmean": ("regmean", o.get("alpha")), "opt": ("opt", None),
               "zipit": ("zipit", (o.get("alpha"), o.get("beta")))}.get(merged.meta["method"])
        if key is None:
            key = ("distill" if merged.meta["method"] == "distill" else "fs-merge " + o["param"],
                   (o["epochs"], o["lr"]))
        return {"per_task_mean": scores.get(key, 50.0)}

    monkeypatch.setattr(bench_vit, "merge", fake_merge)
    monkeypatch.setattr(bench_vit, "evaluate", fake_eval)
    scores[("zipit", (0.5, 1.0))] = 75.0
    grid = {"regmean_alpha": [0.9, 0.5], "opt": [("cls", 0.0)], "zipit": [(0.3, 0.0), (0.5, 1.0)],
            "distill": [(1, 1e-3), (2, 1e-3)], "fs-merge diag": [(1, 1e-2), (1, 1e-3)],
            "fs-merge diag+lowrank(12)": [(1, 1e-4)]}
    tuned = bench_vit.tune([], [], grid=grid)
    assert tuned["regmean_alpha"] == 0.5 and tuned["distill"] == [2, 1e-3] and tuned["fs-merge diag"] == [1, 1e-2]
    assert tuned["zipit"] == [0.5, 1.0]
    assert len(tuned["trials"]) == len(seen) == 10
    # a cached choice without the zipit row: only zipit is searched, the rest kept
    seen.clear()
    again = bench_vit.tune([], [], grid=grid, have={k: v for k, v in tuned.items() if k != "zipit"})
    assert [m for m, _ in seen] == ["zipit", "zipit"] and again["zipit"] == [0.5, 1.0]
    assert again["distill"] == tuned["distill"] and len(again["trials"]) == 12
    # --methods zipit permute: only zipit's values are searched
    seen.clear()
    assert bench_vit.choice_keys(["zipit", "permute"]) == ["zipit"]
    assert bench_vit.choice_keys(["fs-merge"], 4) == ["fs-merge diag", "fs-merge diag+lowrank(12)"]
    assert bench_vit.choice_keys(["fs-merge seq diag+lowrank(12)"], 4) == ["fs-merge diag+lowrank(12)"]
    only = bench_vit.tune([], [], grid=grid, keys=bench_vit.choice_keys(["zipit", "permute"]))
    assert [m for m, _ in seen] == ["zipit", "zipit"] and set(only) == {"zipit", "trials"}
    plan = {name: opts for name, _, opts in bench_vit.method_plan(tuned)}
    assert plan["distill"]["epochs"] == 2 and plan["regmean"]["alpha"] == 0.5
    assert all(o["optimizer"] == "adamw" for n, o in plan.items() if "epochs" in o)


@pytest.mark.parametrize("method,opts", [("average", {}), ("slerp", {}), ("regmean", {}), ("zipit", {}),
                                         ("permute", {}), ("opt", {}),
                                         ("distill", dict(epochs=1, lr=1e-3, optimizer="adamw")),
                                         ("fs-merge", dict(epochs=1, lr=1e-3, optimizer="adamw"))])
def test_every_merge_keeps_the_sources_frozen_class_embedding_heads(method, opts, tmp_path):
    src = [TaskModel("vit", CFG, [TASKS[k]], head="class-embedding") for k in range(2)]
    merged = foldmerge.merge(src, [torch.randn(6, 1, 28, 28) for _ in range(2)], method=method, **opts)
    assert merged.head_kind == "class-embedding" and not merged.head_bias
    assert all(not h.weight.requires_grad for h in merged.heads)
    merged.save(tmp_path / "m")
    back = foldmerge.load(tmp_path / "m")
    assert back.head_kind == "class-embedding"
    for a, b in zip(back.heads, merged.heads):          # an adapted head (head_k · U_out[k]) survives a reload
        assert torch.equal(a.weight, b.weight)


def test_fs_merge_zipit_init_on_vits_folds_to_zipits_merge_and_trains():
    src = [TaskModel("vit", CFG, [TASKS[k]], head="class-embedding") for k in range(2)]
    data = [torch.randn(8, 1, 28, 28) for _ in range(2)]
    z = foldmerge.merge(src, data, method="zipit", alpha=0.5, beta=0.5)
    fs = foldmerge.merge(src, data, method="fs-merge", init="zipit", param="full", epochs=0,
                         zipit_alpha=0.5, zipit_beta=0.5)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for a, b in zip(z(x), fs(x)):
            assert torch.allclose(a, b, atol=1e-5)
    trained = foldmerge.merge(src, data, method="fs-merge", init="zipit", param="full", epochs=20, lr=1e-3,
                              optimizer="adamw", zipit_alpha=0.5, zipit_beta=0.5)
    assert trained.meta["final_loss"] < trained.meta["initial_loss"]
