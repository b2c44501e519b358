"""Hugging Face directories in and out: tiny random BERTs built from configs (as mergekit's
tests do), saved with save_pretrained, merged, and each task's output loaded back with
AutoModelForSequenceClassification."""
import json
import shutil

import pytest
import torch

import foldmerge
from foldmerge.hf import check_tokenizers, is_hf_dir, load_hf, save_hf
from foldmerge.io import ModelFileError

CFG = dict(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
           max_position_embeddings=128)


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def hf_dir(tmp_path, name, seed, labels, **over):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    c = BertConfig(**{**CFG, **over}, num_labels=len(labels), id2label=dict(enumerate(labels)),
                   label2id={v: k for k, v in enumerate(labels)})
    BertForSequenceClassification(c).save_pretrained(tmp_path / name)
    (tmp_path / name / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(CFG["vocab_size"])))
    return tmp_path / name


def ids(n=4, seed=0):
    x = torch.randint(1, CFG["vocab_size"], (n, 16), generator=torch.Generator().manual_seed(seed))
    x[0, 10:] = 0
    return x


def test_a_merge_of_two_hf_directories_loads_back_with_auto_classes(tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification
    a = hf_dir(tmp_path, "a", 0, ["business", "entertainment", "politics"])
    b = hf_dir(tmp_path, "b", 1, ["sports", "tech"])
    assert is_hf_dir(a) and not is_hf_dir(tmp_path)
    src = [load_hf(a, "bbc:0-2"), load_hf(b, "bbc:3-4")]
    x = ids()
    with torch.no_grad():           # the loaded model is the HF model
        hf_a = AutoModelForSequenceClassification.from_pretrained(a).eval()
        torch.testing.assert_close(src[0](x)[0], hf_a(input_ids=x, attention_mask=(x != 0).long()).logits)
    merged = foldmerge.merge(src, [ids(12, 1), ids(12, 2)], method="fs-merge", epochs=3)
    out = save_hf(merged, tmp_path / "merged", src)
    with torch.no_grad():
        ours = merged(x)
        for i, (name, labels) in enumerate([("bbc_0-2", 3), ("bbc_3-4", 2)]):
            task_model = AutoModelForSequenceClassification.from_pretrained(out / name).eval()
            got = task_model(input_ids=x, attention_mask=(x != 0).long()).logits
            torch.testing.assert_close(got, ours[i], atol=1e-5, rtol=1e-5)
            assert len(task_model.config.id2label) == labels and (out / name / "vocab.txt").is_file()
        assert task_model.config.id2label[0] == "sports"
        base = AutoModel.from_pretrained(out / "backbone").eval()
        torch.testing.assert_close(base(input_ids=x, attention_mask=(x != 0).long()).pooler_output,
                                   merged.features(x), atol=1e-5, rtol=1e-5)
    again = load_hf(out / "bbc_3-4")                 # the task is recorded in the directory
    assert again.tasks[0].name == "bbc:3-4"


def test_hf_directories_that_cannot_merge_get_one_clear_error(tmp_path):
    a = hf_dir(tmp_path, "a", 0, ["x", "y", "z"])
    own = load_hf(a).tasks[0]                        # no task named: the head is the task
    assert (own.name, own.labels, own.builtin) == ("a", ("x", "y", "z"), False)
    with pytest.raises(ModelFileError, match="3 labels"):
        load_hf(a, "bbc:3-4")
    remote = hf_dir(tmp_path, "r", 0, ["x", "y"])
    cfg = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "m.M"}}))
    with pytest.raises(ModelFileError, match="trust_remote_code"):
        load_hf(remote, "bbc:3-4")
    other = tmp_path / "gpt"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(ModelFileError, match="has no merge spec"):
        load_hf(other, "bbc:3-4")
    b = hf_dir(tmp_path, "b", 1, ["s", "t"])
    (b / "vocab.txt").write_text("different")
    with pytest.raises(ModelFileError, match="tokenizers differ"):
        check_tokenizers([a, b])
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(**CFG)).save_pretrained(tmp_path / "headless")
    with pytest.raises(ModelFileError, match="without a classification head.*--from"):
        load_hf(tmp_path / "headless", "bbc:3-4")
    deep = hf_dir(tmp_path, "d", 2, ["s", "t"], num_hidden_layers=3)
    with pytest.raises(ValueError, match="layer counts"):
        foldmerge.merge([load_hf(a, "bbc:0-2"), load_hf(deep, "bbc:3-4")], [ids(4)] * 2, method="fs-merge", epochs=1)


def test_the_cli_merges_hf_directories_and_each_task_loads_in_three_lines(tmp_path, capsys):
    from foldmerge.cli import main
    small = hf_dir(tmp_path, "small", 0, ["x", "y"])
    assert main(["merge", str(small), str(small), "--tasks", "bbc:0-1", "bbc:3-4", "--method", "average",
                 "--out", str(tmp_path / "m0")]) == 2
    assert "vocabulary" in capsys.readouterr().err           # BBC's WordPiece ids need the real vocabulary
    a = hf_dir(tmp_path, "a", 0, ["business", "entertainment", "politics"], vocab_size=30522)
    b = hf_dir(tmp_path, "b", 1, ["sports", "tech"], vocab_size=30522)
    out = tmp_path / "merged"
    assert main(["merge", str(a), str(b), "--tasks", "bbc:0-2", "bbc:3-4", "--method", "average",
                 "--per-task", "8", "--out", str(out)]) == 0
    # the README's three lines
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(out / "hf" / "bbc_3-4")
    logits = model(input_ids=ids(), attention_mask=(ids() != 0).long()).logits
    merged = foldmerge.load(out)
    with torch.no_grad():
        torch.testing.assert_close(logits, merged(ids())[1], atol=1e-5, rtol=1e-5)
    # the backbone is on disk once: each task directory hard-links its shard, and loads when copied alone
    shards = [out / "hf" / d / "backbone.safetensors" for d in ("backbone", "bbc_0-2", "bbc_3-4")]
    assert len({p.stat().st_ino for p in shards}) == 1
    assert (out / "hf" / "bbc_3-4" / "classifier.safetensors").stat().st_size < shards[0].stat().st_size / 20
    alone = tmp_path / "copied alone"
    shutil.copytree(out / "hf" / "bbc_3-4", alone)
    torch.testing.assert_close(AutoModelForSequenceClassification.from_pretrained(alone)(
        input_ids=ids(), attention_mask=(ids() != 0).long()).logits, logits)
    assert main(["merge", str(alone), str(a), "--method", "average", "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    # without --tasks each model's task is its head; a method that reads data then needs --data
    assert main(["merge", str(a), str(b), "--method", "fs-merge", "--out", str(tmp_path / "m2")]) == 2
    assert "give them with --data" in capsys.readouterr().err and not (tmp_path / "m2").exists()
    assert main(["merge", str(a), str(b), "--method", "average", "--out", str(tmp_path / "m2")]) == 0
    assert [t.labels for t in foldmerge.load(tmp_path / "m2").tasks] == \
        [("business", "entertainment", "politics"), ("sports", "tech")]
