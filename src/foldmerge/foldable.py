"""The foldable linear map: learnable merge (M) and unmerge (U) matrices.

For n source models with linear weights W_k (out_k x in_k, y = W x + b):

    W* = M · blockdiag(W_1 … W_n) · U          b* = M · concat(b_1 … b_n)

M ("merge") is (d* x Σ out_k); U ("unmerge") is (Σ in_k x d*). Both are stored as a
`FoldMap` S of shape (d* x Σ d_k) made of n column blocks S[k] (d* x d_k):
M = S_M and U = S_Uᵀ. Storing U transposed lets one class serve both roles.

Parameterizations (paper eq. 12, appendix C):
  full            S is a dense matrix.
  diag            each block S[k] is a (rectangular) diagonal: min(d*, d_k) numbers.
  diag+lowrank    diag blocks plus A·B (A: d* x r, B: r x Σ d_k), LoRA style; A
                  starts at zero so any initialization is exact.

All arithmetic goes through two block operations (row-batch convention, X has one row
per example):
  apply(k, X)   = X · S[k]ᵀ     (m x d_k  -> m x d*)
  apply_t(k, Y) = Y · S[k]      (m x d*   -> m x d_k)
The SuperNet form uses these block operations on activations. Folding works on whole
groups of same-shaped layers at once (`fold_linears`): with diagonal (+ low-rank) maps and
equal source widths it never builds a dense map (O(n·r·d²) per layer, a few batched ops per
group); otherwise each map is built densely (`matrix()`, differentiable) and multiplied,
O(n·d³). A SuperNet packs its maps into `MapBank`s so that a group's maps are read with one
index, and the frozen source weights of a group are stacked once, not at every step.
"""
from __future__ import annotations

import math
import weakref
from contextlib import nullcontext

import torch
from torch import nn
from torch.autograd.function import once_differentiable

PARAMS = ("full", "diag", "diag+lowrank")
INITS = ("first", "average", "random")


def parse_param(spec: str) -> tuple[str, int | float]:
    """'full' | 'diag' | 'diag+lowrank' | 'diag+lowrank(16)' | 'lowrank16' | 'diag+lowrank(25%)' -> (kind,
    rank): a rank given as a share of the width is a float in (0, 1], made a rank per map (`FoldMap`)."""
    s = spec.strip().lower().replace(" ", "")
    if s in ("full", "diag"):
        return s, 0
    for prefix in ("diag+lowrank", "lowrank"):
        if s.startswith(prefix):
            rest = s[len(prefix):].strip("()=:")
            if rest.endswith("%") and rest[:-1].isascii() and rest[:-1].isdigit():
                share = int(rest[:-1])
                if not 1 <= share <= 100:
                    raise ValueError(f"a low rank given as a share of the width lies in 1%..100%, got {rest}")
                return "diag+lowrank", share / 100
            try:
                rank = int(rest) if rest else 16
            except ValueError:
                break
            if rank < 1:
                raise ValueError(f"low rank must be >= 1, got {rank}")
            return "diag+lowrank", rank
    raise ValueError(f"unknown M/U parameterization {spec!r}; use full, diag or diag+lowrank(R)")


def _fit_cols(x: torch.Tensor, width: int) -> torch.Tensor:
    """Truncate or zero-pad the last dimension of x to `width` (a rectangular identity)."""
    have = x.shape[-1]
    if have == width:
        return x
    if have > width:
        return x[..., :width]
    pad = x.new_zeros(*x.shape[:-1], width - have)
    return torch.cat([x, pad], dim=-1)


def fit_channels(x: torch.Tensor, width: int) -> torch.Tensor:
    """`_fit_cols` on the first axis (a channelwise module's tensor: a norm's gain, a depthwise kernel)."""
    return _fit_cols(x.movedim(0, -1), width).movedim(-1, 0)


class FoldMap(nn.Module):
    """A (d* x Σ d_k) matrix of n column blocks, used as M (role 'merge') or Uᵀ (role 'unmerge')."""

    def __init__(self, out_dim: int, in_dims: list[int], param: str = "full", init: str = "first",
                 role: str = "merge", generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        kind, rank = parse_param(param)
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; use one of {', '.join(INITS)}")
        if role not in ("merge", "unmerge"):
            raise ValueError(f"role must be 'merge' or 'unmerge', got {role!r}")
        self.out_dim, self.in_dims = int(out_dim), [int(d) for d in in_dims]
        if isinstance(rank, float):          # a share of the merged width, at least 1
            rank = max(1, round(rank * self.out_dim))
        self.kind, self.rank, self.role = kind, rank, role
        self.n = len(self.in_dims)
        self.copies = 1          # U_out of features that are several vectors of its space (`unmerge_features`)
        offsets = [0]
        for d in self.in_dims:
            offsets.append(offsets[-1] + d)
        self.offsets = offsets
        self.diag_lens = [min(self.out_dim, d) for d in self.in_dims]
        total = offsets[-1]

        if kind == "full":
            self.weight = nn.Parameter(self._init_full(init, generator, dtype))
        else:
            self.diag = nn.Parameter(self._init_diag(init, generator, dtype))
            if kind == "diag+lowrank":
                # A = 0 keeps the initialization exact; B random so that A receives gradient.
                self.A = nn.Parameter(torch.zeros(self.out_dim, rank, dtype=dtype))
                b = torch.randn(rank, total, generator=generator, dtype=dtype) / math.sqrt(total)
                self.B = nn.Parameter(b)
            # where the concatenated diagonals sit in the dense (d* x Σ d_k) matrix
            rows = torch.cat([torch.arange(r) for r in self.diag_lens])
            cols = torch.cat([o + torch.arange(r) for o, r in zip(offsets, self.diag_lens)])
            self.register_buffer("_diag_index", torch.stack([rows, cols]), persistent=False)

    # ----------------------------------------------------------------- initialization
    def _block_scale(self, init: str, k: int) -> float:
        """Value on the (rectangular) identity of block k for the structured inits."""
        if self.role == "unmerge":          # U = [I; I; …] for both 'first' and 'average'
            return 1.0
        if init == "first":
            return 1.0 if k == 0 else 0.0
        return 1.0 / self.n                 # 'average': M = [I/n … I/n]

    def _init_full(self, init, generator, dtype):
        w = torch.zeros(self.out_dim, self.offsets[-1], dtype=dtype)
        if init == "random":
            # As the authors' code: Gaussian scaled by 1/sqrt(source width); M also by 1/n.
            width = sum(self.in_dims) / self.n
            std = 1.0 / math.sqrt(width) / (self.n if self.role == "merge" else 1.0)
            return torch.randn(w.shape, generator=generator, dtype=dtype) * std
        for k in range(self.n):
            r, o = self.diag_lens[k], self.offsets[k]
            idx = torch.arange(r)
            w[idx, o + idx] = self._block_scale(init, k)
        return w

    def _init_diag(self, init, generator, dtype):
        total = sum(self.diag_lens)
        if init == "random":
            std = 1.0 / (self.n if self.role == "merge" else 1.0)
            return torch.randn(total, generator=generator, dtype=dtype) * std
        return torch.cat([torch.full((r,), self._block_scale(init, k), dtype=dtype)
                          for k, r in enumerate(self.diag_lens)])

    # ------------------------------------------------------------------ block algebra
    def _cols(self, k: int) -> slice:
        return slice(self.offsets[k], self.offsets[k + 1])

    def _diag_k(self, k: int) -> torch.Tensor:
        o = sum(self.diag_lens[:k])
        return self.diag[o:o + self.diag_lens[k]]

    def apply(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """x · S[k]ᵀ: (… x d_k) -> (… x d*)."""
        if self.kind == "full":
            return x @ self.weight[:, self._cols(k)].T
        r = self.diag_lens[k]
        y = _fit_cols(x[..., :r] * self._diag_k(k), self.out_dim)
        if self.kind == "diag+lowrank":
            y = y + (x @ self.B[:, self._cols(k)].T) @ self.A.T
        return y

    def apply_t(self, k: int, y: torch.Tensor) -> torch.Tensor:
        """y · S[k]: (… x d*) -> (… x d_k)."""
        if self.kind == "full":
            return y @ self.weight[:, self._cols(k)]
        r = self.diag_lens[k]
        x = _fit_cols(y[..., :r] * self._diag_k(k), self.in_dims[k])
        if self.kind == "diag+lowrank":
            x = x + (y @ self.A) @ self.B[:, self._cols(k)]
        return x

    def matrix(self) -> torch.Tensor:
        """Dense S (d* x Σ d_k), differentiable: what folding multiplies with."""
        return stacked_matrices([self])[0]

    def block(self, k: int) -> torch.Tensor:
        """Dense S[k] (d* x d_k) through the block algebra (tests check it against matrix())."""
        eye = torch.eye(self.in_dims[k], dtype=self.dtype, device=self.device)
        return self.apply(k, eye).T

    def dense(self) -> torch.Tensor:
        """Dense S (d* x Σ d_k). As M this is M; as U, the matrix U is dense().T."""
        return torch.cat([self.block(k) for k in range(self.n)], dim=1)

    @torch.no_grad()
    def scale_block(self, k: int, c: float) -> None:
        """Multiply block S[k] by c (used to undo a target scaling after training)."""
        if self.kind == "full":
            self.weight[:, self._cols(k)] *= c
            return
        o = sum(self.diag_lens[:k])
        self.diag[o:o + self.diag_lens[k]] *= c
        if self.kind == "diag+lowrank":
            self.B[:, self._cols(k)] *= c

    @torch.no_grad()
    def set_dense(self, s: torch.Tensor) -> None:
        """Load a dense S (d* x Σ d_k); only a 'full' map can hold any matrix."""
        if self.kind != "full":
            raise ValueError("set_dense needs a 'full' parameterization")
        self.weight.copy_(s.to(self.weight))

    @property
    def dtype(self) -> torch.dtype:
        return self._tensor().dtype

    @property
    def device(self) -> torch.device:
        return self._tensor().device

    def _tensor(self) -> torch.Tensor:
        return self.weight if self.kind == "full" else self.diag

    # ------------------------------------------------------------------ shared storage
    def _param_names(self) -> tuple[str, ...]:
        return {"full": ("weight",), "diag": ("diag",), "diag+lowrank": ("diag", "A", "B")}[self.kind]

    def __getattr__(self, name: str):
        # A map packed into a MapBank reads its parameters as slices of the bank's.
        bank = self.__dict__.get("_bank")
        if bank is not None and name in bank._parameters:
            return bank._parameters[name][self.__dict__["_slot"]]
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return f"{self.role}, out={self.out_dim}, in={self.in_dims}, {self.kind}" + (
            f", rank={self.rank}" if self.rank else "")


class TiedMap(FoldMap):
    """An unmerge map tied to a merge map M: S_U = n·S_M, i.e. U = n·Mᵀ (U_out where a head is its model's
    token table, GPT-2's: the folded head, the mean of table_k · n·M_kᵀ, is the merged table Σ_k M_k table_k).
    It holds no parameters: it reads M's, so training M trains both. `scale_block` (a target scaling)
    scales its own view of a block only, never M."""

    def __init__(self, m: FoldMap):
        nn.Module.__init__(self)
        self.__dict__["_tied"] = m                 # not a submodule: its parameters are M's, learned there
        self.out_dim, self.in_dims, self.kind, self.rank, self.role = m.out_dim, list(m.in_dims), m.kind, m.rank, \
            "unmerge"
        self.n, self.copies, self.offsets, self.diag_lens = m.n, 1, m.offsets, m.diag_lens
        self.__dict__["_cols_scale"] = torch.ones(m.offsets[-1], dtype=torch.float64)

    def _col(self, like: torch.Tensor) -> torch.Tensor:
        return (self.n * self._cols_scale).to(like)

    @property
    def weight(self) -> torch.Tensor:
        return self._tied.weight * self._col(self._tied.weight)

    @property
    def diag(self) -> torch.Tensor:
        d = self._tied.diag
        return d * self._col(d)[self._tied._diag_index[1]]

    @property
    def A(self) -> torch.Tensor:
        return self._tied.A * self.n

    @property
    def B(self) -> torch.Tensor:
        b = self._tied.B
        return b * self._cols_scale.to(b)

    @property
    def _diag_index(self) -> torch.Tensor:
        return self._tied._diag_index

    @torch.no_grad()
    def scale_block(self, k: int, c: float) -> None:
        self._cols_scale[self._cols(k)] *= c

    def set_dense(self, s: torch.Tensor) -> None:
        raise ValueError("a tied map is set through the merge map it is tied to")

    def _tensor(self) -> torch.Tensor:
        return self._tied._tensor()


class MapBank(nn.Module):
    """The parameters of L FoldMaps of one shape, stacked: one (L x …) tensor per parameter name.

    A SuperNet has dozens of maps of a few shapes. Keeping each shape's maps in one set of
    tensors (`pack_maps`) lets folding read a group of layers with one index instead of
    stacking dozens of small tensors every step (and autograd and the optimizer then see a
    handful of tensors instead of hundreds). The maps stay usable one by one: each reads
    its parameters as slices of the bank's, so block algebra, `scale_block` and
    `set_dense` work unchanged and write into the bank.
    """

    def __init__(self, maps: list[FoldMap]):
        super().__init__()
        self.size = len(maps)
        for name in maps[0]._param_names():
            stacked = torch.stack([getattr(m, name).detach() for m in maps])
            self.register_parameter(name, nn.Parameter(stacked, requires_grad=getattr(maps[0], name).requires_grad))
        for slot, m in enumerate(maps):
            for name in m._param_names():
                del m._parameters[name]
            m.__dict__["_bank"], m.__dict__["_slot"] = self, slot
        self._index_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def select(self, name: str, slots: list[int]) -> torch.Tensor:
        """(len(slots) x …): parameter `name` of those maps, one op (the whole tensor if slots = all)."""
        p = self._parameters[name]
        if slots == list(range(slots[0], slots[0] + len(slots))):     # a run of slots: a view, no copy
            return p if len(slots) == self.size else p.narrow(0, slots[0], len(slots))
        key = tuple(slots)
        index = self._index_cache.get(key)
        if index is None or index.device != p.device:
            index = self._index_cache[key] = torch.tensor(slots, device=p.device)
        return p.index_select(0, index)


def pack_maps(module: nn.Module, together: list[list[FoldMap]] = ()) -> nn.ModuleList:
    """Pack every FoldMap under `module` into MapBanks of one (kind, rank, shape); returns the banks.

    `together`: lists of maps that one fold group reads, in its order (a map may repeat);
    each becomes a bank of its own (its distinct maps, per shape) so that the fold reads the
    whole bank or a run of it, a view, instead of gathering slots every step. The other maps
    are banked by shape. Register the result on `module` (e.g. `self.map_banks =
    pack_maps(self)`) so that the banks' parameters are the module's learnable parameters.
    """
    def key(m):
        return (_map_key(m), m.dtype, m.device, m._tensor().requires_grad)

    banked: set[int] = set()
    banks = []
    for maps in list(together) + [[m for m in module.modules() if isinstance(m, FoldMap)]]:
        groups: dict[tuple, list[FoldMap]] = {}
        for m in maps:
            if id(m) not in banked and "_bank" not in m.__dict__:
                banked.add(id(m))
                groups.setdefault(key(m), []).append(m)
        banks += [MapBank(ms) for ms in groups.values()]
    return nn.ModuleList(banks)


def gather_params(maps, name: str) -> torch.Tensor:
    """(L x …): parameter `name` of L maps of one kind and shape, differentiable."""
    bank = maps[0].__dict__.get("_bank")
    if bank is not None and all(m.__dict__.get("_bank") is bank for m in maps):
        return bank.select(name, [m.__dict__["_slot"] for m in maps])
    return torch.stack([getattr(m, name) for m in maps])


# --------------------------------------------------------------------------- folding
def merge_features(m: FoldMap, feats: list[torch.Tensor]) -> torch.Tensor:
    """Merged features Σ_k feats_k · M[k]ᵀ (the SuperNet's M applied to concatenated features)."""
    if m.kind == "full":    # one matmul instead of n (the hot path of local FS-Merge)
        return torch.cat(list(feats), dim=-1) @ m.weight.T
    if len(set(m.in_dims)) > 1:
        return sum(m.apply(k, f) for k, f in enumerate(feats))
    # equal widths: all blocks at once (a few ops, not a few per source)
    x = torch.cat(list(feats), dim=-1)                                   # (…, n·d)
    r = m.diag_lens[0]
    y = _fit_cols((x.unflatten(-1, (m.n, m.in_dims[0]))[..., :r] * m.diag.view(m.n, r)).sum(-2), m.out_dim)
    return y + (x @ m.B.T) @ m.A.T if m.kind == "diag+lowrank" else y


def unmerge_features(u: FoldMap, merged: torch.Tensor) -> list[torch.Tensor]:
    """Reconstruct every source model's features from merged ones: U · f*, split per model. Features
    of several vectors of the space side by side (`u.copies`, a spec's feature_copies) go through U
    vector by vector."""
    if u.copies > 1:
        return [p.flatten(-2) for p in _unmerge(u, merged.unflatten(-1, (u.copies, u.out_dim)))]
    return _unmerge(u, merged)


def _unmerge(u: FoldMap, merged: torch.Tensor) -> list[torch.Tensor]:
    if u.kind == "full":
        return list((merged @ u.weight).split(u.in_dims, dim=-1))
    if len(set(u.in_dims)) > 1:
        return [u.apply_t(k, merged) for k in range(u.n)]
    r = u.diag_lens[0]                     # equal widths: all blocks at once
    x = _fit_cols(merged[..., None, :r] * u.diag.view(u.n, r), u.in_dims[0]).flatten(-2)   # (…, n·d)
    if u.kind == "diag+lowrank":
        x = x + (merged @ u.A) @ u.B
    return list(x.split(u.in_dims, dim=-1))


def fold_linear(m: FoldMap | None, weights: list[torch.Tensor], u: FoldMap | None,
                biases: list[torch.Tensor] | None = None):
    """W* = M · blockdiag(W_k) · U and b* = M · concat(b_k).

    m=None means 'no merge on the output side' and is only valid for n = 1.
    u=None means a shared input (U = [I; I; …]), e.g. the image fed to every model.
    """
    return fold_linears([(m, weights, u, biases)])[0]


def fold_linears(jobs, groups: list[list[int]] | None = None) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """`fold_linear` for many layers at once: jobs = [(m, weights, u, biases), …].

    Layers whose maps and weights have the same shapes (e.g. every block's Q, K, V and O)
    are folded together with batched matmuls, so the cost per training step is a few dozen
    kernel launches for a whole network instead of several per layer. A layer without bias
    joins its group with a zero bias, whose fold is dropped (cheaper than a group of its
    own: each group costs a few dozen operations whatever its size). `groups`: what
    `fold_groups(jobs)` returns, for a caller that folds the same jobs every step.
    """
    out: list = [None] * len(jobs)
    for idx in groups if groups is not None else fold_groups(jobs):
        ms, ws, us, bs = zip(*(jobs[i] for i in idx))
        for i, (w, b) in zip(idx, _fold_group(ms, ws, us, bs)):
            out[i] = (w, b if jobs[i][3] is not None else None)
    return out


def fold_groups(jobs) -> list[list[int]]:
    """The jobs `fold_linears` folds together (same map kinds and shapes, same weight shapes), in order."""
    groups: dict[tuple, list[int]] = {}
    for i, (m, weights, u, biases) in enumerate(jobs):
        if m is None and len(weights) != 1:
            raise ValueError("fold_linear without M needs exactly one weight")
        key = (_map_key(m), _map_key(u), tuple(tuple(w.shape) for w in weights))   # with or without bias
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def fold_group_maps(jobs) -> list[list[FoldMap]]:
    """The M's and the U's of every group `fold_linears` folds, in its order: `pack_maps(together=…)`."""
    return [maps for idx in fold_groups(jobs) for side in (0, 2)
            if (maps := [jobs[i][side] for i in idx if jobs[i][side] is not None])]


def _map_key(m: FoldMap | None):
    return None if m is None else (m.kind, m.rank, m.out_dim, tuple(m.in_dims))


def stacked_matrices(maps) -> torch.Tensor:
    """(L x d* x Σ d_k): the dense matrices of L maps of one shape and kind, built in one go."""
    m0 = maps[0]
    if m0.kind == "full":
        return gather_params(maps, "weight")
    diag = gather_params(maps, "diag")
    s = diag.new_zeros(len(maps), m0.out_dim, m0.offsets[-1])
    layer = torch.arange(len(maps), device=diag.device).repeat_interleave(diag.shape[1])
    rows, cols = m0._diag_index
    s = s.index_put((layer, rows.repeat(len(maps)), cols.repeat(len(maps))), diag.reshape(-1))
    if m0.kind == "diag+lowrank":
        s = s + torch.bmm(gather_params(maps, "A"), gather_params(maps, "B"))
    return s


def _fold_group(ms, ws, us, bs):
    """Fold L same-shaped layers; ws[l][k] is layer l's weight of source k."""
    W, W_all, b = _stacked_sources(ws, bs)   # n x (L, out_k, in_k); (L, n, out, in) or None; (L, Σ out_k) or None
    if W_all is not None and _structured(ms[0]) and _structured(us[0]):
        return _fold_group_structured(ms, W_all, us, b)
    if us[0] is not None:                                                 # W_k · U[k]
        U = stacked_matrices(us)                                          # (L, d_in*, Σ in_k)
        cols = _split_points([w.shape[2] for w in W])
        wu = torch.cat([torch.bmm(w, U[:, :, a:c].transpose(1, 2)) for w, (a, c) in zip(W, cols)], dim=1)
    else:
        wu = torch.cat(W, dim=1)                                          # (L, Σ out_k, in)
    if ms[0] is None:
        return list(zip(wu.unbind(0), b.unbind(0) if b is not None else [None] * len(ws)))
    M = stacked_matrices(ms)                                              # (L, d*, Σ out_k)
    w_star = torch.bmm(M, wu)
    b_star = torch.bmm(M, b.unsqueeze(-1)).squeeze(-1) if b is not None else None
    return list(zip(w_star.unbind(0), b_star.unbind(0) if b_star is not None else [None] * len(ws)))


# Tensors built from frozen source weights (stacks, concatenations), kept while the same source
# tensors are unchanged: a training step would otherwise rebuild (and copy) them every time. An
# entry is [ids, versions, data pointers, value, weakrefs]: the weakrefs drop it as soon as one
# of its tensors is freed, so an id that matches is the same tensor.
_FROZEN_CACHE: dict[tuple, list] = {}


def frozen_cached(tag: str, tensors: list[torch.Tensor], build):
    """build(), computed once while `tensors` stay the same tensors with unchanged contents
    (version counter) and storage (`.to()` in place moves it); rebuilt at every call if any
    of them requires grad (the value must then carry its graph)."""
    if any(t.requires_grad for t in tensors):
        return build()
    key = (tag, id(tensors[0]))
    state = [list(map(id, tensors)), [t._version for t in tensors], [t.data_ptr() for t in tensors]]
    hit = _FROZEN_CACHE.get(key)
    if hit is not None and hit[:3] == state:
        return hit[3]
    entry = state + [build()]

    def drop(_, key=key, entry=entry, cache=_FROZEN_CACHE):     # the dict itself: at exit the global is None
        if cache.get(key) is entry:
            del cache[key]
    entry.append([weakref.ref(t, drop) for t in tensors])
    _FROZEN_CACHE[key] = entry
    return entry[3]


def _stacked_sources(ws, bs):
    """The sources of a layer group stacked: n x (L, out_k, in_k), the same as one (L, n, out, in)
    tensor W_all when the sources are frozen and of equal shapes (what the structured fold reads;
    W are then views into it, not a second copy) else None, and the biases (L, Σ out_k) or None."""
    flat = [w for layer in ws for w in layer] + [x for layer in bs if layer is not None for x in layer]

    def build():
        W_all = None
        if not any(t.requires_grad for t in flat) and len({tuple(w.shape) for w in ws[0]}) == 1:
            W_all = torch.stack([torch.stack(list(layer)) for layer in ws])
            W = list(W_all.unbind(1))
        else:
            W = [torch.stack([w[k] for w in ws]) for k in range(len(ws[0]))]
        b = None
        if any(x is not None for x in bs):    # a layer without bias gets zeros (its folded bias is dropped)
            b = torch.stack([torch.cat(list(x)) if x is not None else W[0].new_zeros(sum(w.shape[0] for w in layer))
                             for x, layer in zip(bs, ws)])
        return W, W_all, b

    return frozen_cached("fold group", flat, build)


def _structured(m: FoldMap | None) -> bool:
    return m is None or m.kind != "full"


def _fold_group_structured(ms, W, us, b):
    """`_fold_group` for frozen sources of equal shapes and diag / diag+low-rank maps, no dense maps.

    W is (L, n, out, in), b (L, n·out) or None. With M[k] = Dm_k + Am·Bm_k and
    U[k] = Du_k + Bu_kᵀ·Auᵀ (diagonal blocks plus a rank-r part), W* = Σ_k M[k]·W_k·U[k] is

        W* = Σ_k Dm_k·W_k·Du_k + Am·V + (Σ_k Dm_k·P_k + Am·R)·Auᵀ
        b* = Σ_k Dm_k·b_k + Am·Σ_k Bm_k·b_k
        with P_k = W_k·Bu_kᵀ (out x r), Q_k = Bm_k·W_k (r x in), V = Σ_k Q_k·Du_k, R = Σ_k Bm_k·P_k

    Each source is read by two r-wide products (P and Q: O(2·n·r·d²) per layer), and every
    other product is r x r or of the merged size. The backward reads each source the same
    way (the gradients of Bm and Bu are Q's and P's), so it never forms the (out x in)
    gradient of any one source's M[k]·W_k, and the diagonal parts cost an elementwise pass.
    `_StructuredFold` does this with the backward written out (autograd's graph of the same
    algebra would add its own nodes, saved tensors and passes). At a tiny ViT's sizes most of
    the fold's time is per-operation cost (~150 small operations a group, forward and backward),
    not arithmetic: it barely grows with n.
    """
    def params(maps, width):     # diagonals, low-rank factors (or None) and merged width of one side
        m0 = maps[0]
        if m0 is None:
            return None, None, None, width
        low = m0.kind == "diag+lowrank"
        return (gather_params(maps, "diag"), gather_params(maps, "A") if low else None,
                gather_params(maps, "B") if low else None, m0.out_dim)

    dm, Am, Bm, d_out = params(ms, W.shape[2])
    du, Au, Bu, d_in = params(us, W.shape[3])
    folded = _StructuredFold.apply(W, b, dm, Am, Bm, du, Au, Bu, d_out, d_in)
    if b is None:
        return [(w, None) for w in folded.unbind(0)]
    w_star, b_star = folded
    return list(zip(w_star.unbind(0), b_star.unbind(0)))


class _StructuredFold(torch.autograd.Function):
    """[W* | b*] of `_fold_group_structured` (shapes there), with a hand-written backward.

    dm (L, n·r_m), Am (L, out*, rm), Bm (L, rm, n·out): M's diagonals and low-rank factors
    (None: no M, n = 1; Am = Bm = None: diagonal only); du, Au, Bu the same for U (None:
    shared input). The sources W, b are frozen: no gradient flows to them. Both directions
    run in the maps' precision with autocast off: under bf16 autocast the folded weights come
    out float32 like any weight (the layers that use them cast them), and the backward, which
    autocast does not reach, sees the dtypes the forward saw.
    """

    @staticmethod
    def forward(ctx, W, b, dm, Am, Bm, du, Au, Bu, d_out, d_in):
        with _no_autocast(W.device.type):
            return _StructuredFold._forward(ctx, W, b, dm, Am, Bm, du, Au, Bu, d_out, d_in)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_w, g_b=None):
        with _no_autocast(g_w.device.type):
            return _StructuredFold._backward(ctx, g_w, g_b)

    @staticmethod
    def _forward(ctx, W, b, dm, Am, Bm, du, Au, Bu, d_out, d_in):
        # P is kept transposed, Pt (L, r, n·out): its product with the sources and the one in the
        # backward then both multiply a few rows into a source, the fast shape for batched matmuls
        L, n, o, i = W.shape
        Wb = W.view(L * n, o, i)
        r_u = du.shape[1] // n if du is not None else i
        Y = W if du is None else _fit_cols(W[..., :r_u] * du.view(L, n, 1, r_u), d_in)   # W_k·Du_k
        Pt = Q = V = R = beta = None
        if Bu is not None:                                       # P_kᵀ = Bu_k·W_kᵀ, one bmm over (layer, source)
            r = Bu.shape[1]
            Bu_k = Bu.view(L, r, n, i).transpose(1, 2).reshape(L * n, r, i)
            Pt = torch.bmm(Bu_k, Wb.transpose(1, 2)).view(L, n, r, o).transpose(1, 2).reshape(L, r, n * o)
        if dm is None:                                           # n = 1, nothing merged on the output side
            A, St, bd = Y[:, 0], Pt, b
        else:
            r_m = dm.shape[1] // n
            A = _fit_rows((dm.view(L, n, r_m, 1) * Y[:, :, :r_m]).sum(1), d_out)     # Σ_k Dm_k·W_k·Du_k
            St = None if Pt is None else _fit_cols(
                (Pt.view(L, -1, n, o)[..., :r_m] * dm.view(L, 1, n, r_m)).sum(2), d_out)   # (Σ_k Dm_k·P_k)ᵀ
            bd = None if b is None else _fit_cols((dm.view(L, n, r_m) * b.view(L, n, o)[..., :r_m]).sum(1), d_out)
            if Am is not None:
                rm = Am.shape[2]
                Bm_k = Bm.view(L, rm, n, o).transpose(1, 2).reshape(L * n, rm, o)
                Q = torch.bmm(Bm_k, Wb).view(L, n, rm, i)                             # Bm_k·W_k
                V = Q.sum(1) if du is None else _fit_cols((Q[..., :r_u] * du.view(L, n, 1, r_u)).sum(1), d_in)
                A = torch.baddbmm(A, Am, V)
                if Pt is not None:
                    R = torch.bmm(Bm, Pt.transpose(1, 2))                                # Σ_k Bm_k·P_k
                    St = torch.baddbmm(St, R.transpose(1, 2), Am.transpose(1, 2))
                if b is not None:
                    beta = torch.bmm(Bm, b.view(L, n * o, 1))                            # Σ_k Bm_k·b_k
                    bd = torch.baddbmm(bd.unsqueeze(-1), Am, beta).squeeze(-1)
        if Au is not None:
            w_star = torch.baddbmm(A, St.transpose(1, 2), Au.transpose(1, 2))
        else:       # A may still be a view of the sources (n = 1, no U): the output is a tensor of its own
            w_star = A.clone() if A._base is not None or A is W else A
        ctx.save_for_backward(W, b, dm, Am, Bm, du, Au, Bu, Pt, Q, V, R, beta, St)
        ctx.r_u = r_u
        if b is None:
            return w_star
        return w_star, (bd.clone() if bd is b else bd)

    @staticmethod
    def _backward(ctx, g_w, g_b):
        W, b, dm, Am, Bm, du, Au, Bu, Pt, Q, V, R, beta, St = ctx.saved_tensors
        r_u = ctx.r_u
        L, n, o, i = W.shape
        Wb = W.view(L * n, o, i)
        g_dm = g_Am = g_Bm = g_du = g_Au = g_Bu = g_St = g_Pt = None
        if Au is not None:                                       # W* = A + S·Auᵀ
            g_Au = torch.bmm(g_w.transpose(1, 2), St.transpose(1, 2))
            g_St = torch.bmm(Au.transpose(1, 2), g_w.transpose(1, 2))                  # (L, r, out*)
        if dm is None:                                           # n = 1: W* = W_0·Du_0 + P_0·Auᵀ
            if du is not None:
                g_du = (g_w[..., :r_u] * W[:, 0, :, :r_u]).sum(-2)
            g_Pt = g_St
        else:
            r_m = dm.shape[1] // n
            g_du_q = None
            if Am is not None:                                   # the low-rank part of M: Am·(V, R, β)
                Am_t = Am.transpose(1, 2)
                g_Am = torch.bmm(g_w, V.transpose(1, 2))
                g_V = torch.bmm(Am_t, g_w)                       # (L, rm, in*)
                rm = g_V.shape[1]
                # V = Σ_k Q_k·Du_k with Q_k = Bm_k·W_k: Bm's and Du's gradients through Q
                if du is None:
                    g_Q = g_V.unsqueeze(1).expand(L, n, rm, i)
                else:
                    g_Vu = g_V[:, None, :, :r_u]
                    g_Q = _fit_cols(g_Vu * du.view(L, n, 1, r_u), i)
                    g_du_q = (g_Vu * Q[..., :r_u]).sum(-2)                               # (L, n, r_u)
                g_Bm = torch.bmm(g_Q.reshape(L * n, rm, i), Wb.transpose(1, 2))
                g_Bm = g_Bm.view(L, n, rm, o).transpose(1, 2).reshape(L, rm, n * o)
                if R is not None:                                # R = Σ_k Bm_k·P_k
                    g_Am.baddbmm_(g_St.transpose(1, 2), R.transpose(1, 2))
                    g_R = torch.bmm(g_St, Am)                    # g_Rᵀ (L, r, rm)
                    g_Bm.baddbmm_(g_R.transpose(1, 2), Pt)
                    g_Pt = torch.bmm(g_R, Bm)                    # (L, r, n·out)
                if beta is not None:                             # β = Σ_k Bm_k·b_k
                    g_Am.baddbmm_(g_b.unsqueeze(-1), beta.transpose(1, 2))
                    g_Bm.baddbmm_(torch.bmm(Am_t, g_b.unsqueeze(-1)), b.view(L, 1, n * o))
            # the diagonal part of M: Σ_k Dm_k·(W_k·Du_k, P_k, b_k), rows < r_m
            E = g_w[:, None, :r_m, :r_u] * W[:, :, :r_m, :r_u]                   # (L, n, r_m, r_u)
            if du is None:
                g_dm = E.sum(-1)
            else:
                E2 = E.view(L * n, r_m, r_u)
                g_dm = torch.bmm(du.view(L * n, 1, r_u), E2.transpose(1, 2)).view(L, n, r_m)
                g_du = torch.bmm(dm.view(L * n, 1, r_m), E2).view(L, n, r_u)
                if g_du_q is not None:
                    g_du += g_du_q
            if g_St is not None:
                g_Sd = g_St[:, :, None, :r_m]                                          # (L, r, 1, r_m)
                g_dm += (g_Sd * Pt.view(L, -1, n, o)[..., :r_m]).sum(1)
                g_Pd = g_Sd * dm.view(L, 1, n, r_m)                                    # (L, r, n, r_m)
                if g_Pt is None:
                    g_Pt = _fit_cols(g_Pd, o).view(L, -1, n * o)
                else:
                    g_Pt.view(L, -1, n, o)[..., :r_m] += g_Pd
            if b is not None:
                g_dm += g_b[:, None, :r_m] * b.view(L, n, o)[..., :r_m]
            g_dm = g_dm.reshape(L, n * r_m)
        if g_du is not None:
            g_du = g_du.reshape(L, n * r_u)
        if Bu is not None:                                       # P_kᵀ = Bu_k·W_kᵀ
            r = Bu.shape[1]
            g_Pk = g_Pt.view(L, r, n, o).transpose(1, 2).reshape(L * n, r, o)
            g_Bu = torch.bmm(g_Pk, Wb).view(L, n, r, i).transpose(1, 2).reshape(L, r, n * i)
        return None, None, g_dm, g_Am, g_Bm, g_du, g_Au, g_Bu, None, None


def _no_autocast(device_type: str):
    """Autocast switched off, entered only where it is on (the context costs a few µs a call)."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def _fit_rows(x: torch.Tensor, height: int) -> torch.Tensor:
    """Truncate or zero-pad the second-to-last dimension of x to `height`."""
    return x if x.shape[-2] == height else _fit_cols(x.transpose(-1, -2), height).transpose(-1, -2)


def _split_points(sizes: list[int]) -> list[tuple[int, int]]:
    out, o = [], 0
    for s in sizes:
        out.append((o, o + s))
        o += s
    return out
