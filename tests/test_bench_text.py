"""`bench text` on a toy scale (tiny BERTs, a handful of texts) and `train-sources --from` a
Hugging Face BertModel start."""
import json

import pytest
import torch

from foldmerge import cli
from foldmerge.bench import text


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")


def test_bench_text_runs_every_row_and_the_sweep(monkeypatch, tmp_path):
    monkeypatch.setattr(text, "SCRATCH", {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                                          "intermediate_size": 16})
    monkeypatch.setitem(text.SETTINGS, "scratch", {**text.SETTINGS["scratch"], "per_task": 6, "held_out": 6,
                                                   "epochs": 2, "source_epochs": 1})
    monkeypatch.setattr(text, "SWEEP", (4, 100000))
    r = text.run_bench("scratch", pairs=1, sweep=True, out=str(tmp_path),
                       methods=["average", "distill", "fs-merge", "regmean"])
    names = [row["method"] for row in r["rows"]]
    assert names == ["random guess", "originals", "ensemble", "average", "regmean", "distill",
                     "fs-merge diag+lowrank(12)"]
    trained = [row for row in r["rows"] if row["method"] in ("distill", "fs-merge diag+lowrank(12)")]
    assert all(row["early_stop"]["held_out_examples"] == [6, 6] for row in trained)
    assert [row["per_task_texts"] for row in r["sweep"]] == [4, 4] and r["sweep_skipped"] == [100000]
    json.dumps(r)
    text.print_report({**r, "command": "x"}, "x")
    with pytest.raises(ValueError, match="unknown bench method"):
        text.run_bench("scratch", methods=["nope"], out=str(tmp_path))


def test_train_sources_fine_tunes_from_a_hugging_face_bert_start(tmp_path):
    from transformers import BertConfig, BertModel

    from foldmerge.data.texts import tokenizer
    torch.manual_seed(0)
    start = tmp_path / "start"
    BertModel(BertConfig(vocab_size=tokenizer().get_vocab_size(), hidden_size=8, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=16)).save_pretrained(start)
    out = tmp_path / "src"
    assert cli.main(["train-sources", "--arch", "bert", "--from", str(start), "--tasks", "bbc:3-4",
                     "--epochs", "0", "--out", str(out), "--json"]) == 0
    model_dir = out / "bbc_3-4-s0"
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["backbone"]["hidden_size"] == 8
    from foldmerge.api import load
    from foldmerge.hf import load_backbone
    m, (_, state) = load(model_dir), load_backbone(start)
    assert all(torch.equal(m.backbone.state_dict()[k], v) for k, v in state.items())     # 0 epochs: the start
    assert cli.main(["train-sources", "--arch", "mlp", "--from", str(start), "--tasks", "mnist:0-4",
                     "--out", str(tmp_path / "x")]) == 2
