"""Label-free selection: parsing, the held-out agreement criterion, the choice it makes."""
import pytest
import torch

import foldmerge
from foldmerge import selection
from foldmerge.context import FeatureCache
from foldmerge.model import TaskModel


def sources():
    out = []
    for k, task in enumerate(["mnist:0-4", "mnist:5-9"]):
        torch.manual_seed(k)
        out.append(TaskModel("mlp", {"in_dim": 20, "hidden": [16, 12]}, [task]).to(torch.float64))
    return out


def sample(n=32):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 20, generator=g, dtype=torch.float64) for _ in range(2)]


def test_parse():
    assert selection.parse(["alpha=0.1,0.5", "stop-layer=0,2", "filter=cls,window-8"]) == \
        {"alpha": [0.1, 0.5], "stop_layer": [0, 2], "filter": ["cls", "window-8"]}
    assert selection.parse(None) == {}
    for bad in (["alpha"], ["=1"], ["alpha="]):
        with pytest.raises(ValueError, match="ARG=V1,V2"):
            selection.parse(bad)
    with pytest.raises(ValueError, match="twice"):
        selection.parse(["alpha=1", "alpha=2"])


def test_agreement_is_100_for_the_sources_themselves_side_by_side():
    src, data = sources(), sample()
    ens = foldmerge.merge(src, data, method="zipit", stop_layer=0, calibrate="none")   # the exact ensemble
    agree, kl = selection.agreement(ens, src, data, FeatureCache())
    assert agree == pytest.approx(100.0) and kl == pytest.approx(0.0, abs=1e-9)


def test_select_picks_the_candidate_that_reproduces_the_sources_and_merges_it_from_all_data():
    src, data = sources(), sample()
    merged = foldmerge.merge(src, data, method="zipit", select={"stop_layer": [2, 0]}, calibrate="none")
    report = merged.meta["select"]
    assert [t["options"] for t in report["trials"]] == [{"stop_layer": 2}, {"stop_layer": 0}]
    assert report["trials"][1]["agreement"] == pytest.approx(100.0)
    assert report["trials"][0]["agreement"] < 100.0
    assert report["chosen"] == {"stop_layer": 0} and merged.meta["stop_layer"] == 0
    direct = foldmerge.merge(src, data, method="zipit", stop_layer=0, calibrate="none")
    x = sample(5)[0]
    for a, b in zip(merged(x), direct(x)):
        assert torch.equal(a, b)


def test_select_errors():
    src, data = sources(), sample()
    with pytest.raises(ValueError, match="not an option of method 'average'"):
        foldmerge.merge(src, data, method="average", select={"alpha": [0.1]})
    with pytest.raises(ValueError, match="also given as an option"):
        foldmerge.merge(src, data, method="regmean", alpha=0.5, select={"alpha": [0.1]})
    with pytest.raises(ValueError, match="no values"):
        foldmerge.merge(src, data, method="regmean", select={"alpha": []})
    with pytest.raises(ValueError, match="at least 4"):
        foldmerge.merge(src, [d[:3] for d in data], method="regmean", select={"alpha": [0.5]})


def test_select_bench_compares_the_two_picks(monkeypatch, tmp_path):
    from foldmerge.bench import selection as bench
    src, data = sources(), sample()
    monkeypatch.setattr(bench, "_setting", lambda name, cache: (src, data, {"zipit": {"stop_layer": [2, 0]}}))
    val = {0: 90.0, 2: 95.0}                  # labelled validation prefers full zipping here

    def fake_eval(model, split="test"):
        return {"per_task_mean": val[model.meta["stop_layer"]] - (1.0 if split == "test" else 0.0)}

    monkeypatch.setattr(bench, "evaluate", fake_eval)
    result = bench.run_bench(settings=["mnist d2"], out=str(tmp_path))
    (row,) = result["rows"]
    assert row["validation_pick"] == {"stop_layer": 2} and row["label_free_pick"] == {"stop_layer": 0}
    assert not row["same"] and row["loss"] == pytest.approx(5.0) and row["best_test"] == pytest.approx(94.0)
    with pytest.raises(ValueError, match="unknown"):
        bench.run_bench(settings=["cifar d2"])


def test_held_out_halves_of_an_augmented_sample_hold_no_copy_of_what_the_merge_fits_on(monkeypatch):
    # augmented images are made from the drawn originals: split after augmenting, the scored half
    # holds copies of the fitted half's originals. --select splits the originals and augments each
    # half alone; the calibration fits and checks on the originals only.
    from foldmerge import api
    torch.manual_seed(0)
    src = [TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, [t]) for t in ("mnist:0-4", "mnist:5-9")]
    job = api.prepare(src, 8, method="zipit", augment=6, select={"beta": [0.3, 0.5]}, fidelity=0)
    originals = api._originals(job)
    assert [len(o) for o in originals] == [8, 8]

    def rows(t):
        return {tuple(r.flatten().tolist()) for r in t}
    for fit, held in api._augmented_folds(job):
        for f, h, o in zip(fit, held, originals):
            assert rows(h) <= rows(o) and len(h) == 4
            assert len(f) == 4 + 6 and not rows(f) & rows(h)
    seen = []
    real = api.calibrate_heads
    monkeypatch.setattr(api, "calibrate_heads", lambda m, s, data, index=None: (seen.append([len(d) for d in data]),
                                                                              real(m, s, data, index))[1])
    merged = api.finish(job, api.run(job))
    assert seen == [[8, 8]] and merged.meta["select"]["chosen"]["beta"] in (0.3, 0.5)
