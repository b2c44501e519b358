"""foldmerge report: figures from bench JSON, and one-line errors for files it cannot read."""
import json

from foldmerge.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def _vit():
    rows = []
    for pair in (0, 1):
        for method, pt, j, s, lp in (("ensemble", 93.0, 71.0, None, None), ("distill", 86.0 + pair, 84.0, 119.0, 142464),
                                     ("fs-merge diag", 83.0, 82.0 + pair, 292.0, 7808)):
            rows.append({"pair": pair, "method": method, "per_task": pt, "joint": j, "seconds": s,
                         "learnable_parameters": lp})
    return {"bench": "vit", "setting": "pairs16", "rows": rows, "command": "foldmerge bench vit", "total_seconds": 60,
            "date": "2026-12-03T00:00:00+00:00", "environment": {"machine": "test CPU, 2 cores", "git_commit": "abc"}}


def _cost():
    rows = [{"n": n, "method": m, "seconds": s * n, "peak_bytes": 2**20 * n, "time_ratio": r, "memory_ratio": r,
             "learnable_parameters": 1} for n in (2, 4) for m, s, r in (("distill", 1.0, 1.0), ("fs-merge", 1.5, 1.5))]
    return {"bench": "cost", "device": "cpu", "precision": "32-true", "rows": rows, "command": "foldmerge bench cost"}


def _efficiency():
    rows = [{"arch": "mlp", "originals": None, "seed": 0, "method": "ensemble", "per_task": 95.0, "joint": 84.0}]
    rows += [{"arch": "mlp", "originals": n, "seed": s, "method": m, "per_task": 90.0 + s + n / 100, "joint": 80.0,
              "seconds": 3.0, "learnable_parameters": 100} for n in (16, 64) for s in (0, 1) for m in ("distill", "fs-merge")]
    from foldmerge.bench.efficiency import curves
    return {"bench": "data-efficiency", "arch": "mlp", "counts": [16, 64], "skipped": [], "total_per_task": 1024,
            "seeds": 2, "rows": rows, "curves": curves(rows), "command": "foldmerge bench data-efficiency"}


def _scale():
    from foldmerge.bench.scale import gaps
    rows = [{"width": w, "depth": 4, "originals": 16, "augmented": 800, "seed": 0, "source_parameters": 1000 * w,
             "method": m, "per_task": pt + w / 64, "joint": 80.0, "seconds": 10.0, "learnable_parameters": 5}
            for w in (64, 128) for m, pt in (("distill", 90.0), ("fs-merge diag+lowrank(12)", 89.0))]
    return {"bench": "scale", "rows": rows, "gaps": gaps(rows), "command": "foldmerge bench scale", "total_seconds": 1,
            "cells": 2, "cells_from_cache": 1}


def test_report_from_fixtures(tmp_path, capsys):
    paths = []
    for name, result in (("vit", _vit()), ("cost", _cost()), ("eff", _efficiency()), ("scale", _scale())):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(result))
        paths.append(str(p))
    out = tmp_path / "report"
    assert main(["report", *paths, "--out", str(out), "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    figures = sorted(out.glob("*.png"))
    for stem in ("vit-accuracy", "vit-time", "vit-params", "cost-ratios", "eff-curves", "scale-gap"):
        f = out / f"{stem}.png"
        assert f in figures
        data = f.read_bytes()
        assert data.startswith(PNG) and len(data) > 2000        # a drawn image, not an empty file
    md = (out / "report.md").read_text()
    assert "test CPU, 2 cores" in md and "2026-12-03" in md and "foldmerge bench vit" in md
    assert "86.5 ± 0.7 / 84.0" in md                   # distill per-task mean ± std over the two pairs
    assert "not recorded" in md                        # the cost fixture has no machine or date
    # a resumed run's own minutes leave out cells measured before: the report says so, with their merge time
    assert "read 1 of 2 cells back from earlier runs; the merges in it took 0.7 min" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figures)    # self-contained
    assert sorted(done["files"]) == sorted(p.name for p in out.iterdir())
    # a second report replaces the first
    assert main(["report", paths[0], "--out", str(out)]) == 0
    assert not (out / "cost-ratios.png").exists()


def test_report_refuses_bad_input(tmp_path, capsys):
    good = tmp_path / "vit.json"
    good.write_text(json.dumps(_vit()))
    truncated = tmp_path / "cut.json"
    truncated.write_text(good.read_text()[:200])
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"bench": "nothing", "rows": [], "command": "x"}))
    cut_keys = tmp_path / "nokeys.json"
    cut_keys.write_text(json.dumps({"bench": "vit", "rows": []}))
    out = tmp_path / "report"
    for bad, words in ((truncated, "not valid JSON"), (unknown, "unknown bench 'nothing'"),
                       (cut_keys, "without 'setting'")):
        assert main(["report", str(good), str(bad), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1
        assert not out.exists()                                  # nothing half-written
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert main(["report", str(good), "--out", str(other)]) == 2
    assert (other / "notes.txt").read_text() == "keep"


def test_scale_gap_and_config_parsing():
    import pytest
    from foldmerge.bench.scale import parse_config, vit_config
    result = _scale()
    g = {r["width"]: r for r in result["gaps"]}
    assert abs(g[64]["gap_per_task"] - (-1.0)) < 1e-9 and g[128]["seeds"] == 1
    assert parse_config("128x6") == (128, 6) and vit_config(192, 4)["heads"] == 12
    for bad in ("128", "100x4", "axb"):
        with pytest.raises(ValueError):
            parse_config(bad)


def test_bench_arguments_fail_with_one_line(capsys):
    assert main(["bench", "data-efficiency", "--arch", "mlp", "--counts", "2048", "--quiet"]) == 2
    assert "1…1024" in capsys.readouterr().err
    assert main(["bench", "scale", "--configs", "100x4"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


def test_pareto_front_names_each_cost_level_best():
    from foldmerge.bench.figures import pareto_front
    rows = [{"method": m, "seconds": s, "per_task": a}
            for m, s, a in [("cheap", 1, 50), ("dominated", 2, 40), ("better", 3, 70), ("tie-slower", 4, 70),
                            ("best", 9, 90)]]
    assert [r["method"] for r in pareto_front(rows, "seconds")] == ["cheap", "better", "best"]
