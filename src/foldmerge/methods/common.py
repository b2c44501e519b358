"""Helpers every merging method shares."""
from __future__ import annotations

import hashlib
import json
import weakref

import torch

from ..foldable import unmerge_features
from ..train import TrainConfig, fit


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


def default_targets(models) -> str:
    """'all' for chains of layers (MLPs: every input against every source, paper 2.1), 'own-task'
    for architectures with a residual stream (transformers: an input of task k against source k
    only, paper B.2)."""
    return "all" if models[0].spec.is_chain() else "own-task"


def cat_with_owner(data: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate the per-model merge samples; owner[i] = index of the model whose task x[i] is from."""
    x = torch.cat(list(data))
    owner = torch.cat([torch.full((len(d),), k, dtype=torch.long, device=d.device) for k, d in enumerate(data)])
    return x, owner


def check_same_backbone(models, method: str) -> None:
    """Parameter-wise methods (average, SLERP, RegMean) need identical backbones and head layouts."""
    sources_arch(models)
    from ..spec import check_mergeable
    check_mergeable([m.spec for m in models], [m.backbone_config for m in models])    # the family's own reason first
    cfgs = [json.dumps(m.backbone_config, sort_keys=True) for m in models]     # key order is no difference
    if len(set(cfgs)) != 1:
        a, b = (json.loads(c) for c in cfgs[:1] + [c for c in cfgs if c != cfgs[0]][:1])
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise ValueError(f"{method} needs identical backbones; they differ in {diff[0]} "
                         f"({a.get(diff[0])} vs {b.get(diff[0])}); FS-Merge and the alignment methods merge "
                         "different widths")
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


def copy_heads(merged, models) -> None:
    """Every source's heads into the merge, in order: heads are never merged (FS-Merge paper, section 2)."""
    with torch.no_grad():
        for dst, src in zip(merged.heads, [h for m in models for h in m.heads]):
            dst.load_state_dict(src.state_dict())


# Task vectors: merging models fine-tuned from one pre-trained start ------------------
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
    from ..model import TaskModel
    merged = TaskModel.for_merge(models)
    p = next(merged.backbone.parameters())
    full = merged.backbone.state_dict()
    full.update({k: v.to(p.dtype) for k, v in state.items()})
    merged.backbone.load_state_dict(full)
    copy_heads(merged, models)
    merged.meta = meta
    return merged


# The objective FS-Merge and distillation share ------------------------------------
_TEACHER_FEATURES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
SAMPLES_PER_MODEL = 16      # merge samples whose features are kept per model (FS-Merge seq.: n - 1)
CHUNK = 256                 # examples per forward pass: memory stays flat however large the sample


@torch.no_grad()
def features_in_chunks(model, x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """model.features(x), `chunk` examples at a time (a sample of real images in one pass
    would hold every layer's activations for all of them at once)."""
    return torch.cat([model.features(part) for part in x.split(chunk)]) if len(x) else model.features(x)


@torch.no_grad()
def teacher_features(model, x: torch.Tensor) -> torch.Tensor:
    """model.features(x) in eval mode, computed once per (model, data) and reused by every later method.

    A bench runs distillation and several FS-Merge variants on the same sources and merge
    sample; the sources' features are the same for all of them (paper E.2 saves them to disk
    once). FS-Merge seq. reads each source on a growing sample, one per stage, so a model
    keeps its last SAMPLES_PER_MODEL samples (features only: N x out_dim each). The key is the
    data's content and the identity, storage and version of every parameter and buffer of the
    model (a changed sample, an edited weight or BatchNorm statistic is recomputed); teachers
    always run in eval mode (dropout off, BatchNorm on its running statistics), whatever mode
    the caller left them in. Entries die with the model.
    """
    data = x.detach().to("cpu").contiguous()
    tensors = list(model.parameters()) + list(model.buffers())
    key = (tuple(x.shape), str(x.dtype), str(x.device),
           hashlib.sha1(data.view(torch.uint8).numpy().tobytes()).hexdigest(),
           tuple((id(t), t.data_ptr(), t._version) for t in tensors))
    per_model = _TEACHER_FEATURES.setdefault(model, {})
    if key in per_model:
        per_model[key] = per_model.pop(key)             # most recently used last
    else:
        was_training = model.training
        model.eval()
        try:
            per_model[key] = features_in_chunks(model, x)
        finally:
            model.train(was_training)
        while len(per_model) > SAMPLES_PER_MODEL:
            del per_model[next(iter(per_model))]
    return per_model[key]


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


def fit_reconstruction(params, features, output_map, models, x: torch.Tensor, owner: torch.Tensor | None,
                       cfg: TrainConfig, target_scale, desc: str, inputs: list[torch.Tensor] | None = None,
                       through: list | None = None, held_out=None, early_stop=None) -> list[float]:
    """The objective and loop FS-Merge global and distillation share.

    `features(*batch_inputs)` gives the merged features f*; `output_map` (a FoldMap, unmerge
    role) reconstructs every source's last features from them; the loss scores those against the
    sources' own features on x (computed once), on every input or, with `owner`, only on each
    input's own source. Targets are scaled by `target_scales`; the output map's blocks are
    multiplied by the scales before training (so training starts exactly at the init) and
    divided by them after, also when training fails (so the folded model is unaffected).
    `inputs` (default [x]) are what `features` receives, e.g. x and cached layer outputs on x.

    `through` (FS-Merge seq.): one (block, A) per source: source k is reconstructed as
    A · U[block] f* with a fixed matrix A (None: U[block] f* itself, one source per block).
    A source reached through A is scaled by scaling A, so several may share a block.

    `held_out` (x, owner) with `early_stop` (a `train.EarlyStop`): the same loss on held-out
    inputs, f* computed by `features` on them alone, scored after every epoch (paper F.8).
    """
    targets = [teacher_features(m, x) for m in models]
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
        return [blocks[b] if a is None else blocks[b] @ a.T for b, a in links]

    def loss_fn(*batch):
        ob = batch[m + n] if owner is not None else None
        return reconstruction_loss(reconstruct(features(*batch[:m])), list(batch[m:m + n]), ob)

    if early_stop is not None:
        xh, oh = held_out
        held_targets = [teacher_features(m, xh) * s for m, s in zip(models, scales)]

        def held_loss():
            merged = torch.cat([features(part) for part in xh.split(CHUNK)])
            return reconstruction_loss(reconstruct(merged), held_targets, oh)
        early_stop.loss = held_loss

    for b, s in own_blocks:
        output_map.scale_block(b, s)
    try:
        return fit(params, loss_fn, args, cfg, desc=desc, early_stop=early_stop)
    finally:
        for b, s in own_blocks:
            output_map.scale_block(b, 1.0 / s)


# Training defaults for architectures with a residual stream (ViTs, BERTs): the ViT bench's
# validated choice on pairs16 (appendix E.2's optimizer, batch and weight decay; epochs and lr
# from its grid, README "ViTs": distillation and low-rank FS-Merge both chose 100 epochs at
# lr 1e-3) with E.1's 20 warmup epochs and unscaled targets (E.2). Chains of layers (MLPs)
# keep each method's E.1 values.
RESIDUAL_TRAINING = dict(optimizer="adamw", batch_size=128, weight_decay=0.001, epochs=100, lr=1e-3, momentum=0.9,
                         warmup=0.2, target_scale="none")


def training_defaults(models, own: dict) -> dict:
    """A method's defaults for these models: its own (E.1) with plain SGD on the whole sample and
    scaled targets for MLPs; for architectures with a residual stream its training values
    replaced by RESIDUAL_TRAINING (its other keys, e.g. the init, kept)."""
    if models[0].spec.is_chain():
        return {"optimizer": "sgd", "batch_size": None, "weight_decay": 0.0, "target_scale": "match", **own}
    return {**own, **RESIDUAL_TRAINING}


def training_config(given: dict, defaults: dict, schedule: str, seed: int):
    """(TrainConfig, target scale) from the training options `given` (None: `defaults`'s)."""
    from ..train import TrainConfig
    t = resolve(given, defaults)
    target_scale = t.pop("target_scale")
    return TrainConfig(schedule=schedule, seed=seed, **t), target_scale


def resolve(given: dict, defaults: dict) -> dict:
    """`given` with every None replaced by its default."""
    return {k: defaults[k] if v is None else v for k, v in given.items()}


def early_stopping(models, held_out, own_task: bool, patience: int | None):
    """((x, owner), EarlyStop) for per-model held-out inputs (None: (None, None), no early stopping)."""
    from ..train import EarlyStop
    if held_out is None:
        if patience is not None:
            raise ValueError("patience applies only with held-out data (held_out / --held-out)")
        return None, None
    if len(held_out) != len(models) or any(len(h) == 0 for h in held_out):
        raise ValueError(f"held-out data needs a non-empty tensor per model ({len(models)})")
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a positive number of epochs, got {patience!r}")
    x, owner = cat_with_owner(list(held_out))
    stop = EarlyStop(loss=None) if patience is None else EarlyStop(loss=None, patience=patience)
    return (x, owner if own_task else None), stop


def early_stop_record(stop, held_out) -> dict:
    """The meta entry of a run that stopped early ({} if it did not use held-out data)."""
    return {"early_stop": {**stop.as_dict(), "held_out_examples": [len(t) for t in held_out]}} if stop else {}
