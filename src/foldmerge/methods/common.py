"""Helpers every merging method shares: source checks, task vectors, and the training options and
objective that FS-Merge and distillation share."""
from __future__ import annotations

import json

import torch
from torch.nn import functional as F

from ..arch import defaults
from ..foldable import unmerge_features
from ..model import CHUNK, TaskModel
from ..options import Choice, Integer, ModelRef, Number, NumberOr, Option, Rule
from ..spec import check_mergeable
from ..train import EarlyStop, TrainConfig


def sources_arch(models) -> str:
    archs = {m.arch for m in models}
    if len(archs) != 1:
        raise ValueError(f"cannot merge models of different architectures: {sorted(archs)}")
    if len(models) < 2:
        raise ValueError("merging needs at least two models")
    return archs.pop()


def sources_spec(models):
    """The merge spec every model shares (at least two models of one architecture)."""
    sources_arch(models)
    return models[0].spec


def cat_inputs(data: list[torch.Tensor]) -> torch.Tensor:
    """The per-model merge samples as one tensor: every model reads every example, so the examples must
    have one shape (images of one size, texts of one length); else one line naming both."""
    shapes = [tuple(d.shape[1:]) for d in data]
    if len(set(shapes)) > 1:
        k = next(k for k, s in enumerate(shapes) if s != shapes[0])
        raise ValueError(f"every model reads every model's examples, but model 1's are {shapes[0]} and model {k + 1}'s "
                         f"{shapes[k]} (their image processors or tokenizers make different sizes): give every model "
                         "a processor that makes the same size")
    return torch.cat(list(data))


def cat_with_owner(data: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the per-model merge samples; owner[i] = index of the model whose task x[i] is from."""
    x = cat_inputs(data)
    owner = torch.cat([torch.full((len(d),), k, dtype=torch.long, device=d.device) for k, d in enumerate(data)])
    return x, owner


def check_same_backbone(models, method: str) -> None:
    """Parameter-wise methods (average, SLERP, RegMean) need identical backbones and head layouts."""
    sources_arch(models)
    check_mergeable([m.spec for m in models], [m.backbone_config for m in models])    # the family's own reason first
    cfgs = [json.dumps(m.backbone_config, sort_keys=True) for m in models]     # key order is no difference
    if len(set(cfgs)) != 1:
        a, b = (json.loads(c) for c in cfgs[:1] + [c for c in cfgs if c != cfgs[0]][:1])
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        sizes = all(isinstance(c.get(diff[0]), int) for c in (a, b))
        raise ValueError(f"{method} needs identical backbones; they differ in {diff[0]} "
                         f"({a.get(diff[0])} vs {b.get(diff[0])})"
                         + ("; FS-Merge merges models whose widths differ" if sizes else ""))
    if len({m.head_bias for m in models}) != 1:
        raise ValueError(f"{method} needs sources whose heads all have, or all lack, a bias")


def layer_rows(module, inp: torch.Tensor) -> torch.Tensor:
    """The rows a layer multiplies by its (flattened) weight: an nn.Linear's inputs (… x in), an
    nn.Conv2d's input patches (one row of in·kh·kw per output position, `F.unfold`)."""
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1:
            raise ValueError("grouped convolutions are not supported")
        cols = torch.nn.functional.unfold(inp, module.kernel_size, module.dilation, module.padding, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return inp.reshape(-1, inp.shape[-1])


def layer_outputs(module, out: torch.Tensor) -> torch.Tensor:
    """A layer's outputs as rows of its output features (a conv's channels at every position)."""
    if isinstance(module, torch.nn.Conv2d):
        return out.movedim(1, -1).reshape(-1, out.shape[1])
    return out.reshape(-1, out.shape[-1])


def copy_heads(merged, models, assign: bool = False) -> None:
    """Every source's heads into the merge, in order: heads are never merged (FS-Merge paper, section 2).
    `assign`: the merge's heads take copies of the tensors as they are (a merge shaped on the meta device)."""
    with torch.no_grad():
        for dst, src in zip(merged.heads, [h for m in models for h in m.heads]):
            dst.load_state_dict({k: v.detach().clone() for k, v in src.state_dict().items()} if assign else
                                src.state_dict(), assign=assign)


# Task vectors: merging models fine-tuned from one pre-trained start ------------------
BASE = Option("base", ModelRef(), "the pre-trained model the sources were fine-tuned from (a model directory)")


def check_base(models, base, method: str) -> None:
    """`base` is the pre-trained model every source was fine-tuned from: same backbone."""
    if base is None:
        raise ValueError(f"{method} needs the pre-trained model the sources were fine-tuned from (--base DIR)")
    check_same_backbone(list(models) + [base], method)


@torch.no_grad()
def task_vectors(models, base) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(the base's floating-point backbone tensors, τ_k = θ_k − θ_base for every source), float64
    (Ilharco et al. 2023); integer buffers are no parameters and stay the base's."""
    b = {k: v.to(torch.float64) for k, v in base.backbone.state_dict().items() if v.is_floating_point()}
    return b, [{k: v.to(torch.float64) - b[k] for k, v in m.backbone.state_dict().items() if k in b} for m in models]


def merged_from_state(models, state: dict[str, torch.Tensor], meta: dict):
    """A merge of `models` whose backbone is `state` (cast to the sources' dtype) and whose heads are theirs."""
    merged = TaskModel.for_merge(models)
    p = next(merged.backbone.parameters())
    full = merged.backbone.state_dict()
    full.update({k: v.to(p.dtype) for k, v in state.items()})
    merged.backbone.load_state_dict(full)
    copy_heads(merged, models)
    merged.meta = meta
    return merged


# The objective FS-Merge and distillation share ------------------------------------
def target_scales(targets: list[torch.Tensor], how) -> list[float]:
    """Factors that bring every source's targets to a common mean |f| (FS-Merge paper E.1):
    'match' the first source's level, a number that level, 'none' leaves them (all 1)."""
    means = [t.abs().mean().clamp_min(1e-12).item() for t in targets]
    if how in (None, "none", 0, 0.0):
        return [1.0] * len(targets)
    if how == "match":
        return [means[0] / m for m in means]
    try:
        level = float(how)
    except (TypeError, ValueError):
        raise ValueError(f"target_scale must be 'match', 'none' or a number, got {how!r}") from None
    return [level / m for m in means]


def reconstruction_loss(recon: list[torch.Tensor], targets: list[torch.Tensor], owner: torch.Tensor | None):
    """Mean squared error over the scored entries (all, or only each input's own task)."""
    total, count = 0.0, 0
    for k, (r, t) in enumerate(zip(recon, targets)):
        if owner is not None:
            keep = owner == k
            r, t = r[keep], t[keep]
        total = total + ((r - t) ** 2).sum()
        count += t.numel()
    return total / max(count, 1)


def logit_kl(recon: list[torch.Tensor], targets: list[torch.Tensor], owner: torch.Tensor | None, models,
             scales) -> torch.Tensor:
    """The mean KL divergence from each source head's predicted distribution on its own features to the
    same head's on the reconstructed ones (per prediction: an input, or a position of a language
    model's); the features unscaled first (`target_scales`), the heads' biases included."""
    total, count = 0.0, 0
    for k, (r, t) in enumerate(zip(recon, targets)):
        if owner is not None:
            keep = owner == k
            r, t = r[keep], t[keep]
        r, t = r / scales[k], t / scales[k]
        for head in models[k].heads:
            p = F.log_softmax(F.linear(t, head.weight.detach(), None if head.bias is None else head.bias.detach()), -1)
            q = F.log_softmax(F.linear(r, head.weight.detach(), None if head.bias is None else head.bias.detach()), -1)
            p, q = p.flatten(0, -2), q.flatten(0, -2)
            total = total + F.kl_div(q, p, log_target=True, reduction="sum")
            count += p.shape[0]
    return total / max(count, 1)


def fit_reconstruction(params, features, output_map, models, x: torch.Tensor, owner: torch.Tensor | None,
                       cfg: TrainConfig, target_scale, desc: str, context, inputs: list[torch.Tensor] | None = None,
                       through: list | None = None, held_out=None, early_stop=None, modules=()) -> list[float]:
    """The objective and loop FS-Merge global and distillation share.

    `features(*batch_inputs)` gives the merged features f*; `output_map` (a FoldMap, unmerge
    role) reconstructs every source's last features from them; the loss scores those against the
    sources' own features on x (from `context.features`), on every input or, with `owner`, only on each
    input's own source. Targets are scaled by `target_scales`; the output map's blocks are
    multiplied by the scales before training (so training starts exactly at the init) and
    divided by them after, also when training fails (so the folded model is unaffected).
    `inputs` (default [x]) are what `features` receives, e.g. x and cached layer outputs on x.

    `through` (FS-Merge seq.): one (block, A) per source: source k is reconstructed as
    A · U[block] f* with a fixed matrix A (None: U[block] f* itself, one source per block).
    A source reached through A is scaled by scaling A, so several may share a block.

    `held_out` (x, owner) with `early_stop` (a `train.EarlyStop`): the same loss on held-out
    inputs, f* computed by `features` on them alone, scored after every epoch (paper F.8).

    `modules`: those holding `params` and running `features` (besides `output_map`), for FSDP.
    """
    targets = [context.features(m, x) for m in models]
    scales = target_scales(targets, target_scale)
    targets = [t * s for t, s in zip(targets, scales)]
    links = through or [(k, None) for k in range(len(models))]
    links = [(b, None if a is None else a * s) for (b, a), s in zip(links, scales)]
    own_blocks = [(b, s) for (b, a), s in zip(links, scales) if a is None]
    inputs = [x] if inputs is None else list(inputs)
    n, m = len(targets), len(inputs)
    args = [*inputs, *targets] + ([owner] if owner is not None else [])

    def reconstruct(merged):
        blocks = unmerge_features(output_map, merged)
        return [blocks[b] if a is None else (blocks[b].unflatten(-1, (output_map.copies, -1)) @ a.T).flatten(-2)
                for b, a in links]

    w = cfg.logit_weight
    heads = [torch.cat([h.weight for h in mk.heads]).detach() for mk in models] if w else None

    def objective(recon, tgt, ob):
        """The features' error, and with logit_weight the logits' (a source's heads read both alike:
        their biases cancel in the squared error)."""
        loss = reconstruction_loss(recon, tgt, ob)
        if not w:
            return loss
        if cfg.logit_loss == "kl":
            logits = logit_kl(recon, tgt, ob, models, scales)
        else:
            logits = reconstruction_loss([r @ h.T for r, h in zip(recon, heads)],
                                         [t @ h.T for t, h in zip(tgt, heads)], ob)
        return (1 - w) * loss + w * logits

    def loss_fn(*batch):
        ob = batch[m + n] if owner is not None else None
        return objective(reconstruct(features(*batch[:m])), list(batch[m:m + n]), ob)

    if early_stop is not None:
        xh, oh = held_out
        held_targets = [context.features(m, xh) * s for m, s in zip(models, scales)]

        def held_loss():
            merged = torch.cat([features(part) for part in xh.split(CHUNK)])
            return objective(reconstruct(merged), held_targets, oh)
        early_stop.loss = held_loss

    for b, s in own_blocks:
        output_map.scale_block(b, s)
    try:
        return context.train(params, loss_fn, args, cfg, desc=desc, early_stop=early_stop,
                             modules=[*modules, output_map])
    finally:
        for b, s in own_blocks:
            output_map.scale_block(b, 1.0 / s)


# The training options FS-Merge and distillation share ------------------------------
def family(models) -> str:
    """The row of `foldmerge.arch.defaults` the models' spec names."""
    return models[0].spec.defaults


def sections(method: str, options: dict) -> tuple[str, ...]:
    """Where a method's family defaults are read: its variant's group, its own, then "train"."""
    variant = options.get("variant")
    return ((f"{method}/{variant}",) if variant else ()) + (method, "train")


def by_family(key: str, method: str, help_sections: tuple[str, ...] | None = None) -> Rule:
    """A default read from the models' family row (`foldmerge.arch.defaults`); a batch of the whole
    sample is recorded as its size."""
    shown = help_sections or (method, "train")

    def fn(c):
        value = defaults.value(family(c.models), sections(method, c.options), key)[0]
        if key == "batch_size" and value is None and c.data is not None:
            value = sum(len(d) for d in c.data)          # every example in one step: gradient descent
        return value
    return Rule(fn, defaults.describe(shown, key))


def training_options(method: str) -> tuple[Option, ...]:
    """The optimization options of a trained merge (FS-Merge, distillation), defaults by family."""
    return (
        Option("epochs", Integer(0), "epochs of training", by_family("epochs", method)),
        Option("lr", Number(positive=True), "peak learning rate", by_family("lr", method)),
        Option("momentum", Number(0, 1, below=True), "SGD momentum (AdamW: unused)", by_family("momentum", method)),
        Option("schedule", Choice(("constant", "step", "cosine")), "learning-rate schedule", "cosine",
               "appendix E.1: one cosine cycle after a linear warmup"),
        Option("warmup", Number(low=0, high=1, below=True), "cosine schedule: the share of training spent warming up",
               by_family("warmup", method)),
        Option("weight_decay", Number(low=0), "weight decay", by_family("weight_decay", method)),
        Option("decay", Choice(("all", "matrices", "to-start")),
               "what weight decay pulls: every parameter toward zero (all), only the matrices (matrices: an "
               "identity-initialized diagonal, a norm's gain, a bias keep their values), or every parameter "
               "toward its starting value (to-start)", "all",
               "the optimizers' own decay, which every measured bench used"),
        Option("logit_weight", Number(0, 1), "the share of the sources' logits (each source's heads on its "
               "reconstructed and on its own features) in the reconstruction loss, the rest the features'", 0.0,
               "paper eq. 4: the features alone"),
        Option("logit_loss", Choice(("mse", "kl")), "with logit_weight: the logits' error, their squared error or "
               "the KL divergence from each source's predicted distribution to the merge's (a language model's "
               "distillation)", "mse", "the features' squared error, carried to the logits"),
        Option("batch_size", Integer(1), "examples per step ('whole sample': gradient descent)",
               by_family("batch_size", method)),
        Option("optimizer", Choice(("sgd", "adamw")), "optimizer", by_family("optimizer", method)),
        Option("targets", Choice(("all", "own-task")),
               "which sources an input is scored against: every source, or only its own task's",
               by_family("targets", method)),
        Option("target_scale", NumberOr(("match", "none")),
               "scale every source's targets to a common mean |f|: the first source's (match), a number, "
               "or none", by_family("target_scale", method)),
        Option("patience", Integer(1), "with held-out data (--held-out): epochs without improvement before "
               "stopping", Rule(lambda c: 20 if c.held_out is not None else None,
                                "20 with held-out data: the early stopping of paper F.8, kept as measured")),
    )


def training_config(options: dict, seed: int) -> tuple[TrainConfig, object]:
    """(TrainConfig, target scale) from a trained merge's resolved options."""
    cfg = TrainConfig(epochs=options["epochs"], lr=options["lr"], momentum=options["momentum"],
                      weight_decay=options["weight_decay"], decay=options["decay"], optimizer=options["optimizer"],
                      logit_weight=options["logit_weight"], logit_loss=options["logit_loss"],
                      schedule=options["schedule"], warmup=options["warmup"], batch_size=options["batch_size"],
                      seed=seed)
    return cfg, options["target_scale"]


def early_stopping(models, held_out, own_task: bool, patience: int | None):
    """((x, owner), EarlyStop) for per-model held-out inputs (None: (None, None), no early stopping)."""
    if held_out is None:
        if patience is not None:
            raise ValueError("patience applies only with held-out data (held_out / --held-out)")
        return None, None
    if len(held_out) != len(models) or any(len(h) == 0 for h in held_out):
        raise ValueError(f"held-out data needs a non-empty tensor per model ({len(models)})")
    x, owner = cat_with_owner(list(held_out))
    stop = EarlyStop(loss=None) if patience is None else EarlyStop(loss=None, patience=patience)
    return (x, owner if own_task else None), stop


def early_stop_record(stop, held_out) -> dict:
    """The meta entry of a run that stopped early ({} if it did not use held-out data)."""
    return {"early_stop": {**stop.as_dict(), "held_out_examples": [len(t) for t in held_out]}} if stop else {}
