"""Trust: no code run from a pickle, nothing non-finite in or out, no model lost,
no traceback for bad input, and a model that names what it came from. One test per defect."""
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import foldmerge
from foldmerge import cli
from foldmerge.io import ModelFileError, save_model
from foldmerge.loading import load as load_model
from foldmerge.model import TaskModel
from foldmerge.train import TrainConfig, TrainingDiverged, fit


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def mlp(seed=0, task="mnist:0-4", hidden=(16,)):
    torch.manual_seed(seed)
    return TaskModel("mlp", {"in_dim": 784, "hidden": list(hidden)}, [task])


@pytest.fixture
def two(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    mlp(0, "mnist:0-4").save(a)
    mlp(1, "mnist:5-9").save(b)
    return a, b


def cli_error(argv, capsys, contains=None):
    code = cli.main([str(x) for x in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("foldmerge: error:"), err
    if contains:
        assert contains in err, err
    return err


def snapshot(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- 1. pickles
class _Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_an_allowed_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, two, capsys):
    a, _ = two
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((a / "config.json").read_text())
    marker = tmp_path / "ran"
    state = dict(mlp(0).state_dict())
    state["evil"] = _Payload(marker)                  # valid weights beside a payload
    torch.save(state, bad / "model.pt")
    with pytest.raises(ModelFileError, match="weights_only"):
        load_model(bad, allow_pickle=True)
    cli_error(["merge", bad, two[1], "--method", "average", "--out", tmp_path / "m", "--allow-pickle"], capsys,
              "refused")
    assert not marker.exists() and not (tmp_path / "m").exists()


def test_a_plain_tensor_pickle_loads_with_the_flag_and_the_merge_says_so(tmp_path, two, capsys):
    a, b = two
    p = tmp_path / "p"
    p.mkdir()
    (p / "config.json").write_text((a / "config.json").read_text())
    torch.save(load_model(a).state_dict(), p / "model.pt")
    assert cli.main(["merge", str(p), str(b), "--method", "average", "--out", str(tmp_path / "m"),
                     "--allow-pickle"]) == 0
    meta = load_model(tmp_path / "m").meta
    assert meta["sources"][0]["loaded_from_pickle"] is True


# ------------------------------------------------------------------------ 2. finite checks
def test_a_nan_or_inf_in_a_source_is_named_on_load(tmp_path, two, capsys):
    a, b = two
    for bad_value in (float("nan"), float("inf")):
        m = mlp(0)
        with torch.no_grad():
            m.backbone.layers[0].weight[0, 0] = bad_value
        out = tmp_path / f"nan{bad_value}"
        out.mkdir()
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(out / "model.safetensors"))
        (out / "config.json").write_text((a / "config.json").read_text())
        with pytest.raises(ModelFileError, match="backbone.layers.0.weight"):
            load_model(out)
        cli_error(["merge", out, b, "--method", "average", "--out", tmp_path / "m"], capsys, "NaN/Inf")
        cli_error(["eval", out], capsys, "NaN/Inf")
        with pytest.raises(ValueError, match="model 1"):      # in memory, through the API
            foldmerge.merge([m, load_model(b)], 4, method="average")
    assert not (tmp_path / "m").exists()


def test_non_finite_or_wrong_hyperparameters_get_one_line(two, tmp_path, capsys):
    a, b = two
    for flag, value in [("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"), ("--momentum", "nan"),
                        ("--batch-size", "0"), ("--widths", "0"), ("--widths", "-4"), ("--per-task", "0"),
                        ("--epochs", "-1"), ("--augment", "-2"), ("--seed", "-1")]:
        cli_error(["merge", a, b, "--out", tmp_path / "m", flag, value], capsys, f"{flag}: expected")
    with pytest.raises(ValueError, match="finite"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="batch size"):
        TrainConfig(batch_size=0)
    assert not (tmp_path / "m").exists()


def test_training_that_diverges_stops_with_the_epoch_and_the_likely_cause(two, tmp_path, capsys):
    w = torch.nn.Parameter(torch.ones(3))
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TrainingDiverged, match=r"epoch \d+ of 50.*learning rate"):
        fit([w], lambda xb: ((xb @ w) ** 2).mean(), [x], TrainConfig(epochs=50, lr=10.0, schedule="constant",
                                                                      momentum=0.0))
    cli_error(["merge", *two, "--method", "fs-merge", "--epochs", "30", "--lr", "1e6", "--out", tmp_path / "m"],
              capsys, "diverged")
    assert not (tmp_path / "m").exists()


def test_nothing_non_finite_is_saved_or_evaluated(tmp_path):
    m = mlp(0)
    with torch.no_grad():
        m.heads[0].bias[1] = float("nan")
    with pytest.raises(ModelFileError, match="heads.0.bias"):
        save_model(m, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="heads.0.bias"):
        foldmerge.evaluate(m)


# ------------------------------------------------------------------------- 3. nothing lost
def test_out_equal_to_or_inside_an_input_is_refused_before_work(two, capsys):
    a, b = two
    before = snapshot(a.parent)
    cli_error(["merge", a, b, "--method", "average", "--out", a], capsys, "is the input")
    cli_error(["merge", a, b, "--method", "average", "--out", a / "sub", "--force"], capsys, "inside the input")
    assert snapshot(a.parent) == before


def test_an_existing_model_is_replaced_only_with_force_keeping_other_files(two, tmp_path, capsys):
    a, b = two
    out = tmp_path / "m"
    assert cli.main(["merge", str(a), str(b), "--method", "average", "--out", str(out)]) == 0
    (out / "NOTES.md").write_text("mine")
    (out / "extra").mkdir()
    (out / "extra" / "f.txt").write_text("also mine")
    before = snapshot(out)
    cli_error(["merge", a, b, "--method", "fs-merge", "--epochs", "5", "--out", out], capsys, "--force")
    assert snapshot(out) == before                  # refused before training: nothing touched
    assert cli.main(["merge", str(a), str(b), "--method", "slerp", "--out", str(out), "--force"]) == 0
    assert load_model(out).meta["method"] == "slerp"
    assert (out / "NOTES.md").read_text() == "mine" and (out / "extra" / "f.txt").read_text() == "also mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "m"]      # no temporaries left


def test_an_unwritable_out_is_found_before_work(two, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:          # root writes anywhere: stand in for a read-only folder
        real = os.access
        monkeypatch.setattr("foldmerge.io.os.access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    loaded = []
    monkeypatch.setattr("foldmerge.api.load", lambda *a, **k: loaded.append(a))
    cli_error(["merge", *two, "--method", "average", "--out", locked / "m"], capsys, "permission")
    assert loaded == []


def test_train_sources_follows_the_same_rules(tmp_path, capsys, monkeypatch):
    from foldmerge.commands import train_sources as command
    calls = []

    def fake_train(task, hidden, seed, **kw):
        calls.append(task.name)
        m = TaskModel("mlp", {"in_dim": 784, "hidden": hidden}, [task])
        m.meta = {"val_accuracy": 1.0, "test_accuracy": 1.0, "seed": seed}
        return m

    monkeypatch.setattr(command, "train_source", fake_train)
    argv = ["train-sources", "--tasks", "mnist:0-4", "mnist:5-9", "--hidden", "4", "--out", str(tmp_path)]
    m = TaskModel("mlp", {"in_dim": 784, "hidden": [4]}, ["mnist:5-9"])
    m.meta = {"val_accuracy": 1.0, "test_accuracy": 1.0}
    m.save(tmp_path / "mnist_5-9-s1")
    before = snapshot(tmp_path)
    cli_error(argv, capsys, "--force")
    assert calls == [] and snapshot(tmp_path) == before         # refused before any training
    assert cli.main(argv + ["--force"]) == 0
    assert calls == ["mnist:0-4", "mnist:5-9"] and load_model(tmp_path / "mnist_5-9-s1").meta["seed"] == 1


# ----------------------------------------------------------------------- atomic replace
KILL_BETWEEN = textwrap.dedent("""
    import os, shutil, signal, sys, torch
    import foldmerge.io as io
    from foldmerge.model import TaskModel
    torch.manual_seed(1)
    new = TaskModel("mlp", {"in_dim": 784, "hidden": [16]}, ["mnist:0-4"])
    new.meta = {"which": "new"}
    # killed right after the new directory is in place, before the old one is removed
    io.shutil.rmtree = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    io.save_model(new, sys.argv[1], new.meta)
""")


def test_a_kill_between_the_renames_of_a_replace_leaves_a_complete_model(tmp_path):
    out = tmp_path / "m"
    old = mlp(0)
    old.meta = {"which": "old"}
    old.save(out)
    (out / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, "-c", KILL_BETWEEN, str(out)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    loaded = load_model(out)                         # a complete model is there: the new one
    assert loaded.meta["which"] == "new" and (out / "keep.txt").read_text() == "mine"
    leftovers = [p for p in tmp_path.iterdir() if p.name != "m"]
    assert len(leftovers) == 1                       # the old one, beside; removed by the next save
    mlp(2).save(out)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# -------------------------------------------------------------------- tracebacks, nonsense
def test_bad_configs_and_api_arguments_get_clear_errors(tmp_path, two, capsys):
    a, b = two
    cfg = json.loads((a / "config.json").read_text())
    for bad in ({"hidden": [-4]}, {"hidden": [0]}, {"hidden": "x"}, {"in_dim": -1}):
        broken = tmp_path / f"broken{len(list(tmp_path.iterdir()))}"
        broken.mkdir()
        (broken / "config.json").write_text(json.dumps({**cfg, "backbone": {**cfg["backbone"], **bad}}))
        (broken / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes())
        with pytest.raises(ModelFileError, match="describes no valid model"):
            load_model(broken)
        cli_error(["eval", broken], capsys)
    ma, mb = load_model(a), load_model(b)
    for data, match in [([torch.randn(4, 3)] * 2, "does not take"), ([torch.zeros(0, 784)] * 2, "empty"),
                        ([torch.ones(4, 784, dtype=torch.bool)] * 2, "floating"),
                        ([torch.full((4, 784), float("nan"))] * 2, "NaN"), ([torch.randn(4, 784)], "1 data tensors"),
                        ("x", "data must be"), (True, "data must be")]:
        with pytest.raises(ValueError, match=match):
            foldmerge.merge([ma, mb], data, method="average")
    for models, match in [([ma], "two or more"), (ma, "two or more"), ([ma, "nowhere"], "does not exist")]:
        with pytest.raises((ValueError, ModelFileError), match=match):
            foldmerge.merge(models, 4, method="average")
    with pytest.raises(ValueError, match="seed"):
        foldmerge.merge([ma, mb], 4, method="average", seed=-1)
    with pytest.raises(ValueError, match="MLP sizes"):
        TaskModel("mlp", {"in_dim": 784, "hidden": [-4]}, ["mnist:0-4"])


# --------------------------------------------------------------------------- provenance
def test_a_merge_names_its_sources_software_and_call(two, tmp_path, capsys, monkeypatch):
    a, b = two
    monkeypatch.chdir(tmp_path)
    assert cli.main(["merge", "a", "b", "--method", "average", "--out", "m"]) == 0
    meta = load_model(tmp_path / "m").meta
    for record, path in zip(meta["sources"], (a, b)):
        assert record["path"] == str(path.resolve())
        assert record["sha256"] == hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    prov = meta["provenance"]
    assert prov["torch"] == torch.__version__ and prov["foldmerge"] == foldmerge.__version__
    assert prov["python"].count(".") == 2 and prov["threads"] >= 1 and prov["git_commit"]
    assert (prov["device"], prov["precision"]) == ("cpu", "32-true")
    assert meta["command"].startswith("foldmerge ")
    api = foldmerge.merge([load_model(a), load_model(b)], 4, method="regmean", alpha=0.5)
    assert api.meta["call"] == {"function": "foldmerge.merge", "data": 4, "method": "regmean", "seed": 0,
                                "calibrate": "routing", "options": {"alpha": 0.5}}
    capsys.readouterr()
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"foldmerge {foldmerge.__version__}"


def test_a_config_that_declares_huge_layers_is_refused_before_anything_is_allocated(two, capsys, monkeypatch):
    a, b = two
    cfg = json.loads((a / "config.json").read_text())
    cfg["backbone"]["hidden"] = [10**9]                 # 784e9 weights: the real build would need ~3 TB
    (a / "config.json").write_text(json.dumps(cfg))
    cli_error(["eval", a], capsys, "the config makes it (1000000000, 784)")


@pytest.mark.parametrize("field,value", [
    ("hidden_size", "8"), ("hidden_size", None), ("hidden_size", 8.0), ("layer_norm_eps", "1e-12"),
    ("layer_norm_eps", -1), ("hidden_act", 5), ("type_vocab_size", "2"), ("intermediate_size", True),
    ("num_labels", "2"), ("pad_token_id", "0"), ("id2label", ["neg", "pos"]), ("hidden_dropout_prob", "0.1"),
    ("classifier_dropout", "0.1"), ("is_decoder", "false"), ("tie_word_embeddings", "yes"), ("dtype", "float99")])
def test_a_hugging_face_config_field_of_the_wrong_type_is_one_line_with_or_without_a_tokenizer(
        tmp_path, capsys, field, value):
    """transformers reads a folder's config to load its tokenizer: the schema reads it first."""
    import json

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                                  [f"w{i}" for i in range(35)]))
    for name in ("a", "b"):
        BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=16,
                                                 id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
                                      ).save_pretrained(tmp_path / name)
        BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / name)
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    code = cli.main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--method", "average",
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "config.json" in err and field in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change", ["classifier", "vocab_size", "max_position_embeddings", "num_labels"])
def test_a_hugging_face_tensor_of_the_wrong_shape_is_named(tmp_path, capsys, change):
    import json

    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertForSequenceClassification
    d = tmp_path / "m"
    BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=16, max_position_embeddings=16)).save_pretrained(d)
    if change == "classifier":
        state = load_file(str(d / "model.safetensors"))
        state["classifier.weight"] = torch.zeros(3, 8)
        save_file(state, str(d / "model.safetensors"))
    else:
        cfg = json.loads((d / "config.json").read_text())
        cfg[change] = 10 if change == "vocab_size" else 4 if change == "max_position_embeddings" else 3
        (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=r"tensor '.*' is \(.*\), but config.json makes it") as e:
        foldmerge.load(d)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("where", ["model config", "hf config", "report input", "yaml", "yaml key"])
def test_a_file_nested_too_deeply_or_with_a_list_for_a_key_is_one_line(tmp_path, capsys, where):
    deep_json = '{"a":' * 100000 + "1" + "}" * 100000
    a, b = tmp_path / "a", tmp_path / "b"
    for k, p in enumerate((a, b)):
        torch.manual_seed(k)
        TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, [f"mnist:{'0-4' if k == 0 else '5-9'}"]).save(p)
    out = tmp_path / "o"
    if where == "model config":
        (b / "config.json").write_text(deep_json)
        argv = ["merge", str(a), str(b), "--method", "average", "--out", str(out)]
    elif where == "hf config":
        (b / "config.json").write_text(deep_json.replace('{"a":', '{"model_type": "bert", "a":', 1))
        argv = ["merge", str(a), str(b), "--method", "average", "--out", str(out)]
    elif where == "report input":
        (tmp_path / "r.json").write_text(deep_json)
        argv = ["report", str(tmp_path / "r.json"), "--out", str(out)]
    else:
        text = (f"models: {'[' * 100000}{']' * 100000}\nout: {out}\n" if where == "yaml" else
                f"models: [{a}, {b}]\n? [x, y]\n: 3\nout: {out}\n")
        (tmp_path / "m.yaml").write_text(text)
        argv = ["merge", "--config", str(tmp_path / "m.yaml")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and ("nested too deeply" in err or "a key must be a name" in err), err
    assert not out.exists()
