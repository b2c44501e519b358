"""Resume: a merge or a source training killed mid-training (SIGKILL) and resumed
from its checkpoint ends bit-identical to a run that was never stopped (CPU, one thread)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from foldmerge.checkpoint import KILL_AFTER, Checkpoint, CheckpointError, checkpoint_dir
from foldmerge.model import TaskModel


def run(args, kill_after=None):
    env = {**os.environ, "FOLDMERGE_PROGRESS": "0"}
    env.pop(KILL_AFTER, None)
    if kill_after:
        env[KILL_AFTER] = str(kill_after)
    return subprocess.run([sys.executable, "-m", "foldmerge", *map(str, args), "--threads", "1"],
                          capture_output=True, text=True, env=env)


def here(args):
    """The same command in this process (no interpreter start, data already read): the runs that are
    never killed; only the killed run needs a process of its own."""
    from foldmerge import cli
    return cli.main([*map(str, args), "--threads", "1", "--quiet"])


def weights(path):
    return (path / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    paths = []
    for k, task in enumerate(["mnist:0-4", "mnist:5-9", "fmnist:0-4"]):
        torch.manual_seed(k)
        m = TaskModel("mlp", {"in_dim": 784, "hidden": [12, 12]}, [task])
        m.save(root / f"m{k}")
        paths.append(root / f"m{k}")
    return paths


@pytest.mark.parametrize("name,models,options,kill_after,stage", [
    ("global", 2, ["--epochs", "12"], 2, 0),
    ("distill-minibatch-adamw", 2, ["--method", "distill", "--epochs", "6", "--batch-size", "5",
                                    "--optimizer", "adamw", "--lr", "0.01"], 2, 0),
    ("seq", 3, ["--variant", "seq", "--epochs", "6", "--last-epochs", "10"], 4, 1),   # killed in stage 2
])
def test_a_killed_merge_resumes_to_the_same_weights(sources, tmp_path, capsys, name, models, options, kill_after,
                                                    stage):
    base = ["merge", *sources[:models], "--per-task", "8", *options, "--checkpoint-every", "2"]
    whole = tmp_path / "whole"
    assert here(["merge", *sources[:models], "--per-task", "8", *options, "--out", whole]) == 0
    out = tmp_path / "killed"
    killed = run([*base, "--out", out], kill_after=kill_after)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    state = json.loads((checkpoint_dir(out) / "state.json").read_text())
    assert state["current"]["fit"] == stage and len(state["finished"]) == stage
    if name == "global":
        capsys.readouterr()
        assert here([*base, "--out", out]) == 2            # a fresh start over a checkpoint is refused
        assert "--resume" in capsys.readouterr().err
        assert here([*base[:-2], "--seed", "1", "--out", out, "--resume"]) == 2   # so is a resume of another run
        err = capsys.readouterr().err
        assert "different run" in err and "seed" in err
    assert here([*base, "--out", out, "--resume"]) == 0
    assert weights(out) == weights(whole)
    assert not checkpoint_dir(out).exists()                # removed once the model is saved


def test_killed_source_training_resumes_to_the_same_weights(tmp_path):
    args = ["train-sources", "--tasks", "mnist:0-4", "--hidden", "8", "--epochs", "2"]
    assert here([*args, "--out", tmp_path / "whole"]) == 0
    killed = run([*args, "--out", tmp_path / "k", "--checkpoint-every", "1"], kill_after=1)
    assert killed.returncode == -9, killed.stderr
    assert here([*args, "--out", tmp_path / "k", "--resume"]) == 0
    name = "mnist_0-4-s0"
    assert weights(tmp_path / "k" / name) == weights(tmp_path / "whole" / name)
    assert not checkpoint_dir(tmp_path / "k" / name).exists()


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Checkpoint(tmp_path / "none", None, {}, resume=True)


def test_bench_cells_are_measured_once_and_counted_when_read_back(tmp_path):
    from foldmerge.bench import Cells
    calls = []

    def measure():
        calls.append(1)
        return [{"method": "distill", "per_task": 90.0}]

    first, again = Cells(), Cells()
    path = tmp_path / "cells" / "a.json"
    assert first.rows(path, measure) == [{"method": "distill", "per_task": 90.0}]
    assert again.rows(path, measure) == first.rows(path, measure) and len(calls) == 1
    assert again.rows(tmp_path / "cells" / "b.json", measure) and len(calls) == 2
    assert first.facts() == {"cells": 2, "cells_from_cache": 1}
    assert again.facts() == {"cells": 2, "cells_from_cache": 1}
    assert not list(tmp_path.rglob("*.tmp"))                # written atomically: no half file left


def test_a_checkpoint_changed_after_it_was_written_is_refused(tmp_path):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones_like(p)
    opt.step()
    where = tmp_path / "run.resume"
    ck = Checkpoint(where, 1, {"run": 1})
    ck.save(0, 1, 1, [p], opt, torch.Generator().manual_seed(0), [0.5])
    Checkpoint(where, None, {"run": 1}, resume=True)             # as written: resumes
    tensors, state = (where / "state.safetensors").read_bytes(), (where / "state.json").read_text()
    meta = json.loads(state)
    g = torch.Generator().manual_seed(3)
    edits = [("state.safetensors", bytes(b ^ 0xFF if i == int(k) else b for i, b in enumerate(tensors)))
             for k in torch.randint(len(tensors), (12,), generator=g)]
    edits += [("state.safetensors", tensors[:len(tensors) // 2]), ("state.safetensors", b"")]
    edits += [("state.json", json.dumps({**meta, "current": {**meta["current"], "epoch": 0}})),
              ("state.json", json.dumps({**meta, "every": 3})), ("state.json", json.dumps([meta])),
              ("state.json", state[:-9]), ("state.json", json.dumps({k: v for k, v in meta.items() if k != "integrity"}))]
    for name, content in edits:
        (where / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(CheckpointError) as e:
            Checkpoint(where, None, {"run": 1}, resume=True)
        assert len(str(e.value).splitlines()) == 1
        assert "changed after it was written" in str(e.value) or "not a readable checkpoint" in str(e.value)
        (where / "state.safetensors").write_bytes(tensors)
        (where / "state.json").write_text(state)


def test_a_full_disk_while_checkpointing_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    import errno
    import foldmerge.io as io
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    where = tmp_path / "run.resume"
    ck = Checkpoint(where, 1, {"run": 1})
    ck.save(0, 1, 1, [p], opt, torch.Generator().manual_seed(0), [0.5])
    before = {f.name: f.read_bytes() for f in where.iterdir()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(io, "_write_file", full)          # every tensor file is written through io
    with pytest.raises(OSError, match="No space"):
        ck.save(0, 2, 2, [p], opt, torch.Generator().manual_seed(0), [0.5, 0.4])
    assert {f.name: f.read_bytes() for f in where.iterdir()} == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["run.resume"]          # no temporary left
    assert Checkpoint(where, None, {"run": 1}, resume=True).current["epoch"] == 1


@pytest.mark.parametrize("delay", [3.0])
def test_a_merge_killed_at_an_arbitrary_instant_resumes_to_the_same_weights(sources, tmp_path, delay):
    import signal
    import time
    args = ["merge", *sources[:2], "--per-task", "8", "--epochs", "300", "--checkpoint-every", "5", "--threads", "1"]
    whole = tmp_path / "whole"
    assert here([*args, "--out", whole]) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "FOLDMERGE_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "foldmerge", *map(str, args), "--out", str(out)], env=env,
                            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    time.sleep(delay)                   # wherever it is: loading, training, writing a checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():                    # it had finished
        assert weights(out) == weights(whole)
        return
    again = [*args, "--out", out] + (["--resume"] if (checkpoint_dir(out) / "state.json").is_file() else [])
    assert here(again) == 0
    assert weights(out) == weights(whole)


@pytest.mark.parametrize("key,value", [("momentum", -3), ("weight_decay", 0.5), ("nesterov", True), ("lr", -1.0)])
def test_a_checkpoint_whose_optimizer_settings_are_not_the_run_s_is_refused_even_hashed_anew(tmp_path, key, value):
    from foldmerge.checkpoint import STATE, TENSORS, CheckpointError, _integrity
    p = torch.nn.Parameter(torch.ones(3))
    where = tmp_path / "run.resume"
    Checkpoint(where, 1, {"run": 1}).save(0, 1, 1, [p], torch.optim.SGD([p], lr=0.1, momentum=0.9),
                                         torch.Generator().manual_seed(0), [0.5])
    state = json.loads((where / STATE).read_text())
    state["current"]["param_groups"][0][key] = value
    state["integrity"] = _integrity(where / TENSORS, state)
    (where / STATE).write_text(json.dumps(state))
    q = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(CheckpointError, match="not this run's"):
        Checkpoint(where, None, {"run": 1}, resume=True).restore(0, [q], torch.optim.SGD([q], lr=0.1, momentum=0.9),
                                                                 torch.Generator())
