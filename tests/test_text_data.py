"""BBC News text tasks: real data, fixed seeded splits, WordPiece token ids of all-MiniLM-L6-v2."""
import torch

from foldmerge.data import Task
from foldmerge.data.texts import MAX_TOKENS, bbc_texts, load_texts, tokenize


def test_bbc_news_has_its_2225_articles_in_five_sorted_topics_and_fixed_splits():
    texts, labels, classes = bbc_texts()
    assert len(texts) == 2225 and classes == sorted(classes) and len(classes) == 5
    data = load_texts("bbc")
    kept = len(data["train_y"]) + len(data["test_y"])
    assert 2000 < kept < 2225                               # verbatim repeats kept once
    every = torch.cat([torch.from_numpy(data["train_x"]), torch.from_numpy(data["test_x"])])
    assert len(torch.unique(every, dim=0)) == kept
    all_y = torch.cat([torch.from_numpy(data["train_y"]), torch.from_numpy(data["test_y"])])
    for c in range(5):                                       # 20 % of every topic is test
        n = int((all_y == c).sum())
        assert abs(int((data["test_y"] == c).sum()) - 0.2 * n) <= 1
    t = Task.parse("bbc:0,2,4")
    (tr, _), (va, _), (te, yte) = t.split("train"), t.split("val"), t.split("test")
    rows = {tuple(r.tolist()) for r in tr} | {tuple(r.tolist()) for r in va}
    assert not rows & {tuple(r.tolist()) for r in te} and set(yte.tolist()) == {0, 1, 2}
    assert torch.equal(t.sample(8, 3), t.sample(8, 3)) and tr.shape[1] == MAX_TOKENS


def test_tokens_are_the_minilm_wordpiece_ids():
    ids = tokenize(["Ink helps drive democracy in Asia"])[0]
    assert ids[0] == 101 and 102 in ids and ids[-1] == 0          # [CLS] … [SEP] [PAD]…
