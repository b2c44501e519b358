"""Declared options: every option of every method reaches the merge, and its meta, from the command
line and from a YAML config alike; the grammars accept or refuse, never crash."""
import json
import string

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from foldmerge import cli
from foldmerge.api import SETTINGS
from foldmerge.gated import GateNet
from foldmerge.data import Task
from foldmerge.methods import METHODS
from foldmerge.model import TaskModel
from foldmerge.options import ModelRef, TensorFile, check_value

TASKS = ["mnist:0-4", "mnist:5-9"]


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """Two tiny MLP sources (and a base for the task-vector methods, a gate trunk) on disk."""
    root = tmp_path_factory.mktemp("options")
    paths = []
    for k, t in enumerate(TASKS):
        torch.manual_seed(k)
        m = TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, [t])
        m.save(root / f"m{k}")
        paths.append(root / f"m{k}")
    torch.manual_seed(9)
    TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, [TASKS[0]]).save(root / "base")
    save_file({k: v.contiguous() for k, v in GateNet(2, channels=1, width=4).trunk.state_dict().items()},
              str(root / "trunk.safetensors"))
    return root, paths


def example(option, root):
    """A value of the option's grammar: generated from the grammar, or the files this merge needs."""
    if isinstance(option.kind, ModelRef):
        return str(root / "base")
    if isinstance(option.kind, TensorFile):
        return str(root / "trunk.safetensors")
    if option.name == "widths":
        return [6]                                  # one hidden layer
    if option.name == "gate_width":
        return 4                                    # the trunk file's width
    if option.name == "weights":
        return [0.25, 0.75]                         # one per model
    if option.name == "filter":
        return "full"                               # an MLP has no tokens to pick from
    return option.kind.example()


def cases():
    out = []
    for m in METHODS.values():
        for o in m.options:
            out.append(pytest.param(m.name, o.name, id=f"{m.name}-{o.name}"))
    return out


def companions(method, option, root) -> dict:
    """What makes the option apply (its `when`, held-out data for patience) and keeps the merge short."""
    extra = {}
    if option.when:
        extra[option.when[0]] = option.when[1][0]
    names = {o.name for o in method.options}
    if "epochs" in names and option.name != "epochs":
        extra["epochs"] = 1
    if "gate_epochs" in names and option.name != "gate_epochs":
        extra["gate_epochs"] = 1
    if option.name == "logit_loss":               # scores the logits: they must weigh something
        extra["logit_weight"] = 0.5
    if method.name in ("task-arithmetic", "ties") and option.name != "base":
        extra["base"] = str(root / "base")
    if method.name == "gating":                    # a small gate, and averaging (no Gram solves) for the rest
        extra.setdefault("gate_width", 4)
        if option.name not in ("rest", "alpha"):
            extra["rest"] = "average"
        extra.pop(option.name, None)
    return extra


KINDS = {o.name: o.kind for m in METHODS.values() for o in m.options} | {o.name: o.kind for o in SETTINGS}


def flags(options: dict) -> list[str]:
    """The options as command-line words, each value written by its grammar."""
    out = []
    for k, v in options.items():
        out.append("--" + k.replace("_", "-"))
        out += [KINDS[k].text(x) for x in v] if isinstance(v, list) else [KINDS[k].text(v)]
    return out


def recorded_as(option, value):
    if isinstance(option.kind, ModelRef):
        return lambda r: r["model"].endswith("base")
    if isinstance(option.kind, TensorFile):
        return lambda r: set(r) == {"0.weight", "0.bias"} or len(r) > 0
    want = check_value(option, value)
    return lambda r: r == want


@pytest.mark.parametrize("method_name,option_name", cases())
def test_every_option_round_trips_from_the_command_line_and_yaml_into_meta(method_name, option_name, place,
                                                                          tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")
    split = Task.split          # what is checked is the option's path into meta: 200 examples per split do
    monkeypatch.setattr(Task, "split", lambda self, which: tuple(t[:200] for t in split(self, which)))
    root, paths = place
    method = METHODS[method_name]
    option = next(o for o in method.options if o.name == option_name)
    value = example(option, root)
    extra = companions(method, option, root)
    if option_name == "patience":
        extra["held_out"] = 4
    ok = recorded_as(option, value)
    settings_ = {"per_task": 4, "calibrate": "none"}
    argv = ["merge", *map(str, paths), "--method", method_name, *flags({option_name: value, **extra}),
            *flags(settings_), "--out", str(tmp_path / "cli"), "--json"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    meta = json.loads(capsys.readouterr().out)["meta"]
    assert ok(meta["options"][option_name]), meta["options"]
    setting_keys = {o.name for o in SETTINGS}
    config = {"models": [str(p) for p in paths], "method": method_name, "out": str(tmp_path / "yaml"),
              **{k: v for k, v in extra.items() if k in setting_keys}, **settings_,
              "options": {option_name: value, **{k: v for k, v in extra.items() if k not in setting_keys}}}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["merge", "--config", str(tmp_path / "merge.yaml"), "--json"]) == 0, capsys.readouterr().err
    from_yaml = json.loads(capsys.readouterr().out)["meta"]
    assert ok(from_yaml["options"][option_name])
    assert from_yaml["options"] == meta["options"]


def test_an_unknown_option_or_method_is_refused_with_a_suggestion(place, tmp_path, capsys):
    _, paths = place
    base = ["merge", *map(str, paths), "--out", str(tmp_path / "m")]
    for argv, said in [(["--method", "zipit", "--alhpa", "0.3"], "did you mean --alpha?"),
                       (["--method", "average", "--alpha", "0.3"], "--alpha does not apply to method 'average'"),
                       (["--method", "zipt"], "did you mean zipit?"),
                       (["--method", "zipit", "--beta", "1.5"], "--beta: expected a number in [0, 1], got 1.5")]:
        assert cli.main(base + argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err, err
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"models": list(map(str, paths)), "method": "zipit",
                                                     "out": str(tmp_path / "m"), "options": {"alhpa": 0.3}}))
    assert cli.main(["merge", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown key 'options.alhpa' (did you mean alpha?)" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"models": list(map(str, paths)), "pertask": 4}))
    assert cli.main(["merge", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "unknown key 'pertask' (did you mean per_task?)" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_help_groups_the_options_per_method_with_every_default(capsys):
    assert cli.main(["merge", "--help"]) == 0
    text = capsys.readouterr().out
    for m in METHODS.values():
        assert f"method {m.name}:" in text
        for o in m.options:
            assert o.flag in text
    flat = "".join(text.split())                  # argparse wraps lines, also inside hyphenated words
    for o in [o for m in METHODS.values() for o in m.options] + list(SETTINGS):
        if o.default is not None:
            assert "".join(o.default_text().split()) in flat, o.name
    assert "--init {first,average,random,zipit,permute,regmean}" in text       # every reader's choices
    assert "mlp1000(local:15000)" in flat                                # a variant's own default


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.printable, max_size=12))
def test_every_grammar_reads_or_refuses_any_text(text):
    for o in {id(o): o for m in METHODS.values() for o in m.options}.values():
        try:
            value = o.kind.parse(text)
        except ValueError:
            continue
        assert check_value(o, value) == value or isinstance(value, str)


def test_the_api_checks_its_keywords_as_the_command_line_does(place):
    import foldmerge
    _, paths = place
    for kwargs, said in [({"seeed": 1}, "'seeed' is neither an option of method 'average' nor a keyword of "
                                        "foldmerge.merge (did you mean seed?)"),
                         ({"per_task": 8}, "per_task counts the examples drawn from data files"),
                         ({"weights": [0.5, "x"]}, "--weights: expected a finite number >= 0, got 'x'"),
                         ({"alpha": 0.5}, "--alpha does not apply to method 'average'")]:
        with pytest.raises(ValueError) as e:
            foldmerge.merge(list(map(str, paths)), 4, method="average", **kwargs)
        assert said in str(e.value), str(e.value)
    with pytest.raises(ValueError, match="--max-iter: expected a positive integer, got '3'"):
        foldmerge.merge(list(map(str, paths)), 4, method="weight-matching", max_iter="3")
    merged = foldmerge.merge(list(map(str, paths)), 4, method="slerp", precision="32-true", calibrate="none")
    assert merged.meta["engine"]["accelerator"] == "cpu" and merged.meta["options"] == {"t": 0.5}


def test_defaults_that_depend_on_the_merge_are_recorded_as_used(place):
    import foldmerge
    _, paths = place
    fs = foldmerge.merge(list(map(str, paths)), 4, method="fs-merge", epochs=2, held_out=4, calibrate="none")
    assert fs.meta["options"]["patience"] == 20 and fs.meta["options"]["batch_size"] == 8   # the whole sample
    assert fs.meta["train"]["batch_size"] == 8
    seq = foldmerge.merge(list(map(str, paths)), 4, method="fs-merge", variant="seq", epochs=2, calibrate="none")
    assert seq.meta["options"]["last_epochs"] == 2 and "patience" not in seq.meta["options"]


def test_a_yaml_file_names_itself_and_the_key_in_every_error_and_reads_paths_from_its_folder(place, tmp_path,
                                                                                              capsys):
    root, paths = place
    where = tmp_path / "conf"
    where.mkdir()

    def err(config):
        (where / "m.yaml").write_text(yaml.safe_dump(config))
        assert cli.main(["merge", "--config", str(where / "m.yaml")]) == 2
        out = capsys.readouterr().err
        assert out.count("\n") == 1 and "m.yaml" in out, out
        return out
    models = [str(p) for p in paths]
    assert "give each model's task in its entry" in err({"models": models, "tasks": ["mnist:0-4", "mnist:5-9"]})
    assert "method: unknown method 'avrage' (did you mean average?)" in err({"models": models, "method": "avrage"})
    assert "select: --select alpah: not an option of method 'regmean' (did you mean alpha?)" in \
        err({"models": models, "method": "regmean", "select": {"alpah": [0.1]}, "out": "x"})
    assert "max_iter is not an option of method 'average' (it is weight-matching's)" in \
        err({"models": models, "method": "average", "options": {"max_iter": 3}})
    # relative paths: the models and out, from the YAML file's folder
    import shutil
    for p in paths:
        shutil.copytree(p, where / p.name)
    (where / "m.yaml").write_text(yaml.safe_dump({"models": [p.name for p in paths], "method": "average",
                                                  "per_task": 4, "out": "merged"}))
    assert cli.main(["merge", "--config", str(where / "m.yaml"), "--quiet"]) == 0, capsys.readouterr().err
    assert (where / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,says", [
    (["--seed", "1_0"], "--seed"), (["--seed", "١٢"], "--seed"), (["--seed", " 3 "], "--seed"),
    (["--seed", "99999999999999999999999"], "up to 2^63 - 1"), (["--lr", "1e308"], "float32"),
    (["--lr", "0_5"], "--lr"), (["--lr", "٠.٥"], "--lr"), (["--momentum", "5"], "--momentum")])
def test_numbers_are_read_as_written_in_ascii_and_within_what_the_arithmetic_holds(tmp_path, capsys, argv, says):
    for k, task in enumerate(["mnist:0-4", "mnist:5-9"]):
        TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, [task]).save(tmp_path / f"m{k}")
    code = cli.main(["merge", str(tmp_path / "m0"), str(tmp_path / "m1"), "--method", "fs-merge", *argv,
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "o").exists()
