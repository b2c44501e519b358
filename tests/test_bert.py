"""The BERT family (Hugging Face `BertModel`, post-LN) as a merge spec: folding is exact, the
structured inits fold to what they claim, every method that applies merges it."""
import pytest
import torch
from torch.nn import functional as F

import foldmerge
from foldmerge.model import TaskModel
from foldmerge.supernet import SuperNet

CFG = {"vocab_size": 40, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
       "intermediate_size": 16, "max_position_embeddings": 12}
TASKS = ["mnist:0-4", "mnist:5-9", "fmnist:0-4"]


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def berts(n, dtype=torch.float64, over=None):
    out = []
    for k in range(n):
        torch.manual_seed(k)
        out.append(TaskModel("bert", {**CFG, **(over or {}).get(k, {})}, [TASKS[k]]).to(dtype))
    return out


def ids(n=3, length=10, seed=0):
    x = torch.randint(1, CFG["vocab_size"], (n, length), generator=torch.Generator().manual_seed(seed))
    x[0, 6:] = 0                                  # padding: masked out of attention
    return x


def test_parameters_keep_their_hugging_face_names():
    from transformers import BertModel

    from foldmerge.arch.encoder import hf_config, tables
    m = berts(1)[0]
    hf = BertModel(hf_config(tables()["bert"], CFG))
    assert sorted(m.backbone.state_dict()) == sorted(f"bert.{k}" for k in hf.state_dict())


@pytest.mark.parametrize("param", ["full", "diag", "diag+lowrank(3)"])
@pytest.mark.parametrize("n,widths", [(2, None), (3, None), (2, [6, 12])])
def test_folded_bert_equals_supernet(param, n, widths):
    sn = SuperNet(berts(n), widths=widths, param=param, init="random", seed=3).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sn.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = ids()
    wide = sn(x, form="supernet")
    torch.testing.assert_close(sn(x, form="folded"), wide, rtol=0, atol=1e-10)
    plain = sn.fold()
    assert plain.backbone_config["hidden_size"] == (widths[0] if widths else CFG["hidden_size"])
    recon = sn.reconstruct(wide)
    for i, (k, out) in enumerate(zip(sn.head_owner, plain(x))):
        torch.testing.assert_close(out, F.linear(recon[k], *sn.head(i)), rtol=0, atol=1e-10)


@pytest.mark.parametrize("param", ["full", "diag"])
def test_first_init_folds_to_model_one(param):
    src = berts(2)
    folded = SuperNet(src, param=param, init="first").fold()
    x = ids()
    assert torch.equal(folded.features(x), src[0].features(x))


@pytest.mark.parametrize("method,opts", [("average", {}), ("slerp", {}), ("regmean", {}), ("zipit", {}),
                                         ("permute", {}), ("opt", {}), ("distill", {"epochs": 2}),
                                         ("fs-merge", {"epochs": 2}), ("fs-merge", {"epochs": 2, "variant": "seq"})])
def test_every_method_merges_berts(method, opts):
    src = berts(2, dtype=torch.float32)
    data = [ids(12, seed=k) for k in range(2)]
    merged = foldmerge.merge(src, data, method=method, **opts)
    assert merged.arch == "bert" and [t.name for t in merged.tasks] == TASKS[:2]
    outs = merged(ids())
    assert all(torch.isfinite(o).all() for o in outs)


def test_berts_that_cannot_merge_get_one_clear_error():
    for over, what in [({1: {"num_hidden_layers": 3}}, "layer counts"), ({1: {"vocab_size": 41}}, "vocabulary")]:
        with pytest.raises(ValueError, match=what):
            foldmerge.merge(berts(2, over=over), [ids(4)] * 2, method="fs-merge", epochs=1)
    with pytest.raises(ValueError, match="token ids"):
        foldmerge.merge(berts(2), [torch.randn(4, 10)] * 2, method="average")


def test_berts_merge_on_bbc_news_text_tasks():
    """Text tasks from real data: token ids drawn from BBC News, no augmentation by default,
    per-task and joint accuracy on the fixed test split."""
    from foldmerge.data import Task
    tasks = ["bbc:0-2", "bbc:3-4"]
    src = []
    for k, t in enumerate(tasks):
        torch.manual_seed(k)
        src.append(TaskModel("bert", {**CFG, "vocab_size": 30522, "max_position_embeddings": 128}, [t]))
    x, y = Task.parse("bbc:3,4").split("test")
    assert x.dtype == torch.int64 and x.shape[1] == 128 and set(y.tolist()) == {0, 1}
    merged = foldmerge.merge(src, 4, method="regmean")
    assert merged.meta["merge_sample"] == {"per_task": 4, "augment": 0, "seed": 0}
    result = foldmerge.evaluate(merged)
    assert set(result["per_task"]) == set(tasks) and 0 <= result["joint_mean"] <= 100
    with pytest.raises(ValueError, match="text task"):
        foldmerge.merge(src, 4, method="regmean", augment=8)


def test_train_sources_trains_a_bert_on_a_text_task(tmp_path):
    from foldmerge import cli
    assert cli.main(["train-sources", "--arch", "bert", "--tasks", "bbc:3-4", "--width", "8", "--depth", "1",
                     "--heads", "2", "--epochs", "1", "--limit", "32", "--out", str(tmp_path), "--threads", "1"]) == 0
    m = foldmerge.load(tmp_path / "bbc_3-4-s0")
    assert m.arch == "bert" and m.backbone_config["vocab_size"] == 30522 and 0 <= m.meta["test_accuracy"] <= 100
    assert cli.main(["train-sources", "--arch", "bert", "--tasks", "mnist:0-4", "--out", str(tmp_path)]) == 2
