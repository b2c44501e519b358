"""`foldmerge bench tune-fs` on a toy cell: FS-Merge and distillation get the same number of trials,
every trial is scored on the validation split, and a trial measured once is read back."""
import torch

from foldmerge.bench import tune_fs
from foldmerge.model import TaskModel


def toy_cell(out, seed):
    torch.manual_seed(seed)
    cfg = {"image_size": 28, "channels": 1, "patch": 7, "width": 8, "depth": 1, "heads": 2, "mlp_dim": 16,
           "out_dim": 8}
    sources = [TaskModel("vit", cfg, [t], head="class-embedding") for t in ("mnist:0-4", "mnist:5-9")]
    data = [torch.randn(16, 1, 28, 28) for _ in sources]
    train = {"epochs": 1, "lr": 1e-3, "optimizer": "adamw", "batch_size": 8, "weight_decay": 0.001}
    return sources, data, {"fs-merge": {"param": "diag+lowrank(2)", "init": "first", **train},
                           "distill": {"init": "first", **train}}


def test_tune_fs_gives_both_methods_the_same_trials_on_validation(tmp_path, monkeypatch, capsys):
    from foldmerge.data import Task
    split, splits = Task.split, []

    def first_examples(self, which):                 # the toy scores 200 examples per split
        splits.append(which)
        return tuple(t[:200] for t in split(self, which))
    monkeypatch.setattr(Task, "split", first_examples)
    monkeypatch.setitem(tune_fs.CELLS, "toy", toy_cell)
    monkeypatch.setattr(tune_fs, "FULL_SEARCH", {"toy"})
    assert len(tune_fs.TRIALS["fs-merge"]) == len(tune_fs.TRIALS["distill"])
    # a follow-up cell runs each method's leads: every lead is a trial, the counts equal
    leads = {m: [label for label, _ in tune_fs.trials_for("vit-pairs100", m)] for m in tune_fs.TRIALS}
    assert {m: set(v) for m, v in leads.items()} == {m: set(v) for m, v in tune_fs.LEADS.items()}
    assert len(leads["fs-merge"]) == len(leads["distill"]) > 1
    # the toy runs the first trial and the first two of each method's own
    own = len(tune_fs.SHARED)
    monkeypatch.setattr(tune_fs, "TRIALS", {m: t[:1] + t[own:own + 2] for m, t in tune_fs.TRIALS.items()})
    r = tune_fs.run_bench(cells=("toy",), out=str(tmp_path))
    assert set(splits) == {"val"} and len(r["rows"]) == 2 * len(tune_fs.TRIALS["fs-merge"])
    assert all(0 <= row["val_per_task"] <= 100 for row in r["rows"])
    assert r["cells_from_cache"] == 0
    again = tune_fs.run_bench(cells=("toy",), out=str(tmp_path))
    assert again["rows"] == r["rows"] and again["cells_from_cache"] == len(r["rows"])
    tune_fs.print_report(r, "foldmerge bench tune-fs")
    printed = capsys.readouterr().out
    assert all(t in printed for t in ("validated", "zipit init", "init average"))
    import json

    from foldmerge.bench.report import build_report
    r.update(command="foldmerge bench tune-fs", environment={"machine": "test"})
    (tmp_path / "bench-tune-fs.json").write_text(json.dumps(r))
    build_report([str(tmp_path / "bench-tune-fs.json")], str(tmp_path / "report"), "x")
    page = (tmp_path / "report" / "report.md").read_text()
    assert "tuned alike" in page and "minus distill's best" in page and "zipit init" in page
