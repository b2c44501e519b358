"""Paths and task specs a user can type wrong: every path argument given a loop of links, a dangling
link or a name that is not UTF-8, and generated task specs, end in one line (exit 2) or a valid
result, and nothing is written."""
import os
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from foldmerge import cli
from foldmerge.data import Task
from foldmerge.model import TaskModel


@pytest.fixture
def two(tmp_path, monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")
    monkeypatch.chdir(tmp_path)
    for k, task in enumerate(["mnist:0-4", "mnist:5-9"]):
        torch.manual_seed(k)
        TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, [task]).save(tmp_path / f"m{k}")
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    (tmp_path / "dangling").symlink_to("nowhere")
    latin = os.fsencode(tmp_path) + b"/nb\xfe"                 # a folder whose name is not UTF-8, reached by a link
    os.mkdir(latin)
    shutil.copytree(tmp_path / "m0", os.fsdecode(latin + b"/m0"))
    (tmp_path / "nblink").symlink_to(os.fsdecode(latin))
    return tmp_path


BAD = ["loop1", "dangling", os.fsdecode(b"caf\xe9"), "nblink/m0"]      # 3rd: Latin-1 bytes; 4th: a link to them
PLACES = [lambda p: [p, "m1", "--method", "average", "--out", "o"],
          lambda p: ["m0", "m1", "--method", "average", "--out", p],
          lambda p: ["m0", "m1", "--method", "zipit", "--data", p, p, "--out", "o"],
          lambda p: ["m0", "m1", "--method", "average", "--eval-data", p, p, "--out", "o"],
          lambda p: ["m0", "m1", "--config", p, "--out", "o"],
          lambda p: ["m0", "m1", "--method", "average", "--checkpoint-dir", p, "--out", "o"]]


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("place", range(len(PLACES)))
def test_a_bad_path_anywhere_is_one_line_and_writes_nothing(two, capsys, bad, place):
    if bad == BAD[2]:
        os.mkdir(os.fsencode(two) + b"/caf\xe9")
    before = sorted(os.listdir(two))
    code = cli.main(["merge", *PLACES[place](bad)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("foldmerge: error:"), err
    assert sorted(os.listdir(two)) == before


def test_eval_and_report_take_bad_paths_in_one_line(two, capsys):
    for argv in (["eval", "loop1"], ["eval", BAD[2]], ["report", "loop1", "--out", "r"], ["report", "m0", "--out", BAD[2]]):
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, (argv, err)
    assert not (two / "r").exists()


@settings(max_examples=400, deadline=None, derandomize=True)
@given(spec=st.text(alphabet="mnistfbc:/rot90,-  12345678", max_size=14))
def test_task_specs_mean_what_was_typed_or_get_one_line(spec):
    try:
        task = Task.parse(spec)
    except ValueError as e:
        assert len(str(e).splitlines()) == 1
        return
    assert len(task.classes) >= 2 and len(set(task.classes)) == len(task.classes)
    assert Task.parse(task.name) == task                     # its name says what it is
    if ":" in spec:                                          # classes typed are the classes taken
        typed = spec.partition(":")[2]
        assert all(str(c) in typed for c in (task.classes[0], task.classes[-1]))


@pytest.mark.parametrize("brk", ["\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"])
def test_a_line_break_inside_a_name_leaves_the_error_one_whole_line(tmp_path, capsys, brk):
    """Names the user gives (a file's, a config's value) may hold characters that some readers take
    for line ends: the error prints them escaped, whole, on one line."""
    import json
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": [f"Bert{brk}Evil"]}))
    assert cli.main(["merge", str(bad), str(bad), "--method", "average", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and repr(brk)[1:-1] + "Evil" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spec", ["mnist:٠-٤", "mnist:０-４", "mnist:0-٤"])
def test_task_specs_take_ascii_digits_only(spec):
    with pytest.raises(ValueError, match="numbers and ranges"):
        Task.parse(spec)
