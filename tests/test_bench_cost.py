"""bench cost: one tiny measured run per method, ratios to distillation, clear errors."""
import pytest

from foldmerge.bench import cost
from foldmerge.cli import main


@pytest.mark.parametrize("method", list(cost.METHODS))
def test_measure_runs_each_method(method, monkeypatch):
    monkeypatch.setattr(cost, "VIT", {**cost.VIT, "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "out_dim": 8})
    row = cost.measure(3, method, per_task=6, epochs=1, device="cpu", threads=None)
    assert row["seconds"] > 0 and row["peak_bytes"] >= 0 and row["learnable_parameters"] > 0


def test_seq_runs_the_vit_bench_schedule_and_timed_runs_skip_the_sampler(monkeypatch):
    monkeypatch.setattr(cost, "VIT", {**cost.VIT, "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "out_dim": 8})
    row = cost.measure(3, "fs-merge seq", per_task=6, epochs=8, device="cpu", threads=None, memory=False)
    assert row["stage_epochs"] == [2, 8] and row["peak_bytes"] is None


def test_ratios_are_to_distillation_of_the_same_n():
    runs = [{"n": 2, "method": "distill", "seconds": 2.0, "peak_bytes": 100, "learnable_parameters": 5},
            {"n": 2, "method": "fs-merge folded", "seconds": 3.0, "peak_bytes": 150, "learnable_parameters": 4},
            {"n": 2, "method": "fs-merge folded", "seconds": 1.0, "peak_bytes": 90, "learnable_parameters": 4},
            {"n": 2, "method": "fs-merge folded", "seconds": 2.2, "peak_bytes": 110, "learnable_parameters": 4},
            {"n": 4, "method": "distill", "seconds": 4.0, "peak_bytes": 200, "learnable_parameters": 5}]
    rows = {(r["n"], r["method"]): r for r in cost._medians(runs)}
    assert rows[(2, "fs-merge folded")]["seconds"] == 2.2                 # the median of three
    assert rows[(2, "fs-merge folded")]["time_ratio"] == pytest.approx(1.1)
    assert rows[(2, "fs-merge folded")]["memory_ratio"] == pytest.approx(1.1)
    assert rows[(4, "distill")]["time_ratio"] == 1.0
    assert rows[(2, "fs-merge folded")]["time_ratio_quartiles"] is None       # one distillation run: no pairs


def test_run_by_run_ratio_quartiles_pair_runs_in_order():
    d, f = [2.0, 4.0, 2.0, 2.0, 4.0], [3.0, 4.0, 2.2, 2.4, 6.0]              # ratios 1.5, 1.0, 1.1, 1.2, 1.5
    runs = [{"n": 2, "method": m, "seconds": s, "peak_bytes": 1, "learnable_parameters": 1}
            for a, b in zip(d, f) for m, s in (("distill", a), ("fs-merge folded", b))]
    rows = {r["method"]: r for r in cost._medians(runs)}
    assert rows["fs-merge folded"]["time_ratio"] == pytest.approx(3.0 / 2.0)           # of the medians
    assert rows["fs-merge folded"]["time_ratio_quartiles"] == pytest.approx([1.1, 1.5])
    assert rows["distill"]["time_ratio_quartiles"] is None


def test_bad_arguments(capsys):
    assert main(["bench", "cost", "--n", "1"]) == 2
    assert "--n values" in capsys.readouterr().err
    assert main(["bench", "cost", "--methods", "magic"]) == 2
    assert "unknown cost-bench method" in capsys.readouterr().err


def test_same_process_runs_alternate_methods_after_an_untimed_run_of_each(monkeypatch):
    monkeypatch.setattr(cost, "VIT", {**cost.VIT, "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "out_dim": 8})
    calls = []
    timed = cost._timed_merge
    monkeypatch.setattr(cost, "_timed_merge", lambda models, data, cache, m, epochs, *a, **k:
                        calls.append((m, epochs)) or timed(models, data, cache, m, epochs, *a, **k))
    rows = cost.measure_alternating(2, ["distill", "fs-merge folded"], per_task=6, epochs=2, device="cpu",
                                    threads=None, repeats=2)
    assert calls == [("distill", 1), ("fs-merge folded", 1)] + [("distill", 2), ("fs-merge folded", 2)] * 2
    assert [r["method"] for r in rows] == ["distill", "fs-merge folded"] * 2
    assert all(r["n"] == 2 and r["seconds"] > 0 and r["peak_bytes"] is None for r in rows)


def test_steps_time_each_methods_real_step_alternately(monkeypatch):
    monkeypatch.setattr(cost, "VIT", {**cost.VIT, "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "out_dim": 8})
    rows = cost.measure_steps(2, ["distill", "fs-merge folded"], per_task=6, device="cpu", threads=None,
                              rounds=3, block=2)
    assert [r["method"] for r in rows] == ["distill", "fs-merge folded"] * 3
    assert all(r["seconds"] > 0 and r["peak_bytes"] is None and r["learnable_parameters"] > 0 for r in rows)
    table = {r["method"]: r for r in cost._medians(rows)}
    assert table["fs-merge folded"]["memory_ratio"] is None and len(table["fs-merge folded"]["time_ratio_quartiles"]) == 2


def test_steps_argument_errors(capsys):
    assert main(["bench", "cost", "--steps", "-1"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["bench", "cost", "--steps", "5", "--same-process"]) == 2
    assert "drop --same-process" in capsys.readouterr().err


def test_steps_against_another_checkout_time_its_folded_step_beside_ours(monkeypatch, tmp_path, capsys):
    import shutil
    from pathlib import Path
    shutil.copytree(Path(cost.__file__).parents[1], tmp_path / "src" / "foldmerge")    # a second checkout
    monkeypatch.setattr(cost, "VIT", {**cost.VIT, "width": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "out_dim": 8})
    rows = cost.measure_steps(2, ["distill", "fs-merge folded"], per_task=6, device="cpu", threads=None,
                              rounds=2, block=1, against=str(tmp_path / "src"))
    other = f"fs-merge folded @ {tmp_path / 'src'}"
    assert [r["method"] for r in rows] == ["distill", "fs-merge folded", other] * 2
    table = {r["method"]: r for r in cost._medians(rows)}
    assert table[other]["learnable_parameters"] == table["fs-merge folded"]["learnable_parameters"]
    assert main(["bench", "cost", "--against", str(tmp_path / "src")]) == 2
    assert "give --steps" in capsys.readouterr().err
    assert main(["bench", "cost", "--steps", "2", "--against", str(tmp_path)]) == 2
    assert "no foldmerge package there" in capsys.readouterr().err
