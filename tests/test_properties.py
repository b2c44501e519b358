"""Property-based checks (hypothesis, bounded): random malformed input gets a one-line error or a
valid result, never a traceback and never a file written on error; random small MLPs and ViTs
with random maps fold to the function their SuperNet computes."""
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import foldmerge
from foldmerge import cli
from foldmerge.io import ModelFileError
from foldmerge.loading import load as load_model
from foldmerge.model import TaskModel
from foldmerge.supernet import SuperNet

FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    for k, task in enumerate(["mnist:0-4", "mnist:5-9"]):
        torch.manual_seed(k)
        TaskModel("mlp", {"in_dim": 784, "hidden": [8, 8]}, [task]).save(root / f"m{k}")
    return root


def one_line_or_result(code, err, out: Path):
    assert code in (0, 2), err
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("foldmerge: error:"), err
        assert not out.exists(), "a file was written on error"
    else:
        model = load_model(out)                     # a valid, finite model
        assert all(torch.isfinite(t).all() for t in model.state_dict().values())


WORDS = st.sampled_from(["0", "-1", "-4", "1", "2", "3", "0.5", "nan", "inf", "-inf", "1e9", "x", "", "full",
                         "diag", "diag+lowrank(2)", "diag+lowrank(-1)", "lowrank", "first", "zipit", "none",
                         "match", "global", "local", "seq", "cosine", "adamw", "1,2", "alpha=0.5"])
FLAGS = ["--variant", "--param", "--init", "--widths", "--lr", "--momentum", "--schedule", "--warmup",
         "--weight-decay", "--batch-size", "--optimizer", "--targets", "--target-scale", "--form", "--alpha",
         "--beta", "--stop-layer", "--t", "--filter", "--reg", "--per-task", "--augment", "--seed", "--select",
         "--calibrate", "--output-map", "--zipit-alpha", "--zipit-beta", "--regmean-alpha", "--last-epochs"]


@FAST
@given(method=st.sampled_from(["average", "slerp", "regmean", "zipit", "permute", "opt", "fs-merge", "distill",
                               "nonsense"]),
       options=st.lists(st.tuples(st.sampled_from(FLAGS), WORDS), max_size=4),
       epochs=st.integers(-1, 3))
def test_random_merge_command_lines_end_in_one_line_or_a_model(saved, tmp_path_factory, capsys, monkeypatch,
                                                               method, options, epochs):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")
    out = tmp_path_factory.mktemp("o") / "merged"
    argv = ["merge", str(saved / "m0"), str(saved / "m1"), "--method", method, "--out", str(out),
            "--threads", "1"]
    opts = dict(options)
    opts.setdefault("--per-task", "4")
    if "--augment" in opts and opts["--augment"] not in ("0", "1", "2", "3"):
        opts["--augment"] = opts["--augment"]      # malformed stays malformed; a valid count stays small
    if method in ("fs-merge", "distill"):
        argv += ["--epochs", str(epochs)]          # bounded: the property is about input, not training time
    for flag, value in opts.items():
        argv += [flag, value] if not value.startswith("-") else [f"{flag}={value}"]
    code = cli.main(argv)
    one_line_or_result(code, capsys.readouterr().err, out)


BACKBONES = st.fixed_dictionaries({}, optional={
    "in_dim": st.one_of(st.integers(-3, 900), st.text(max_size=3), st.none(), st.floats(allow_nan=True)),
    "hidden": st.one_of(st.lists(st.integers(-3, 20), max_size=3), st.integers(-2, 5), st.text(max_size=3)),
    "bogus": st.integers()})


@FAST
@given(arch=st.sampled_from(["mlp", "vit", "cnn", 3]), backbone=BACKBONES,
       tasks=st.one_of(st.just(["mnist:0-4"]), st.lists(st.sampled_from(["mnist:0-4", "x", "mnist:11", ""]),
                                                       max_size=2)),
       head=st.sampled_from(["linear", "class-embedding", "other", None]))
def test_random_configs_load_or_get_one_clear_error(tmp_path_factory, arch, backbone, tasks, head):
    d = tmp_path_factory.mktemp("cfg")
    cfg = {"arch": arch, "backbone": backbone, "tasks": tasks, **({"head": head} if head else {})}
    (d / "config.json").write_text(json.dumps(cfg))
    try:
        model = TaskModel.from_config(cfg)
    except Exception:
        model = None
    if model is not None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    else:
        (d / "model.safetensors").write_bytes(b"")
    try:
        loaded = load_model(d)
    except ModelFileError as e:
        assert len(str(e).splitlines()) == 1
        return
    assert model is not None and loaded.config() == model.config()


@FAST
@given(shape=st.lists(st.integers(0, 30), min_size=0, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool]),
       fill=st.sampled_from([0.0, 1.0, float("nan"), float("inf")]), count=st.integers(0, 3),
       method=st.sampled_from(["average", "regmean", "zipit"]))
def test_random_api_data_gets_a_clear_error_or_a_merge(saved, shape, dtype, fill, count, method):
    models = [load_model(saved / "m0"), load_model(saved / "m1")]
    data = [torch.full(shape, fill).to(dtype) for _ in range(count)]
    try:
        merged = foldmerge.merge(models, data, method=method)
    except ValueError as e:
        assert len(str(e).splitlines()) == 1
        return
    assert all(torch.isfinite(t).all() for t in merged.state_dict().values())


# ----------------------------------------------------------------------- folding
def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(n=st.integers(2, 3), depth=st.integers(1, 3), widths=st.lists(st.integers(2, 12), min_size=3, max_size=3),
       param=st.sampled_from(["full", "diag", "diag+lowrank(2)"]), init=st.sampled_from(["first", "average", "random"]),
       target=st.booleans(), seed=st.integers(0, 10_000))
def test_random_mlps_and_maps_fold_to_the_supernet(n, depth, widths, param, init, target, seed):
    torch.manual_seed(seed)
    tasks = ["mnist:0-4", "mnist:5-9", "fmnist:0-4"]
    hidden = widths[:depth]
    sources = [TaskModel("mlp", {"in_dim": 7, "hidden": hidden}, [tasks[k]]).double() for k in range(n)]
    tw = [max(1, w - 1) for w in hidden] if target else None
    sn = SuperNet(sources, widths=tw, param=param, init=init, seed=seed).double()
    _perturb(sn, seed)
    x = torch.randn(5, 7, dtype=torch.float64)
    wide = sn(x, form="supernet")
    torch.testing.assert_close(sn(x, form="folded"), wide, rtol=0, atol=1e-9)
    recon = sn.reconstruct(wide)
    for i, out in enumerate(sn.fold()(x)):
        torch.testing.assert_close(out, F.linear(recon[sn.head_owner[i]], *sn.head(i)), rtol=0, atol=1e-9)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(n=st.integers(2, 3), heads=st.sampled_from([1, 2]), per_head=st.integers(2, 4), depth=st.integers(1, 2),
       param=st.sampled_from(["full", "diag", "diag+lowrank(2)"]), seed=st.integers(0, 10_000))
def test_random_vits_and_maps_fold_to_the_supernet(n, heads, per_head, depth, param, seed):
    torch.manual_seed(seed)
    width = heads * per_head
    cfg = {"image_size": 8, "channels": 1, "patch": 4, "width": width, "depth": depth, "heads": heads,
           "mlp_dim": 2 * width, "out_dim": width}
    tasks = ["mnist:0-4", "mnist:5-9", "fmnist:0-4"]
    sources = [TaskModel("vit", cfg, [tasks[k]]).double() for k in range(n)]
    sn = SuperNet(sources, param=param, init="random", seed=seed).double()
    _perturb(sn, seed)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    wide = sn(x, form="supernet")
    torch.testing.assert_close(sn(x, form="folded"), wide, rtol=0, atol=1e-9)
    torch.testing.assert_close(sn.fold().features(x), wide, rtol=0, atol=1e-9)


# ------------------------------------------------------- any JSON in any field of a config file
JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 40) | st.floats(-1e3, 1e3, width=32) |
                    st.text(max_size=5), lambda inner: st.lists(inner, max_size=3) |
                    st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def config_files(tmp_path_factory):
    """One model directory of each config kind: foldmerge's MLP, ResNet and gated MLP, a Hugging Face BERT."""
    from transformers import BertConfig, BertForSequenceClassification
    root = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, ["mnist:0-4"]).save(root / "mlp")
    TaskModel("resnet", {"base": 4, "blocks": 1, "stages": 1}, [{"name": "own", "labels": ["a", "b", "c"]}],
              head="class-embedding").save(root / "resnet")
    from foldmerge.gated import GatedModel
    GatedModel("mlp", {"in_dim": 784, "hidden": [8]}, ["mnist:0-4", "mnist:5-9"],
               gated=["layers.0.weight", "layers.0.bias"]).save(root / "gated")
    BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=16, max_position_embeddings=16, num_labels=3)
                                  ).save_pretrained(root / "bert")
    return root


FIELDS = {"mlp": [(), ("arch",), ("backbone",), ("backbone", "in_dim"), ("backbone", "hidden"), ("tasks",),
                  ("tasks", 0), ("head_bias",), ("head",), ("kind",), ("meta",), ("new",)],
          "resnet": [("backbone", "base"), ("backbone", "batchnorm"), ("backbone", "widths"), ("tasks", 0, "labels"),
                     ("tasks", 0, "name"), ("tasks", 0), ("head",)],
          "gated": [("kind",), ("gated",), ("gated", 0), ("gate",), ("gate", "width"), ("gate", "channels"), ("gate", "new"), ("tasks", 1)],
          "bert": [(), ("model_type",), ("architectures",), ("id2label",), ("hidden_size",), ("num_attention_heads",),
                   ("vocab_size",), ("layer_norm_eps",), ("hidden_act",), ("pad_token_id",), ("foldmerge_task",)]}


def _set(cfg, path, value):
    if not path:
        return value
    cfg = json.loads(json.dumps(cfg))
    at = cfg
    for p in path[:-1]:
        at = at[p]
    at[path[-1]] = value
    return cfg


MANY = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@MANY
@given(kind_field=st.sampled_from([(k, f) for k, fs in FIELDS.items() for f in fs]), value=JSON)
def test_any_json_in_any_field_of_a_model_config_loads_or_gets_one_line(config_files, tmp_path_factory,
                                                                       kind_field, value):
    import shutil
    kind, field = kind_field
    d = tmp_path_factory.mktemp("c") / kind
    shutil.copytree(config_files / kind, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(_set(cfg, field, value)))
    before = sorted(p.name for p in d.iterdir())
    try:
        model = load_model(d)
    except (ModelFileError, ValueError) as e:
        assert len(str(e).splitlines()) == 1, str(e)
    else:
        assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert sorted(p.name for p in d.iterdir()) == before            # reading writes nothing


@MANY
@given(kind=st.sampled_from(["mlp", "resnet", "bert"]), cut=st.integers(0, 120), junk=st.binary(max_size=40),
       header=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_any_bytes_in_a_weight_file_s_header_load_or_get_one_line(config_files, tmp_path_factory, kind, cut, junk,
                                                                  header):
    """A safetensors file is an 8-byte header length, a JSON header, the tensors: damaged anywhere in
    its first bytes (length, header, truncation), it is refused in one line."""
    import shutil
    d = tmp_path_factory.mktemp("w") / kind
    shutil.copytree(config_files / kind, d)
    data = (d / "model.safetensors").read_bytes()
    length = data[:8] if header is None else header.to_bytes(8, "little")
    (d / "model.safetensors").write_bytes(length + data[8:8 + cut] + junk + data[8 + cut + len(junk):])
    try:
        model = load_model(d)
    except (ModelFileError, ValueError) as e:
        assert len(str(e).splitlines()) == 1, str(e)
    else:
        assert all(torch.isfinite(t).all() for t in model.state_dict().values())


@MANY
@given(which=st.sampled_from(["state.json", "state.safetensors"]), at=st.integers(0, 400), junk=st.binary(max_size=16))
def test_any_bytes_in_a_checkpoint_are_refused_in_one_line(tmp_path_factory, which, at, junk):
    from foldmerge.checkpoint import Checkpoint, CheckpointError
    where = tmp_path_factory.mktemp("ck") / "run.resume"
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    Checkpoint(where, 1, {"run": 1}).save(0, 1, 1, [p], opt, torch.Generator().manual_seed(0), [0.5])
    data = (where / which).read_bytes()
    changed = data[:at] + junk + data[at + len(junk):]
    (where / which).write_bytes(changed)
    try:
        Checkpoint(where, None, {"run": 1}, resume=True)
    except CheckpointError as e:
        assert len(str(e).splitlines()) == 1
    else:
        assert changed == data              # only an unchanged checkpoint resumes


CHECKPOINT_FIELDS = [(), ("fingerprint",), ("every",), ("finished",), ("current",), ("current", "fit"),
                     ("current", "epoch"), ("current", "step"), ("current", "history"), ("current", "opt_state"),
                     ("current", "opt_state", "0"), ("current", "param_groups"), ("current", "param_groups", 0),
                     ("current", "param_groups", 0, "lr"), ("new",)]


@MANY
@given(field=st.sampled_from(CHECKPOINT_FIELDS), value=JSON)
def test_any_json_in_any_field_of_a_checkpoint_with_its_hash_made_again_resumes_or_gets_one_line(
        tmp_path_factory, field, value):
    """An adversary who knows the hash: a state.json of any shape, hashed anew, resumes into the same
    kind of run or is refused in one line, never a traceback."""
    from foldmerge.checkpoint import STATE, TENSORS, Checkpoint, CheckpointError, _integrity
    where = tmp_path_factory.mktemp("ck") / "run.resume"
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    Checkpoint(where, 1, {"run": 1}).save(0, 1, 1, [p], opt, torch.Generator().manual_seed(0), [0.5])
    state = _set(json.loads((where / STATE).read_text()), field, value)
    if isinstance(state, dict):
        state["integrity"] = _integrity(where / TENSORS, state)
    (where / STATE).write_text(json.dumps(state))
    q = torch.nn.Parameter(torch.zeros(3))
    resumed = torch.optim.Adam([q], lr=0.1)
    try:
        ck = Checkpoint(where, None, {"run": 1}, resume=True)
        epoch, step, history = ck.restore(0, [q], resumed, torch.Generator())
    except CheckpointError as e:
        assert len(str(e).splitlines()) == 1, str(e)
    else:
        assert torch.isfinite(q).all() and isinstance(epoch, int) and isinstance(step, int)
        q.grad = torch.ones(3)
        resumed.step()                         # a resumed state trains on (a bad one fails at its first step)
        assert torch.isfinite(q).all()


YAML_BASE = {"models": [{"path": "m0", "task": "mnist:0-4"}, {"path": "m1", "task": "mnist:5-9"}],
             "method": "fs-merge", "options": {"param": "diag", "epochs": 3, "widths": [10]}, "per_task": 8,
             "seed": 4, "out": "out"}
YAML_FIELDS = [(), ("models",), ("models", 0), ("models", 0, "path"), ("models", 0, "task"), ("models", 1, "data"),
               ("models", 1, "eval_data"), ("method",), ("options",), ("options", "param"), ("options", "epochs"),
               ("options", "lr"), ("options", "widths"), ("options", "init"), ("per_task",), ("seed",), ("out",),
               ("augment",), ("select",), ("calibrate",), ("held_out",), ("force",), ("new",)]


@MANY
@given(field=st.sampled_from(YAML_FIELDS), value=JSON)
def test_any_value_in_any_key_of_a_merge_yaml_reads_or_gets_one_line(tmp_path_factory, field, value):
    """The YAML is read into the declared settings and options (never into argv): any value at any key
    is read into what the declarations allow or refused in one line naming the file."""
    import yaml

    from foldmerge import config
    folder = tmp_path_factory.mktemp("yaml")
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(_set(YAML_BASE, field, value)))
    try:
        read = config.read(str(path))
    except ValueError as e:
        assert len(str(e).splitlines()) == 1 and str(path) in str(e), str(e)
    else:
        assert set(read) == {"models", "tasks", "data", "eval_data", "method", "settings", "options", "file"}
        assert all(isinstance(p, str) for p in read["models"])
    assert sorted(p.name for p in folder.iterdir()) == ["merge.yaml"]          # reading writes nothing
