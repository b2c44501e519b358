"""TaskModel: one backbone of some architecture plus one head per task (a classifier, or a projection
into an embedding space).

A source model is a TaskModel with one head; a merged model has one head per merged
task. Heads are never merged (FS-Merge paper, section 2): merging adapts a head only by
folding the last U into it.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import arch_spec
from .data import Task
from .io import parameters_on_meta, save_model

# linear: a classifier (logits of the task's classes); class-embedding: a frozen one (below); projection:
# a map into an embedding space without bias (CLIP's towers), whose outputs are compared by direction,
# never routed or scored as classes; lm: a language model's head (next-token logits over the vocabulary
# at every position, no bias)
HEADS = ("linear", "class-embedding", "projection", "lm")
CHUNK = 256                 # examples per forward pass: memory stays flat however large the sample


def as_input(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`x` on the device of the parameter `like`, and in its dtype if `x` is floating point
    (images); integer inputs (token ids) keep their dtype."""
    return x.to(device=like.device, dtype=like.dtype if x.is_floating_point() else x.dtype)


@torch.no_grad()
def features_in_chunks(model, x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """model.features(x), `chunk` examples at a time (a sample of real images in one pass
    would hold every layer's activations for all of them at once)."""
    return torch.cat([model.features(part) for part in x.split(chunk)]) if len(x) else model.features(x)


def padding_id(model) -> int:
    """The id texts are padded with: the model's padding id; for a decoder without one (Llama) its
    end-of-text id, else 0 (under a causal mask what follows a text never reaches it)."""
    c = model.backbone_config
    pad = c.get("pad_token_id", 0)
    if pad is None:
        pad = c.get("eos_token_id")
    return pad if isinstance(pad, int) else 0


def class_embeddings(task: Task | str, dim: int) -> torch.Tensor:
    """A fixed (classes x dim) matrix of unit rows for `task`: the same for every model and
    every run (seeded by the task and class names), distinct for distinct tasks. It stands
    in for the CLIP text embeddings of the label names that the FS-Merge paper uses as
    frozen heads, so that models trained on one task share one output space."""
    task = Task.parse(task)
    rows = []
    for c in task.classes:
        g = torch.Generator().manual_seed(zlib.crc32(f"{task.name}#{c}".encode()))
        rows.append(torch.randn(dim, generator=g))
    e = torch.stack(rows)
    return e / e.norm(dim=1, keepdim=True)


def head_layout(models) -> tuple[str, bool]:
    """(head kind, head bias) that every model shares: a merge keeps its sources' kind of head."""
    layouts = {(m.head_kind, m.head_bias) for m in models}
    if len(layouts) != 1:
        raise ValueError(f"cannot merge models whose heads differ (kind, bias): {sorted(layouts)}")
    return layouts.pop()


class TaskModel(nn.Module):
    def __init__(self, arch: str, backbone: dict[str, Any], tasks: list[Task | str],
                 head_bias: bool = True, head: str = "linear"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        self.arch = arch
        self.backbone_config = dict(backbone)
        self.tasks = [Task.parse(t) for t in tasks]
        self.head_kind = head
        self.head_bias = head_bias and head == "linear"
        self.backbone = self.spec.build(self.backbone_config)
        # the spec describes the backbone (a clear error naming the parameter if not); the heads
        # read its output space
        d = self.spec.validate(self.backbone, f"{arch} backbone")[self.spec.output] * self.spec.feature_copies
        self.feature_dim = d
        self.heads = nn.ModuleList(nn.Linear(d, t.num_classes, bias=self.head_bias) for t in self.tasks)
        if head == "class-embedding":      # frozen: training only moves the backbone
            with torch.no_grad():
                for h, t in zip(self.heads, self.tasks):
                    h.weight.copy_(class_embeddings(t, d))
                    h.weight.requires_grad_(False)
        self.meta: dict[str, Any] = {}   # how the model was made (method, options, seed, …)

    @classmethod
    def for_merge(cls, models, backbone: dict[str, Any] | None = None) -> "TaskModel":
        """An (untrained) model to hold the merge of `models`: model 1's backbone configuration (or
        `backbone`), every task of every model, their head kind and bias, their dtype and device."""
        p = next(models[0].backbone.parameters())
        return cls._merge_of(models, backbone).to(dtype=p.dtype, device=p.device)

    @classmethod
    def shaped_for_merge(cls, models) -> "TaskModel":
        """`for_merge`'s model with its parameters on the meta device (shapes, no memory): for a merge that
        assigns every tensor (`load_state_dict(…, assign=True)`), so the merged model is allocated once."""
        with parameters_on_meta():
            return cls._merge_of(models)

    @classmethod
    def _merge_of(cls, models, backbone: dict[str, Any] | None = None) -> "TaskModel":
        kind, bias = head_layout(models)
        first = models[0]
        return cls(first.arch, dict(first.backbone_config if backbone is None else backbone),
                   [t for m in models for t in m.tasks], bias, head=kind)

    @property
    def spec(self):
        """The backbone's merge spec (`foldmerge.spec.ArchSpec`): the architecture as data."""
        spec = self.__dict__.get("_spec")
        if spec is None:
            spec = self.__dict__["_spec"] = arch_spec(self.arch, self.backbone_config)
        return spec

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_spec", None)      # rebuilt on use: a spec may hold functions that do not pickle
        return state

    def merge_form(self) -> "TaskModel":
        """The equivalent model a merge reads: the family's `merge_form` (a ResNet's BatchNorm
        folded into its convs), or the model itself. A new model; this one is left as it is."""
        form = self.spec.merge_form
        if form is None:
            return self
        return self.with_backbone(*form(self.backbone_config, self.backbone), fused_batchnorm=True)

    def with_backbone(self, config: dict, state: dict, **meta) -> "TaskModel":
        """A new model of this family and these heads over the backbone (`config`, `state`) an
        equivalent form gives (BatchNorm folded in, identity blocks appended), in this model's dtype
        and device; `meta` added to this model's."""
        out = TaskModel(self.arch, config, self.tasks, self.head_bias, head=self.head_kind)
        p = next(self.backbone.parameters())
        out.to(dtype=p.dtype, device=p.device)
        with torch.no_grad():
            out.backbone.load_state_dict(state)
            for dst, src in zip(out.heads, self.heads):
                dst.load_state_dict(src.state_dict())
        out.meta = {**self.meta, **meta}
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.backbone(x)
        return [h(f) for h in self.heads]

    def config(self) -> dict[str, Any]:
        return {"arch": self.arch, "backbone": self.backbone_config,
                "tasks": [t.record() for t in self.tasks], "head_bias": self.head_bias, "head": self.head_kind}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "TaskModel":
        return cls(cfg["arch"], cfg["backbone"], cfg["tasks"], cfg.get("head_bias", True), cfg.get("head", "linear"))

    def save(self, out_dir, expect=False) -> "Path":
        """Write safetensors weights + config.json (with `meta`) atomically (`expect`: `io.swap_in`'s)."""
        return save_model(self, out_dir, self.meta, expect=expect)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
