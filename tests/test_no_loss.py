"""Nothing of the user's is lost: each way a run could write over or delete what it did not
create, reproduced, and refused in one line with everything left as it was."""
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foldmerge import cli
from foldmerge.io import identity
from foldmerge.loading import load as load_model
from foldmerge.model import TaskModel

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def mlp(seed, task):
    torch.manual_seed(seed)
    return TaskModel("mlp", {"in_dim": 784, "hidden": [16]}, [task])


@pytest.fixture
def two(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    mlp(0, "mnist:0-4").save(a)
    mlp(1, "mnist:5-9").save(b)
    return a, b


def snapshot(path):
    return {p.relative_to(path).as_posix(): (p.read_bytes() if p.is_file() else "dir")
            for p in sorted(Path(path).rglob("*"))}


def refused(argv, capsys, contains):
    code = cli.main([str(x) for x in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("foldmerge: error:"), err
    assert contains in err, err
    return err


def users_folder(path):
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
    (path / "figures").mkdir()
    (path / "figures" / "f.png").write_bytes(b"\x89PNG")


# 1 --------------------------------------------------------------------------- OUT.resume
@pytest.mark.parametrize("method", ["average", "fs-merge"])
def test_checkpoints_never_write_over_or_delete_what_is_at_out_resume(two, tmp_path, capsys, method):
    out = tmp_path / "m"
    users_folder(tmp_path / "m.resume")
    epochs = ["--epochs", 2] if method == "fs-merge" else []
    before = snapshot(tmp_path)
    refused(["merge", *two, "--method", method, *epochs, "--checkpoint-every", 1, "--out", out], capsys,
            "is not a foldmerge checkpoint")
    assert snapshot(tmp_path) == before
    # a source model at OUT.resume: an input, never a place to write
    shutil.rmtree(tmp_path / "m.resume")
    mlp(2, "mnist:0-4").save(tmp_path / "m.resume")
    before = snapshot(tmp_path)
    refused(["merge", tmp_path / "m.resume", two[1], "--method", method, *epochs, "--checkpoint-every", 1,
             "--out", out], capsys, "is the input")
    assert snapshot(tmp_path) == before


def test_a_method_that_never_checkpoints_removes_nothing_at_the_end(two, tmp_path, capsys):
    out = tmp_path / "m"
    (tmp_path / "m.resume").mkdir()           # empty: a place a checkpoint may go, and nothing to lose
    assert cli.main(["merge", *map(str, two), "--method", "average", "--checkpoint-every", "1",
                     "--out", str(out)]) == 0
    assert (tmp_path / "m.resume").is_dir()   # not written, so not removed either


def test_train_sources_never_writes_over_what_is_at_a_model_s_resume_path(tmp_path, capsys, monkeypatch):
    from foldmerge.commands import train_sources as command
    calls = []
    monkeypatch.setattr(command, "train_source", lambda *a, **k: calls.append(a))
    users_folder(tmp_path / "mnist_0-4-s0.resume")
    before = snapshot(tmp_path)
    refused(["train-sources", "--tasks", "mnist:0-4", "--hidden", 4, "--checkpoint-every", 1, "--out", tmp_path],
            capsys, "is not a foldmerge checkpoint")
    assert calls == [] and snapshot(tmp_path) == before


# 2 ----------------------------------------------------------------- an input inside --out
def test_an_input_inside_out_is_refused_directly_through_a_link_or_as_data(two, tmp_path, capsys):
    a, b = two
    out = tmp_path / "m"
    assert cli.main(["merge", str(a), str(b), "--method", "average", "--out", str(out)]) == 0
    mlp(3, "mnist:0-4").save(out / "hf" / "inner")          # a model the user keeps inside an output
    (tmp_path / "link").symlink_to(out / "hf" / "inner")
    np_data = out / "mine.npy"
    import numpy as np
    np.save(np_data, np.zeros((4, 1, 28, 28), dtype=np.float32))
    linked = tmp_path / "linked"             # a model folder whose weights are a link into --out
    linked.mkdir()
    shutil.copy(a / "config.json", linked / "config.json")
    (linked / "model.safetensors").symlink_to(out / "hf" / "inner" / "model.safetensors")
    before = snapshot(tmp_path)
    for source in (out / "hf" / "inner", tmp_path / "link"):
        refused(["merge", source, b, "--method", "average", "--out", out, "--force"], capsys, "holds the input")
    refused(["merge", a, b, "--method", "zipit", "--data", np_data, np_data, "--per-task", 2, "--out", out,
             "--force"], capsys, "holds the input")
    refused(["merge", linked, b, "--method", "average", "--out", out, "--force"], capsys, "holds the input")
    assert snapshot(tmp_path) == before


# 3 ------------------------------------------------------------------------------ report
def test_report_never_deletes_an_input_inside_its_out(tmp_path, capsys):
    result = sorted(RESULTS.glob("bench-mlp*.json"))[0]
    report = tmp_path / "report"
    assert cli.main(["report", str(result), "--out", str(report)]) == 0
    capsys.readouterr()
    shutil.copy(result, report / result.name)
    users_folder(tmp_path / "notes")
    before = snapshot(tmp_path)
    refused(["report", report / result.name, "--out", report], capsys, "holds the input")
    assert snapshot(tmp_path) == before
    refused(["report", result, "--out", tmp_path / "notes"], capsys, "is not a foldmerge report")
    assert snapshot(tmp_path) == before


# 4: a Hugging Face directory with a missing or stray tensor is refused by name:
#    tests/test_user_data.py::test_hub_conventions_pytorch_model_bin_missing_tensors_and_hub_ids

# 5 ------------------------------------------------------------ two runs, one --out
def test_a_model_written_to_out_during_the_run_is_never_replaced(two, tmp_path, capsys, monkeypatch):
    import foldmerge.api as api
    out = tmp_path / "m"
    real = api._run

    def another_process_writes(model):
        def run(job, data, options):
            merged = real(job, data, options)
            model.save(out)
            return merged
        return run
    other = mlp(7, "mnist:0-4")
    other.meta = {"by": "the other process"}
    monkeypatch.setattr(api, "_run", another_process_writes(other))
    refused(["merge", *two, "--method", "average", "--out", out], capsys, "appeared while this run worked")
    assert load_model(out).meta["by"] == "the other process"
    # with --force the user agreed to replace the model that was there when the run began, not a newer one
    before = snapshot(out)
    refused(["merge", *two, "--method", "average", "--out", out, "--force"], capsys, "changed while this run worked")
    assert snapshot(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]       # no temporaries left


def test_concurrent_merges_to_one_out_leave_one_complete_model(two, tmp_path):
    out = tmp_path / "m"
    argv = [sys.executable, "-m", "foldmerge", "merge", *map(str, two), "--method", "fs-merge", "--epochs", "3",
            "--per-task", "16", "--fidelity", "0", "--quiet", "--out", str(out)]
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    loser = next(e for c, e in results if c == 2)
    assert loser.count("\n") == 1 and ("already holds" in loser or "while this run worked" in loser), loser
    assert load_model(out).meta["method"] == "fs-merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "m"]


@pytest.mark.parametrize("where", ["weights", "export"])
def test_a_full_disk_while_saving_leaves_the_old_model_and_its_export_whole(two, tmp_path, capsys, monkeypatch, where):
    import foldmerge.api as api
    import foldmerge.io as io
    out = tmp_path / "m"
    assert cli.main(["merge", *map(str, two), "--method", "average", "--out", str(out)]) == 0
    (out / "hf").mkdir()
    (out / "hf" / "export.txt").write_text("the earlier export")
    before = snapshot(out)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    if where == "weights":
        monkeypatch.setattr(io, "_write_file", full)
    else:
        monkeypatch.setattr(api, "_export", lambda merged, d, sources: full())
    refused(["merge", *two, "--method", "slerp", "--out", out, "--force"], capsys, "No space left")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "m"]


def test_a_real_full_disk_while_saving_leaves_the_old_model_whole(two, tmp_path):
    """The same on a real full file system: a small tmpfs, mounted in a mount namespace of its own
    (`unshare`), holding the old model, too small for a second one beside it."""
    old, disk, after = tmp_path / "old", tmp_path / "disk", tmp_path / "after"
    assert cli.main(["merge", *map(str, two), "--method", "average", "--out", str(old)]) == 0
    disk.mkdir()
    size = sum(p.stat().st_size for p in old.rglob("*") if p.is_file())
    script = f"""
        mount -t tmpfs -o size={size // 1024 + 16}k tmpfs '{disk}' || exit 97
        cp -r '{old}' '{disk}/m'
        '{sys.executable}' -m foldmerge merge '{two[0]}' '{two[1]}' --method slerp --out '{disk}/m' --force --quiet \
            2> '{tmp_path}/err'
        echo $? > '{tmp_path}/rc'
        ls -A '{disk}' > '{tmp_path}/left'
        cp -r '{disk}/m' '{after}'
    """
    run = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], capture_output=True,
                         text=True, env={**os.environ, "FOLDMERGE_PROGRESS": "0"})
    if not (tmp_path / "rc").exists():
        pytest.skip(f"no tmpfs can be mounted here (unshare / mount: {run.stderr.strip()[:120]}); the injected "
                    "full disk above covers the same paths")
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "2" and err.count("\n") == 1, err
    assert "No space left" in err, err
    assert snapshot(after) == snapshot(old)                          # the old model, byte for byte
    assert (tmp_path / "left").read_text().split() == ["m"]         # no half-written folder beside it


def test_the_export_lands_in_the_model_s_swap(two, tmp_path, monkeypatch):
    import foldmerge.api as api
    import foldmerge.io as io
    seen = []
    real = io.swap_in
    monkeypatch.setattr(io, "swap_in", lambda tmp, out, expect=False: (seen.append(sorted(
        p.name for p in tmp.iterdir())), real(tmp, out, expect))[1])
    monkeypatch.setattr(api, "_export", lambda merged, d, sources: (d / "hf").mkdir())
    assert cli.main(["merge", *map(str, two), "--method", "average", "--out", str(tmp_path / "m")]) == 0
    assert seen == [["config.json", "hf", "model.safetensors"]]       # one swap holds all


# 6 ----------------------------------------------------- provenance hashes what was loaded
def test_a_source_rewritten_during_the_run_is_recorded_as_it_was_loaded(two, tmp_path, monkeypatch):
    import foldmerge.api as api
    a, b = two
    loaded = hashlib.sha256((a / "model.safetensors").read_bytes()).hexdigest()
    real = api._run

    def rewrite_then_run(job, data, options):
        mlp(9, "mnist:0-4").save(a)              # the user's training job writes the source anew
        return real(job, data, options)
    monkeypatch.setattr(api, "_run", rewrite_then_run)
    assert cli.main(["merge", str(a), str(b), "--method", "average", "--out", str(tmp_path / "m")]) == 0
    meta = json.loads((tmp_path / "m" / "config.json").read_text())["meta"]
    assert meta["sources"][0]["sha256"] == loaded
    assert hashlib.sha256((a / "model.safetensors").read_bytes()).hexdigest() != loaded


def test_identity_tells_a_replaced_or_written_directory(tmp_path):
    d = tmp_path / "d"
    assert identity(d) is None
    d.mkdir()
    first = identity(d)
    os.utime(d, ns=(1, 1))
    assert identity(d) != first


# from the adversarial review: files the user put inside an output a run replaces
def hf_pair(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification
    paths = []
    for k in range(2):
        torch.manual_seed(k)
        BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=16, num_labels=2 + k)
                                      ).save_pretrained(tmp_path / f"hf{k}")
        paths.append(tmp_path / f"hf{k}")
    import numpy as np
    np.save(tmp_path / "ids.npy", np.random.default_rng(0).integers(1, 40, (16, 8)))
    return paths, [str(tmp_path / "ids.npy")] * 2


def test_a_replaced_model_keeps_the_user_s_files_at_every_depth_of_its_export(tmp_path, capsys):
    models, data = hf_pair(tmp_path)
    out = tmp_path / "m"
    argv = ["merge", *map(str, models), "--data", *data, "--per-task", "8", "--method", "average", "--out", str(out)]
    assert cli.main(argv) == 0
    mine = {out / "notes.txt": "top", out / "hf" / "notes.txt": "in hf", out / "hf" / "hf0" / "mine.txt": "in a task",
            out / "hf" / "oldtask" / "f.txt": "a folder of mine"}
    for p, text in mine.items():
        p.parent.mkdir(exist_ok=True)
        p.write_text(text)
    assert cli.main(argv + ["--force"]) == 0
    assert {p: p.read_text() for p in mine} == mine
    assert load_model(out).meta["method"] == "average"


def test_a_config_file_inside_out_is_an_input(tmp_path, capsys):
    models, data = hf_pair(tmp_path)
    out = tmp_path / "m"
    assert cli.main(["merge", *map(str, models), "--data", *data, "--per-task", "8", "--method", "average",
                     "--out", str(out)]) == 0
    yaml_file = out / "hf" / "merge.yaml"
    yaml_file.write_text(f"models: [{models[0]}, {models[1]}]\nmethod: average\nout: {out}\nforce: true\n")
    before = yaml_file.read_text()
    capsys.readouterr()
    refused(["merge", "--config", yaml_file, "--data", *data, "--per-task", "8"], capsys, "holds the input")
    assert yaml_file.read_text() == before


def test_a_report_run_again_keeps_the_user_s_files_in_its_folder(tmp_path, capsys):
    result = tmp_path / "r.json"
    shutil.copy(RESULTS / "bench-cnn-w4.json", result)
    out = tmp_path / "report"
    assert cli.main(["report", str(result), "--out", str(out)]) == 0
    mine = {out / "notes.txt": "mine", out / "figs-mine" / "a.txt": "a", out / "copy.json": result.read_text()}
    for p, text in mine.items():
        p.parent.mkdir(exist_ok=True)
        p.write_text(text)
    assert cli.main(["report", str(result), "--out", str(out)]) == 0
    assert {p: p.read_text() for p in mine} == mine and (out / "report.md").is_file()


def test_a_folder_whose_files_foldmerge_did_not_write_is_never_replaced(two, tmp_path, capsys):
    """A folder is replaced only if foldmerge wrote what it holds: a user's report.md is not a
    report, a Hugging Face model's config.json is not a foldmerge model."""
    notes = tmp_path / "notes"
    notes.mkdir()
    mine = {notes / "report.md": "# My trip\n![me](photo.png)\n", notes / "photo.png": "JPEG",
            notes / "report.html": "<html>mine</html>"}
    for p, text in mine.items():
        p.write_text(text)
    result = tmp_path / "r.json"
    shutil.copy(RESULTS / "bench-cnn-w4.json", result)
    refused(["report", result, "--out", notes], capsys, "is not a foldmerge report")
    assert {p: p.read_text() for p in mine} == mine
    from transformers import BertConfig, BertForSequenceClassification
    hf = tmp_path / "hf-model"
    BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=16)).save_pretrained(hf)
    before = snapshot(hf)
    capsys.readouterr()
    refused(["merge", *two, "--method", "average", "--out", hf, "--force"], capsys, "is not a foldmerge model")
    assert snapshot(hf) == before
