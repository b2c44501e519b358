"""`foldmerge bench lm`: language models from different seeds merged into one of the same size.

Two shapes of decoder, each transformers' own class: Llama-shaped (`LlamaForCausalLM`: 4 layers at
width 128, 4 query heads and 2 key-value heads, gated MLP 256, rotary embeddings) and GPT-2-shaped
(`GPT2LMHeadModel`: 4 layers at width 128, 4 heads, MLP 256, a position table, its LM head tied to
its token table), trained here from seeds 0 and 1 on BBC News text,
words as tokens (the 2,000 commonest words of the training articles, lower case, a word-level
tokenizer saved with every model), blocks of 64 tokens, 600 steps of 32 blocks (AdamW, lr 2e-3, one
cycle). Two settings:

  same       both sources on every topic's articles: the seed-collection setting
  domains    source 1 on business and politics, source 2 on sport and entertainment

Each merge reads 200 unlabeled training blocks per source (the models share one vocabulary, so one
LM head); FS-Merge (diagonal + low rank 12, and full maps; global, and local with full maps) and
distillation (on the last features, and on the logits by KL) start from `first` and train 50 epochs
at batch 64 (FS-Merge local: 1,024 token rows a step). Measured on
300 held-out blocks of each domain (the test articles, a fixed 20 % of every topic): perplexity of
the sources, of the ensemble (their next-token probabilities averaged: two models' cost), and of
every merge; merge seconds and peak memory (resident set above the level before the merge, freed
memory given back to the system first: `bench.cost.PeakMemory`). Each merge's row is a cell kept
under OUT/lm/cells: an interrupted run resumes.
"""
from __future__ import annotations

import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from torch.nn import functional as F

from ..api import merge
from ..data.texts import bbc_texts
from ..hf import load_hf
from ..progress import status
from ..selection import ensemble_log_probs
from . import Cells
from .cost import PeakMemory

DOMAINS = {"all": ("business", "entertainment", "politics", "sport", "tech"),
           "business+politics": ("business", "politics"), "sport+entertainment": ("sport", "entertainment")}
SETTINGS = {"same": ("all", "all"), "domains": ("business+politics", "sport+entertainment")}
VOCAB, BLOCK = 2000, 64
CONFIG = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=256, max_position_embeddings=BLOCK, bos_token_id=1, eos_token_id=2)
GPT2 = dict(n_embd=128, n_layer=4, n_head=4, n_inner=256, n_positions=BLOCK, bos_token_id=1, eos_token_id=2)
# shape -> (config class, LM class, configuration, cache prefix of its sources)
SHAPES = {"llama": ("LlamaConfig", "LlamaForCausalLM", "CONFIG", ""),
          "gpt2": ("GPT2Config", "GPT2LMHeadModel", "GPT2", "gpt2-")}
TRAIN = dict(steps=600, lr=2e-3, batch_size=32)
PER_TASK, TEST = 200, 300
TRAINED = {"init": "first", "epochs": 50, "batch_size": 64}
PLAN = [("average", "average", {}), ("ZipIt!", "zipit", {}), ("permute", "permute", {}),
        ("distill", "distill", TRAINED), ("fs-merge diag+lowrank(12)", "fs-merge", {"param": "diag+lowrank(12)", **TRAINED}),
        ("fs-merge full", "fs-merge", {"param": "full", **TRAINED}),
        # added after the first runs (the full list): RegMean, distillation on the logits by KL, and
        # FS-Merge local (one (M, U) per space of the stream, on every token's activations: 1,024 rows a step)
        ("regmean", "regmean", {}),
        ("distill (logits, KL)", "distill", {**TRAINED, "logit_weight": 1.0, "logit_loss": "kl"}),
        ("fs-merge local full", "fs-merge", {"variant": "local", "param": "full", **TRAINED, "batch_size": 1024})]
WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def _articles() -> dict[str, tuple[list[str], list[str]]]:
    """topic -> (training articles, test articles): a fixed 20 % of every topic is the test set."""
    texts, labels, classes = bbc_texts()
    out = {}
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        members = [texts[i] for i in np.flatnonzero(labels == c)]
        order = rng.permutation(len(members))
        cut = int(round(0.2 * len(members)))
        out[name] = ([members[i] for i in order[cut:]], [members[i] for i in order[:cut]])
    return out


def _topic(name: str) -> str:
    return {"sports": "sport"}.get(name, name)


def tokenizer(articles: dict, folder: Path):
    """The word-level tokenizer of the commonest training words, saved in `folder`."""
    import transformers
    counts = Counter(w for train, _ in articles.values() for a in train for w in WORD.findall(a.lower()))
    words = [w for w, _ in counts.most_common(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Split(Regex(WORD.pattern), behavior="isolated")])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def blocks(tok, texts: list[str]) -> torch.Tensor:
    """The texts' ids, each ended by </s>, concatenated and cut into blocks of BLOCK tokens."""
    ids = [i for t in texts for i in tok(t)["input_ids"] + [tok.eos_token_id]]
    n = len(ids) // BLOCK
    return torch.tensor(ids[:n * BLOCK]).view(n, BLOCK)


def domain_blocks(tok, articles: dict, domain: str, split: int) -> torch.Tensor:
    return torch.cat([blocks(tok, articles[_key(articles, t)][split]) for t in DOMAINS[domain]])


def _key(articles: dict, topic: str) -> str:
    return next(k for k in articles if _topic(k) == topic)


def train_source(folder: Path, data: torch.Tensor, seed: int, tok, shape: str = "llama") -> Path:
    """A language model of `shape` (SHAPES) trained from `seed` on `data` (blocks), saved in `folder` with the
    tokenizer."""
    import transformers
    if (folder / "config.json").is_file():
        return folder
    config_class, model_class, config, _ = SHAPES[shape]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**globals()[config],
                                                                                   vocab_size=len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, TRAIN["lr"], total_steps=TRAIN["steps"], pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(TRAIN["steps"]):
        batch = data[torch.randint(len(data), (TRAIN["batch_size"],), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            status(f"  {folder.name}: step {step + 1}, loss {loss.item():.3f}")
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@torch.no_grad()
def perplexity(logits_of, x: torch.Tensor) -> float:
    """exp of the mean next-token cross-entropy; `logits_of(x)` gives log-probabilities or logits."""
    total, count = 0.0, 0
    for part in x.split(64):
        logp = F.log_softmax(logits_of(part)[:, :-1].float(), dim=-1)
        total -= logp.gather(-1, part[:, 1:, None]).sum().item()
        count += part[:, 1:].numel()
    return float(np.exp(total / count))


def run_bench(settings: tuple = tuple(SETTINGS), methods: list[str] | None = None, out: str = "runs/bench",
              seed: int = 0, shapes: tuple = tuple(SHAPES)) -> dict:
    bad = [s for s in settings if s not in SETTINGS] + [s for s in shapes if s not in SHAPES]
    if bad:
        raise ValueError(f"unknown setting or shape {bad[0]!r}; this bench runs {', '.join(SETTINGS)} on "
                         f"{', '.join(SHAPES)}")
    cache, t0, rows, store = Path(out) / "lm", time.perf_counter(), [], Cells()
    cache.mkdir(parents=True, exist_ok=True)
    articles = _articles()
    tok = tokenizer(articles, cache / "tokenizer")
    tests = {d: domain_blocks(tok, articles, d, 1)[:TEST] for d in ("business+politics", "sport+entertainment")}
    for shape, setting in ((sh, se) for sh in shapes for se in settings):
        domains = SETTINGS[setting]
        paths, train = [], []
        for k, d in enumerate(domains):
            data = domain_blocks(tok, articles, d, 0)
            train.append(data)
            paths.append(train_source(cache / f"{SHAPES[shape][3]}{setting}-{d}-seed{k}", data, k, tok, shape))
        sources = [load_hf(p) for p in paths]
        g = torch.Generator().manual_seed(seed)
        sample = [d[torch.randperm(len(d), generator=g)[:PER_TASK]] for d in train]

        def row(name, logits_of, seconds=None, peak=None):
            return {"shape": shape, "setting": setting, "method": name, "seconds": seconds, "peak_bytes": peak,
                    **{f"ppl {d}": perplexity(logits_of, x) for d, x in tests.items()}}
        for k, s in enumerate(sources):
            rows.append(row(f"source {k + 1} ({domains[k]})", lambda x, s=s: s(x)[0]))
        rows.append(row("ensemble (2 models)", lambda x: ensemble_log_probs(sources, x, lambda s, t: s.features(t))))
        for name, method, opts in PLAN:
            if methods and name not in methods and method not in methods:
                continue

            def measure(name=name, method=method, opts=opts):
                start = time.perf_counter()
                with PeakMemory("cpu") as peak:
                    merged = merge(sources, sample, method, seed=seed, calibrate="none", **opts)
                seconds = time.perf_counter() - start
                r = row(name, lambda x: merged(x)[0], seconds, peak.bytes)
                status(f"  {shape} {setting} {name}: " + " / ".join(f"{v:.1f}" for k, v in r.items()
                                                                    if k.startswith("ppl")) + f" ({seconds:.0f} s)")
                return [r]
            # each merge is a cell kept under OUT/lm/cells (an interrupted run resumes at the first it lacks)
            slug = f"{shape}-{setting}-{name}-seed{seed}".replace(" ", "_").replace("!", "").replace(",", "")
            rows += store.rows(cache / "cells" / f"{slug.replace('(', '').replace(')', '')}.json", measure)
    return {"bench": "lm", "shapes": list(shapes), "settings": list(settings), "domains": list(tests),
            "per_task": PER_TASK, "test": TEST, "block": BLOCK, "vocabulary": len(tok),
            "models": {s: globals()[SHAPES[s][2]] for s in shapes}, "source_training": TRAIN,
            "trained_merges": TRAINED, "seed": seed, "rows": rows, **store.facts(),
            "total_seconds": time.perf_counter() - t0}


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(120, Console().width))
    for shape, setting in ((sh, se) for sh in result.get("shapes", ["llama"]) for se in result["settings"]):
        table = Table(title=f"{shape}-shaped language models from different seeds ({setting}): perplexity on "
                            "held-out text (lower is better)")
        table.add_column("model")
        for d in result["domains"]:
            table.add_column(d, justify="right")
        table.add_column("seconds", justify="right")
        table.add_column("peak MiB", justify="right")
        for r in (r for r in result["rows"] if r["setting"] == setting and r.get("shape", "llama") == shape):
            table.add_row(r["method"], *(f"{r[f'ppl {d}']:.1f}" for d in result["domains"]),
                          "-" if r["seconds"] is None else f"{r['seconds']:.0f}",
                          "-" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2 ** 20:.0f}")
        console.print(table)
    console.print(f"measured now: seed {result['seed']} (sources seeds 0, 1); {result['total_seconds'] / 60:.1f} min; "
                  f"command: {command}")
