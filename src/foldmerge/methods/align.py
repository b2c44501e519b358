"""Alignment methods from the merge spec: observe every space, one (M, U) per space, fold.

ZipIt!, permute and OT fusion differ only in how they turn the activations of one space into
a merge map M (d* x Σ d_k) and an unmerge map U (Σ d_k x d*). Everything around that is here,
written once for every architecture:

  observe(models, data)        the activations of every space at the spec's probes, on all
                               merge data (every task's sample, concatenated): feats[space][k]
                               is (samples x d_k), the probes of a space stacked as samples
  per_head(fn, feats, heads)   fn applied to each head of a split space alone (attention q/k
                               and v: neurons are matched within a head, never across), the
                               maps assembled block by block
  merge_with_maps(models, maps)  the merged model: a SuperNet whose every site takes its
                               space's maps (tied across the space's parameters, as alignment
                               methods do), merged norms M·concat(γ_k), folded
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch

from ..foldable import TiedMap
from ..io import MappedTensors
from ..model import TaskModel, as_input
from ..supernet import SuperNet
from ..spec import Param, check_mergeable
from .common import CHUNK, cat_inputs, sources_spec


def read_lazily(models) -> bool:
    """Whether a merge's sources are memory-mapped (`--lazy`, `foldmerge.loading.load`): then spaces are
    observed one at a time and maps fold parameter by parameter."""
    return any(m.meta.get("lazy") for m in models)


def averaged_spaces(spec) -> set[str]:
    """The spaces whose maps are the sources' mean, never matched or learned: fixed ones (rotary queries and
    keys, grouped-query values) and those derived from them."""
    return {s.name for s in spec.spaces if s.fixed or s.derived}


def merged_spaces(spec) -> list[str]:
    """The spaces a merge maps (every space that is not a shared input), in spec order."""
    return [s.name for s in spec.spaces if not s.shared]


def check_sources(models, data, method: str, equal_widths: bool = True) -> None:
    """One data tensor per model, every space observed, identical widths (if asked): else a one-line ValueError."""
    spec = sources_spec(models)
    if data is None or len(data) != len(models):
        raise ValueError(f"{method} needs one data tensor per model; got "
                         f"{0 if data is None else len(data)} for {len(models)} models")
    if any(len(d) == 0 for d in data):
        raise ValueError(f"{method} needs at least one example per model")
    probed = {p.space for p in spec.probes}
    missing = [s for s in merged_spaces(spec) if s not in probed]
    if missing:
        raise ValueError(f"{method} needs activations of every space; the {spec.name} spec has no probe "
                         f"for {missing[0]!r}")
    check_mergeable([m.spec for m in models], [m.backbone_config for m in models])    # the family's own reason first
    if equal_widths:
        check_widths(models, method)


def check_widths(models, method: str) -> None:
    """Every merged space equally wide in every model (what a data-free alignment checks), else one line."""
    spec = sources_spec(models)
    widths = [spec.validate(m.backbone) for m in models]
    for s in merged_spaces(spec):
        ws = [w[s] for w in widths]
        if len(set(ws)) != 1:
            raise ValueError(f"{method} needs sources with identical hidden widths; space {s!r} is {ws} wide")


@torch.no_grad()
def observe(models, data, select=None, chunk: int = CHUNK, spaces=None, rows: int | None = None,
            seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """feats[space][k]: model k's activations of `space` on the concatenated merge data (float64).

    Every probe of a space is read on every example; a probe's tensor (examples x … x d) becomes
    rows of d (`select(tensor)` if given, e.g. some tokens only; by default every position), and
    the probes of a space are stacked in spec order. Models run in eval mode, `chunk` examples
    at a time. `spaces`: only those spaces, each forward pass stopped once their last probe is read.
    `rows`: at most about that many rows per probe, drawn at random in each chunk (seeded by the probe
    and the chunk, so every model gives the rows of the same inputs and positions)."""
    spec = models[0].spec
    x = cat_inputs(list(data))
    feats: dict[str, list[torch.Tensor]] = {}
    for m in models:
        for space, t in _observe_one(spec, m.backbone, x, select, chunk, spaces, rows, seed).items():
            feats.setdefault(space, []).append(t)
    return feats


def features_of(models, data, rows: int | None = None, seed: int = 0):
    """space -> [model k's activations of it] (`observe`, `rows` per probe): all observed at once for
    sources in memory; for lazily read sources (`--lazy`) each space observed when asked, its forward
    passes stopped after its last probe, so that one space's activations are held at a time (the passes
    are recomputed)."""
    if not read_lazily(models):
        feats = observe(models, data, rows=rows, seed=seed)
        return feats.__getitem__
    return lambda space: observe(models, data, spaces={space}, rows=rows, seed=seed)[space]


class _Seen(Exception):
    """Every probe asked for has been read: the rest of the forward pass is not needed."""


def _observe_one(spec, backbone, x, select, chunk, spaces=None, most=None, seed=0) -> dict[str, torch.Tensor]:
    seen: list[list[torch.Tensor]] = [[] for _ in spec.probes]
    wanted = [i for i, p in enumerate(spec.probes) if spaces is None or p.space in spaces]
    read, part_no = [0], [0]

    def keep(i):
        axis = spec.probes[i].axis

        def rows(t):
            t = t.detach()
            if axis not in (-1, t.dim() - 1):      # the space's axis last (a conv's channels)
                t = t.movedim(axis, -1)
            r = select(t) if select is not None else t.reshape(-1, t.shape[-1])
            if most is not None:                  # this chunk's share of `most`, the same rows in every model
                share = -(-most * len(t) // len(x))
                if len(r) > share:
                    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + i * 10_007 + part_no[0])
                    r = r[torch.randperm(len(r), generator=g)[:share].sort().values]
            seen[i].append(r.to(torch.float64))
            read[0] += 1
            if spaces is not None and read[0] == len(wanted):
                raise _Seen
        return rows

    handles = []
    for i, probe in enumerate(spec.probes):
        if i not in wanted:
            continue
        try:
            module = backbone.get_submodule(probe.module)
        except AttributeError:
            raise ValueError(f"{spec.name} spec: probe of {probe.space!r} names no module {probe.module!r}") from None
        f = keep(i)
        if probe.where == "in":
            handles.append(module.register_forward_pre_hook(lambda _m, args, f=f: f(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _args, out, f=f: f(out)))
    was_training = backbone.training
    p = next(backbone.parameters())
    try:
        backbone.eval()
        for part_no[0], part in enumerate(x.split(chunk)):
            read[0] = 0
            try:
                backbone(as_input(part, p))
            except _Seen:
                pass
    finally:
        for h in handles:
            h.remove()
        backbone.train(was_training)
    out: dict[str, list[torch.Tensor]] = {}
    for i in wanted:
        out.setdefault(spec.probes[i].space, []).append(torch.cat(seen[i]))
    return {space: torch.cat(parts) for space, parts in out.items()}


def per_head(fn, feats: list[torch.Tensor], heads: int):
    """(M, U) of a space split into `heads` contiguous heads: `fn(head_feats)` -> (M_h, U_h, …) on
    each head's features alone, placed in head h's rows of M and columns of each model's block.
    Extra results of fn (statistics) are returned per head as a list."""
    if heads == 1:
        m, u, *extra = fn(feats)
        return m, u, [extra]
    widths = [f.shape[1] for f in feats]
    per = [w // heads for w in widths]
    offsets = [sum(widths[:k]) for k in range(len(widths))]
    parts = [fn([f[:, h * p:(h + 1) * p] for f, p in zip(feats, per)]) for h in range(heads)]
    sizes = {m.shape[0] for m, *_ in parts}
    if len(sizes) != 1:
        raise ValueError(f"the heads of a space came out {sorted(sizes)} wide; attention needs equal heads")
    d = sizes.pop()
    m_all = feats[0].new_zeros(d * heads, sum(widths), dtype=parts[0][0].dtype)
    u_all = m_all.new_zeros(sum(widths), d * heads)
    for h, (m, u, *_) in enumerate(parts):
        col = 0
        for k, p in enumerate(per):
            src = slice(offsets[k] + h * p, offsets[k] + (h + 1) * p)
            m_all[h * d:(h + 1) * d, src] = m[:, col:col + p]
            u_all[src, h * d:(h + 1) * d] = u[col:col + p]
            col += p
    return m_all, u_all, [extra for _, _, *extra in parts]


def space_supernet(models, widths: dict[str, int] | None = None, seed: int = 0) -> SuperNet:
    """A SuperNet with full maps (init 'first') at the merged widths `widths` (space -> width)."""
    spec = models[0].spec
    w = per_space = None
    if widths is not None and any(widths[s] != d for s, d in spec.validate(models[0].backbone).items() if s in widths):
        if spec.resize_spaces is not None:                  # resized only when a width changes
            per_space = widths
        else:
            w = [widths[s] for s in spec.width_spaces]
    sn = SuperNet(models, widths=w, param="full", init="first", seed=seed, space_widths=per_space)
    for s, d in (widths or {}).items():
        if sn.space_widths.get(s, d) != d:
            raise ValueError(f"the maps of space {s!r} are {d} wide, but the merged {spec.name} is "
                             f"{sn.space_widths[s]} wide there (the architecture ties it to another width)")
    return sn


@torch.no_grad()
def load_maps(sn: SuperNet, models, maps: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Every site of `sn` takes its space's (M, U); merged norms become M·concat(γ_k). A fixed space
    (queries and keys rotated by position: a match within a head would move a dimension to another
    rotation frequency; grouped-query values) and a space derived from one take the mean."""
    mean = averaged_spaces(sn.spec)
    for role, _, space, fm in sn.sites():
        if isinstance(fm, TiedMap):         # set through the merge map it is tied to (spec.tied_output)
            continue
        m, u = maps[space] if space not in mean else averaging_maps(fm.out_dim, [1 / fm.n] * fm.n, [None] * fm.n)
        fm.set_dense(m if role == "merge" else u.T)
    states = [dict(m.backbone.named_parameters()) for m in models]
    for key, space in sn.spec.norm_params():
        if key in sn._norm:
            m = maps[space][0]
            rows = torch.cat([st[key].detach().to(m) for st in states])      # channels first, any shape
            sn.norm(key).copy_((m @ rows.reshape(len(rows), -1)).reshape(m.shape[0], *rows.shape[1:]))


def merge_with_maps(models, maps: dict[str, tuple[torch.Tensor, torch.Tensor]], seed: int = 0):
    """The merged model of alignment maps (one (M, U) per merged space); see the module docstring.
    Sources read lazily (memory-mapped, `foldmerge.loading.load`) fold parameter by parameter
    (`fold_by_parameter`), which the tests check against this SuperNet's fold."""
    if read_lazily(models):
        return fold_by_parameter(models, maps)
    sn = space_supernet(models, {s: m.shape[0] for s, (m, _) in maps.items()}, seed)
    load_maps(sn, models, maps)
    return sn.fold()


class SpaceMaps(Mapping):
    """The (M, U) of every merged space, each computed when first read (`fn(space)`), and dropped by
    `release(space)` once no parameter reads it again: a fold parameter by parameter (`fold_by_parameter`)
    then holds the stream's maps and one layer's at a time, not every layer's. A released space is not
    computed again (reading it is a bug)."""

    def __init__(self, spaces, fn):
        self._spaces, self._fn, self._made, self._released = list(spaces), fn, {}, set()

    def __getitem__(self, space):
        if space not in self._spaces or space in self._released:
            raise KeyError(space)
        if space not in self._made:
            self._made[space] = self._fn(space)
        return self._made[space]

    def __iter__(self):
        return iter(self._spaces)

    def __len__(self):
        return len(self._spaces)

    def release(self, space) -> None:
        self._made.pop(space, None)
        self._released.add(space)


def fold_by_parameter(models, maps):
    """The fold of `merge_with_maps`, one parameter at a time: each merged tensor is Σ_k of source k's tensor
    with every merged axis mapped (the axis a parameter writes by M's block k, the axis a weight reads by
    U's block k), computed in float32 from that one parameter of each source, and kept in the sources'
    dtype, and written to a temporary file's pages as it is made (`io.MappedTensors`). So a merge of
    memory-mapped sources reads one parameter of every source at a time and holds that parameter's
    float32 arithmetic and the maps in use (the merged backbone is in the file's pages, as the sources are): a space's maps are read when its first
    parameter folds and released after its last (`SpaceMaps`, whose maps may be trained when read: so
    only the arithmetic here runs without gradients). Fixed and derived spaces take the mean, and a head
    tied to the token table reads n·Mᵀ (`spec.tied_output`), as in `load_maps`."""
    spec, n = models[0].spec, len(models)
    widths = [m.spec.validate(m.backbone) for m in models]
    mean = averaged_spaces(spec)
    offsets = {s: [0] + torch.tensor([w[s] for w in widths]).cumsum(0).tolist() for s in merged_spaces(spec)}
    sources = [dict(m.backbone.named_parameters()) for m in models]
    norms = [Param(key, (nm.space,)) for nm in spec.norms for key in (f"{nm.module}.weight", f"{nm.module}.bias")
             if key in sources[0]]
    params = spec.params + norms
    uses = Counter(p.axes[a] for p in params for a in spec.merged_axes(p))
    uses[spec.output] += 1                                    # the heads read it last
    held: dict[str, tuple] = {}

    def get(s):
        if s not in held:
            m, u = averaging_maps(widths[0][s], [1 / n] * n, [None] * n) if s in mean else maps[s]
            if m.shape[0] != widths[0][s]:
                raise ValueError("a merge of lazily read sources keeps model 1's widths; these maps change them")
            held[s] = (m.detach().float(), u.detach().float())
        return held[s]

    def done(s):
        uses[s] -= 1
        if uses[s] == 0:
            held.pop(s, None)
            if hasattr(maps, "release") and s not in mean:
                maps.release(s)

    def block(s, k, role):        # (d* x d_k): M's block k, or U's block k transposed
        a, b = offsets[s][k], offsets[s][k + 1]
        return get(s)[0][:, a:b] if role == "merge" else get(s)[1][a:b].T

    merged = TaskModel.shaped_for_merge(models)            # every tensor is assigned below
    dtype = next(models[0].backbone.parameters()).dtype
    # the merged backbone goes to a file's pages as it is made (`io.MappedTensors`), not to this process's memory
    store = MappedTensors({p.key: (tuple(sources[0][p.key].shape), dtype) for p in params})
    state = {}
    for p in params:
        roles = [(a, p.axes[a], "merge" if i == 0 else "unmerge") for i, a in enumerate(spec.merged_axes(p))]
        for _, space, _ in roles:
            get(space)
        total = None
        with torch.no_grad():
            for k in range(n):
                t = sources[k][p.key].detach().float()
                for axis, space, role in roles:
                    t = torch.tensordot(block(space, k, role), t.movedim(axis, 0), dims=1).movedim(0, axis)
                total = t if total is None else total + t
        state[p.key] = store.put(p.key, total)
        for _, space, _ in roles:
            done(space)
    merged.backbone.load_state_dict(state, assign=True)
    # the heads read the output through U, or n·Mᵀ where tied to the token table: head_k · U_out[k] (each
    # vector of the features, for feature_copies)
    m_out, u_out = get(spec.output)
    u_out = u_out if spec.tied_output is None else n * m_out.T
    sources_heads = [(k, h) for k, m in enumerate(models) for h in m.heads]
    for head, (k, h) in zip(merged.heads, sources_heads):
        a, b = offsets[spec.output][k], offsets[spec.output][k + 1]
        w = h.weight.detach().float().unflatten(-1, (spec.feature_copies, -1))
        w = torch.tensordot(w, u_out[a:b], dims=([2], [0])).flatten(-2)
        head.load_state_dict({"weight": w.to(dtype),
                              **({"bias": h.bias.detach().clone()} if h.bias is not None else {})}, assign=True)
    done(spec.output)
    return merged


def averaging_maps(width: int, weights: list[float], perms: list[torch.Tensor | None]):
    """(M, U) of one space that averages the models with `weights` after permuting model k by
    perms[k] (None: as it is): M = [w_1 P_1, …, w_n P_n], U = [P_1ᵀ; …; P_nᵀ], P[i, perm[i]] = 1."""
    eye = torch.eye(width, dtype=torch.float64)
    ps = [eye if p is None else eye[p] for p in perms]
    return torch.cat([w * p for w, p in zip(weights, ps)], dim=1), torch.cat([p.T for p in ps], dim=0)


def identity_maps(feats: list[torch.Tensor]):
    """Every model's features kept side by side (d* = Σ d_k): M = U = I. An unzipped layer."""
    total = sum(f.shape[1] for f in feats)
    eye = torch.eye(total, dtype=feats[0].dtype)
    return eye, eye
