"""Multi-layer perceptrons and their Foldable SuperNet (FS-Merge paper, section 2.1).

Backbone: x (flattened) -> [Linear -> ReLU] x L; the features f_L are the last hidden
layer's post-activations. The class head sits outside the backbone and is never merged.

SuperNet for n sources with hidden widths d_l^k and target widths d_l^*:

    f*_0 = x
    f*_l = relu( M_l · (blockdiag(W_l^k) · U_{l-1} · f*_{l-1} + concat(b_l^k)) )
    reconstruction of model k's f_L:  U_L[k] · f*_L

with U_0 = [I; I; …] because every model sees the same input. Since ReLU acts on merged
features, the SuperNet equals the folded MLP W*_l = M_l · blockdiag(W_l) · U_{l-1} at every
step; `forward(form="folded")` runs that plain MLP, `form="supernet"` runs the wide
SuperNet as drawn in the paper (the reference the tests compare against).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..foldable import FoldMap, fold_linears, merge_features, pack_maps, unmerge_features
from ..spec import ArchSpec, Param, Probe, Space

FORMS = ("folded", "supernet")


class Backbone(nn.Module):
    def __init__(self, in_dim: int = 784, hidden: list[int] | tuple[int, ...] = (128,)):
        super().__init__()
        if not hidden:
            raise ValueError("an MLP needs at least one hidden layer")
        self.in_dim = int(in_dim)
        self.hidden = [int(h) for h in hidden]
        dims = [self.in_dim] + self.hidden
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out_dim = self.hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.flatten(1)
        for layer in self.layers:
            f = F.relu(layer(f))
        return f

    def preactivations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """z_1 … z_L (before ReLU) of every hidden layer."""
        zs, f = [], x.flatten(1)
        for layer in self.layers:
            z = layer(f)
            zs.append(z)
            f = F.relu(z)
        return zs


def spec(config: dict) -> ArchSpec:
    """The MLP as data: the shared input, one space per hidden layer; layer l writes h_l and
    reads h_{l-1} (the input for l = 0); h_l is observed where layer l + 1 reads it (after
    the ReLU), the last one as the backbone's output."""
    depth = len(config.get("hidden", DEFAULTS["hidden"]))
    spaces = [Space("input", shared=True)] + [Space(f"h{l}") for l in range(depth)]
    params, probes = [], []
    for l in range(depth):
        params += [Param(f"layers.{l}.weight", (f"h{l}", f"h{l - 1}" if l else "input")),
                   Param(f"layers.{l}.bias", (f"h{l}",))]
        probes.append(Probe(f"h{l}", f"layers.{l + 1}", "in") if l < depth - 1 else Probe(f"h{l}", "", "out"))
    return ArchSpec("mlp", spaces, params, probes=probes, output=f"h{depth - 1}", build=lambda c: Backbone(**c),
                    resize=resize, width_spaces=tuple(f"h{l}" for l in range(depth)), check=check_compatible)


DEFAULTS = {"in_dim": 784, "hidden": (128,)}


def resize(config: dict, widths: list[int]) -> dict:
    """The configuration with hidden widths `widths` (one per hidden layer)."""
    depth = len(config.get("hidden", DEFAULTS["hidden"]))
    if len(widths) != depth:
        raise ValueError(f"target widths {list(widths)} do not match the source depth {depth}: give one per hidden layer")
    if any(w < 1 for w in widths):
        raise ValueError(f"target widths must be positive, got {list(widths)}")
    return {**config, "hidden": [int(w) for w in widths]}


def check_compatible(configs: list[dict]) -> None:
    """Same depth and input size; otherwise a clear error (widths may differ)."""
    depths = [len(c.get("hidden", DEFAULTS["hidden"])) for c in configs]
    if len(set(depths)) != 1:
        raise ValueError(f"cannot merge MLPs of different depths {depths}: "
                         "FS-Merge folds layer by layer, so every model needs the same number of hidden layers")
    ins = [c.get("in_dim", DEFAULTS["in_dim"]) for c in configs]
    if len(set(ins)) != 1:
        raise ValueError(f"cannot merge MLPs with different input sizes {ins}")


class SuperNet(nn.Module):
    """Frozen source weights plus learnable M_l, U_l for every hidden layer."""

    def __init__(self, sources, widths: list[int] | None = None, param: str = "full",
                 init: str = "first", seed: int = 0):
        super().__init__()
        if any(s.arch != "mlp" for s in sources):
            raise ValueError("MLP SuperNet needs MLP source models")
        check_compatible([s.backbone_config for s in sources])
        self.n = len(sources)
        depth = len(sources[0].backbone.hidden)
        src_widths = [[s.backbone.hidden[l] for s in sources] for l in range(depth)]
        self.widths = list(widths) if widths is not None else [w[0] for w in src_widths]
        if len(self.widths) != depth:
            raise ValueError(f"target widths {self.widths} do not match the source depth {depth}")
        self.in_dim = sources[0].backbone.in_dim
        self.tasks = [t for s in sources for t in s.tasks]
        self.head_bias = sources[0].head_bias
        g = torch.Generator().manual_seed(int(seed))
        dtype = sources[0].backbone.layers[0].weight.dtype

        # Frozen source weights, kept as buffers (never trained, moved with .to()).
        self.src_w, self.src_b = [], []
        for l in range(depth):
            ws, bs = [], []
            for k, s in enumerate(sources):
                lin = s.backbone.layers[l]
                self.register_buffer(f"w{l}_{k}", lin.weight.detach().clone())
                self.register_buffer(f"b{l}_{k}", lin.bias.detach().clone())
                ws.append(f"w{l}_{k}")
                bs.append(f"b{l}_{k}")
            self.src_w.append(ws)
            self.src_b.append(bs)
        # Heads: (source k, head index j) -> frozen weights; the last U is folded into them.
        self.head_owner = []
        for k, s in enumerate(sources):
            for j, h in enumerate(s.heads):
                i = len(self.head_owner)
                self.register_buffer(f"hw{i}", h.weight.detach().clone())
                self.register_buffer(f"hb{i}", h.bias.detach().clone() if h.bias is not None else None)
                self.head_owner.append(k)

        self.M = nn.ModuleList(FoldMap(self.widths[l], src_widths[l], param, init, "merge", g, dtype)
                               for l in range(depth))
        self.U = nn.ModuleList(FoldMap(self.widths[l], src_widths[l], param, init, "unmerge", g, dtype)
                               for l in range(depth))
        self.map_banks = pack_maps(self)                         # same-shaped maps share tensors (foldable.MapBank)
        self.to(sources[0].backbone.layers[0].weight.device)   # maps live where the sources do

    # ---------------------------------------------------------------- source weights
    def weights(self, l: int) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.src_w[l]]

    def biases(self, l: int) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.src_b[l]]

    @property
    def depth(self) -> int:
        return len(self.widths)

    # ------------------------------------------------------------------------ forward
    def folded_layers(self, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """W*_l, b*_l for every hidden layer from `start` on (differentiable in M and U)."""
        return fold_linears([(self.M[l], self.weights(l), self.U[l - 1] if l > 0 else None, self.biases(l))
                             for l in range(start, self.depth)])

    @torch.no_grad()
    def input_preactivations(self, x: torch.Tensor) -> torch.Tensor:
        """[z_1^1 … z_1^n]: every source's first-layer pre-activations (examples x Σ d_1^k).

        The input is shared and never learned, so a training loop can compute these once;
        `forward(None, pre=z)` then starts from them: relu(M_1 · z) is exactly layer 1 of the
        folded model (W*_1 x + b*_1 = M_1 (blockdiag(W_1) [x; …; x] + b_1)), at a fraction of the
        cost when the input is wide (784 pixels against 2 x 128 features)."""
        x = x.flatten(1)
        return torch.cat([F.linear(x, w, b) for w, b in zip(self.weights(0), self.biases(0))], dim=1)

    def forward(self, x: torch.Tensor | None, form: str = "folded", pre: torch.Tensor | None = None) -> torch.Tensor:
        """Merged features f*_L (d*_L wide). `pre`: `input_preactivations(x)` instead of x."""
        if pre is not None:
            if form not in FORMS:
                raise ValueError(f"form must be one of {FORMS}, got {form!r}")
            f = F.relu(merge_features(self.M[0], list(pre.split(self.M[0].in_dims, dim=1))))
            if form == "folded":
                for w, b in self.folded_layers(start=1):
                    f = F.relu(F.linear(f, w, b))
                return f
            return self._supernet_layers(f, start=1)
        f = x.flatten(1)
        if form == "folded":
            for w, b in self.folded_layers():
                f = F.relu(F.linear(f, w, b))
            return f
        if form != "supernet":
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        return self._supernet_layers(f, start=0)

    def _supernet_layers(self, f: torch.Tensor, start: int) -> torch.Tensor:
        for l in range(start, self.depth):
            # U_{l-1} · f*: every model's reconstructed input (shared image for l = 0).
            recon = unmerge_features(self.U[l - 1], f) if l > 0 else [f] * self.n
            z = [F.linear(r, w, b) for r, w, b in zip(recon, self.weights(l), self.biases(l))]
            f = F.relu(torch.cat(z, dim=1) @ self.M[l].dense().T)
        return f

    @property
    def output_map(self) -> FoldMap:
        """The map that reconstructs the sources' features and is folded into the heads."""
        return self.U[-1]

    def reconstruct(self, merged: torch.Tensor) -> list[torch.Tensor]:
        """U_L · f*: the reconstruction of every source model's last features."""
        return unmerge_features(self.output_map, merged)

    # ------------------------------------------------------------------------ folding
    @torch.no_grad()
    def fold(self):
        """The merged model: a plain MLP of the target widths plus one adapted head per task."""
        from ..model import TaskModel
        merged = TaskModel("mlp", {"in_dim": self.in_dim, "hidden": self.widths}, self.tasks, self.head_bias)
        merged.to(dtype=self.w0_0.dtype, device=self.w0_0.device)
        for layer, (w, b) in zip(merged.backbone.layers, self.folded_layers()):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        for i, head in enumerate(merged.heads):
            k = self.head_owner[i]
            head.weight.copy_(self.U[-1].apply(k, getattr(self, f"hw{i}")))   # head_k · U_L[k]
            if head.bias is not None:
                head.bias.copy_(getattr(self, f"hb{i}"))
        return merged
