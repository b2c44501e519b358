"""TaskModel: one backbone of some architecture plus one classification head per task.

A source model is a TaskModel with one head; a merged model has one head per merged
task. Heads are never merged (FS-Merge paper, section 2): merging adapts a head only by
folding the last U into it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import get_arch
from .data import Task


class TaskModel(nn.Module):
    def __init__(self, arch: str, backbone: dict[str, Any], tasks: list[Task | str],
                 head_bias: bool = True):
        super().__init__()
        self.arch = arch
        self.backbone_config = dict(backbone)
        self.tasks = [Task.parse(t) for t in tasks]
        self.head_bias = head_bias
        self.backbone = get_arch(arch).Backbone(**backbone)
        d = self.backbone.out_dim
        self.heads = nn.ModuleList(nn.Linear(d, t.num_classes, bias=head_bias) for t in self.tasks)
        self.meta: dict[str, Any] = {}   # how the model was made (method, options, seed, …)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.backbone(x)
        return [h(f) for h in self.heads]

    def config(self) -> dict[str, Any]:
        return {"arch": self.arch, "backbone": self.backbone_config,
                "tasks": [t.name for t in self.tasks], "head_bias": self.head_bias}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "TaskModel":
        return cls(cfg["arch"], cfg["backbone"], cfg["tasks"], cfg.get("head_bias", True))

    def save(self, out_dir) -> "Path":
        """Write safetensors weights + config.json (with `meta`) atomically."""
        from .io import save_model
        return save_model(self, out_dir, self.meta)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
