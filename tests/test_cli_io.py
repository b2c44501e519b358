"""Model files (safetensors + config.json, pickle refused) and the command line: one-line
errors with exit status 2, and a short train-sources -> merge -> eval run on real MNIST."""
import json
import os
from contextlib import redirect_stdout
from io import StringIO

import pytest
import torch

import foldmerge
from foldmerge import cli
from foldmerge.io import ModelFileError
from foldmerge.loading import load as load_model
from foldmerge.model import TaskModel

BACKBONE = {"in_dim": 784, "hidden": [16]}


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny (batch 10, width 16): one thread is faster, and several times
    faster on a busy machine. `--threads 1` below sets it too; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_model(seed=0, hidden=(16,), task="mnist:0-4"):
    torch.manual_seed(seed)
    return TaskModel("mlp", {"in_dim": 784, "hidden": list(hidden)}, [task])


def images(n=8, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def assert_same_outputs(a, b, x):
    oa, ob = outputs(a, x), outputs(b, x)
    assert len(oa) == len(ob)
    for u, v in zip(oa, ob):
        assert torch.equal(u, v)


# ------------------------------------------------------------------------------ files
def test_save_load_round_trip(tmp_path):
    model = small_model()
    out = tmp_path / "m"
    model.save(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == "mlp" and cfg["backbone"] == BACKBONE and cfg["tasks"] == ["mnist:0-4"]
    loaded = foldmerge.load(out)
    assert isinstance(loaded, TaskModel)
    assert loaded.backbone.hidden == [16] and [t.name for t in loaded.tasks] == ["mnist:0-4"]
    assert_same_outputs(model, loaded, images())


def test_save_over_existing_model_dir_replaces_it_and_leaves_no_temp_dirs(tmp_path):
    out = tmp_path / "m"
    first, second = small_model(seed=0), small_model(seed=1)
    first.save(out)
    second.save(out)
    x = images()
    loaded = load_model(out)
    assert_same_outputs(second, loaded, x)
    assert not torch.equal(outputs(first, x)[0], outputs(loaded, x)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["m"]          # no .m.* temporaries
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle was (not) executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_refuses_a_pickle_file(tmp_path):
    marker = tmp_path / "unpickled"
    ckpt = tmp_path / "model.pt"
    torch.save({"state": _Payload(marker)}, ckpt)
    with pytest.raises(ModelFileError, match="pickle"):
        load_model(ckpt)
    with pytest.raises(ModelFileError, match="pickle"):
        foldmerge.load(str(ckpt))
    assert not marker.exists()


def test_load_refuses_a_pickle_in_a_model_dir_unless_allowed(tmp_path):
    model = small_model()
    out = tmp_path / "m"
    model.save(out)
    (out / "model.safetensors").unlink()

    marker = tmp_path / "unpickled"
    torch.save({"state": _Payload(marker)}, out / "model.pt")
    with pytest.raises(ModelFileError, match="pickle"):
        load_model(out)
    assert not marker.exists()

    torch.save(model.state_dict(), out / "model.pt")
    with pytest.raises(ModelFileError, match="pickle"):
        load_model(out, allow_pickle=False)
    loaded = load_model(out, allow_pickle=True)
    assert_same_outputs(model, loaded, images())


# ------------------------------------------------------------------------- CLI errors
def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(argv, capsys, contains=None):
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("foldmerge: error:"), err
    if contains:
        assert contains in lines[0], err
    return lines[0]


@pytest.fixture
def two_saved(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    small_model(0, task="mnist:0-4").save(a)
    small_model(1, task="mnist:5-9").save(b)
    return a, b


def test_eval_of_a_missing_path(tmp_path, capsys):
    assert_one_line_error(["eval", tmp_path / "nope", "--json"], capsys, contains="does not exist")


def test_merge_with_an_unknown_method(two_saved, tmp_path, capsys):
    out = tmp_path / "merged"
    assert_one_line_error(["merge", *two_saved, "--method", "no-such-method", "--out", out], capsys,
                          contains="unknown method")
    assert not out.exists()


def test_train_sources_with_a_bad_task_spec(tmp_path, capsys):
    out = tmp_path / "src"
    assert_one_line_error(["train-sources", "--tasks", "mnist:0-11", "--hidden", "16", "--out", out], capsys,
                          contains="mnist:0-11")
    assert not out.exists()


def test_merge_of_different_depths(tmp_path, capsys):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    small_model(0, hidden=[16], task="mnist:0-4").save(a)
    small_model(1, hidden=[16, 16], task="mnist:5-9").save(b)
    assert_one_line_error(["merge", a, b, "--method", "fs-merge", "--epochs", "1", "--per-task", "2",
                           "--out", out], capsys, contains="depth")
    assert not out.exists()


def test_merge_option_that_does_not_apply(two_saved, tmp_path, capsys):
    out = tmp_path / "merged"
    assert_one_line_error(["merge", *two_saved, "--method", "average", "--variant", "local", "--out", out],
                          capsys, contains="--variant")
    assert not out.exists()


# ------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def trained_sources(tmp_path_factory):
    """Two MLPs 784-16 trained for one epoch each through `foldmerge train-sources`."""
    root = tmp_path_factory.mktemp("src")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FOLDMERGE_PROGRESS", "0")
        buf = StringIO()
        with redirect_stdout(buf):
            code = cli.main(["train-sources", "--tasks", "mnist:0-4", "mnist:5-9", "--hidden", "16",
                             "--epochs", "1", "--out", str(root), "--json", "--threads", "1"])
    assert code == 0
    report = json.loads(buf.getvalue())
    return root, report


def test_train_sources_writes_one_model_dir_per_task(trained_sources):
    root, report = trained_sources
    assert sorted(p.name for p in root.iterdir()) == ["mnist_0-4-s0", "mnist_5-9-s1"]
    rows = report["models"]
    assert [(r["task"], r["seed"]) for r in rows] == [("mnist:0-4", 0), ("mnist:5-9", 1)]
    for r in rows:
        assert (root / os.path.basename(r["path"]) / "model.safetensors").is_file()
        assert r["test"] > 80          # a trained 5-class MNIST model, random guess is 20 %
    cfg = json.loads((root / "mnist_5-9-s1" / "config.json").read_text())
    assert cfg["backbone"] == BACKBONE and cfg["tasks"] == ["mnist:5-9"]


def test_merge_then_eval_end_to_end(trained_sources, tmp_path, capsys):
    root, _ = trained_sources
    srcs = [root / "mnist_0-4-s0", root / "mnist_5-9-s1"]
    out = tmp_path / "merged-global"
    # lr 0.03: at the default 0.1 full-batch GD diverges on these narrow (width 16) sources.
    code, stdout, err = run_cli(["merge", *srcs, "--method", "fs-merge", "--variant", "global",
                                 "--epochs", "30", "--lr", "0.03", "--per-task", "16", "--out", out], capsys)
    assert code == 0, err
    assert "merged 2 models" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (out / "README.md").read_text()          # the model card: sources with their hashes, options, data
    assert "## Sources" in card and "fs-merge" in card and "## Fidelity" in card and "## Accuracy (test split)" in card
    meta = json.loads((out / "config.json").read_text())["meta"]
    assert meta["method"] == "fs-merge" and meta["variant"] == "global"
    assert meta["merge_examples"] == [16, 16]
    assert meta["final_loss"] < meta["initial_loss"]

    code, stdout, err = run_cli(["eval", out, "--json"], capsys)
    assert code == 0, err
    (result,) = json.loads(stdout)["results"]
    assert set(result["per_task"]) == {"mnist:0-4", "mnist:5-9"}
    assert set(result["joint"]) == {"mnist:0-4", "mnist:5-9"}
    assert 0 <= result["joint_mean"] <= 100
    assert result["per_task_mean"] > 50          # random guess: 20 %

    merged = foldmerge.load(out)
    assert merged.backbone.hidden == [16] and len(merged.heads) == 2


def test_eval_of_sources_gives_their_heads_side_by_side_and_the_ensemble(trained_sources, capsys):
    from foldmerge.evaluation import Ensemble, evaluate
    root, _ = trained_sources
    srcs = [root / "mnist_0-4-s0", root / "mnist_5-9-s1"]
    code, stdout, err = run_cli(["eval", *srcs, "--ensemble", "--json"], capsys)
    assert code == 0, err
    a, b, side, ens = json.loads(stdout)["results"]
    assert side["model"] == "heads side by side" and ens["model"] == "ensemble"
    # side by side, each task is scored by its own source: per-task is the sources' own
    assert side["per_task"] == {**a["per_task"], **b["per_task"]}
    assert set(side["joint"]) == {"mnist:0-4", "mnist:5-9"} and "joint" not in a
    assert ens["joint_mean"] == pytest.approx(evaluate(Ensemble([foldmerge.load(p) for p in srcs]))["joint_mean"])
    code, stdout, err = run_cli(["eval", srcs[0], "--ensemble"], capsys)
    assert code != 0 and "--ensemble needs two or more models" in err


def test_merge_with_label_free_selection(trained_sources, tmp_path, capsys):
    root, _ = trained_sources
    out = tmp_path / "merged-select"
    code, stdout, err = run_cli(["merge", root / "mnist_0-4-s0", root / "mnist_5-9-s1", "--method", "regmean",
                                 "--select", "alpha=0.1,0.9", "--per-task", "16", "--out", out, "--json"], capsys)
    assert code == 0, err
    meta = json.loads(stdout)["meta"]
    assert [t["options"]["alpha"] for t in meta["select"]["trials"]] == [0.1, 0.9]
    assert meta["alpha"] == meta["select"]["chosen"]["alpha"]
    code, _, err = run_cli(["merge", root / "mnist_0-4-s0", root / "mnist_5-9-s1", "--method", "regmean",
                            "--select", "alpha", "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "ARG=V1,V2" in err and not (tmp_path / "bad").exists()


def test_merge_average_end_to_end(trained_sources, tmp_path, capsys):
    root, _ = trained_sources
    out = tmp_path / "merged-average"
    code, stdout, err = run_cli(["merge", root / "mnist_0-4-s0", root / "mnist_5-9-s1",
                                 "--method", "average", "--out", out, "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["meta"]["method"] == "average"
    assert set(report["test"]["per_task"]) == {"mnist:0-4", "mnist:5-9"}
    assert "joint_mean" in report["test"]
    assert (out / "model.safetensors").is_file()


# ------------------------------------------------------------ regressions (bugs seen)
def test_meta_survives_a_round_trip(tmp_path):
    model = small_model()
    model.meta = {"method": "average", "seed": 3}
    model.save(tmp_path / "m")
    loaded = foldmerge.load(tmp_path / "m")
    assert loaded.meta["method"] == "average" and loaded.meta["seed"] == 3
    assert loaded.meta["path"] == str(tmp_path / "m")


def test_foldmerge_evaluate_can_be_called_twice():
    # A submodule named `evaluate` once replaced the function foldmerge.evaluate on first use.
    model = small_model()
    for _ in range(2):
        assert set(foldmerge.evaluate(model)["per_task"]) == {"mnist:0-4"}


def test_save_refuses_to_wipe_a_directory_that_is_not_a_model(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ModelFileError):
        small_model().save(out)
    assert (out / "precious.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["runs"]


def test_merge_out_onto_the_sources_folder_is_refused(trained_sources, capsys):
    root, _ = trained_sources
    before = sorted(p.name for p in root.iterdir())
    assert_one_line_error(["merge", root / "mnist_0-4-s0", root / "mnist_5-9-s1", "--method", "average",
                           "--out", root], capsys)
    assert sorted(p.name for p in root.iterdir()) == before


@pytest.mark.parametrize("argv,expected", [(["bench", "scale"], False), (["--quiet", "bench", "scale"], True),
                                           (["bench", "scale", "--quiet"], True), (["report", "x.json", "--out", "r", "--quiet"], True)])
def test_quiet_before_or_after_the_subcommand(argv, expected):
    assert cli.build_parser(cli._command_of(argv)).parse_args(argv).quiet is expected
