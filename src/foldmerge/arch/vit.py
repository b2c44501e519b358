"""Vision Transformers in plain PyTorch (the FS-Merge paper's ViT-B/16 family, scaled down).

Pre-LayerNorm blocks, a CLS token, learned position embeddings, a final LayerNorm on the
CLS token and a projection (no bias) to the feature dimension, as in CLIP's image encoder:

    h_0 = [cls; patches · W_patchᵀ + b_patch] + pos
    h   = h + W_O · attn(LN_1(h))             attn: q, k, v = separate linears, H heads
    h   = h + W_2 · gelu(W_1 · LN_2(h))
    f   = W_proj · LN_post(h[CLS])

Every linear map is its own `nn.Linear` (the patch projection is a linear on flattened
patches, the same as a stride-p convolution), because each is a place where the
Foldable SuperNet puts an M or a U (paper appendix B.1; docs/architecture.md).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..schema import strict_arguments
from ..spec import ArchSpec, Norm, Param, Probe, Space, Unit, check_sizes, resize_transformer


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p · W/p, C·p·p), patches in row-major order."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def multihead(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention with `heads` heads of width/heads each: (B, N, D) x 3 -> (B, N, D)."""
    b, n, _ = q.shape

    def split(t):           # (B, N, D) -> (B, H, N, D/H)
        return t.reshape(b, n, heads, -1).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, n, -1)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(multihead(self.q(x), self.k(x), self.v(x), self.heads))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attention(self.ln1(h))
        return h + self.fc2(F.gelu(self.fc1(self.ln2(h))))


class Backbone(nn.Module):
    @strict_arguments            # the signature is the schema of a config's `backbone`
    def __init__(self, image_size: int = 28, channels: int = 1, patch: int = 7, width: int = 64,
                 depth: int = 4, heads: int = 4, mlp_dim: int = 128, out_dim: int = 64):
        super().__init__()
        sizes = {"image_size": image_size, "channels": channels, "patch": patch, "width": width, "depth": depth,
                 "heads": heads, "mlp_dim": mlp_dim, "out_dim": out_dim}
        check_sizes("ViT", sizes, "width", "heads")
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch}")
        if depth < 1:
            raise ValueError("a ViT needs at least one block")
        self.image_size, self.channels, self.patch = image_size, channels, patch
        self.width, self.depth, self.heads, self.mlp_dim, self.out_dim = width, depth, heads, mlp_dim, out_dim
        n_patches = (image_size // patch) ** 2
        self.patch_proj = nn.Linear(channels * patch * patch, width)
        self.cls = nn.Parameter(torch.randn(width) * 0.02)
        self.pos = nn.Parameter(torch.randn(n_patches + 1, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_dim) for _ in range(depth))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(width))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """h_0: the CLS token and the embedded patches, with position embeddings (B, 1 + N, width)."""
        p = self.patch_proj(patchify(x, self.patch))
        # cls (width) and pos (tokens, width) may carry a leading batch axis: the gating merge
        # gives every input its own mixture of them
        cls = self.cls.reshape(-1, 1, self.width).expand(p.shape[0], 1, -1)
        return torch.cat([cls, p], dim=1) + self.pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x)
        for block in self.blocks:
            h = block(h)
        return self.proj(self.ln_post(h[:, 0]))


def spec(config: dict) -> ArchSpec:
    """The ViT as data (paper appendix B.1; docs/architecture.md).

    Spaces: the shared pixels of a patch; the residual stream `res` (one space through every
    block); per block l the attention spaces `qk{l}` (q and k together: their dot product is
    what attention reads) and `v{l}`, both split into the heads, and the MLP hidden `mlp{l}`;
    the features `feat`. Sites: the patch embedding, its bias, the class token and the
    positions are summed into one tensor, so one M (`embed`) merges them; Q, K and V read
    LN1's output through one U; every other M and U is the layer's own."""
    c = {**DEFAULTS, **config}
    heads = c["heads"]
    spaces = [Space("pixels", shared=True), Space("res"), Space("feat")]
    params = [Param("patch_proj.weight", ("res", "pixels"), merge_at="embed"),
              Param("patch_proj.bias", ("res",), merge_at="embed"),
              Param("cls", ("res",), merge_at="embed"), Param("pos", (None, "res"), merge_at="embed")]
    norms, probes = [], [Probe("res", "blocks.0", "in")]
    units = [Unit("embedding", "embedding", ("patch_proj.weight", "patch_proj.bias", "cls", "pos"))]
    for l in range(c["depth"]):
        b = f"blocks.{l}"
        qk, v, mlp = f"qk{l}", f"v{l}", f"mlp{l}"
        spaces += [Space(qk, heads=heads), Space(v, heads=heads), Space(mlp)]
        for name, out, inp, reads_at in (("q", qk, "res", f"{b}.ln1"), ("k", qk, "res", f"{b}.ln1"),
                                         ("v", v, "res", f"{b}.ln1"), ("o", "res", v, None),
                                         ("fc1", mlp, "res", None), ("fc2", "res", mlp, None)):
            params += [Param(f"{b}.{name}.weight", (out, inp), unmerge_at=reads_at), Param(f"{b}.{name}.bias", (out,))]
        norms += [Norm(f"{b}.ln1", "res"), Norm(f"{b}.ln2", "res")]
        units += [Unit(f"{b}.ln1", "norm", (f"{b}.ln1.weight", f"{b}.ln1.bias")),
                  Unit(f"{b}.attn", "attention", tuple(f"{b}.{n}.{a}" for n in "qkvo" for a in ("weight", "bias"))),
                  Unit(f"{b}.ln2", "norm", (f"{b}.ln2.weight", f"{b}.ln2.bias")),
                  Unit(f"{b}.mlp", "mlp", tuple(f"{b}.{n}.{a}" for n in ("fc1", "fc2") for a in ("weight", "bias")))]
        probes += [Probe(qk, f"{b}.q"), Probe(qk, f"{b}.k"), Probe(v, f"{b}.v"), Probe(mlp, f"{b}.fc2", "in"),
                   Probe("res", b)]
    params.append(Param("proj.weight", ("feat", "res")))
    norms.append(Norm("ln_post", "res"))
    probes.append(Probe("feat", ""))
    units += [Unit("ln_post", "norm", ("ln_post.weight", "ln_post.bias")), Unit("proj", "output", ("proj.weight",))]
    return ArchSpec("vit", spaces, params, norms, probes, output="feat", build=lambda cfg: Backbone(**cfg),
                    resize=resize, width_spaces=("res", "mlp0"), check=check_compatible, units=units,
                    defaults="vit")


DEFAULTS = {"image_size": 28, "channels": 1, "patch": 7, "width": 64, "depth": 4, "heads": 4, "mlp_dim": 128,
            "out_dim": 64}
# what `train-sources --arch vit` and bench vit train: 28x28 images in 16 patches of 7x7, 4 blocks of width 64
SOURCE_CONFIG = dict(DEFAULTS)


def resize(config: dict, widths: list[int]) -> dict:
    """The configuration at residual width widths[0] and MLP width widths[1] (default: the source's)."""
    return resize_transformer(config, widths, "ViT", ("width", "mlp_dim"), config.get("heads", DEFAULTS["heads"]))


def check_compatible(configs: list[dict]) -> None:
    """Same depth, heads, patch and image size (widths may differ); else one clear error."""
    for attr, what in (("depth", "depths"), ("heads", "attention head counts"), ("patch", "patch sizes"),
                       ("image_size", "image sizes"), ("channels", "channel counts")):
        vals = [c.get(attr, DEFAULTS[attr]) for c in configs]
        if len(set(vals)) != 1:
            raise ValueError(f"cannot merge ViTs with different {what} {vals}")
