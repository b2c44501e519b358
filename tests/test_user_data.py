"""Your models and your data: classifiers made with plain transformers code (not foldmerge's trainer)
merge with their unlabeled examples in ordinary files, are scored on labelled files, and every bad
file is refused in one line naming it, with nothing written."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (AutoModelForImageClassification, AutoModelForSequenceClassification, BertConfig,
                          BertForSequenceClassification, BertTokenizerFast, ViTConfig, ViTForImageClassification,
                          ViTImageProcessor)

import foldmerge
from foldmerge import cli
from foldmerge.data.files import read

WORDS = "the a good bad film movie great awful sport news team win lose game price stock market rise fall".split()


def words(rng, n):
    return " ".join(rng.choice(WORDS, size=n))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Two BERT classifiers (3 and 7 labels) with their tokenizer, and their data in ordinary files."""
    root = tmp_path_factory.mktemp("texts")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [f"w{i}" for i in range(100)]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(str(root / "vocab.txt"))
    rng = np.random.default_rng(0)
    for name, labels, seed in [("reviews", ["neg", "pos", "neutral"], 0), ("news", [f"t{i}" for i in range(7)], 1)]:
        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32, num_labels=len(labels),
                         id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
        BertForSequenceClassification(cfg).save_pretrained(root / f"{name} model")
        tok.save_pretrained(root / f"{name} model")            # tokenizer.json and its config, no vocab.txt
    (root / "reviews.txt").write_text("\n".join(words(rng, rng.integers(2, 9)) for _ in range(40)) + "\n\n")
    with open(root / "news.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for i in range(40):
            w.writerow([i, words(rng, rng.integers(2, 20)), f"t{i % 7}"])
    with open(root / "reviews-labelled.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "label"])
        for i in range(30):
            w.writerow([words(rng, 5), ["neg", "pos", "neutral"][i % 3]])
    return root


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_classifiers_merge_from_a_text_file_and_a_csv_and_load_with_from_pretrained(texts, tmp_path, capsys):
    out = tmp_path / "merged news"
    code, printed, err = run_cli(["merge", texts / "reviews model", texts / "news model", "--data",
                                  texts / "reviews.txt", f"{texts / 'news.csv'}:text", "--per-task", 16, "--method",
                                  "fs-merge", "--epochs", 2, "--eval-data", texts / "reviews-labelled.csv",
                                  f"{texts / 'news.csv'}:text", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert "accuracy on --eval-data" in " ".join(printed.split()) and "sources side by side" in printed
    meta = json.loads((out / "config.json").read_text())["meta"]
    assert [f["source"] for f in meta["merge_sample"]["files"]] == [str(texts / "reviews.txt"),
                                                                  f"{texts / 'news.csv'}:text"]
    assert [t for t in json.loads((out / "config.json").read_text())["tasks"]] == [
        {"name": "reviews model", "labels": ["neg", "pos", "neutral"]},
        {"name": "news model", "labels": [f"t{i}" for i in range(7)]}]
    # the card: hashes of the sources, the data files, fidelity and accuracy on the labelled files
    card = (out / "README.md").read_text()
    assert meta["sources"][0]["sha256"] in card and "reviews.txt" in card
    assert "## Fidelity" in card and "## Accuracy on the labelled examples given" in card
    assert sorted(meta["fidelity"]) == ["news model", "reviews model"]
    assert "library_name: transformers" in (out / "hf" / "news_model" / "README.md").read_text()
    # each task's export answers as the merge does, through the standard class and the source's tokenizer
    merged = foldmerge.load(out)
    clf = AutoModelForSequenceClassification.from_pretrained(out / "hf" / "news_model")
    assert clf.config.id2label[6] == "t6"
    ids = torch.tensor([[2, 10, 11, 12, 3, 0, 0]])
    with torch.no_grad():
        torch.testing.assert_close(clf(input_ids=ids, attention_mask=(ids != 0).long()).logits, merged(ids)[1],
                                   atol=1e-5, rtol=1e-5)
    # eval reads the Hugging Face directories and the merge alike
    code, printed, err = run_cli(["eval", texts / "reviews model", out, "--eval-data", texts / "reviews-labelled.csv",
                                  texts / "reviews-labelled.csv", f"{texts / 'news.csv'}:text", "--quiet"], capsys)
    assert code == 0, err
    assert "reviews model" in printed and "accuracy on --eval-data" in " ".join(printed.split())


def test_every_format_reads_and_preprocessed_tensors_pass_as_they_are(texts, tmp_path):
    rows = [{"sentence": words(np.random.default_rng(k), 4), "label": "pos"} for k in range(12)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import datasets
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "t.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for spec in [tmp_path / "t.jsonl", f"{tmp_path / 't.parquet'}:sentence", f"{tmp_path / 'saved'}:0"]:
        e = read(str(spec))
        assert (e.kind, len(e)) == ("text", 12) and e.items[0] == rows[0]["sentence"], spec
    ids = np.random.default_rng(0).integers(5, 20, size=(20, 8))
    np.save(tmp_path / "ids.npy", ids)
    save_file({"a": torch.tensor(ids), "b": torch.zeros(3)}, str(tmp_path / "ids.safetensors"))
    assert torch.equal(read(str(tmp_path / "ids.npy")).items, torch.tensor(ids))
    assert torch.equal(read(f"{tmp_path / 'ids.safetensors'}:a").items, torch.tensor(ids))
    merged = foldmerge.merge([texts / "reviews model", texts / "news model"],
                             [tmp_path / "ids.npy", f"{tmp_path / 'ids.safetensors'}:a"], per_task=8, method="zipit")
    assert merged.meta["merge_sample"]["files"][0]["kind"] == "tensor"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two ViT image classifiers (4 and 6 labels) with their image processor, and image folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, labels, seed in [("shapes", ["a", "b", "c", "d"], 0), ("colours", [f"c{i}" for i in range(6)], 1)]:
        torch.manual_seed(seed)
        cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
        ViTForImageClassification(cfg).save_pretrained(root / name)
        ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / name)
        flat = root / f"{name}-unlabelled"
        flat.mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(flat / f"{i}.png")
        for label in labels:
            (root / f"{name}-labelled" / label).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                root / f"{name}-labelled" / label / "x.jpg")
    return root


def test_image_classifiers_merge_from_image_folders(images, tmp_path, capsys):
    out = tmp_path / "merged"
    code, printed, err = run_cli(["merge", images / "shapes", images / "colours", "--data",
                                  images / "shapes-unlabelled", images / "colours-labelled", "--per-task", 4,
                                  "--method", "zipit", "--eval-data", images / "shapes-labelled",
                                  images / "colours-labelled", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert "accuracy on --eval-data" in " ".join(printed.split())
    clf = AutoModelForImageClassification.from_pretrained(out / "hf" / "colours")
    assert clf.config.num_labels == 6


def test_foldmerge_models_read_image_folders_with_their_own_preprocessing(tmp_path):
    from foldmerge.model import TaskModel
    from foldmerge.inputs import preprocess
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    m = TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, ["mnist:0-4"])
    x = preprocess(m, read(str(tmp_path / "imgs")))
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    from foldmerge.data.tasks import _normalizer
    mean, std = _normalizer("mnist")
    raw = np.asarray(Image.open(tmp_path / "imgs" / "0.png"), dtype=np.float32) / 255.0
    torch.testing.assert_close(x[0, 0], (torch.from_numpy(raw) - mean) / std)


@pytest.mark.parametrize("case", ["unreadable image", "empty text", "missing column", "too few", "wrong shape",
                                  "one per model", "wrong kind", "unknown label"])
def test_bad_data_gets_one_line_naming_the_file_and_nothing_is_written(case, texts, images, tmp_path, capsys):
    models = [texts / "reviews model", texts / "news model"]
    data = [texts / "reviews.txt", f"{texts / 'news.csv'}:text"]
    extra = []
    if case == "unreadable image":
        (tmp_path / "imgs").mkdir()
        for i in range(7):
            Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image at all")
        models, data = [images / "shapes", images / "colours"], [tmp_path / "imgs", images / "colours-labelled"]
        said = "broken.png"
    elif case == "empty text":
        (tmp_path / "empty.txt").write_text("\n \n")
        data[0], said = tmp_path / "empty.txt", "holds no example"
    elif case == "missing column":
        data[1], said = f"{texts / 'news.csv'}:body", "no column 'body'"
    elif case == "too few":
        extra, said = ["--per-task", "1000"], "40 examples, and --per-task 1000"
    elif case == "wrong shape":
        np.save(tmp_path / "x.npy", np.zeros((10, 3, 9, 9), dtype=np.float32))
        data[0], said = tmp_path / "x.npy", "x.npy has shape (8, 3, 9, 9), which model 1 does not take"
    elif case == "one per model":
        data, said = data[:1], "one data file or folder per model (2), got 1"
    elif case == "wrong kind":
        data[0], said = images / "shapes-unlabelled", "holds images"
    else:
        extra, said = ["--eval-data", texts / "news.csv:text", texts / "news.csv:text"], "label 't0' is none of"
    code, _, err = run_cli(["merge", *models, "--data", *data, "--method", "zipit", "--per-task", 8, *extra,
                            "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and said in err, err
    assert not (tmp_path / "out").exists()


def test_tokenizers_that_differ_only_in_tokenizer_json_are_refused(texts, tmp_path, capsys):
    # transformers saves tokenizer.json alone: the same vocabulary cased and uncased tokenizes
    # "Good" differently, so the two models' ids would not mean the same words
    import shutil
    shutil.copytree(texts / "news model", tmp_path / "cased")
    BertTokenizerFast(str(texts / "vocab.txt"), do_lower_case=False).save_pretrained(tmp_path / "cased")
    assert not (tmp_path / "cased" / "vocab.txt").exists()
    code, _, err = run_cli(["merge", texts / "reviews model", tmp_path / "cased", "--method", "average",
                            "--out", tmp_path / "out"], capsys)
    assert code == 2 and "tokenizers differ" in err and "normalizer" in err, err
    assert not (tmp_path / "out").exists()


def test_hub_conventions_pytorch_model_bin_missing_tensors_and_hub_ids(texts, tmp_path, capsys):
    import shutil
    from safetensors.torch import load_file
    bin_dir = tmp_path / "bin model"
    shutil.copytree(texts / "news model", bin_dir)
    state = load_file(str(bin_dir / "model.safetensors"))
    (bin_dir / "model.safetensors").unlink()
    torch.save(state, bin_dir / "pytorch_model.bin")
    args = ["merge", texts / "reviews model", bin_dir, "--method", "average", "--out", tmp_path / "out"]
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "pytorch_model.bin, a pickle" in err and "--allow-pickle" in err and err.count("\n") == 1
    code, _, err = run_cli(args + ["--allow-pickle"], capsys)
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["meta"]
    assert meta["sources"][1]["loaded_from_pickle"] is True
    # a tensor missing or one too many: refused, never filled in at random or dropped
    for name, change in [("missing", lambda s: s.pop("classifier.weight")),
                         ("stray", lambda s: s.update({"extra.weight": torch.zeros(2)}))]:
        broken = tmp_path / f"{name} model"
        shutil.copytree(texts / "news model", broken)
        s = load_file(str(broken / "model.safetensors"))
        change(s)
        save_file(s, str(broken / "model.safetensors"))
        code, _, err = run_cli(["merge", texts / "reviews model", broken, "--method", "average", "--out",
                                tmp_path / f"out-{name}"], capsys)
        assert code == 2 and "does not hold exactly the model's tensors" in err and err.count("\n") == 1, err
        assert not (tmp_path / f"out-{name}").exists()
    code, _, err = run_cli(["merge", "nobody/no-such-model", texts / "news model", "--method", "average",
                            "--out", tmp_path / "out-hub"], capsys)
    assert code == 2 and "not in the local" not in err and "local Hugging Face cache" in err, err


def test_tokenizers_that_split_the_given_texts_differently_are_refused(texts, tmp_path, capsys):
    # the same vocabulary and rules but a shorter maximum length: equal as tokenizers, yet the given
    # texts come out truncated differently, which only tokenizing them shows
    import shutil
    shutil.copytree(texts / "news model", tmp_path / "short")
    BertTokenizerFast(str(texts / "vocab.txt"), model_max_length=6).save_pretrained(tmp_path / "short")
    code, _, err = run_cli(["merge", texts / "reviews model", tmp_path / "short", "--data", texts / "reviews.txt",
                            f"{texts / 'news.csv'}:text", "--method", "zipit", "--per-task", 8,
                            "--out", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and "tokenize the text" in err, err
    assert not (tmp_path / "out").exists()


def test_a_hub_id_is_named_after_its_repository_and_api_eval_data_scores(texts, tmp_path, monkeypatch):
    import shutil
    import foldmerge
    snapshot = tmp_path / "hf" / "hub" / "models--me--news-bert" / "snapshots" / "0123abc"
    shutil.copytree(texts / "news model", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))   # read when a download is asked
    merged = foldmerge.merge([texts / "reviews model", "me/news-bert"], method="average", fidelity=0,
                             eval_data=[texts / "reviews-labelled.csv", f"{texts / 'news.csv'}:text:label"])
    assert [t.name for t in merged.tasks] == ["reviews model", "news-bert"]       # not the revision hash
    scores = {row["model"]: row for row in merged.meta["scores"]}                   # eval_data alone asks for them
    assert scores and all(0.0 <= v <= 100.0 for row in scores.values() for v in row["per_task"].values())


def test_abbreviated_flags_are_refused(capsys):
    code = cli.main(["merge", "a", "b", "--meth", "average", "--out", "o"])
    err = capsys.readouterr().err
    assert code == 2 and "unrecognized arguments: --meth" in err and "--method" in err, err
