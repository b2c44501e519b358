"""Tasks, splits and merge samples on the real (packaged) data."""
import pytest
import torch

from foldmerge.data import DataMissing, Task, datasets


def test_task_specs():
    assert Task.parse("mnist:0-4").classes == (0, 1, 2, 3, 4)
    assert Task.parse("fashion:5-9").name == "fmnist:5-9"
    assert Task.parse("mnist:0,2,4").name == "mnist:0,2,4"
    assert Task.parse("mnist").num_classes == 10
    for bad in ("mnist:0-11", "cifar:0-4", "mnist:4-0", "mnist:1,1", "mnist:a"):
        with pytest.raises(ValueError):
            Task.parse(bad)


def test_splits_are_disjoint_relabelled_and_ten_percent_val():
    t = Task.parse("mnist:5-9")
    xtr, ytr = t.split("train")
    xva, yva = t.split("val")
    xte, yte = t.split("test")
    assert xtr.shape[1:] == (1, 28, 28) and xtr.dtype == torch.float32
    assert sorted(ytr.unique().tolist()) == [0, 1, 2, 3, 4] == sorted(yte.unique().tolist())
    assert len(xva) / (len(xva) + len(xtr)) == pytest.approx(0.10, abs=0.001)
    # no validation image is also a training image (MNIST has a handful of exact duplicates,
    # so compare the split indices through their pixels on a sample)
    train = {x.numpy().tobytes() for x in xtr}
    assert sum(x.numpy().tobytes() in train for x in xva[:300]) <= 1


def test_merge_sample_is_seeded_and_from_train():
    t = Task.parse("mnist:0-4")
    a, b, c = t.sample(16, seed=0), t.sample(16, seed=0), t.sample(16, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    train = {x.numpy().tobytes() for x in t.split("train")[0]}
    assert all(x.numpy().tobytes() in train for x in a)
    with pytest.raises(ValueError, match="only"):
        t.sample(10**6, seed=0)


def test_missing_data_names_the_install_step(monkeypatch, tmp_path):
    monkeypatch.setenv("FOLDMERGE_FASHION_DIR", str(tmp_path))
    datasets.load_images.cache_clear()
    try:
        with pytest.raises(DataMissing, match="dataset-fashion-mnist"):
            datasets.load_images("fmnist")
    finally:
        datasets.load_images.cache_clear()


def test_task_views_make_distinct_tasks_from_the_same_images():
    from foldmerge.data import Task
    from foldmerge.sources import source_dirname
    plain, rot, inv = Task.parse("mnist:0-4"), Task.parse("mnist/rot90:0-4"), Task.parse("mnist/invert:0-4")
    assert rot.name == "mnist/rot90:0-4" and Task.parse(rot.name) == rot and rot != plain
    assert source_dirname(rot, 3) == "mnist-rot90_0-4-s3"
    x, y = plain.split("val")
    xr, yr = rot.split("val")
    xi, _ = inv.split("val")
    assert torch.equal(y, yr)
    assert torch.allclose(torch.rot90(x, 1, dims=(2, 3)), xr, atol=1e-6)
    # invert: 255 - p, so in normalized units x_inv = c - x for one constant c
    c = (xi + x).flatten()
    assert torch.allclose(c, c[0].expand_as(c), atol=1e-5)
    with pytest.raises(ValueError, match="unknown view"):
        Task.parse("mnist/upside:0-4")
