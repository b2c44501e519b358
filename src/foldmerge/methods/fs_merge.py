"""FS-Merge: train a Foldable SuperNet to reconstruct the sources' features, then fold it.

local  (paper eq. 3): per hidden layer l of an MLP, from the sources' own pre-activations
       z_l^1‖…‖z_l^n, learn M_l, U_l so that U_l · relu(M_l · z) reconstructs f_l^1‖…‖f_l^n. Any other
       family (a residual stream, whose one space every block reads and writes): per merged space, from
       the sources' own activations z^1‖…‖z^n at the space's probes (every block's, for the stream), learn
       M, U so that U · M · z reconstructs them; every site of the space takes them, as alignment maps do
       (`align.merge_with_maps`). Each space needs only its own activations, so the maps of a layer can be
       learned as soon as its activations are seen: the variant that streams.
global (paper eq. 4): learn every M, U together so that U_L · f*_L reconstructs the last
       representation layer of each source.
seq    (paper B.4, "FS-Merge seq."): global FS-Merge of models 1 and 2, then of that merge
       and model 3, and so on; each stage holds two weight sets (the last merge and one new
       source), starts from the last merge ('first' init) and reconstructs every source seen
       so far (sources merged earlier through their chain of last-U maps). `last_epochs`
       trains the last stage longer or shorter.
init: 'first' | 'average' | 'random' | 'zipit' (M, U start as ZipIt!'s maps, every site its
         space's; param full) | 'permute' (every source after the first is permuted onto it first, by
         the activation matching of `permute`, which leaves its function as it was; then 'average':
         the start is the permuted sources' mean, with any param).
param:  'full' | 'diag' | 'diag+lowrank(R)' | 'diag+lowrank(P%)' (a rank of P % of each map's merged width,
         at least 1: one setting for every width); the default by family (`foldmerge.arch.defaults`):
         dense for MLPs (paper 2.1), diagonal + low-rank for a residual stream (B.2).
targets: 'all'      every input is scored against every source's features (MLPs, paper 2.1);
         'own-task' an input of task k only against source k (transformers, B.2).
target_scale: 'match' (scale each source's targets to the first source's mean |f|, paper E.1),
         a number (scale every source's targets to that mean |f|), or 'none'. U's blocks are
         multiplied by the scales before training (so training starts exactly at the init) and
         divided by them before folding (as the authors do), so the scaling never changes what
         the folded model computes, only how the sources' errors are weighed.
"""
from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch.nn import functional as F

from ..foldable import FoldMap, gather_params, merge_features, unmerge_features
from ..options import Choice, Grammar, Integer, Lazy, ListOf, Number, Option, Rule, method
from ..supernet import SuperNet
from . import align, zipit
from .permute import permutation_maps
from .common import (
    by_family,
    cat_with_owner,
    early_stop_record,
    early_stopping,
    fit_reconstruction,
    reconstruction_loss,
    sources_spec,
    target_scales,
    training_config,
    training_options,
)

PARAM = Grammar(r"full|diag|diag\+lowrank\(([1-9][0-9]*|([1-9][0-9]?|100)%)\)",
                "full | diag | diag+lowrank(R), R >= 1, or diag+lowrank(P%), a rank of P % of each map's merged width",
                "PARAM", "diag+lowrank(2)")

OPTIONS = (
    Option("variant", Choice(("local", "global", "seq")),
           "objective: global (paper eq. 4), local (eq. 3: per layer of an MLP, per space of a residual stream), "
           "seq (B.4: one model after another)",
           "global", "paper section 2: the variant of its main results"),
    Option("param", PARAM, "how M and U are parameterized", by_family("param", "fs-merge", ("fs-merge",))),
    Option("init", Choice(("first", "average", "random", "zipit", "permute")), "where M and U start",
           Rule(lambda c: "random" if c.options["variant"] == "local" and c.models[0].spec.relu_layers else "first",
                "random (local on an MLP: appendix E.1), else first (global, seq: section 2; local on a residual "
                "stream starts where the global variant does)")),
    Option("widths", ListOf(Integer(1)), "merged widths, one per width space of the family (MLP: one per hidden "
           "layer; ViT: residual [MLP]); unset: model 1's"),
    Option("form", Choice(("folded", "supernet")), "how the SuperNet runs in training", "folded",
           "the same function and gradients as the SuperNet form (tested), one merged-width model per step"),
    Option("rows", Integer(1), "local: at most this many activation rows per probe and task, drawn at random "
           "(seeded; the same inputs and positions in every source; an MLP's layer gives one row per example): "
           "bounds the activations a space's maps train on", None, "every row: each position of each example",
           when=("variant", ("local",))),
    Option("zipit_alpha", Number(), "with init zipit: ZipIt!'s alpha",
           by_family("alpha", "zipit", ("zipit",)), when=("init", ("zipit",))),
    Option("zipit_beta", Number(0, 1), "with init zipit: ZipIt!'s beta",
           by_family("beta", "zipit", ("zipit",)), when=("init", ("zipit",))),
) + training_options("fs-merge") + (
    Option("last_epochs", Integer(0), "seq: epochs of the last stage",
           Rule(lambda c: c.options["epochs"], "--epochs"), when=("variant", ("seq",))),
)


@method("fs-merge", OPTIONS, "Foldable SuperNet Merge: learn M and U around the frozen sources, then fold",
        held_out=True, lazy=Lazy("--variant local, on a residual stream",
                                 lambda o, spec: o["variant"] == "local" and not spec.relu_layers))
def merge(models, data, seed, context, variant, param, init, widths, form, last_epochs, rows, zipit_alpha, zipit_beta,
          epochs, lr, momentum, schedule, warmup, weight_decay, decay, logit_weight, logit_loss, batch_size, optimizer, targets,
          target_scale, patience, held_out=None):
    sources_spec(models)                  # one architecture, two or more models
    cfg, target_scale = training_config(dict(epochs=epochs, lr=lr, momentum=momentum, schedule=schedule,
                                             warmup=warmup, weight_decay=weight_decay, decay=decay,
                                             logit_weight=logit_weight, logit_loss=logit_loss, batch_size=batch_size,
                                             optimizer=optimizer, target_scale=target_scale), seed)
    torch.manual_seed(seed)
    if logit_weight and variant == "local":
        raise ValueError("logit_weight weighs the last features' reconstruction; local FS-Merge reconstructs "
                         "each layer: use --variant global or seq")
    if held_out is not None and variant != "global":       # before any work
        raise ValueError(f"early stopping on held-out data applies to FS-Merge global, not {variant}")
    if variant == "seq":
        return _merge_seq(models, data, widths, param, init, targets, target_scale, form, cfg, last_epochs, seed,
                          context)
    if rows is not None and models[0].spec.relu_layers:     # an MLP's layer gives one row per example
        g = torch.Generator().manual_seed(int(seed))
        data = [d[torch.randperm(len(d), generator=g)[:rows].sort().values] for d in data]
    if variant == "local" and not models[0].spec.relu_layers:
        if init in ("zipit", "permute"):
            raise ValueError(f"local FS-Merge of a residual stream learns each space's maps alone; init {init!r} "
                             "applies to the global variant")
        return _merge_local_spaces(models, data, param, init, widths, targets, target_scale, cfg, seed, context,
                                   rows)
    if init == "zipit":
        supernet = _zipit_supernet(models, data, widths, param, seed, zipit_alpha, zipit_beta)
    elif init == "permute":
        supernet = SuperNet(_permuted_onto_first(models, data), widths=widths, param=param, init="average", seed=seed)
    else:
        supernet = SuperNet(models, widths=widths, param=param, init=init, seed=seed)
    x, owner = cat_with_owner(data)
    start = time.perf_counter()
    held, stop = early_stopping(models, held_out, targets == "own-task", patience)
    if variant == "local":
        history = _train_local(supernet, models, x, owner if targets == "own-task" else None,
                               cfg, target_scale, context)
    else:
        history = _train_global(supernet, models, x, owner if targets == "own-task" else None,
                                cfg, target_scale, form, context, held_out=held, early_stop=stop)
    merged = supernet.fold()
    merged.meta = {
        "method": "fs-merge", "variant": variant, "param": param, "init": init, "targets": targets,
        "target_scale": target_scale, "form": form,
        **({"zipit_alpha": zipit_alpha, "zipit_beta": zipit_beta} if init == "zipit" else {}), "widths": supernet.widths,
        "train": cfg.as_dict(len(x)), "train_seconds": time.perf_counter() - start,
        "learnable_parameters": sum(p.numel() for p in supernet.parameters() if p.requires_grad),
        "final_loss": history[-1] if history else None,
        "initial_loss": history[0] if history else None,
        "merge_examples": [len(t) for t in data],
        **early_stop_record(stop, held_out),
    }
    return merged


def _merge_seq(models, data, widths, param, init, targets, target_scale, form, cfg, last_epochs, seed, context):
    """FS-Merge seq. (B.4): n - 1 global stages over (last merge, next source)."""
    if init != "first":
        raise ValueError(f"FS-Merge seq. starts every stage from the last merge: init must be 'first', got {init!r}")
    start = time.perf_counter()
    merged, chain, stages = None, None, []
    for k in range(1, len(models)):
        pair = [models[0], models[1]] if k == 1 else [merged, models[k]]
        supernet = SuperNet(pair, widths=widths if k == 1 else None, param=param, init="first", seed=seed)
        x, owner = cat_with_owner(data[:k + 1])
        # source j < k is reconstructed through its chain into the last merge's feature space
        through = None if k == 1 else [(0, a) for a in chain] + [(1, None)]
        stage_cfg = replace(cfg, epochs=last_epochs) if k == len(models) - 1 and last_epochs is not None else cfg
        history = _train_global(supernet, models[:k + 1], x, owner if targets == "own-task" else None, stage_cfg,
                                target_scale, form, context, through=through,
                                desc=f"FS-Merge seq. {k}/{len(models) - 1}")
        with torch.no_grad():
            u = [supernet.output_map.block(b).T for b in range(2)]   # U[b]: (d_b x d*)
            chain = u if k == 1 else [a @ u[0] for a in chain] + [u[1]]
        merged = supernet.fold()
        stages.append({"learnable_parameters": sum(p.numel() for p in supernet.parameters() if p.requires_grad),
                       "epochs": stage_cfg.epochs, "initial_loss": history[0] if history else None,
                       "final_loss": history[-1] if history else None})
    merged.meta = {
        "method": "fs-merge", "variant": "seq", "param": param, "init": init, "targets": targets,
        "target_scale": target_scale, "form": form, "widths": supernet.widths,
        "train": cfg.as_dict(sum(len(d) for d in data)),
        "last_epochs": last_epochs, "train_seconds": time.perf_counter() - start, "stages": stages,
        # what one stage optimizes (the stages run one after another)
        "learnable_parameters": max(s["learnable_parameters"] for s in stages),
        "initial_loss": stages[-1]["initial_loss"], "final_loss": stages[-1]["final_loss"],
        "merge_examples": [len(t) for t in data],
    }
    return merged


def _zipit_supernet(models, data, widths, param, seed, alpha, beta):
    """A SuperNet whose maps start as ZipIt!'s (paper section 3.1, "FS-M, ZipIt init"): every
    site takes its space's ZipIt! maps, merged norms M·concat(γ_k), as `zipit.merge` folds them."""
    if param != "full":
        raise ValueError(f"init 'zipit' needs param 'full' (ZipIt!'s maps are not diagonal), got {param!r}")
    if widths is not None:
        raise ValueError("init 'zipit' merges to model 1's widths; leave widths unset")
    align.check_sources(models, data, "init 'zipit'")
    maps, _ = zipit.space_maps(models, data, alpha, beta)
    supernet = align.space_supernet(models, {s: m.shape[0] for s, (m, _) in maps.items()}, seed)
    align.load_maps(supernet, models, maps)
    return supernet


def _permuted_onto_first(models, data):
    """Model 1, and every other model with its neurons permuted onto model 1's (per space, within
    attention heads, by activation correlation on the merge data: `permute`'s matching). A
    permutation changes no model's function; the SuperNet then starts from their mean."""
    align.check_sources(models, data, "init 'permute'")
    spec = models[0].spec
    feats = align.observe(models, data)
    # frozen class-embedding heads put every model's features in one space already (the heads are the
    # same matrices): that space stays as it is, a permutation would undo the alignment the heads made
    shared_out = all(m.head_kind == "class-embedding" for m in models)
    out = [models[0]]
    for k in range(1, len(models)):
        maps = {}
        for s in align.merged_spaces(spec):
            if shared_out and s == spec.output:
                eye = torch.eye(feats[s][k].shape[1], dtype=feats[s][k].dtype)
                maps[s] = (eye, eye)
                continue
            _, u, _ = align.per_head(lambda f: permutation_maps(f[0], f[1]), [feats[s][0], feats[s][k]],
                                     spec.space(s).heads)
            p = u[u.shape[1]:].T                        # U's second block is Pᵀ: model k read in model 1's order
            maps[s] = (p, p.T)
        permuted = align.merge_with_maps([models[k]], maps)
        permuted.meta = dict(models[k].meta)
        out.append(permuted)
    return out


def _train_global(supernet, models, x, owner, cfg, target_scale, form, context, through=None,
                  desc="FS-Merge global", held_out=None, early_stop=None):
    # The input is fixed: layers that read it (an MLP's first layer) start every step from the
    # sources' outputs on it, computed once (same function, much less work per step).
    # (not with early stopping: held-out f* is computed from its inputs alone)
    fixed = supernet.fixed_inputs(x) if early_stop is None else None
    stop = {"held_out": held_out, "early_stop": early_stop}
    if fixed is None:
        return fit_reconstruction(supernet.parameters(), lambda xb: supernet(xb, form=form), supernet.output_map,
                                  models, x, owner, cfg, target_scale, desc, context, through=through, **stop,
                                  modules=[supernet])
    return fit_reconstruction(supernet.parameters(), lambda xb, *zb: supernet(xb, form=form, fixed=list(zb)),
                              supernet.output_map, models, x, owner, cfg, target_scale, desc, context,
                              inputs=[x, *fixed], through=through, modules=[supernet])


def _train_local(supernet, models, x, owner, cfg, target_scale, context):
    """Every layer's (M_l, U_l) learns its own reconstruction (eq. 3).

    The layers share no parameters, so they are trained in one loop on the sum of their
    losses: with (momentum) SGD each layer's update is exactly the one it would get alone,
    and one optimizer step serves all layers. When every layer has full maps of one shape
    (the usual constant-width MLP) the layers run as one batched matmul.
    """
    chain = supernet.spec.relu_layers          # (any other family: `_merge_local_spaces`)
    with torch.no_grad():
        pre = [_preactivations(m.backbone, [mod for mod, _ in chain], x) for m in models]   # [model][layer]
    n, depth = len(models), len(chain)
    # layer l's M writes its space, its U reads it (layer l + 1's input; U_out for the last layer)
    maps = [tuple(side[0] for side in supernet.maps_of(space)) for _, space in chain]
    z = [[p[l] for p in pre] for l in range(depth)]
    tgt, layer_scales = [], []
    for l in range(depth):
        t = [F.relu(zk) for zk in z[l]]
        scales = target_scales(t, target_scale)
        layer_scales.append(scales)
        for k, sk in enumerate(scales):     # start from the init's function on the scaled targets
            maps[l][1].scale_block(k, sk)
        tgt.append([tk * s for tk, s in zip(t, scales)])
    params = [p for p in supernet.parameters() if p.requires_grad]       # the maps' (packed) parameters
    batched = all(M.kind == U.kind == "full" for M, U in maps) and \
        len({(tuple(M.weight.shape), tuple(U.weight.shape)) for M, U in maps}) == 1
    desc = f"FS-Merge local ({depth} layer{'s' if depth > 1 else ''})"
    try:
        if batched:
            history = context.train(params, _batched_local_loss(maps, owner, maps[0][0].in_dims),
                                    _batched_local_data(z, tgt, owner), cfg, desc=desc, modules=[supernet])
        else:
            args = [t for l in range(depth) for t in (*z[l], *tgt[l])] + ([owner] if owner is not None else [])

            def loss_fn(*batch):
                ob = batch[2 * n * depth] if owner is not None else None
                total = 0.0
                for l, (M, U) in enumerate(maps):
                    zb, tb = batch[2 * n * l:2 * n * l + n], list(batch[2 * n * l + n:2 * n * (l + 1)])
                    total = total + reconstruction_loss(unmerge_features(U, F.relu(merge_features(M, zb))), tb, ob)
                return total

            history = context.train(params, loss_fn, args, cfg, desc=desc, modules=[supernet])
    finally:                                # the folded model never sees the target scaling
        for l in range(depth):
            for k, s in enumerate(layer_scales[l]):
                maps[l][1].scale_block(k, 1.0 / s)
    return history


def _merge_local_spaces(models, data, param, init, widths, targets, target_scale, cfg, seed, context, rows=None):
    """Local FS-Merge of a family that is not a chain of layers: one (M, U) per merged space, each trained
    alone to reconstruct the space's activations (module docstring), then folded as alignment maps are.
    Fixed and derived spaces (rotary queries and keys, grouped-query values) take the mean, as there."""
    if widths is not None:
        raise ValueError("local FS-Merge of a residual stream merges to model 1's widths; leave widths unset")
    align.check_sources(models, data, "local FS-Merge", equal_widths=False)
    spec, start = models[0].spec, time.perf_counter()
    per_task = [align.features_of(models, [d], rows, seed) for d in data]   # rows of task k's inputs: owner k
    first, last, learned = [], [], [0]

    def space_maps(space):        # trained when the fold first reads the space (align.SpaceMaps)
        seen = [f(space) for f in per_task]
        z = [torch.cat([s[k] for s in seen]).float() for k in range(len(models))]
        owner = torch.cat([torch.full((len(s[0]),), k) for k, s in enumerate(seen)])
        del seen
        scales = target_scales(z, target_scale)
        z = [zk * c for zk, c in zip(z, scales)]
        width, dims = z[0].shape[1], [zk.shape[1] for zk in z]
        g = torch.Generator().manual_seed(int(seed) * 7919 + learnable.index(space))   # whatever order spaces come in
        m = FoldMap(width, dims, param, init, "merge", g)
        u = FoldMap(width, dims, param, init, "unmerge", g)
        params = [*m.parameters(), *u.parameters()]
        learned[0] += sum(p.numel() for p in params)

        def loss_fn(*batch):
            zb, ob = list(batch[:-1]), batch[-1]
            return reconstruction_loss(unmerge_features(u, merge_features(m, zb)), zb,
                                       ob if targets == "own-task" else None)
        # one loop per space (its own row count), so no checkpoint: a space's training is short
        history = replace(context, checkpoint=None).train(params, loss_fn, [*z, owner], cfg,
                                                          desc=f"FS-Merge local ({space})", modules=[m, u])
        first.extend(history[:1])
        last.extend(history[-1:])
        with torch.no_grad():
            for k, c in enumerate(scales):     # trained on c_k·z_k: on z_k itself M_k is c_k·M_k, U_k is U_k / c_k
                m.scale_block(k, c)
                u.scale_block(k, 1.0 / c)
            return m.dense(), u.dense().T
    learnable = [s for s in align.merged_spaces(spec) if s not in align.averaged_spaces(spec)]
    maps = align.SpaceMaps(learnable, space_maps)
    merged = align.merge_with_maps(models, maps, seed)
    merged.meta = {"method": "fs-merge", "variant": "local", "param": param, "init": init, "targets": targets,
                   "rows": rows,
                   "target_scale": target_scale, "train": cfg.as_dict(sum(len(d) for d in data)),
                   "train_seconds": time.perf_counter() - start, "learnable_parameters": learned[0],
                   "initial_loss": sum(first) if first else None, "final_loss": sum(last) if last else None,
                   "merge_examples": [len(d) for d in data]}
    return merged


def _preactivations(backbone, layers: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the named Linear modules (before their ReLU) on `x`, in the order given."""
    modules, seen = dict(backbone.named_modules()), {}
    hooks = [modules[name].register_forward_hook(lambda mod, i, out, name=name: seen.__setitem__(name, out))
             for name in layers]
    try:
        backbone(x)
    finally:
        for h in hooks:
            h.remove()
    return [seen[name] for name in layers]


def _batched_local_data(z, tgt, owner):
    """(examples x layers x Σd) inputs and targets, so that minibatches slice examples."""
    data = [torch.stack([torch.cat(zl, 1) for zl in z], 1), torch.stack([torch.cat(tl, 1) for tl in tgt], 1)]
    return data + ([owner] if owner is not None else [])


def _batched_local_loss(maps, owner, in_dims):
    """The per-layer losses of `_recon_loss`, summed, for L layers at once (bmm)."""
    block_of = torch.cat([torch.full((d,), k) for k, d in enumerate(in_dims)])

    def loss_fn(zb, tb, ob=None):
        m = gather_params([M for M, _ in maps], "weight")      # L x d* x Σd
        u = gather_params([U for _, U in maps], "weight")      # L x d* x Σd  (U = uᵀ)
        h = F.relu(torch.bmm(zb.transpose(0, 1), m.transpose(1, 2)))
        sq = (torch.bmm(h, u) - tb.transpose(0, 1)) ** 2       # L x N x Σd
        if ob is None:
            return sq.mean(dim=(1, 2)).sum()
        keep = (ob.unsqueeze(1) == block_of.unsqueeze(0)).to(sq.dtype)   # N x Σd: own block only
        return ((sq * keep).sum(dim=(1, 2)) / keep.sum().clamp_min(1)).sum()

    return loss_fn
