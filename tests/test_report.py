"""foldmerge report: figures from bench, merge and eval JSON, and one-line errors for files it cannot read."""
import contextlib
import io
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from foldmerge.bench.efficiency import curves
from foldmerge.bench.figures import accuracy_figure, name_points, pareto_front
from foldmerge.bench.report import REPLICATE, TOPICS, slug
from foldmerge.bench.results import BENCHES, points, summary
from foldmerge.bench.scale import gaps, parse_config, vit_config
from foldmerge.cli import main

ROOT = Path(__file__).resolve().parents[1]

PNG = b"\x89PNG\r\n\x1a\n"


def _vit():
    rows = []
    for pair in (0, 1):
        for method, pt, j, s, lp in (("random guess", 20.0, 10.0, None, None), ("originals", 95.0, 81.0, None, None),
                                     ("ensemble", 93.0, 71.0, None, None), ("average", 30.0 + pair, 28.0, 1.0, None),
                                     ("distill", 86.0 + pair, 84.0, 119.0, 142464),
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
    return {"bench": "data-efficiency", "arch": "mlp", "counts": [16, 64], "skipped": [], "total_per_task": 1024,
            "seeds": 2, "rows": rows, "curves": curves(rows), "command": "foldmerge bench data-efficiency"}


def _scale():
    rows = [{"width": w, "depth": 4, "originals": 16, "augmented": 800, "seed": 0, "source_parameters": 1000 * w,
             "method": m, "per_task": pt + w / 64, "joint": 80.0, "seconds": 10.0, "learnable_parameters": 5}
            for w in (64, 128) for m, pt in (("distill", 90.0), ("fs-merge diag+lowrank(12)", 89.0))]
    return {"bench": "scale", "rows": rows, "gaps": gaps(rows), "command": "foldmerge bench scale", "total_seconds": 1,
            "cells": 2, "cells_from_cache": 1}


def _cnn():
    # ZipIt! 1/3 keeps two of three stages per model: more MFLOPs than one original, so no best merge
    rows = [{"pair": "mnist", "width": 1, "seed": seed, "method": m, "task_a": a, "task_b": a, "avg": a, "joint": j,
             "mflops": f, "seconds": s}
            for seed in (0, 1) for m, a, j, f, s in (("Originals", 98.0, None, 4.7294, 0.0),
                                                     ("Ensemble", 97.0 + seed, 92.0, 9.4588, 0.0),
                                                     ("ZipIt! 1/3", 95.0, 90.0, 12.156, 2.0),
                                                     ("PLeaS", 80.0 + 2 * seed, 70.0, 4.7297, 3.0),
                                                     ("W.Avg", 20.0, 15.0, 4.7297, 0.1),
                                                     ("Distillation", 85.0, 80.0 + seed, 4.7297, 9.0))]
    return {"bench": "cnn", "rows": rows, "command": "foldmerge bench cnn", "total_seconds": 5}


def _mlp():
    runs = [{"method": m, "value": d, "seed": seed, "per_task": pt - d, "joint": j, "seconds": s}
            for d in (1, 2) for seed in (0, 1, 2)
            for m, pt, j, s in (("average", 90.0, 80.0, 0.1), ("distill", 95.0, 85.0, 20.0), ("ensemble", 96.0, 84.0, 0.2),
                                ("originals", 97.0, 86.0, None), ("zipit", 96.0, 87.0, 0.4))]
    return {"bench": "mlp", "dataset": "mnist", "vary": "depth", "runs": runs, "command": "foldmerge bench mlp"}


def _merge():
    return {"out": "runs/merged", "meta": {"method": "zipit", "options": {"alpha": 0.3}, "wall_seconds": 3.5,
                                           "command": "foldmerge merge a b --method zipit --out runs/merged --json",
                                           "provenance": {"machine": "test CPU, 2 cores", "git_commit": "abc"}},
            "test": {"split": "test", "per_task": {"mnist:0-4": 95.0, "mnist:5-9": 90.5}, "per_task_mean": 92.75,
                     "joint": {"mnist:0-4": 83.0, "mnist:5-9": 75.0}, "joint_mean": 79.0}}


def _eval():
    return {"results": [
        {"model": "src/a", "method": "source", "split": "test", "per_task": {"mnist:0-4": 97.7}, "per_task_mean": 97.7},
        {"model": "src/b", "method": "source", "split": "test", "per_task": {"mnist:5-9": 95.0}, "per_task_mean": 95.0},
        {"model": "ensemble", "method": "ensemble", "split": "test", "per_task": {"mnist:0-4": 94.0, "mnist:5-9": 88.3},
         "per_task_mean": 91.15, "joint": {"mnist:0-4": 54.2, "mnist:5-9": 71.4}, "joint_mean": 62.8}]}


def _write(folder, results: dict) -> list[str]:
    paths = []
    for name, result in results.items():
        p = folder / f"{name}.json"
        p.write_text(json.dumps(result))
        paths.append(str(p))
    return paths


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
                       (cut_keys, "the field 'command' is missing")):
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
    rows = [{"method": m, "seconds": s, "per_task": a}
            for m, s, a in [("cheap", 1, 50), ("dominated", 2, 40), ("better", 3, 70), ("tie-slower", 4, 70),
                            ("best", 9, 90)]]
    assert [r["method"] for r in pareto_front(rows, "seconds")] == ["cheap", "better", "best"]


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """One report of every kind of fixture, given out of the sections' order."""
    folder = tmp_path_factory.mktemp("full")
    paths = _write(folder, {"eval": _eval(), "cost": _cost(), "merge": _merge(), "cnn": _cnn(), "eff": _efficiency(),
                            "vit": _vit(), "scale": _scale(), "mlp": _mlp()})
    assert main(["report", *paths, "--out", str(folder / "report")]) == 0
    return folder / "report"


def _table_after(md: str, heading: str) -> list[list[str]]:
    lines = md[md.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start + 2:]:          # past the header and its rule
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def test_the_summary_comes_first_with_each_settings_best_merge_and_references(full_report):
    md = (full_report / "report.md").read_text()
    h2 = re.findall(r"^## (.+)$", md, flags=re.MULTILINE)
    assert h2[0] == "Summary" and md.index("**Contents**") < md.index("## Summary")
    rows = {r[0]: r for r in _table_after(md, "## Summary")}
    # setting, result, n, best merge, its accuracy, distillation, originals, ensemble: means over replicates
    assert rows["ViT pairs16"] == ["ViT pairs16", "vit.json", "2 pairs", "fs-merge diag", "83.0 / 82.5",
                                   "86.5 ± 0.7 / 84.0", "95.0 / 81.0", "93.0 / 71.0"]
    # ZipIt! 1/3 is more accurate than PLeaS but larger than one model; the ensemble is a reference
    assert rows["CNN mnist x1"] == ["CNN mnist x1", "cnn.json", "2 seeds", "PLeaS", "81.0 ± 1.4 / 70.0",
                                    "85.0 / 80.5", "98.0 / –", "97.5 ± 0.7 / 92.0"]
    assert rows["MLP mnist depth 1"][2:5] == ["3 seeds", "zipit", "95.0 / 87.0"]
    assert rows["MLP mnist depth 2"][5:] == ["93.0 / 85.0", "95.0 / 86.0", "94.0 / 84.0"]
    assert list(rows) == ["MLP mnist depth 1", "MLP mnist depth 2", "ViT pairs16", "CNN mnist x1"]
    assert "left out by that: cnn.json: ZipIt! 1/3." in md
    assert "Not in this table" in md and "Merges, Evaluations" in md


def test_sections_come_in_their_order_each_result_under_its_heading(full_report):
    md = (full_report / "report.md").read_text()
    assert re.findall(r"^## (.+)$", md, flags=re.MULTILINE) == ["Summary", "MLP", "ViT", "CNN", "Scale", "Data efficiency",
                                                          "Cost", "Merges", "Evaluations"]
    assert re.findall(r"^### (.+)$", md, flags=re.MULTILINE) == ["mlp.json", "vit.json", "cnn.json", "scale.json", "eff.json",
                                                           "cost.json", "merge.json", "eval.json"]
    assert set(TOPICS) == set(BENCHES) | {"merge", "eval"} and set(REPLICATE) <= set(TOPICS)


def test_the_table_of_contents_links_every_heading(full_report):
    md = (full_report / "report.md").read_text()
    contents = md[md.index("**Contents**"):md.index("## Summary")]
    links = re.findall(r"^( *)- \[(.+)\]\(#(.+)\)$", contents, flags=re.MULTILINE)
    headings = re.findall(r"^(#{2,3}) (.+)$", md, flags=re.MULTILINE)
    assert [(len(indent) // 2 + 2, text) for indent, text, _ in links] == [(len(h), t) for h, t in headings]
    assert [a for _, _, a in links] == [slug(t) for _, t in headings]
    assert slug("One start (gating)") == "one-start-gating" and slug("bench-cnn-w1.json") == "bench-cnn-w1json"
    html = (full_report / "report.html").read_text()
    for _, _, anchor in links:
        assert f"href='#{anchor}'" in html and f"id='{anchor}'" in html


def test_merge_and_eval_json_are_reported(full_report):
    md = (full_report / "report.md").read_text()
    merge = _table_after(md, "### merge.json")
    assert merge == [["runs/merged", "zipit", "95.0 / 83.0", "90.5 / 75.0", "92.8 / 79.0"]]
    assert "foldmerge merge a b --method zipit" in md and "options: alpha=0.3" in md
    evaluated = _table_after(md, "### eval.json")
    assert evaluated[0] == ["src/a", "source", "97.7 / –", "–", "97.7 / –"]
    assert evaluated[2] == ["ensemble", "ensemble", "94.0 / 54.2", "88.3 / 71.4", "91.2 / 62.8"]


@pytest.mark.parametrize("bad, words", [
    ({"out": "x", "meta": {"method": "zipit"}}, "the field 'test' is missing"),
    ({"out": "x", "meta": {"method": "zipit"}, "test": {"per_task": {"a": 90.0}}}, "the field 'test.per_task_mean' is missing"),
    ({"out": "x", "meta": {}, "test": {"per_task": {}, "per_task_mean": 1.0}}, "the field 'meta.method' is missing"),
    ({"out": "x", "meta": {"method": "m"}, "test": {"per_task": {"a": "high"}, "per_task_mean": 1.0}},
     "field 'test.per_task.a': found 'high', expected a valid number"),
    ({"results": [_eval()["results"][0], {"model": "b", "method": "source", "per_task_mean": 1.0}]},
     "the field 'results.1.per_task' is missing"),
    ({"results": [{"model": "b", "per_task": {}, "per_task_mean": 1.0}]}, "the field 'results.0.method' is missing"),
    ({"results": []}, "field 'results': found [], expected at least 1 item"),
    ({"rows": []}, "no 'bench', 'test' or 'results' key"),
])
def test_a_malformed_merge_or_eval_json_is_refused_in_one_line(tmp_path, capsys, bad, words):
    good, broken = _write(tmp_path, {"merge": _merge(), "broken": bad})
    out = tmp_path / "report"
    assert main(["report", good, broken, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and broken in err and len(err.splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]


def test_references_are_lines_not_bars():
    rows = summary(points(_vit()))
    ax = accuracy_figure(rows, "vit").axes[0]
    methods = [t.get_text() for t in ax.get_yticklabels()]
    assert methods == ["average", "distill", "fs-merge diag"]            # no originals, ensemble, random guess
    assert len(ax.patches) == 2 * len(methods)                          # per-task and joint bars, methods only
    assert {round(p.get_width(), 6) for p in ax.patches} == {30.5, 28.0, 86.5, 84.0, 83.0, 82.5}
    levels = {(line.get_xdata()[0], line.get_linestyle()) for line in ax.lines if line.get_linestyle() != "None"}
    assert levels == {(95.0, "-"), (81.0, "-"), (93.0, "--"), (71.0, "--"), (20.0, ":"), (10.0, ":")}


def test_names_beside_points_do_not_overlap():
    fig = Figure(figsize=(4, 3))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    named = [(1.0, 50.0, "a long method name"), (1.02, 50.1, "another long name"), (1.01, 49.9, "a third"),
             (3.0, 10.0, "far away")]
    ax.scatter([x for x, _, _ in named], [y for _, y, _ in named])
    texts = name_points(ax, named)
    boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in texts]
    assert [t.get_text() for t in texts] == ["another long name", "a long method name", "a third", "far away"]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def _paths_of(value, at=()):
    """Every path into a JSON value (keys and list indices), the value itself first."""
    yield at
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths_of(v, at + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _paths_of(v, at + (i,))


ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True) |
                        st.text(max_size=4), lambda inner: st.lists(inner, max_size=2) |
                        st.dictionaries(st.text(max_size=3), inner, max_size=2), max_leaves=4)


@settings(max_examples=20, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_result_changed_anywhere_reports_or_is_refused_in_one_line(tmp_path_factory, data):
    """Hostile result JSON: one value anywhere in a committed bench result (or a fixture) replaced by
    any JSON value: a report, or one line and no report folder."""
    name = data.draw(st.sampled_from(["vit", "cost", "eff", "scale", "bench-cost", "bench-text-scratch"]))
    result = {"vit": _vit, "cost": _cost, "eff": _efficiency, "scale": _scale}[name]() if "-" not in name else \
        json.loads((ROOT / "docs" / "results" / f"{name}.json").read_text())
    path = data.draw(st.sampled_from(list(_paths_of(result))))
    value = data.draw(ANY_JSON)
    if path:
        at = result
        for p in path[:-1]:
            at = at[p]
        at[path[-1]] = value
    else:
        result = value
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "r.json").write_text(json.dumps(result))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["report", str(folder / "r.json"), "--out", str(folder / "report")])
    assert code in (0, 2), err.getvalue()
    if code == 2:
        assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("foldmerge: error:"), err.getvalue()
        assert not (folder / "report").exists()
    else:
        assert (folder / "report" / "report.md").is_file()


def test_a_same_task_bench_reports_the_sources_mean_as_originals_and_its_correlation(tmp_path, capsys):
    rows = [{"family": "mlp", "dataset": "mnist", "seed": 0, "method": m, "accuracy": a, "mflops": 0.2,
             "seconds": s} for m, a, s in (("source 1", 90.0, None), ("source 2", 94.0, None),
                                           ("Ensemble", 95.0, None), ("W.Avg", 60.0, 0.1), ("FS-Merge", 93.0, 9.0))]
    result = {"bench": "same-task", "rows": rows, "command": "foldmerge bench same-task",
              "correlation": {"per_cell": {"mlp mnist s0": 1.0}, "pooled": 0.5, "merges": 2}}
    found = {p["method"]: p for p in points(result)}
    assert found["Originals"]["per_task"] == 92.0 and found["Originals"]["joint"] is None
    assert "source 1" not in found and found["FS-Merge"]["per_task"] == 93.0
    paths = _write(tmp_path, {"bench-same-task": result})
    assert main(["report", *paths, "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Spearman's rho +0.50 over 2 merges pooled; per cell +1.00 to +1.00" in md
    row = next(r for r in _table_after(md, "Summary") if r[0] == "one task, mlp mnist")
    assert row[3:5] == ["FS-Merge", "93.0 / –"] and row[6] == "92.0 / –"
