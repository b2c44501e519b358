"""Which heads of the sources answer one task, and the one head a merge keeps for it.

Models trained on different tasks keep a head each. Models trained on the same task (from different
seeds: the setting of Git Re-Basin, ZipIt! and CCA Merge) share an output space: their heads
become one head of the merge, merged like any other layer. After a method has adapted each
source's head to the merged features (the last U folded into it), the shared head's M averages
their outputs: W* = mean_k W_k U_k, b* = mean_k b_k, the mean of the adapted heads' logits.

When two heads answer the same task (`same_task="auto"`, the default):
  built-in tasks      the same data set, view and classes (`mnist` and `mnist`)
  a model's own task  the same labels in the same order (a Hugging Face model's id2label), unless
                      they are transformers' placeholder names (LABEL_0, LABEL_1, …), which say
                      nothing of the task, or a projection's dimensions (EMBED_0, …: CLIP towers
                      from different starts embed into different spaces); then `same_task="yes"`
                      says so
`"yes"`: every source has one head and all answer one task (equal class counts); `"no"`: every
head is its own task.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .data import Task

SAME_TASK = ("auto", "yes", "no")
# transformers' placeholder class names, and the names foldmerge gives a projection's dimensions
PLACEHOLDER = re.compile(r"(LABEL|EMBED)_\d+")


def answers_same_task(a: Task, b: Task) -> bool:
    """Whether heads of tasks `a` and `b` answer one task, by their labels (module docstring)."""
    if a.builtin or b.builtin:
        return a == b
    return a.labels == b.labels and not all(PLACEHOLDER.fullmatch(x) for x in a.labels)


@dataclass
class Sharing:
    """The merge's tasks (one head each) and, per source and per head of it, the merge's head it
    answers through."""
    tasks: list[Task]
    index: list[list[int]]

    @property
    def shared(self) -> bool:
        """Whether any head of the merge answers for two or more source heads."""
        flat = [j for heads in self.index for j in heads]
        return len(set(flat)) < len(flat)

    def sources_of(self, j: int) -> list[int]:
        """The sources with a head that answers through the merge's head `j`."""
        return [k for k, heads in enumerate(self.index) if j in heads]

    def record(self) -> list[dict]:
        """For meta: each of the merge's tasks with the sources (numbered from 1) that answer it."""
        return [{"task": t.name, "sources": [k + 1 for k in self.sources_of(j)]} for j, t in enumerate(self.tasks)]


def share(models, same_task: str = "auto") -> Sharing:
    """How the heads of `models` map onto the merge's heads (module docstring); one line when they
    cannot."""
    if same_task not in SAME_TASK:
        raise ValueError(f"same_task must be one of {', '.join(SAME_TASK)}, got {same_task!r}")
    heads = [(k, t) for k, m in enumerate(models) for t in m.tasks]
    if same_task == "yes":
        if any(len(m.tasks) != 1 for m in models):
            raise ValueError("--same-task yes merges models of one head each into one head; a source has "
                             f"{max(len(m.tasks) for m in models)}")
        counts = sorted({t.num_classes for _, t in heads})
        if len(counts) != 1:
            raise ValueError(f"--same-task yes needs heads with one class count; they have {counts}")
        return Sharing([models[0].tasks[0]], [[0] for _ in models])
    tasks, index = [], [[] for _ in models]
    for k, t in heads:
        j = next((j for j, u in enumerate(tasks) if same_task == "auto" and answers_same_task(t, u)), None)
        if j is not None and j in index[k]:
            raise ValueError(f"a source has two heads of task {t.name!r}")
        if j is None:
            if any(u.name == t.name for u in tasks):
                raise ValueError(f"two models' tasks are both named {t.name!r} but are not one task; give the "
                                 "models distinct names (a Hugging Face model's task is its directory's name), or "
                                 "--same-task yes if they answer one task")
            tasks.append(t)
            j = len(tasks) - 1
        index[k].append(j)
    return Sharing(tasks, index)


@torch.no_grad()
def merge_heads(merged, sharing: Sharing) -> None:
    """`merged`'s heads, one per source head in source order as a method leaves them (each on the
    merged features), made one per task of `sharing` (in place): a shared head is the mean of its
    sources' heads."""
    flat = [j for heads in sharing.index for j in heads]
    if len(flat) != len(merged.heads):
        raise ValueError(f"{len(merged.heads)} heads for {len(flat)} source heads")
    kept = []
    for j, _ in enumerate(sharing.tasks):
        members = [merged.heads[i] for i, g in enumerate(flat) if g == j]
        head = nn.Linear(members[0].in_features, members[0].out_features, bias=members[0].bias is not None)
        head.to(dtype=members[0].weight.dtype, device=members[0].weight.device)
        head.weight.copy_(torch.stack([h.weight for h in members]).mean(0))
        if head.bias is not None:
            head.bias.copy_(torch.stack([h.bias for h in members]).mean(0))
        head.weight.requires_grad_(members[0].weight.requires_grad)
        kept.append(head)
    merged.heads = nn.ModuleList(kept)
    merged.tasks = list(sharing.tasks)
