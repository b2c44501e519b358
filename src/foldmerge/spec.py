"""The merge spec: an architecture described as data, read by every merging method.

A spec names the *spaces* of a network — the feature spaces whose neurons a merge may
mix, such as an MLP's hidden layers, a transformer's residual stream, each block's
attention and MLP spaces — and says, for every parameter, which space each of its axes
lives in. That is all a method needs to know about an architecture:

  Space(name, heads=1, shared=False)
      heads:  the space is split into that many contiguous heads (attention q/k and v);
              merged widths must divide by it and alignment methods match within heads.
      shared: an input every model reads alike (pixels, token embeddings of one
              vocabulary): never merged, so a parameter reading it needs no U.
  Param(key, axes, merge_at=None, unmerge_at=None)
      key:    the parameter's name in the backbone's state dict.
      axes:   one space name (or None: an axis that is not merged, e.g. tokens) per axis.
              Two merged axes make a weight (written space, read space), y = W x + b;
              one merged axis a tensor written into that space (bias, norm vector,
              class token, position table (None, space)).
      merge_at / unmerge_at: the *site* of the M on the written axis and of the U on the
              read axis. Parameters with one site share that map: by default a module's
              weight and bias share its M, and each module's input has a U of its own;
              Q, K and V that read one LayerNorm's output share one U (`unmerge_at` =
              that norm), the patch embedding, class token and positions that are summed
              into one tensor share one M.
  Norm(module, space)
      a module that acts on each channel of `space` alone, with the space on the first axis of its
      weight and bias: a LayerNorm (its gain and bias), or a depthwise convolution (ConvNeXt's: a
      kernel per channel). It runs in merged width: FS-Merge learns its tensors there (from model
      1's, or the mean), alignment methods merge them by M (M·concat(γ_k), row by row).
  Probe(space, module, where, axis=-1)
      where `space` is observed on a forward pass ("in": the module's input, "out": its
      output; module "" is the backbone itself); `axis` is the tensor's axis that holds the
      space (1 for a conv's channels). Activation methods (ZipIt!, permute, OT, CCA, PLeaS)
      collect every probe of a space on the merge data, samples (and positions) stacked.
  Unit(name, kind, keys)
      a module of the network as the gating merge (Ye et al.) sees it: kind "embedding",
      "norm", "attention", "mlp" or "output" (the map to the features the heads read), and
      the parameter keys it holds. Units are optional; methods that gate or compare whole
      modules (`foldmerge.methods.gating`, `foldmerge.similarity`) need them.
  ArchSpec(name, spaces, params, norms, probes, output, build, resize, width_spaces, check, units,
           stages, merge_form, resize_spaces)
      output:  the space of the backbone's features, which the task heads read.
      build(config) -> nn.Module:  the plain backbone at that configuration.
      resize(config, widths) -> config:  the configuration at new widths, one per
               `width_spaces` entry (what `--widths` sets).
      check(configs):  an optional family test of whether models can merge at all
               (e.g. equal depths), with the family's own message.
      stages:  the groups of spaces partial zipping may stop after, in order (default: an MLP's
               layers one by one; none for a single residual stream). A ResNet's stages.
      merge_form(config, backbone) -> (config, state):  the equivalent backbone a merge reads, if the
               family trains in a form that does not merge (a ResNet's BatchNorm folded into its
               convs): its configuration and state dict (`TaskModel.merge_form` builds the model).
      resize_spaces(config, {space: width}) -> config:  the configuration at given widths of any
               spaces (where merged widths differ per space: PLeaS's budgets, partial zips).
      defaults: the row of `foldmerge.arch.defaults` whose values its merges take by default (each
               built-in family its own; a user's architecture "vit" unless it names another).
      feature_copies: the features the heads read are that many vectors of the output space side by
               side (DINOv2's classifier reads the class token and the patches' mean; DeiT's distilled
               one its two tokens): every vector is reconstructed through U_out, which a head folds into
               each copy's columns.
      tied_output: the merge site whose M the heads' reading of the output is tied to (GPT-2's LM head
               is its token table): U_out = n·Mᵀ of that site, learned as M, so that the folded head
               (the mean of head_k U_out[k] = Σ_k table_k M_kᵀ) is the merged table itself.
      depth(config) -> int:  the number of blocks, where models of the family may differ in it.
      deepen(config, backbone, depth) -> (config, state):  the equivalent backbone with identity blocks
               appended up to `depth`, where the family has an identity block (pre-LN: a block whose
               output projections are zero adds nothing to the stream); models of different depths
               merge at the deepest one's depth. Without it they are refused, with the reason.

`validate(backbone)` checks a spec against a model and returns every space's width: each
parameter of the model is covered exactly once, every axis names a space of the spec and
agrees with the others of that space, every space a weight reads is written somewhere (or
is shared), no shared space is written, head counts divide widths. A malformed spec gets
a `SpecError` (a ValueError) that names the parameter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn


class SpecError(ValueError):
    """A merge spec that does not describe its model; the message names the parameter or space."""


@dataclass(frozen=True)
class Space:
    name: str
    heads: int = 1
    shared: bool = False
    # fixed: the space's maps are fixed per-source multiples of the identity (model 1's for the `first`
    # init, the mean otherwise), never learned nor matched: queries and keys that rotary position
    # embeddings rotate pair by pair after the map (such maps commute with every rotation; a learned
    # one would mix frequencies), and the values of grouped-query attention (below)
    fixed: bool = False
    # derived: written by a computation from another space, not by a parameter (grouped-query
    # attention's output, each query head's weighted values of its group's fixed-map values): nothing
    # merges into it; its readers' U are learned as any other
    derived: bool = False


@dataclass(frozen=True)
class Param:
    key: str
    axes: tuple
    merge_at: str | None = None
    unmerge_at: str | None = None

    @property
    def module(self) -> str:
        return self.key.rpartition(".")[0]


@dataclass(frozen=True)
class Norm:
    module: str
    space: str


@dataclass(frozen=True)
class Probe:
    space: str
    module: str
    where: str = "out"
    axis: int = -1


UNIT_KINDS = ("embedding", "norm", "attention", "mlp", "output")


@dataclass(frozen=True)
class Unit:
    name: str
    kind: str
    keys: tuple[str, ...]


@dataclass
class ArchSpec:
    name: str
    spaces: list[Space]
    params: list[Param]
    norms: list[Norm] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    output: str = ""
    build: Callable[[dict], nn.Module] | None = None
    resize: Callable[[dict, list[int]], dict] | None = None
    width_spaces: tuple[str, ...] = ()
    check: Callable[[list[dict]], None] | None = None
    units: list[Unit] = field(default_factory=list)
    stages: list[tuple[str, ...]] | None = None
    merge_form: Callable | None = None
    resize_spaces: Callable[[dict, dict], dict] | None = None
    defaults: str = "vit"
    depth: Callable[[dict], int] | None = None
    deepen: Callable | None = None
    feature_copies: int = 1
    tied_output: str | None = None
    # (Linear module, the space it writes) of a backbone that is x -> [Linear -> ReLU] x L, the
    # last ReLU its output, in order; local FS-Merge trains each such layer alone (empty: not one)
    relu_layers: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        self.spaces, self.params = list(self.spaces), [p if isinstance(p, Param) else Param(*p) for p in self.params]
        self.norms, self.probes = list(self.norms), list(self.probes)
        self.width_spaces = tuple(self.width_spaces)
        self._space = {}
        for s in self.spaces:
            if s.name in self._space:
                raise SpecError(f"{self.name} spec: space {s.name!r} is declared twice")
            if s.heads < 1:
                raise SpecError(f"{self.name} spec: space {s.name!r} has {s.heads} heads")
            self._space[s.name] = s
        seen = set()
        for p in self.params:
            if p.key in seen:
                raise SpecError(f"{self.name} spec: parameter {p.key!r} is listed twice")
            seen.add(p.key)
            for a in p.axes:
                if a is not None and a not in self._space:
                    raise SpecError(f"{self.name} spec: parameter {p.key!r} names an unknown space {a!r}")
            if len(self.merged_axes(p)) > 2:
                raise SpecError(f"{self.name} spec: parameter {p.key!r} has more than two merged axes")
        for nm in self.norms:
            if nm.space not in self._space or self._space[nm.space].shared:
                raise SpecError(f"{self.name} spec: norm {nm.module!r} is over {nm.space!r}, not a merged space")
        for pr in self.probes:
            if pr.space not in self._space:
                raise SpecError(f"{self.name} spec: a probe observes an unknown space {pr.space!r}")
            if pr.where not in ("in", "out"):
                raise SpecError(f"{self.name} spec: probe of {pr.space!r} at {pr.module!r}: where must be 'in' or 'out'")
        if not isinstance(self.feature_copies, int) or self.feature_copies < 1:
            raise SpecError(f"{self.name} spec: feature_copies must be a positive integer, got {self.feature_copies!r}")
        if self.output not in self._space or self._space[self.output].shared:
            raise SpecError(f"{self.name} spec: the output space {self.output!r} is not a merged space of the spec")
        if self.tied_output is not None and not any(
                self.merge_site(p) == self.tied_output and self.written_space(p) == self.output for p in self.params):
            raise SpecError(f"{self.name} spec: tied_output {self.tied_output!r} is no merge site writing the output "
                            f"space {self.output!r}")
        for s in self.width_spaces:
            if s not in self._space:
                raise SpecError(f"{self.name} spec: width space {s!r} is not a space of the spec")
        for p in self.weights():
            written, read = p.axes[0], p.axes[1]
            if len(p.axes) < 2 or self.merged_axes(p) != [0, 1]:
                raise SpecError(f"{self.name} spec: weight {p.key!r} must be (out, in) or a conv's (out, in, None, "
                                f"None); got axes {p.axes}")
            if self._space[written].shared:
                raise SpecError(f"{self.name} spec: parameter {p.key!r} writes the shared space {written!r}")
        for p in self.params:        # (out, in) with both axes in spaces: axis 0 is written
            spaced = [a for a in p.axes if a is not None]
            if len(spaced) == 2 and p.axes[0] is not None and self._space[p.axes[0]].shared:
                raise SpecError(f"{self.name} spec: parameter {p.key!r} writes the shared space {p.axes[0]!r}")
        keys = {p.key: p for p in self.params}
        for p in self.params:        # a layer's bias is merged where its weight's output is
            w = keys.get(p.module + ".weight") if p.key.endswith(".bias") else None
            if w is not None and self.merged_axes(w) and self.merge_site(w) != self.merge_site(p):
                raise SpecError(f"{self.name} spec: bias {p.key!r} is merged at {self.merge_site(p)!r} "
                                f"but its weight at {self.merge_site(w)!r}")
        self.units = list(self.units)
        known, owner = {p.key for p in self.params} | {k for k, _ in self.norm_params()}, {}
        for u in self.units:
            if u.kind not in UNIT_KINDS:
                raise SpecError(f"{self.name} spec: unit {u.name!r} has kind {u.kind!r}; use one of {', '.join(UNIT_KINDS)}")
            for k in u.keys:
                if k not in known:
                    raise SpecError(f"{self.name} spec: unit {u.name!r} names {k!r}, which is not a parameter of the spec")
                if k in owner:
                    raise SpecError(f"{self.name} spec: {k!r} is in units {owner[k]!r} and {u.name!r}")
                owner[k] = u.name
        read = {p.axes[1] for p in self.weights()} | {self.output} | {nm.space for nm in self.norms}
        written = {p.axes[i] for p in self.params for i in self.merged_axes(p)[:1]}
        for s in sorted(read - written):
            if not self._space[s].shared and not self._space[s].derived:
                raise SpecError(f"{self.name} spec: space {s!r} is read but no parameter writes it")

    # ------------------------------------------------------------------ reading the spec
    def space(self, name: str) -> Space:
        return self._space[name]

    def merged_axes(self, p: Param) -> list[int]:
        """The axes of p that a merge maps: those in a space that is not shared."""
        return [i for i, a in enumerate(p.axes) if a is not None and not self._space[a].shared]

    def is_weight(self, p: Param) -> bool:
        """A weight reads one merged space and writes another: (out, in), merged by M·W·U."""
        return len(self.merged_axes(p)) == 2

    def weights(self) -> list[Param]:
        return [p for p in self.params if self.is_weight(p)]

    def layer_weights(self) -> list[Param]:
        """The weights of layers y = W x + b: (out, in) or a conv's (out, in, None, None), first axis
        merged (the reads may be shared); a layer's bias is `<module>.bias`. What RegMean fits and
        the SuperNet form widens."""
        return [p for p in self.params
                if p.key.endswith(".weight") and len(p.axes) >= 2 and all(a is None for a in p.axes[2:])
                and self.merged_axes(p)[:1] == [0]]

    def chain_stages(self) -> list[tuple[str, ...]]:
        """The cuts partial zipping may stop at, in order: groups of spaces such that the spaces of
        the later groups are read only by the parameters of later groups (an MLP's layers one by
        one, a ResNet's stages); [] where the architecture gives none (a single residual stream)."""
        if self.stages is not None:
            return list(self.stages)
        return [(s,) for s in self.width_spaces] if self.is_chain() else []

    def written_space(self, p: Param) -> str | None:
        axes = self.merged_axes(p)
        return p.axes[axes[0]] if axes else None

    def merge_site(self, p: Param) -> str:
        return p.merge_at or p.module

    def unmerge_site(self, p: Param) -> str:
        return p.unmerge_at or f"{p.module}:in"

    def norm_params(self) -> list[tuple[str, str]]:
        """(key, space) of every norm's weight and bias."""
        return [(f"{nm.module}.{attr}", nm.space) for nm in self.norms for attr in ("weight", "bias")]

    def units_of(self, kind: str) -> list[Unit]:
        return [u for u in self.units if u.kind == kind]

    def structure(self) -> tuple:
        """What two models must share to merge: spaces, parameters with their axes and sites, norms, output."""
        return (tuple(self.spaces), tuple(self.params), tuple(self.norms), self.output)

    def is_chain(self) -> bool:
        """Every merged space is written at one site (an MLP's layers), none is a residual stream."""
        sites: dict[str, set] = {}
        for p in self.params:
            s = self.written_space(p)
            if s is not None:
                sites.setdefault(s, set()).add(self.merge_site(p))
        return all(len(v) == 1 for v in sites.values())

    # ------------------------------------------------------------------------ checking
    def validate(self, backbone: nn.Module, what: str = "model") -> dict[str, int]:
        """Every space's width in `backbone`, after checking that the spec describes it."""
        tensors = dict(backbone.named_parameters())
        norm_keys = {}
        for key, space in self.norm_params():
            if key in tensors:
                norm_keys[key] = space
            elif key.endswith(".weight"):
                raise SpecError(f"{self.name} spec: the {what} has no norm parameter {key!r}")
        covered = [p.key for p in self.params] + list(norm_keys)
        dup = sorted({k for k in covered if covered.count(k) > 1})
        if dup:
            raise SpecError(f"{self.name} spec: parameter {dup[0]!r} is covered twice (a param and a norm)")
        missing = [k for k in covered if k not in tensors]
        if missing:
            raise SpecError(f"{self.name} spec: the {what} has no parameter {missing[0]!r}")
        uncovered = [k for k in tensors if k not in set(covered)]
        if uncovered:
            raise SpecError(f"{self.name} spec: parameter {uncovered[0]!r} of the {what} is not in the spec")
        widths: dict[str, int] = {}
        first: dict[str, str] = {}

        def see(space, size, key):
            if space in widths and widths[space] != size:
                raise SpecError(f"{self.name} spec: parameter {key!r} gives space {space!r} width {size}, "
                                f"but {first[space]!r} gives it {widths[space]}")
            widths.setdefault(space, size)
            first.setdefault(space, key)

        for p in self.params:
            t = tensors[p.key]
            if t.dim() != len(p.axes):
                raise SpecError(f"{self.name} spec: parameter {p.key!r} has {t.dim()} dimensions "
                                f"but the spec gives it {len(p.axes)} axes {p.axes}")
            for a, size in zip(p.axes, t.shape):
                if a is not None:
                    see(a, size, p.key)
        for key, space in norm_keys.items():
            t = tensors[key]
            if t.dim() < 1:
                raise SpecError(f"{self.name} spec: norm parameter {key!r} has no channel axis")
            see(space, t.shape[0], key)
        for s in self.spaces:
            if s.name in widths and widths[s.name] % s.heads:
                raise SpecError(f"{self.name} spec: space {s.name!r} is {widths[s.name]} wide, "
                                f"not divisible by its {s.heads} heads")
        return widths


def check_mergeable(specs: list[ArchSpec], configs: list[dict]) -> None:
    """Models merge only if one spec describes them all (widths may differ)."""
    names = {s.name for s in specs}
    if len(names) != 1:
        raise ValueError(f"cannot merge models of different architectures: {sorted(names)}")
    if specs[0].check is not None:
        specs[0].check(configs)
    base = specs[0].structure()
    for k, s in enumerate(specs[1:], start=2):
        if s.structure() != base:
            ours, theirs = {p.key: p for p in specs[0].params}, {p.key: p for p in s.params}
            diff = sorted(set(ours) ^ set(theirs)) or [k_ for k_ in ours if ours[k_] != theirs[k_]] or ["(spaces)"]
            raise ValueError(f"cannot merge these {specs[0].name} models: model {k} differs from model 1 "
                             f"at {diff[0]!r}")


def resize_transformer(config: dict, widths: list[int], family: str, keys: tuple[str, str], heads: int) -> dict:
    """A transformer's configuration at residual width widths[0] and MLP width widths[1] (default:
    the source's), `keys` naming those two entries of its config; the residual width must divide
    into the `heads` attention heads."""
    if not 1 <= len(widths) <= 2:
        raise ValueError(f"a {family} takes one or two target widths (residual, MLP), got {list(widths)}")
    if any(w < 1 for w in widths):
        raise ValueError(f"target widths must be positive, got {list(widths)}")
    c = {**config, **{k: int(w) for k, w in zip(keys, widths)}}
    if c[keys[0]] % heads:
        raise ValueError(f"merged width {c[keys[0]]} is not divisible by the {heads} attention heads")
    return c


def check_sizes(family: str, sizes: dict, width: str, heads: str) -> None:
    """A transformer configuration's sizes: positive integers, and `sizes[width]` divisible by
    `sizes[heads]` attention heads; else one clear error."""
    bad = [k for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
    if bad:
        raise ValueError(f"{family} {bad[0]} must be a positive integer, got {sizes[bad[0]]!r}")
    if sizes[width] % sizes[heads]:
        raise ValueError(f"{family} {width.replace('_', ' ')} {sizes[width]} is not divisible by its "
                         f"{sizes[heads]} attention heads")
