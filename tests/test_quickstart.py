"""The README's quickstart, run exactly as written, on classifiers made here with plain transformers
code (not foldmerge's trainer; one with more than five labels) and data in ordinary files."""
import csv
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (BertConfig, BertForSequenceClassification, BertTokenizerFast, ViTConfig,
                          ViTForImageClassification, ViTImageProcessor)

from foldmerge import cli

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("stocks rise on good news the film was great awful bad game team win lose market price fall "
         "movie plot actors").split()


def quickstart() -> tuple[list[list[str]], list[str]]:
    """(the shell commands, the Python blocks) of the README's quickstart section."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quickstart.*?(?=^## )", text, flags=re.S | re.M).group(0)
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "foldmerge":
                commands.append(words[1:])
    return commands, re.findall(r"```python\n(.*?)```", section, flags=re.S)


def make_text_side(place: Path, rng) -> None:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (place / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(str(place / "vocab.txt"))
    for name, labels, seed in [("reviews-model", ["negative", "positive", "mixed"], 0),
                               ("news-model", ["business", "sport", "tech", "politics", "health", "science",
                                               "arts"], 1)]:
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=32, num_labels=len(labels),
                            id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
        BertForSequenceClassification(config).save_pretrained(place / name)
        tokenizer.save_pretrained(place / name)
    sentence = lambda: " ".join(rng.choice(WORDS, size=rng.integers(3, 12)))  # noqa: E731
    (place / "reviews.txt").write_text("\n".join(sentence() for _ in range(80)) + "\n")
    for name, column, label, labels, n in [("news.csv", "text", None, None, 80),
                                           ("reviews-labelled.csv", "text", "label", ["negative", "positive"], 30),
                                           ("news-labelled.csv", "text", "topic", ["sport", "arts"], 30)]:
        with open(place / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([column] + ([label] if label else []))
            for i in range(n):
                w.writerow([sentence()] + ([labels[i % len(labels)]] if label else []))


def make_image_side(place: Path, rng) -> None:
    for name, labels, seed in [("shapes-model", ["circle", "square", "star"], 0),
                               ("colours-model", [f"colour{i}" for i in range(6)], 1)]:
        torch.manual_seed(seed)
        config = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, num_labels=len(labels),
                           id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
        ViTForImageClassification(config).save_pretrained(place / name)
        ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(place / name)
        folder = place / name.replace("-model", "")
        folder.mkdir()
        for i in range(70):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        for label in labels:
            (place / f"{folder.name}-test" / label).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                    place / f"{folder.name}-test" / label / f"{i}.jpg")


def test_the_readme_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    commands, python_blocks = quickstart()
    assert len(commands) == 2 and len(python_blocks) == 1
    rng = np.random.default_rng(0)
    make_text_side(tmp_path, rng)
    make_image_side(tmp_path, rng)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FOLDMERGE_PROGRESS", "0")
    for argv in commands:
        assert cli.main(argv) == 0, capsys.readouterr().err
        printed = " ".join(capsys.readouterr().out.split())
        assert "accuracy on --eval-data" in printed and "sources side by side" in printed
    exec(compile(python_blocks[0], "README quickstart", "exec"), {})
    assert re.fullmatch(r"tensor\(\[\d\]\)\n", capsys.readouterr().out)
    assert (tmp_path / "merged" / "hf" / "news-model" / "tokenizer.json").is_file()
    assert (tmp_path / "merged-images" / "hf" / "colours-model" / "preprocessor_config.json").is_file()


if __name__ == "__main__":
    pytest.main([__file__])
