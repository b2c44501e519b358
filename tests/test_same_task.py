"""Same-task merges: models of one task (from different seeds) merge into one model with one head,
merged like any layer; models of different tasks keep a head each. Which heads answer one task is
checked on generated task lists; every method runs in the setting on tiny MLPs; Hugging Face
classifiers with the same labels merge into one classifier."""
import json
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

import foldmerge
from foldmerge import cli
from foldmerge.calibrate import calibrate_heads
from foldmerge.data import Task
from foldmerge.evaluation import SourceHeads
from foldmerge.heads import answers_same_task, merge_heads, share
from foldmerge.methods import METHODS
from foldmerge.model import TaskModel

MLP = {"in_dim": 784, "hidden": [16]}


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def mlp(task, seed):
    torch.manual_seed(seed)
    return TaskModel("mlp", MLP, [task])


# ------------------------------------------------------------------ which heads answer one task
POOL = ["mnist", "mnist:0-4", "mnist:5-9", "fmnist", "mnist/rot90:0-4",
        {"name": "reviews", "labels": ["neg", "pos"]}, {"name": "tweets", "labels": ["neg", "pos"]},
        {"name": "spam", "labels": ["ham", "spam"]}, {"name": "a", "labels": ["LABEL_0", "LABEL_1"]},
        {"name": "b", "labels": ["LABEL_0", "LABEL_1"]}, {"name": "topics", "labels": ["x", "y", "z"]}]


class Heads:
    """A stand-in source: its tasks are all sharing reads."""

    def __init__(self, tasks):
        self.tasks = [Task.parse(t) for t in tasks]


@pytest.mark.parametrize("trial", range(60))
def test_sharing_on_generated_task_lists(trial):
    rng = random.Random(trial)
    sources = [Heads(rng.sample(POOL, rng.choice([1, 1, 2]))) for _ in range(rng.randint(2, 4))]
    heads = [(k, t) for k, s in enumerate(sources) for t in s.tasks]
    for mode in ("auto", "no"):
        try:
            sharing = share(sources, mode)
        except ValueError as e:
            # refused only where two heads of one source answer one task, or two tasks not one share a name
            said = str(e)
            assert ("a source has two heads" in said and mode == "auto") or "both named" in said, said
            continue
        # every source head answers through exactly one head of the merge, of a task it is one with
        assert [len(i) for i in sharing.index] == [len(s.tasks) for s in sources]
        for k, s in enumerate(sources):
            for t, j in zip(s.tasks, sharing.index[k]):
                assert t == sharing.tasks[j] or (mode == "auto" and answers_same_task(t, sharing.tasks[j]))
        # two source heads share a merge head exactly when they answer one task (auto), never (no)
        flat = [j for i in sharing.index for j in i]
        for a in range(len(heads)):
            for b in range(a + 1, len(heads)):
                same = flat[a] == flat[b]
                assert same == (mode == "auto" and answers_same_task(heads[a][1], heads[b][1]))
        assert len({t.name for t in sharing.tasks}) == len(sharing.tasks)


def test_placeholder_labels_are_no_task_and_yes_says_so():
    a, b = Heads([POOL[8]]), Heads([POOL[9]])
    assert not share([a, b]).shared
    assert share([a, b], "yes").shared
    with pytest.raises(ValueError, match="one class count"):
        share([Heads(["mnist:0-4"]), Heads(["mnist:0-2"])], "yes")
    with pytest.raises(ValueError, match="one head each"):
        share([Heads(["mnist:0-4", "mnist:5-9"]), Heads(["fmnist:0-1"])], "yes")


# ------------------------------------------------------------------ the one head
def test_the_shared_head_answers_the_mean_of_the_adapted_heads_logits():
    a, b, c = mlp("mnist", 0), mlp("mnist", 1), mlp("fmnist:0-4", 2)
    sharing = share([a, b, c])
    assert [t.name for t in sharing.tasks] == ["mnist:0-9", "fmnist:0-4"] and sharing.index == [[0], [0], [1]]
    merged = TaskModel.for_merge([a, b, c])
    for h in merged.heads:
        torch.nn.init.normal_(h.weight)
    x = torch.randn(5, 1, 28, 28)
    before = merged(x)
    merge_heads(merged, sharing)
    after = merged(x)
    torch.testing.assert_close(after[0], (before[0] + before[1]) / 2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(after[1], before[2])
    assert [t.name for t in merged.tasks] == ["mnist:0-9", "fmnist:0-4"]
    # the reference: the sources' logits averaged per task
    ref = SourceHeads([a, b, c], sharing.index, sharing.tasks)(x)
    torch.testing.assert_close(ref[0], (a(x)[0] + b(x)[0]) / 2)


def test_a_merge_of_a_model_with_itself_is_the_model():
    a = mlp("mnist", 0)
    b = mlp("mnist", 5)
    b.load_state_dict(a.state_dict())
    merged = foldmerge.merge([a, b], data=8, method="average", fidelity=8)
    x = torch.randn(6, 1, 28, 28)
    assert len(merged.heads) == 1 and merged.meta["same_task"] == [{"task": "mnist:0-9", "sources": [1, 2]}]
    torch.testing.assert_close(merged(x)[0], a(x)[0])
    assert merged.meta["calibration"]["why"] == "one head: no task to route between"
    assert all(f["agreement"] == 100.0 for f in merged.meta["fidelity"].values())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_merges_models_of_one_task_into_one_head(name, tmp_path):
    a, b = mlp("mnist", 0), mlp("mnist", 1)
    options = {"epochs": 1} if name in ("fs-merge", "distill") else {}
    if name in ("task-arithmetic", "ties"):
        base = mlp("mnist", 2)
        base.save(tmp_path / "base")
        options = {"base": str(tmp_path / "base")}
    if name == "gating":
        with pytest.raises(ValueError, match="nothing to route between"):
            foldmerge.merge([a, b], data=8, method=name)
        return
    merged = foldmerge.merge([a, b], data=8, method=name, fidelity=8, **options)
    assert [t.name for t in merged.tasks] == ["mnist:0-9"] and len(merged.heads) == 1
    assert merged(torch.randn(3, 1, 28, 28))[0].shape == (3, 10)
    assert sorted(merged.meta["fidelity"]) == ["mnist:0-9 (source 1)", "mnist:0-9 (source 2)"]


def test_same_task_no_keeps_a_head_per_model_and_a_mixed_merge_calibrates_between_the_tasks():
    a, b, c = mlp("mnist:0-4", 0), mlp("mnist:0-4", 1), mlp("mnist:5-9", 2)
    with pytest.raises(ValueError, match="both named"):
        foldmerge.merge([a, b], data=8, method="zipit", same_task="no")
    merged = foldmerge.merge([a, b, c], data=8, method="zipit")
    assert [t.name for t in merged.tasks] == ["mnist:0-4", "mnist:5-9"]
    assert merged.meta["calibration"]["calibrate"] == "routing"
    # the calibration reads the two sources of the shared head as one sample
    model = TaskModel.for_merge([a, c])
    data = [torch.randn(16, 1, 28, 28) for _ in range(3)]
    assert "kept" in calibrate_heads(model, [a, b, c], data, [[0], [0], [1]])


# ------------------------------------------------------------------ Hugging Face classifiers
def bert(place, seed, labels):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=16, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
    BertForSequenceClassification(config).save_pretrained(place)
    return place


def test_hugging_face_classifiers_with_the_same_labels_merge_into_one_classifier(tmp_path, capsys):
    a = bert(tmp_path / "sentiment seed 0", 0, ["negative", "positive"])
    b = bert(tmp_path / "sentiment seed 1", 1, ["negative", "positive"])
    out = tmp_path / "merged"
    assert cli.main(["merge", str(a), str(b), "--method", "average", "--quiet", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["tasks"] == [{"name": "sentiment seed 0", "labels": ["negative", "positive"]}]
    assert sorted(p.name for p in (out / "hf").iterdir()) == ["backbone", "sentiment_seed_0"]
    clf = AutoModelForSequenceClassification.from_pretrained(out / "hf" / "sentiment_seed_0")
    assert clf.config.id2label == {0: "negative", 1: "positive"}
    ids = torch.tensor([[2, 5, 6, 3]])
    with torch.no_grad():
        torch.testing.assert_close(clf(input_ids=ids).logits, foldmerge.load(out)(ids)[0], atol=1e-5, rtol=1e-5)
    # told they are different tasks, they keep a head each
    assert cli.main(["merge", str(a), str(b), "--method", "average", "--same-task", "no", "--quiet",
                     "--out", str(tmp_path / "two")]) == 0
    assert len(json.loads((tmp_path / "two" / "config.json").read_text())["tasks"]) == 2


# ------------------------------------------------------------------ the bench and its correlation
def test_spearman_is_the_rank_correlation_with_ties_at_their_mean_rank():
    from foldmerge.bench import spearman
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2, 3], [5, 5, 5]) is None
    # ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): Pearson of the ranks
    assert abs(spearman([1, 2, 2, 3], [1, 2, 3, 4]) - 0.9486832980505138) < 1e-12


def test_bench_same_task_runs_every_row_on_tiny_models(monkeypatch, tmp_path):
    from foldmerge.bench import same_task
    from foldmerge.data import Task

    def tiny(task, seed):
        model = mlp(task, seed)
        model.meta = {"test_accuracy": foldmerge.evaluate(model)["per_task_mean"]}
        return model
    monkeypatch.setattr(same_task, "FAMILIES", {"mlp": tiny})
    monkeypatch.setattr(same_task, "PER_TASK", 8)
    monkeypatch.setattr(same_task, "FIDELITY", 8)
    split = Task.split
    monkeypatch.setattr(Task, "split", lambda self, which: tuple(t[:300] for t in split(self, which)))
    r = same_task.run_bench(families=("mlp",), datasets=("mnist",), methods=["average", "zipit", "cca", "permute"],
                            out=str(tmp_path))
    assert [row["method"] for row in r["rows"]] == ["source 1", "source 2", "Ensemble", "W.Avg", "Permute", "ZipIt!",
                                                   "CCA Merge"]
    assert all(0 <= row["agreement"] <= 100 for row in r["rows"][3:])
    assert r["correlation"]["merges"] == 4
    json.dumps(r)
    same_task.print_report({**r, "command": "x"}, "x")
    with pytest.raises(ValueError, match="unknown family"):
        same_task.run_bench(families=("nope",), out=str(tmp_path))


def test_eval_of_models_of_one_task_shows_their_logits_averaged(tmp_path, capsys):
    a, b = mlp("mnist", 0), mlp("mnist", 1)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    assert cli.main(["eval", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["model"] for r in rows][-1] == "logits averaged per task"
    x, y = Task.parse("mnist").split("test")
    with torch.no_grad():
        expected = 100.0 * (((a(x)[0] + b(x)[0]) / 2).argmax(1) == y).float().mean().item()
    assert abs(rows[-1]["per_task"]["mnist:0-9"] - expected) < 1e-9
