"""What the steps of one merge share, passed down to them explicitly (no module holds it).

  fabric      the Lightning Fabric of a device run (`foldmerge.engine`), or None: plain PyTorch here
  parallel    that run's: "ddp" (every rank a whole copy) or "fsdp" (the trained modules sharded)
  checkpoint  the run's `foldmerge.checkpoint.Checkpoint`, or None: no checkpoints
  features    a `FeatureCache` of the sources' features on the merge data
  fit         the training loop every trained method calls (`foldmerge.train.fit`; a bench that
              times single steps hands in one that records what it would train instead)

A caller that merges the same sources several times (a bench: one sample, many methods) passes
one `FeatureCache` to every merge, so the sources' features are computed once.
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import train
from .model import features_in_chunks


class FeatureCache:
    """The features of source models on merge data, computed once per (model, data).

    A bench runs distillation and several FS-Merge variants on the same sources and sample; their
    features are the same for all (paper E.2 saves them to disk once). FS-Merge seq. reads each
    source on a growing sample, so a model keeps its last `per_model` samples. The key is the
    data's content and the identity, storage and version of every parameter and buffer of the
    model (a changed sample, an edited weight or BatchNorm statistic is computed again); sources
    always run in eval mode (dropout off, BatchNorm on its running statistics), whatever mode the
    caller left them in, which is restored."""

    def __init__(self, per_model: int = 16):
        self.per_model = per_model
        self._store: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> {key: features}

    @torch.no_grad()
    def __call__(self, model, x: torch.Tensor) -> torch.Tensor:
        data = x.detach().to("cpu").contiguous()
        tensors = list(model.parameters()) + list(model.buffers())
        key = (tuple(x.shape), str(x.dtype), str(x.device),
               hashlib.sha1(data.view(torch.uint8).numpy().tobytes()).hexdigest(),
               tuple((id(t), t.data_ptr(), t._version) for t in tensors))
        per_model = self._store.setdefault(model, {})
        if key in per_model:
            per_model[key] = per_model.pop(key)             # most recently used last
        else:
            was_training = model.training
            model.eval()
            try:
                per_model[key] = features_in_chunks(model, x)
            finally:
                model.train(was_training)
            while len(per_model) > self.per_model:
                del per_model[next(iter(per_model))]
        return per_model[key]


@dataclass
class Context:
    fabric: object | None = None
    parallel: str = "ddp"
    checkpoint: object | None = None
    features: FeatureCache = field(default_factory=FeatureCache)
    fit: Callable = train.fit

    def train(self, params, loss_fn, data, cfg, desc: str = "training", early_stop=None, modules=None) -> list[float]:
        """`fit` with this merge's device and checkpoint. `modules`: those holding `params` and all the
        loss runs (what parallel "fsdp" shards)."""
        return self.fit(params, loss_fn, data, cfg, desc=desc, early_stop=early_stop, fabric=self.fabric,
                        checkpoint=self.checkpoint, modules=modules, parallel=self.parallel)
