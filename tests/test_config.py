"""`foldmerge merge --config merge.yaml`: the same merge as its flags; unknown keys refused."""
import pytest
import torch
from safetensors.torch import load_file

from foldmerge import cli
from foldmerge.model import TaskModel


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


@pytest.fixture
def sources(tmp_path):
    paths = []
    for k, task in enumerate(("mnist:0-4", "mnist:5-9")):
        torch.manual_seed(k)
        TaskModel("mlp", {"in_dim": 784, "hidden": [12]}, [task]).save(tmp_path / f"m{k}")
        paths.append(str(tmp_path / f"m{k}"))
    return paths


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_a_config_gives_the_merge_its_flags_give(sources, tmp_path):
    flags = ["merge", *sources, "--method", "fs-merge", "--param", "diag+lowrank(2)", "--epochs", "3",
             "--widths", "10", "--per-task", "8", "--seed", "4", "--out", str(tmp_path / "by-flags")]
    assert cli.main(flags) == 0
    (tmp_path / "merge.yaml").write_text(
        "models:\n"
        f"  - path: {sources[0]}\n    task: mnist:0-4\n"
        f"  - path: {sources[1]}\n    task: mnist:5-9\n"
        "method: fs-merge\n"
        "options:\n  param: diag+lowrank(2)\n  epochs: 3\n  widths: [10]\n"
        "per_task: 8\nseed: 4\n"
        f"out: {tmp_path / 'by-config'}\n")
    assert cli.main(["merge", "--config", str(tmp_path / "merge.yaml")]) == 0
    a, b = weights(tmp_path / "by-flags"), weights(tmp_path / "by-config")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["backbone.layers.0.weight"].shape[0] == 10


@pytest.mark.parametrize("text, says", [
    ("method: average\nlearning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("method: average\noptions:\n  epochz: 3\n", "unknown key 'options.epochz'"),
    ("method: [average\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_a_bad_config_is_one_line_and_writes_nothing(sources, tmp_path, capsys, text, says):
    out = tmp_path / "out"
    models = "" if text.startswith("-") else f"models: [{sources[0]}, {sources[1]}]\nout: {out}\n"
    (tmp_path / "bad.yaml").write_text(models + text)
    assert cli.main(["merge", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("text,says", [("seed: 1_0\n", "seed"), ("seed: 0x10\n", "seed"), ("seed: 1:30\n", "seed"),
                                       ("per_task: 010\n", None)])
def test_yaml_numbers_are_read_as_the_command_line_reads_them(sources, tmp_path, capsys, text, says):
    """YAML 1.1 reads 1_0 as 10, 0x10 as 16, 1:30 as 90 and 010 as 8; the command line refuses the first
    three and reads 010 as 10: so does the merge YAML."""
    from foldmerge import config
    (tmp_path / "m.yaml").write_text(f"models: [{sources[0]}, {sources[1]}]\nmethod: average\nout: o\n{text}")
    if says is None:
        assert config.read(str(tmp_path / "m.yaml"))["settings"]["per_task"] == 10
        return
    with pytest.raises(ValueError, match=says):
        config.read(str(tmp_path / "m.yaml"))
