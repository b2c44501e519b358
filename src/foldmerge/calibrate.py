"""Routing calibration: a merged model's heads made comparable, so that joint accuracy holds up.

Joint accuracy takes the argmax over every head's logits at once, so it asks each head to
score low on the other tasks' inputs. No source was trained to: a head trained on its own task
only is often confident on another task's images (docs/evaluation.md measures how often the
sources' own heads, concatenated, send a test image to the wrong task).
A merge that reproduces its sources faithfully (FS-Merge, distillation, ZipIt!) inherits that.

The fix changes what every head adds to all of its own classes, never the order of its
classes: head j becomes

    a_j · (W_j f + b_j + v_j·f + c_j)       a_j > 0, v_j a vector, c_j a number

which is again a linear head, (a_j (W_j + 1 v_jᵀ), a_j (b_j + c_j)), folded into its weights.
Within head j every logit moves by the same amount and is scaled by the same positive factor,
so each task's per-task prediction is exactly the uncalibrated one; only the comparison between
heads changes. (v, c, a) are fit on the merge sample, which needs no labels, only what the
merge already knows: which model's sample each input came from. They minimize the routing
loss, −log of the softmax mass that an input's own model's heads receive over all heads' logits,
plus `weight_decay` · (|v|² + (log a)²) on features scaled to unit mean |f|.

A two-fold check guards it: fit on one half of each model's sample, count on the other half
how often the argmax over all heads lands in the input's own model's heads (routing
accuracy, calibrated and not), and the reverse; the calibration is kept unless held-out
routing gets worse by more than two standard errors of that count (with 64 images a task a
couple of images decide a point, so a smaller drop is noise). The check cannot see overfitting
that the method itself did on the sample (RegMean fits its Grams on all of it and routes the
sample perfectly, calibrated or not). Heads without a bias (frozen class embeddings) take no c.
"""
from __future__ import annotations

import math

import torch

from .model import features_in_chunks

# the best of 0.001 / 0.01 / 0.1 / 1 on FS-Merge, distillation and ZipIt! merges of an MNIST and a
# Fashion-MNIST MLP pair (docs/evaluation.md)
WEIGHT_DECAY = 0.1
MAX_ITER = 300


def _calibrated(f, per_head, v, c, log_a) -> torch.Tensor:
    """Every head's logits a_j (l_j + v_j·f + c_j), side by side (examples x all classes)."""
    return torch.cat([log_a[j].exp() * (l + (f @ v[j] + c[j]).unsqueeze(1)) for j, l in enumerate(per_head)], 1)


def _owners(groups, sizes) -> torch.Tensor:
    """For every class column of the side-by-side logits, the source model its head belongs to."""
    return torch.cat([torch.full((n,), g) for g, n in zip(groups, sizes)])


def _routing_loss(feats, logits, groups, sizes, v, c, log_a):
    """Mean over models k of −log P(an input of model k's sample lands in model k's heads)."""
    owner = _owners(groups, sizes)
    loss = 0.0
    for k, (f, per_head) in enumerate(zip(feats, logits)):
        lp = torch.log_softmax(_calibrated(f, per_head, v, c, log_a), 1)
        loss = loss - torch.logsumexp(lp[:, owner == k], 1).mean() / len(feats)
    return loss


# what each kind of calibration fits: the input-dependent offset v, the constant c, the scale a
KINDS = {"routing": ("v", "c", "a"), "affine": ("c", "a"), "temperature": ("a",)}


def _fit(feats, logits, groups, sizes, bias: bool, weight_decay: float, kind: str = "routing"):
    n, d = len(groups), feats[0].shape[1]
    terms = KINDS[kind]
    v = torch.zeros(n, d, dtype=torch.float64, requires_grad="v" in terms)
    c = torch.zeros(n, dtype=torch.float64, requires_grad=bias and "c" in terms)
    log_a = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    params = [t for t in (v, c, log_a) if t.requires_grad]
    opt = torch.optim.LBFGS(params, max_iter=MAX_ITER, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _routing_loss(feats, logits, groups, sizes, v, c, log_a) + \
            weight_decay * (v.pow(2).sum() + log_a.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return v.detach(), c.detach(), log_a.detach()


def _routing_accuracy(feats, logits, groups, sizes, v, c, log_a) -> float:
    owner = _owners(groups, sizes)
    hits, total = 0, 0
    for k, (f, per_head) in enumerate(zip(feats, logits)):
        hits += int((owner[_calibrated(f, per_head, v, c, log_a).argmax(1)] == k).sum())
        total += len(f)
    return 100.0 * hits / max(total, 1)


@torch.no_grad()
def _features_and_logits(model, data):
    was = model.training
    model.eval()
    try:
        feats = [features_in_chunks(model, d).double() for d in data]
    finally:
        model.train(was)
    heads = [(h.weight.detach().double(), None if h.bias is None else h.bias.detach().double()) for h in model.heads]
    logits = [[f @ w.T + (0 if b is None else b) for w, b in heads] for f in feats]
    return feats, logits


def calibrate_routing(model, data: list[torch.Tensor], groups: list[int],
                      weight_decay: float = WEIGHT_DECAY, kind: str = "routing") -> dict:
    """Fit and fold the routing calibration into `model`'s heads (in place) from `data` (one
    unlabeled tensor per source model); `groups[j]` is the source model whose sample head j
    belongs to. Returns what was done, for the merged model's meta. `kind` 'affine' (a_j, c_j
    only) and 'temperature' (a_j only) are the weaker calibrations the diagnosis compares with
    (`examples/joint_diagnosis.py`); merges use 'routing'."""
    if kind not in KINDS:
        raise ValueError(f"calibration kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if len(groups) != len(model.heads):
        raise ValueError(f"{len(groups)} head groups for {len(model.heads)} heads")
    if weight_decay < 0:
        raise ValueError("the calibration's weight decay must be >= 0")
    feats, logits = _features_and_logits(model, data)
    scale = torch.cat(feats).abs().mean().clamp_min(1e-12)
    feats = [f / scale for f in feats]
    sizes = [h.out_features for h in model.heads]
    bias = all(h.bias is not None for h in model.heads)
    n, d = len(groups), feats[0].shape[1]
    none = (torch.zeros(n, d, dtype=torch.float64), torch.zeros(n, dtype=torch.float64),
            torch.zeros(n, dtype=torch.float64))

    # two folds: every other input of each model's sample
    held_raw, held_cal = [], []
    for fold in (0, 1):
        fit_on = [(f[fold::2], [l[fold::2] for l in ls]) for f, ls in zip(feats, logits)]
        test_on = [(f[1 - fold::2], [l[1 - fold::2] for l in ls]) for f, ls in zip(feats, logits)]
        if any(len(f) == 0 for f, _ in fit_on + test_on):
            return {"calibrate": kind, "kept": False, "reason": "fewer than two inputs per model"}
        params = _fit([f for f, _ in fit_on], [ls for _, ls in fit_on], groups, sizes, bias, weight_decay, kind)
        tf, tl = [f for f, _ in test_on], [ls for _, ls in test_on]
        held_raw.append(_routing_accuracy(tf, tl, groups, sizes, *none))
        held_cal.append(_routing_accuracy(tf, tl, groups, sizes, *params))
    raw, cal = sum(held_raw) / 2, sum(held_cal) / 2
    # a drop within two standard errors of the held-out count is noise (64 images a task: ±3 points)
    count = sum(len(f) for f in feats)
    margin = max(2 * 100 * math.sqrt(max(raw / 100 * (1 - raw / 100), 0.0) / count), 100 / count)
    meta = {"calibrate": kind, "weight_decay": weight_decay,
            "held_out_routing": {"before": raw, "after": cal, "noise_margin": margin}}
    if cal < raw - margin:
        return {**meta, "kept": False, "reason": "held-out routing got worse"}
    v, c, log_a = _fit(feats, logits, groups, sizes, bias, weight_decay, kind)
    if not all(torch.isfinite(t).all() for t in (v, c, log_a)):
        return {**meta, "kept": False, "reason": "the fit did not converge to finite values"}
    v = v / scale                                   # back to the model's feature scale
    with torch.no_grad():
        for j, h in enumerate(model.heads):
            a = log_a[j].exp()
            w = a * (h.weight.double() + v[j].unsqueeze(0))
            h.weight.copy_(w.to(h.weight.dtype))
            if h.bias is not None:
                h.bias.copy_((a * (h.bias.double() + c[j])).to(h.bias.dtype))
    return {**meta, "kept": True, "scales": log_a.exp().tolist()}


def calibrate_heads(merged, models, data: list[torch.Tensor], index: list[list[int]] | None = None) -> dict:
    """The routing calibration of `merged`'s heads (in place), each head grouped with the sample of
    the source it came from. `index` (per source, per head: the merged head it answers through;
    default one merged head per source head) joins the samples of sources that share a head. A model
    that picks its head itself (a gated model's `route`) is left as it is."""
    if hasattr(merged, "route"):
        return {"calibrate": "none", "why": "the gate chooses the head"}
    if index is None:
        first = [sum(len(m.tasks) for m in models[:k]) for k in range(len(models))]
        index = [[first[k] + i for i in range(len(m.tasks))] for k, m in enumerate(models)]
    sample = list(range(len(models)))            # sources that share a head read as one sample
    for k in range(len(models)):
        for other in range(k):
            if set(index[k]) & set(index[other]):
                sample = [sample[other] if s == sample[k] else s for s in sample]
    kept = sorted(set(sample))
    device = next(merged.parameters()).device
    joined = [torch.cat([d for d, s in zip(data, sample) if s == one]).to(device) for one in kept]
    groups = [kept.index(sample[next(k for k, heads in enumerate(index) if j in heads)])
              for j in range(len(merged.heads))]
    return calibrate_routing(merged, joined, groups)
