"""The Foldable SuperNet of any architecture, built from its merge spec (FS-Merge paper, section 2).

For n source models described by one `ArchSpec`, the SuperNet holds the sources' weights
(frozen) and one learnable `FoldMap` per *site* of the spec: an M where a parameter writes a
merged space, a U where a weight reads one, and U_out, which reconstructs every source's
features from the merged ones and is folded into the heads. Norms are learned in merged width.

  folded form (the default)   every step builds the merged tensors of every parameter,
                              W* = M·blockdiag(W_k)·U, b* = M·concat(b_k), t* = M·concat(t_k)
                              for the tensors a space is written with (class token, position
                              table, a weight reading a shared input), then runs the plain
                              backbone at the merged widths (`spec.build`) with them.
  SuperNet form (reference)   the same backbone, each nn.Linear replaced by
                              x* -> U -> [W_k x_k + b_k]_k -> M, activations n times wider.

Every non-linear operation of the backbone acts on merged features in both forms, so the
two are one function (the tests check values and gradients in float64). Folding after
training is `fold()`: the folded tensors saved as a plain model of the architecture, with
head_k · U_out[k] as the heads.

The sources' tensors are held as buffers that share the callers' storage: a SuperNet never
changes, moves or unfreezes the models it was built from, and `.to()` moves its own copies.
Every step reads the current buffers, so a replaced or edited source tensor is folded.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .foldable import (
    FoldMap,
    TiedMap,
    fit_channels,
    fold_group_maps,
    fold_groups,
    fold_linears,
    frozen_cached,
    merge_features,
    pack_maps,
    unmerge_features,
)
from .model import TaskModel, head_layout
from .spec import SpecError, check_mergeable

FORMS = ("folded", "supernet")


class SuperNet(nn.Module):
    def __init__(self, sources, widths: list[int] | None = None, param: str = "full", init: str = "first",
                 seed: int = 0, space_widths: dict[str, int] | None = None):
        super().__init__()
        if not sources:
            raise ValueError("a SuperNet needs at least one source model")
        check_mergeable([s.spec for s in sources], [s.backbone_config for s in sources])
        spec = self.spec = sources[0].spec
        self.n = n = len(sources)
        src_widths = [spec.validate(s.backbone, f"model {k + 1}") for k, s in enumerate(sources)]
        config = dict(sources[0].backbone_config)
        if widths is not None:
            config = spec.resize(config, [int(w) for w in widths])
        if space_widths is not None:        # widths of any spaces (the family's resize_spaces)
            if spec.resize_spaces is None:
                raise ValueError(f"the {spec.name} family sets merged widths per {', '.join(spec.width_spaces)} "
                                 "only (its spec has no resize_spaces)")
            config = spec.resize_spaces(config, {s: int(w) for s, w in space_widths.items()})
        first = next(sources[0].backbone.parameters())
        dtype, device = first.dtype, first.device
        template = spec.build(config).to(dtype=dtype, device=device)
        merged = spec.validate(template, "merged model")
        self.config, self.space_widths = config, merged
        self.widths = [merged[s] for s in spec.width_spaces]
        states = [dict(s.backbone.named_parameters()) for s in sources]

        # frozen sources: buffers sharing the callers' storage (detached: their flags stay theirs)
        self._src: dict[str, list[str]] = {}
        for i, p in enumerate(spec.params):
            self._src[p.key] = []
            for k in range(n):
                name = f"src{i}_{k}"
                self.register_buffer(name, states[k][p.key].detach(), persistent=False)
                self._src[p.key].append(name)
        self.head_owner = []
        for k, s in enumerate(sources):
            for h in s.heads:
                i = len(self.head_owner)
                self.register_buffer(f"head{i}_w", h.weight.detach(), persistent=False)
                self.register_buffer(f"head{i}_b", None if h.bias is None else h.bias.detach(), persistent=False)
                self.head_owner.append(k)

        # one map per site: every M in spec order, then every U, then U_out
        g = torch.Generator().manual_seed(int(seed))
        fixed = {s.name for s in spec.spaces if s.fixed}
        self._map: dict[tuple[str, str], FoldMap] = {}
        self._map_space: dict[tuple[str, str], str] = {}
        maps = []

        def site(role, name, space):
            key = (role, name)
            if key in self._map:
                if self._map_space[key] != space:
                    raise SpecError(f"{spec.name} spec: site {name!r} maps two spaces, "
                                    f"{self._map_space[key]!r} and {space!r}")
                return
            if space in fixed:         # a multiple of the identity per source (spec.Space.fixed): not learned
                fm = FoldMap(merged[space], [w[space] for w in src_widths], "full" if param == "full" else "diag",
                             "first" if init == "first" else "average", role, g, dtype).requires_grad_(False)
            else:
                fm = FoldMap(merged[space], [w[space] for w in src_widths], param, init, role, g, dtype)
            self._map[key], self._map_space[key] = fm, space
            maps.append(fm)

        for p in spec.params:
            if not spec.merged_axes(p):
                raise SpecError(f"{spec.name} spec: parameter {p.key!r} has no merged axis; nothing can merge it")
            site("merge", spec.merge_site(p), spec.written_space(p))
        for p in spec.weights():
            site("unmerge", spec.unmerge_site(p), p.axes[1])
        if spec.tied_output is None:
            site("unmerge", "output", spec.output)
        else:                  # the heads read the output through n·Mᵀ of the tied site (spec.tied_output)
            self._map["unmerge", "output"] = TiedMap(self._map["merge", spec.tied_output])
            self._map_space["unmerge", "output"] = spec.output
        self._map["unmerge", "output"].copies = spec.feature_copies
        self.maps = nn.ModuleList(maps)

        # merged norms: model 1's for 'first', else the mean (cut or zero-padded to the merged width)
        self.norm_params = nn.ParameterList()
        self._norm: dict[str, int] = {}
        for key, space in spec.norm_params():
            if key not in states[0]:
                continue
            chosen = states[:1] if init == "first" else states
            value = sum(fit_channels(st[key].detach(), merged[space]) for st in chosen) / len(chosen)
            self._norm[key] = len(self.norm_params)
            self.norm_params.append(nn.Parameter(value.clone()))

        self.tasks = [t for s in sources for t in s.tasks]
        self.head_kind, self.head_bias = head_layout(sources)
        self._plan(spec)
        # the merged-width backbone the folded form runs, as a function of the folded tensors: its
        # parameters are removed and each step sets the tensors as plain attributes (what
        # functional_call does, without its swap-in / swap-out of every tensor)
        self._template = template
        self._slots = {}
        for name, _ in list(template.named_parameters()):
            owner, _, attr = name.rpartition(".")
            module = template.get_submodule(owner)
            del module._parameters[attr]
            self._slots[name] = (module, attr)
        # maps of one shape share tensors (foldable.MapBank): with a residual stream each fold group
        # gets its own bank, in its order, so that the fold reads it whole; in a chain of layers
        # (an MLP) the groups are runs of the shape banks already, and the layer-by-layer
        # objective of local FS-Merge reads those banks whole
        self._layer_module = {name: template.get_submodule(name) for name in self._layers}
        self._views: dict[str, tuple] = {}
        self._fixed = self._fixed_layers()
        self.map_banks = pack_maps(self, together=() if spec.is_chain() else fold_group_maps(self._jobs()))
        self._groups = fold_groups(self._jobs())

    # ----------------------------------------------------------------------- the fold plan
    def _plan(self, spec) -> None:
        """Which parameters fold as M·W·U (with their biases) and which are rows merged by an M alone."""
        keys = {p.key: p for p in spec.params}
        self._weight_jobs = []        # (weight key, bias key or None, M site, U site)
        self._rows: dict[str, list] = {}          # M site -> [(key, axis), …]: tensors merged on one axis
        paired = set()
        for p in spec.weights():
            b = keys.get(p.module + ".bias")
            bias = b.key if b is not None and spec.merged_axes(b) == [0] and b.key not in paired else None
            if bias:
                paired.add(bias)
            self._weight_jobs.append((p.key, bias, spec.merge_site(p), spec.unmerge_site(p)))
        # (weight job, kernel location or None): a conv weight folds location by location
        self._job_of = []
        for i, (w, *_) in enumerate(self._weight_jobs):
            t = self.source(w, 0)
            self._job_of += [(i, None)] if t.dim() == 2 else [(i, loc) for loc in range(t[0, 0].numel())]
        for p in spec.params:
            if not spec.is_weight(p) and p.key not in paired:
                self._rows.setdefault(spec.merge_site(p), []).append((p.key, spec.merged_axes(p)[0]))
        # the layers y = W x + b of the spec (a 2-d weight whose first axis is merged): what the
        # SuperNet form widens; module -> (weight key, bias key or None, M site, U site or None)
        self._layers = {p.module: (p.key, p.module + ".bias" if p.module + ".bias" in keys else None,
                                   spec.merge_site(p), spec.unmerge_site(p) if spec.is_weight(p) else None)
                        for p in spec.layer_weights()}

    def _jobs(self):
        """The (M, sources, U, biases) fold jobs, one per entry of `_job_of`: a weight, or one kernel
        location of a conv weight (a conv is a linear map of channels at every location; its bias
        rides on location 0)."""
        buf = self._buffers
        jobs = []
        for i, loc in self._job_of:
            w, bias, m, u = self._weight_jobs[i]
            ws = [buf[b] for b in self._src[w]]
            bs = None if bias is None or loc not in (None, 0) else [buf[b] for b in self._src[bias]]
            jobs.append((self._map["merge", m], ws if loc is None else self._locations(w, ws)[loc],
                         self._map["unmerge", u], bs))
        return jobs

    def _locations(self, key: str, ws: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """views[loc][k]: source k's conv weight at kernel location loc, (out, in); the same view
        objects while the buffers are the same (the fold caches what it stacks from them)."""
        state = tuple((id(w), w.data_ptr()) for w in ws)
        hit = self._views.get(key)
        if hit is None or hit[0] != state:
            per = [w.flatten(2).unbind(2) for w in ws]
            hit = self._views[key] = (state, [list(v) for v in zip(*per)])
        return hit[1]

    def source(self, key: str, k: int) -> torch.Tensor:
        """Source k's (frozen) tensor of parameter `key`, as this SuperNet holds it."""
        return self._buffers[self._src[key][k]]

    def merge_map(self, site: str) -> FoldMap:
        return self._map["merge", site]

    def unmerge_map(self, site: str) -> FoldMap:
        return self._map["unmerge", site]

    def sites(self):
        """(role, site, space, map) of every map, in creation order."""
        return [(role, name, self._map_space[role, name], m) for (role, name), m in self._map.items()]

    def norm(self, key: str) -> nn.Parameter:
        return self.norm_params[self._norm[key]]

    def maps_of(self, space: str) -> tuple[list[FoldMap], list[FoldMap]]:
        """The M's that write `space` and the U's that read it."""
        ms = [m for (role, _), m in self._map.items() if role == "merge" and self._map_space[role, _] == space]
        us = [m for (role, _), m in self._map.items() if role == "unmerge" and self._map_space[role, _] == space]
        return ms, us

    # --------------------------------------------------------------------------- folding
    def folded_state(self) -> dict[str, torch.Tensor]:
        """Every parameter of the merged backbone (differentiable in the maps and merged norms)."""
        return self._state(weights=True, skip=set())

    def _state(self, weights: bool, skip) -> dict[str, torch.Tensor]:
        """The merged tensors: the M·W·U folds if `weights`, the rows and norms but those in `skip`."""
        st: dict[str, torch.Tensor] = {}
        if weights:
            conv: dict[str, list] = {}
            for (i, loc), (w, b) in zip(self._job_of, fold_linears(self._jobs(), self._groups)):
                w_key, b_key = self._weight_jobs[i][:2]
                if loc is None:
                    st[w_key] = w
                else:
                    conv.setdefault(w_key, []).append(w)
                if b_key is not None and loc in (None, 0):
                    st[b_key] = b
            for w_key, per_loc in conv.items():     # (out*, in*) per location -> (out*, in*, kh, kw)
                kernel = self.source(w_key, 0).shape[2:]
                st[w_key] = torch.stack(per_loc, dim=-1).unflatten(-1, kernel)
        buf = self._buffers
        # tensors written into a space by an M alone (no U: class token, positions, a weight that
        # reads a shared input), all of one site merged in one `merge_features` call: each tensor
        # with its merged axis last, flattened into rows of one feature vector each
        for site, entries in self._rows.items():
            if skip:
                entries = [e for e in entries if e[0] not in skip]
            if not entries:
                continue
            per = len(entries)
            tensors = [buf[self._src[key][k]] for k in range(self.n) for key, _ in entries]

            def rows(tensors=tensors, entries=entries, per=per):
                return [torch.cat([_as_rows(t, a) for t, (_, a) in zip(tensors[k * per:(k + 1) * per], entries)])
                        for k in range(self.n)]

            merged = merge_features(self._map["merge", site], frozen_cached(("rows", site, per), tensors, rows))
            src0 = tensors[:per]
            counts = [t.numel() // t.shape[a] for t, (_, a) in zip(src0, entries)]
            for (key, a), t, part in zip(entries, src0, merged.split(counts)):
                st[key] = _from_rows(part, t, a)
        for key, i in self._norm.items():
            st[key] = self.norm_params[i]
        return st

    # --------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, form: str = "folded", fixed: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Merged features f* (the backbone's output at merged width).

        fixed: `fixed_inputs(x)` (every source's outputs of the layers that read a shared input),
        computed once for a training sample; those layers then merge them instead of recomputing."""
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        overrides = self._supernet_layers() if form == "supernet" else {}
        skip = set()
        if fixed is not None:
            for (name, widths), z in zip(self._fixed, fixed):
                overrides[name] = _merged_outputs(self._map["merge", self._layers[name][2]], z, widths)
                skip.update(key for key in self._layers[name][:2] if key is not None)
        # the tensors of a layer the SuperNet form widens are still set: a module may read them
        # (Hugging Face's patch embedding reads its weight's dtype); only cached layers skip the fold
        state = self._state(weights=form == "folded", skip=skip)
        return self._run(x, state, overrides)

    def _run(self, x, state, overrides):
        """The template backbone on x with `state` as its tensors and `overrides` (module name ->
        function) as the forward of those modules."""
        for name, (module, attr) in self._slots.items():
            if name in state:
                module.__dict__[attr] = state[name]
        modules = [self._layer_module[name] for name in overrides]
        for module, fn in zip(modules, overrides.values()):
            module.__dict__["forward"] = fn
        try:
            return self._template(x)
        finally:                                  # the step's graph is not kept alive by the template
            for module, attr in self._slots.values():
                module.__dict__.pop(attr, None)
            for module in modules:
                module.__dict__.pop("forward", None)

    def _supernet_layers(self) -> dict:
        """module name -> its forward in the SuperNet form: x* -> U -> [W_k x_k + b_k]_k -> M."""
        out = {}
        for name, (w_key, b_key, m_site, u_site) in self._layers.items():
            module = self._layer_module[name]
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise SpecError(f"{self.spec.name} spec: {w_key!r} is not an nn.Linear's or nn.Conv2d's weight; "
                                "the SuperNet form widens those layers only (use the folded form)")
            out[name] = _wide_layer(self, module, w_key, b_key, self._map["merge", m_site],
                                    None if u_site is None else self._map["unmerge", u_site])
        for w_key, *_ in self._weight_jobs:
            if w_key.rpartition(".")[0] not in out:
                raise SpecError(f"{self.spec.name} spec: weight {w_key!r} is not an nn.Linear's or nn.Conv2d's; "
                                "the SuperNet form widens those layers only (use the folded form)")
        return out

    # ---------------------------------------------------------------- fixed inputs (speed)
    def _fixed_layers(self) -> list[tuple[str, list[int]]]:
        """(module name, source output widths) of the nn.Linear layers that read a shared input and
        whose merged output is cheaper to take from cached source outputs: M·[W_k x + b_k]_k is
        what the folded layer computes, and with 784 pixels against 2 x 128 features the cached
        outputs are the smaller product. (Shapes only: found once, `self._fixed`.)"""
        out = []
        for name, (w_key, _, _, u_site) in self._layers.items():
            module = self._layer_module[name]
            widths = [self.source(w_key, k).shape[0] for k in range(self.n)]
            if u_site is None and isinstance(module, nn.Linear) and module.in_features > sum(widths):
                out.append((name, widths))
        return out

    @torch.no_grad()
    def fixed_inputs(self, x: torch.Tensor, chunk: int = 256) -> list[torch.Tensor] | None:
        """For `forward(…, fixed=)`: every source's outputs of each `_fixed_layers` layer on x,
        concatenated (examples x … x Σ out_k); None when no layer gains from it."""
        layers = self._fixed
        if not layers:
            return None
        outs: list[list[torch.Tensor]] = [[] for _ in layers]

        def capture(i, name, widths):
            w_key, b_key, m_site, _ = self._layers[name]

            def fn(inp):
                z = torch.cat([F.linear(inp, self.source(w_key, k), None if b_key is None else self.source(b_key, k))
                               for k in range(self.n)], dim=-1)
                outs[i].append(z)
                return _merged_outputs(self._map["merge", m_site], z, widths)(inp)
            return fn

        overrides = {name: capture(i, name, widths) for i, (name, widths) in enumerate(layers)}
        state = self.folded_state()
        for part in x.split(chunk):
            self._run(part, state, overrides)
        return [torch.cat(o) for o in outs]

    # ----------------------------------------------------------------------- the output
    @property
    def output_map(self) -> FoldMap:
        """U_out: reconstructs every source's features from the merged ones; folded into the heads."""
        return self._map["unmerge", "output"]

    def reconstruct(self, merged: torch.Tensor) -> list[torch.Tensor]:
        return unmerge_features(self.output_map, merged)

    def head(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Head i of the sources (weight, bias), frozen."""
        return self._buffers[f"head{i}_w"], self._buffers[f"head{i}_b"]

    @torch.no_grad()
    def fold(self):
        """The merged model: a plain backbone at the merged widths plus one adapted head per task
        (head_k · U_out[k]), with the sources' head kind."""
        u = self.output_map
        merged = TaskModel(self.spec.name, dict(self.config), self.tasks, self.head_bias, head=self.head_kind)
        merged.to(dtype=u.dtype, device=u.device)
        merged.backbone.load_state_dict({k: v.detach() for k, v in self.folded_state().items()})
        for i, head in enumerate(merged.heads):
            w, b = self.head(i)
            # each vector of the features through U_out (one, unless the spec has feature_copies)
            head.weight.copy_(u.apply(self.head_owner[i], w.unflatten(-1, (u.copies, -1))).flatten(-2))
            if head.bias is not None:
                head.bias.copy_(b)
        return merged


def _as_rows(t: torch.Tensor, axis: int) -> torch.Tensor:
    """t with its merged axis last, as rows (… x d): one feature vector per row."""
    if t.dim() == 1:
        return t[None]
    if t.dim() == 2:
        return t if axis == 1 else t.T
    return t.movedim(axis, -1).reshape(-1, t.shape[axis])


def _from_rows(part: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """`_as_rows` undone for merged rows `part` (… x d*) of a tensor shaped like `like` (few ops:
    it runs every training step)."""
    if like.dim() == 1:
        return part[0]
    if like.dim() == 2:
        return part if axis == 1 else part.T
    shape = list(like.movedim(axis, -1).shape[:-1]) + [part.shape[-1]]
    return part.reshape(shape).movedim(-1, axis)


def _merged_outputs(m: FoldMap, z: torch.Tensor, widths: list[int]):
    """A layer's forward that ignores its input and merges the sources' cached outputs z."""
    parts = list(z.split(widths, dim=-1))
    return lambda _inp: merge_features(m, parts)


def _wide_layer(sn: SuperNet, module: nn.Module, w_key: str, b_key: str | None, m: FoldMap, u: FoldMap | None):
    """x* -> U -> [layer_k(x_k)]_k -> M, for an nn.Linear (features last) or an nn.Conv2d (channels
    on axis 1: the maps act on the channels at every position)."""
    conv = isinstance(module, nn.Conv2d)

    def layer(x, k):
        b = None if b_key is None else sn.source(b_key, k)
        if conv:
            return F.conv2d(x, sn.source(w_key, k), b, module.stride, module.padding, module.dilation, module.groups)
        return F.linear(x, sn.source(w_key, k), b)

    def forward(inp):
        if conv:
            xs = [x.movedim(-1, 1) for x in unmerge_features(u, inp.movedim(1, -1))] if u is not None else [inp] * sn.n
            return merge_features(m, [layer(x, k).movedim(1, -1) for k, x in enumerate(xs)]).movedim(-1, 1)
        xs = unmerge_features(u, inp) if u is not None else [inp] * sn.n
        return merge_features(m, [layer(x, k) for k, x in enumerate(xs)])
    return forward
