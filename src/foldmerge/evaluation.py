"""The evaluation protocol (FS-Merge paper section 3; ZipIt! section 4).

per-task accuracy: each task's test set scored with that task's head only; mean over tasks.
joint accuracy:    each task's test set scored by argmax over the concatenated scores of all
                   heads (a prediction counts only if it lands in the right task's head and
                   class); mean over tasks.
routed accuracy:   for a model that picks the head itself (`route(x)`, the gating merge): a
                   prediction counts only if the chosen head is the task's and its class is
                   right; mean over tasks. The gating paper's per-task accuracy.

A "model" here is anything that maps images to a list of logits, one per task, in the
order of its `tasks` attribute: a TaskModel, an `Ensemble`, or a merged model.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .arch import defaults
from .data import Task
from .io import nonfinite


@torch.no_grad()
def _logits(model, x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    outs = [model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return [torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))]


@torch.no_grad()
def evaluate(model, tasks: list[Task | str] | None = None, split: str = "test",
             batch_size: int = 1000, labelled: dict | None = None) -> dict:
    """Per-task and joint accuracy (in %) of `model` on `tasks` (default: all of its tasks, or those
    of `labelled`), in eval mode; every module's train/eval mode is restored. `labelled`: {task name:
    (inputs, labels)} of the user's own (`--eval-data`) instead of a built-in task's split."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    if labelled is not None and tasks is None:
        tasks = [t for t in model.tasks if t.name in labelled]
    try:
        return _evaluate(model, tasks, split, batch_size, labelled or {})
    finally:
        for m, was in modes:
            m.train(was)


def _evaluate(model, tasks, split: str, batch_size: int, labelled: dict) -> dict:
    if isinstance(model, nn.Module):
        model.eval()
        bad = nonfinite(model.state_dict())
        if bad:
            raise ValueError(f"cannot evaluate: the model's {bad}")
    own = [t.name for t in model.tasks]
    tasks = [Task.parse(t) for t in (tasks or model.tasks)]
    missing = [t.name for t in tasks if t.name not in own]
    if missing:
        raise ValueError(f"the model has no head for {', '.join(missing)} (its heads: {', '.join(own)})")
    offsets, o = [], 0
    for t in model.tasks:
        offsets.append(o)
        o += t.num_classes
    per_task, joint, routed = {}, {}, {}
    for t in tasks:
        j = own.index(t.name)
        x, y = labelled[t.name] if t.name in labelled else t.split(split)
        logits = _logits(model, x, batch_size)
        if not all(bool(torch.isfinite(z).all()) for z in logits):
            raise ValueError(f"cannot evaluate: the model's outputs on {t.name} are not finite")
        per_task[t.name] = 100.0 * (logits[j].argmax(1) == y).float().mean().item()
        if len(own) > 1:
            joint_pred = torch.cat(logits, dim=1).argmax(1)
            joint[t.name] = 100.0 * (joint_pred == y + offsets[j]).float().mean().item()
        if hasattr(model, "route"):
            chosen = torch.cat([model.route(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
            routed[t.name] = 100.0 * ((chosen == j) & (logits[j].argmax(1) == y)).float().mean().item()
    result = {"split": "given" if labelled else split, "per_task": per_task,
              "per_task_mean": sum(per_task.values()) / len(per_task)}
    for name, values in (("joint", joint), ("routed", routed)):
        if values:
            result[name] = values
            result[f"{name}_mean"] = sum(values.values()) / len(values)
    return result


def forward_mflops(model, example: torch.Tensor) -> float:
    """Millions of floating-point operations of one forward of `example` (one input, batch axis
    included), as the model computes it (`torch.utils.flop_counter`: matmuls, convolutions, attention)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example)
    return counter.get_total_flops() / 1e6


def random_guess(tasks: list[Task | str]) -> dict:
    tasks = [Task.parse(t) for t in tasks]
    total = sum(t.num_classes for t in tasks)
    per = {t.name: 100.0 / t.num_classes for t in tasks}
    return {"per_task": per, "per_task_mean": sum(per.values()) / len(per),
            "joint": {t.name: 100.0 / total for t in tasks}, "joint_mean": 100.0 / total}


def originals(sources) -> dict:
    """Each source model on its own task(s) with its own head: the level merging aims for. With
    several tasks, also the joint accuracy of the sources' heads side by side (`SourceHeads`)."""
    tasks = [t.name for s in sources for t in s.tasks]
    if len(tasks) > 1 and len(set(tasks)) == len(tasks):
        return evaluate(SourceHeads(sources))
    per = {}
    for s in sources:
        per.update(evaluate(s)["per_task"])
    return {"per_task": per, "per_task_mean": sum(per.values()) / len(per)}


class SourceHeads(nn.Module):
    """Reference, not a merge: every source runs on the input with its own backbone, and their
    heads' logits stand side by side (ZipIt!'s "ensemble" row). Per-task accuracy is each
    source's own; joint accuracy is what the sources themselves reach when every head answers
    at once: heads trained on their own task only are often confident on another task's inputs,
    and a merge that reproduces its sources faithfully inherits this (`foldmerge.calibrate`).

    Where sources answer one task (`index`: per source, per head, the task in `tasks` it answers;
    `foldmerge.heads.Sharing`), that task's logits are the mean of theirs: the logit ensemble of
    models of one task."""

    def __init__(self, sources, index: list[list[int]] | None = None, tasks=None):
        super().__init__()
        self.sources = nn.ModuleList(sources)
        self.index = index or [list(range(sum(len(s.tasks) for s in sources[:k]),
                                          sum(len(s.tasks) for s in sources[:k + 1]))) for k in range(len(sources))]
        self.tasks = list(tasks) if tasks is not None else [t for s in sources for t in s.tasks]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        sums, counts = [None] * len(self.tasks), [0] * len(self.tasks)
        for s, heads in zip(self.sources, self.index):
            for j, out in zip(heads, s(x)):
                sums[j] = out if sums[j] is None else sums[j] + out
                counts[j] += 1
        return [z / c for z, c in zip(sums, counts)]


def _abs_mean(f: torch.Tensor) -> torch.Tensor:
    return f.abs().mean().clamp_min(1e-12)


class Ensemble(nn.Module):
    """Reference, not a merge: runs every source, averages their features, then applies every
    head (the FS-Merge paper: "averages the models outputs and then applies classification
    heads"). Needs sources whose features have the same size.

    normalize: scale each source's features to unit mean absolute value before averaging, as the
    authors' ViT code runs it (`EnsembleModel(normalize_output=True)`). Default: the family's
    (`foldmerge.arch.defaults`, "ensemble"): yes for ViTs, no for MLPs, whose paper ensemble (its
    code is not public) is the plain average, which bench mlp reproduces."""

    def __init__(self, sources, normalize: bool | None = None):
        super().__init__()
        dims = {s.feature_dim for s in sources}
        if len(dims) != 1:
            raise ValueError(f"an ensemble needs equal feature sizes, got {sorted(dims)}")
        self.sources = nn.ModuleList(sources)
        self.tasks = [t for s in sources for t in s.tasks]
        self.normalize = defaults.value(sources[0].spec.defaults, ("ensemble",), "normalize")[0] \
            if normalize is None else bool(normalize)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [s.features(x) for s in self.sources]
        if self.normalize:
            feats = [f / _abs_mean(f) for f in feats]
        avg = sum(feats) / len(feats)
        return [h(avg) for s in self.sources for h in s.heads]
