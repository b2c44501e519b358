"""Label-free selection of a method's hyperparameters (`--select ARG=V1,V2,…`).

A user who merges from unlabeled data has no validation labels. What every merge does have:
the sources, and which model's sample each input came from. So a candidate value is scored by
how well the merge reproduces its sources on inputs it was not merged from:

  1. every model's merge sample is split in two folds (every other input);
  2. for each candidate, the method merges from one fold and is scored on the other, and the
     reverse (the mean of the two);
  3. the score is the agreement with the sources: the share of held-out inputs of model k on
     which each of model k's heads in the merge predicts the class that model k itself predicts
     (mean over models); ties go to the lower mean KL divergence from the source's softmax to the
     merge's (for projection heads, CLIP's towers: the mean cosine of the merge's embedding with the
     source's);
  4. the best candidate is merged again from the whole sample.

Several `--select` arguments search their product. Agreement stands in for per-task accuracy
(a source that is right 97 % of the time is a good teacher of which class is which); how often
it picks what labelled validation picks, and what that costs, is measured by `foldmerge bench
select` (docs/selection.md).
"""
from __future__ import annotations

import itertools
import math

import torch
from torch.nn import functional as F

from .model import features_in_chunks, padding_id
from .progress import bar


def parse(items: list[str] | None) -> dict[str, list]:
    """["alpha=0.1,0.5", "beta=1"] -> {"alpha": [0.1, 0.5], "beta": [1]}; values are numbers where
    they parse as numbers, strings otherwise."""
    grid: dict[str, list] = {}
    for item in items or []:
        name, sep, values = item.partition("=")
        name = name.strip().replace("-", "_")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not name or not vals:
            raise ValueError(f"--select takes ARG=V1,V2,…, got {item!r}")
        if name in grid:
            raise ValueError(f"--select names {name!r} twice")
        grid[name] = [_value(v) for v in vals]
    return grid


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"none": None, "None": None}.get(text, text)


def candidates(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def folds(data: list[torch.Tensor]) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """(merge from, score on) twice: every other input of each model's sample, then the reverse."""
    if any(len(d) < 4 for d in data):
        raise ValueError("--select needs at least 4 merge inputs per model (two folds of two)")
    return [([d[0::2] for d in data], [d[1::2] for d in data]), ([d[1::2] for d in data], [d[0::2] for d in data])]


@torch.no_grad()
def fidelity(merged, sources, held: list[torch.Tensor], features, index: list[list[int]] | None = None
             ) -> dict[str, dict]:
    """Per task of each source, on held-out unlabeled inputs of that source: how often the merge's
    head predicts the class the source's head does (agreement %), and the mean KL divergence from the
    source's predicted distribution to the merge's. Needs no label; `features`: a `FeatureCache` (the
    sources' features once per held-out sample); `index`: per source, per head, the merge's head it
    answers through (`foldmerge.heads.Sharing`; default: the next one). Keyed by the source's task,
    with the source's number where sources share a task's name."""
    was = merged.training
    merged.eval()
    try:
        out, first = {}, 0
        names = [t.name for s in sources for t in s.tasks]
        for k, (source, x) in enumerate(zip(sources, held)):
            heads = index[k] if index else list(range(first, first + len(source.heads)))
            first += len(source.heads)
            teacher = features(source, x)
            student = features_in_chunks(merged, x)
            for j, h, task in zip(heads, source.heads, source.tasks):
                p, q = h(teacher), merged.heads[j](student)
                p, q = p.flatten(0, -2), q.flatten(0, -2)        # a language model's: one row per position
                key = task.name if names.count(task.name) == 1 else f"{task.name} (source {k + 1})"
                if merged.head_kind == "projection":      # embeddings: compared by direction, as they are used
                    out[key] = {"cosine": F.cosine_similarity(p, q, dim=1).mean().item(), "examples": len(x)}
                    continue
                if merged.head_kind == "lm":     # and each one's perplexity on the text itself, and the ensemble's
                    pad = padding_id(merged)
                    out[key] = {"perplexity": _perplexity(merged.heads[j](student), x, pad),
                                "source_perplexity": _perplexity(h(teacher), x, pad),
                                "ensemble_perplexity": _perplexity(ensemble_log_probs(sources, x, features), x, pad)}
                else:
                    out[key] = {}
                out[key].update({
                    "agreement": 100.0 * (p.argmax(1) == q.argmax(1)).float().mean().item(),
                    # KL is never negative; rounding leaves about -1e-9 where the two agree exactly
                    "kl": max(0.0, F.kl_div(F.log_softmax(q, 1), F.log_softmax(p, 1), log_target=True,
                                            reduction="batchmean").item()),
                    "examples": len(x)})
        return out
    finally:
        merged.train(was)


def ensemble_log_probs(sources, x: torch.Tensor, features) -> torch.Tensor:
    """The log of the sources' next-token probabilities averaged (language models of one vocabulary, one
    head each): the ensemble, at the cost of every source. Summed a source at a time."""
    total = None
    for s in sources:
        lp = F.log_softmax(s.heads[0](features(s, x)).float(), -1)
        total = lp if total is None else torch.logaddexp(total, lp)
    return total - math.log(len(sources))


def _perplexity(logits: torch.Tensor, ids: torch.Tensor, pad: int) -> float:
    """exp of the mean next-token cross-entropy of a language model's `logits` on token ids `ids`; the
    positions whose next token is the padding id the texts were padded with (`model.padding_id`) are not
    scored."""
    target = ids[:, 1:].to(logits.device)
    keep = target != pad
    ce = F.cross_entropy(logits[:, :-1][keep].float(), target[keep])
    return float(torch.exp(ce))


def agreement(merged, sources, held: list[torch.Tensor], features) -> tuple[float, float]:
    """(agreement %, mean KL) of the merge's heads with the sources', over their tasks (`fidelity`); for
    projection heads (100 x mean cosine, 0)."""
    scores = list(fidelity(merged, sources, held, features).values())
    if "cosine" in scores[0]:
        return 100 * sum(s["cosine"] for s in scores) / len(scores), 0.0
    return (sum(s["agreement"] for s in scores) / len(scores), sum(s["kl"] for s in scores) / len(scores))


def choose(run, sources, data: list[torch.Tensor], grid: dict[str, list], features, splits=None) -> tuple[dict, dict]:
    """The candidate of `grid` whose merges agree best with the sources on held-out inputs.

    run(data, options) -> merged model; `features`: a `FeatureCache`; `splits`: the (merge from,
    score on) pairs, `folds(data)` unless given (an augmented sample is split by its originals).
    Returns (chosen options, report for meta)."""
    empty = [k for k, v in grid.items() if not list(v)]
    if empty:
        raise ValueError(f"--select {empty[0]}: no values to choose from")
    trials = []
    cands = candidates(grid)
    splits = splits or folds(data)
    with bar(len(cands) * len(splits), "label-free selection") as progress:
        for c in cands:
            scores = []
            for fit_on, held in splits:
                scores.append(agreement(run(fit_on, c), sources, held, features))
                progress.advance(1)
            trials.append({"options": c, "agreement": sum(s[0] for s in scores) / len(scores),
                           "kl": sum(s[1] for s in scores) / len(scores)})
    best = max(trials, key=lambda t: (t["agreement"], -t["kl"]))
    return best["options"], {"grid": grid, "criterion": "held-out agreement with the sources (2 folds)",
                             "trials": trials, "chosen": best["options"]}
