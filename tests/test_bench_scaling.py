"""`foldmerge bench scaling` on the smallest decoder: every mode measured in its own process, the
table and the report's figure."""
import json

from foldmerge.bench import scaling
from foldmerge.bench.report import build_report


def test_bench_scaling_measures_both_modes_in_fresh_processes(tmp_path):
    r = scaling.run_bench(out=str(tmp_path), widths=(64,), dtypes=("bfloat16",), methods=("average",))
    assert [(row["mode"], row["dtype"]) for row in r["rows"]] == [("lazy", "bfloat16"), ("whole", "bfloat16")]
    assert all(row["peak_bytes"] >= 0 and row["seconds"] > 0 and row["source_bytes"] > 0 for row in r["rows"])
    assert r["fits"] == []                      # one size: no line to fit
    r["rows"].append({**r["rows"][0], "width": 128, "source_bytes": 2 * r["rows"][0]["source_bytes"],
                      "peak_bytes": 2 * r["rows"][0]["peak_bytes"] + 1})
    fit = scaling.fits(r["rows"])
    assert [(f["mode"], round(f["memory_per_source_byte"], 3)) for f in fit] == [
        ("lazy", round(r["rows"][0]["peak_bytes"] / r["rows"][0]["source_bytes"], 3))]
    r.update(fits=fit, command="foldmerge bench scaling", environment={"machine": "test"})
    (tmp_path / "bench-scaling.json").write_text(json.dumps(r))
    build_report([str(tmp_path / "bench-scaling.json")], str(tmp_path / "report"), "x")
    assert "Merges bigger than memory" in (tmp_path / "report" / "report.md").read_text()
    scaling.print_report(r, "x")
