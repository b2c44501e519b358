"""Distillation: one student of the sources' size trained to reproduce every source's features.

The baseline FS-Merge is compared against (paper sections 3.1–3.2, appendix E). It uses the
same merge sample, the same objective and the same training loop as global FS-Merge; only
what is learned differs:

  FS-Merge      W*_l = M_l · blockdiag(W_l^k) · U_{l-1}   (M, U learned, source weights frozen)
  distillation  W*_l free                                 (every student weight learned)

The student's features f_s (d wide) reconstruct each source's last features through a map
U (one block per source): loss = MSE(U[k]·f_s, f_k), scored against every source ('all', the
MLP default) or only each input's own source ('own-task'). `output_map`:
  learned  U is trained (FS-Merge's last U) and folded into the heads (head_k · U[k]). The
           default for sources with their own learned heads (our MLPs, a user's models): their
           feature spaces are unrelated, and one student of width d cannot be scored against
           both without it.
  fixed    U = [I; I; …] stays fixed: the student reproduces each source's features directly,
           as in the authors' ViT/BERT distillation baseline (their sources' heads live in one
           shared label-embedding space). The default when every source's heads are frozen
           class embeddings (our ViTs).
The result is a plain model of the sources' architecture with every source's head.

Student initializations: 'first' (model 1), 'average' (weight average), 'regmean' (RegMean
with `regmean_alpha`), 'random' (a fresh model from `seed`). U starts as [I; I; …].
"""
from __future__ import annotations

import time

import torch

from ..foldable import FoldMap
from ..model import TaskModel
from ..options import Choice, Number, Option, Rule, method
from . import average, regmean
from .common import (
    by_family,
    cat_with_owner,
    check_same_backbone,
    copy_heads,
    early_stop_record,
    early_stopping,
    fit_reconstruction,
    training_config,
    training_options,
)

INITS = ("first", "average", "regmean", "random")

OPTIONS = (
    Option("init", Choice(INITS), "the student's start", "first", "the FS-Merge authors' distillation baseline"),
    Option("output_map", Choice(("learned", "fixed")), "the map from the student's features to each source's",
           Rule(lambda c: "fixed" if all(m.head_kind == "class-embedding" for m in c.models) else "learned",
                "fixed when every source's heads are frozen class embeddings (their features share one space), "
                "learned otherwise")),
    Option("regmean_alpha", Number(0, 1), "with init regmean: RegMean's alpha",
           by_family("alpha", "regmean", ("regmean",)), when=("init", ("regmean",))),
) + training_options("distill")


def student_init(models, data, init: str, regmean_alpha: float | None = None, seed: int = 0) -> TaskModel:
    """The student before training: a TaskModel with every source's head (heads unchanged)."""
    if init not in INITS:
        raise ValueError(f"unknown distillation init {init!r}; use one of {', '.join(INITS)}")
    if init == "average":
        return average.merge(models)
    if init == "regmean":
        return regmean.merge(models, data, alpha=regmean_alpha)
    first = models[0]
    student = TaskModel.for_merge(models)
    with torch.no_grad():
        if init == "first":
            student.backbone.load_state_dict(first.backbone.state_dict())
        else:
            torch.manual_seed(seed)
            fresh = first.spec.build(first.backbone_config)
            p = next(first.backbone.parameters())
            student.backbone.load_state_dict(fresh.to(dtype=p.dtype, device=p.device).state_dict())
        copy_heads(student, models)
    return student


@method("distill", OPTIONS, "a student of the sources' size trained to reproduce their features", held_out=True)
def merge(models, data, seed, context, init, output_map, regmean_alpha, epochs, lr, momentum, schedule, warmup,
          weight_decay, decay, logit_weight, logit_loss, batch_size, optimizer, targets, target_scale, patience, held_out=None):
    check_same_backbone(models, "distillation")
    cfg, target_scale = training_config(dict(epochs=epochs, lr=lr, momentum=momentum, schedule=schedule,
                                             warmup=warmup, weight_decay=weight_decay, decay=decay,
                                             logit_weight=logit_weight, logit_loss=logit_loss, batch_size=batch_size,
                                             optimizer=optimizer, target_scale=target_scale), seed)
    student = student_init(models, data, init, regmean_alpha, seed)
    student.train()
    head_weights = [h.weight.detach().clone() for h in student.heads]
    owner_of_head = [k for k, m in enumerate(models) for _ in m.heads]
    p = next(student.parameters())
    u = FoldMap(student.feature_dim, [m.feature_dim for m in models], "full", "first",
                "unmerge", dtype=p.dtype).to(p.device)
    u.weight.requires_grad_(output_map == "learned")

    x, owner = cat_with_owner(data)
    held, stop = early_stopping(models, held_out, targets == "own-task", patience)
    start = time.perf_counter()
    learned = list(student.backbone.parameters()) + [q for q in u.parameters() if q.requires_grad]
    history = fit_reconstruction(learned, student.features,
                                 u, models, x, owner if targets == "own-task" else None, cfg, target_scale,
                                 "distillation", context, held_out=held, early_stop=stop, modules=[student])
    student.eval()
    if output_map == "learned":                     # a fixed U is [I; I; …]: the heads stay as they are
        with torch.no_grad():
            for head, w, k in zip(student.heads, head_weights, owner_of_head):
                head.weight.copy_(u.apply(k, w))    # head_k · U[k]
    student.meta = {
        "method": "distill", "init": init, "targets": targets, "target_scale": target_scale,
        "output_map": output_map,
        "train": cfg.as_dict(len(x)), "train_seconds": time.perf_counter() - start,
        "learnable_parameters": sum(q.numel() for q in learned),
        "initial_loss": history[0] if history else None, "final_loss": history[-1] if history else None,
        "merge_examples": [len(d) for d in data],
        **({"regmean_alpha": regmean_alpha} if init == "regmean" else {}),
        **early_stop_record(stop, held_out),
    }
    return student
