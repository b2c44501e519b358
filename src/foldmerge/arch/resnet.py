"""ResNets with BatchNorm (ZipIt!'s CIFAR ResNet-20 family, width multiplier w) and their merge spec.

    stem:    x -> relu(BN(conv3x3(x)))                                   16w channels
    stage s: `blocks` basic blocks at 16w·2^s channels (stride 2 at the first block of s > 0):
             h -> relu( BN(conv3x3(relu(BN(conv3x3(h))))) + shortcut(h) )
             shortcut = identity, or BN(conv1x1, stride 2) where the width or the size changes
    f = global average pool of the last stage (the features the task heads read)

ResNet-20 is blocks = 3. A conv is a linear map of channels at every kernel location, so the
merge maps act on channels: a conv weight (out, in, kh, kw) has axes (written space, read
space, None, None) and folds as W*[:, :, i, j] = M·blockdiag(W_k[:, :, i, j])·U at each (i, j).

BatchNorm is not merged as such: with `batchnorm` the model trains with it, and merging reads
the *fused* model (`fuse_batchnorm`: every BN folded into the conv before it, exact in eval
mode; config batchnorm = False, convs with bias), which `foldmerge.merge` and the CLI make by
themselves. The merged model is a plain conv net; the REPAIR-style BatchNorm reset of ZipIt!
(statistics recomputed on the merge sample) is `foldmerge.methods.repair` on it.

The spec: every layer that writes into one residual stage writes one space `res{s}` (the stem
or the first block's projection shortcut, and every block's second conv: the identity
shortcuts add them up), each block's inner conv writes its own space `s{s}b{b}`; the
`stages` are the cuts partial zipping may stop at (stem + stage 0, stage 1, stage 2).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..schema import strict_arguments
from ..spec import ArchSpec, Param, Probe, Space

DEFAULTS = {"channels": 1, "width": 1, "base": 16, "blocks": 3, "stages": 3, "batchnorm": True}
# what `train-sources --arch resnet` trains by default: bench cnn's sources, a ResNet-8 (three stages of
# one block, 8·w channels first; ResNet-20 is too slow to train here many times); how it trains them:
# foldmerge.arch.defaults.SOURCES
SOURCE_CONFIG = {"channels": 1, "base": 8, "blocks": 1, "stages": 3, "batchnorm": True}


def _positive(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"ResNet {name} must be a positive integer, got {v!r}")


def stage_widths(c: dict) -> list[int]:
    """Channels of every stage: base·width·2^s unless the config lists them (`widths`, a merge's)."""
    if c.get("widths") is not None:
        return [int(w) for w in c["widths"]]
    return [c["base"] * c["width"] * 2 ** s for s in range(c["stages"])]


class Block(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int, bn: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, hidden, 3, stride, 1, bias=not bn)
        self.conv2 = nn.Conv2d(hidden, cout, 3, 1, 1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(hidden) if bn else nn.Identity()
        self.bn2 = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=not bn)
            self.bn_short = nn.BatchNorm2d(cout) if bn else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h)))))
        return F.relu(z + (h if self.shortcut is None else self.bn_short(self.shortcut(h))))


class Backbone(nn.Module):
    @strict_arguments            # the signature is the schema of a config's `backbone`
    def __init__(self, channels: int = 1, width: int = 1, base: int = 16, blocks: int = 3, stages: int = 3,
                 batchnorm: bool = True, widths: list[int] | None = None, hidden: list[list[int]] | None = None):
        super().__init__()
        for name, v in (("channels", channels), ("width", width), ("base", base), ("blocks", blocks),
                        ("stages", stages)):
            _positive(name, v)
        c = {"channels": channels, "width": width, "base": base, "blocks": blocks, "stages": stages, "widths": widths}
        ws = stage_widths(c)
        if len(ws) != stages:
            raise ValueError(f"ResNet widths {ws} do not give one width per stage ({stages})")
        hidden = hidden or [[w] * blocks for w in ws]     # inner widths of every block (a merge may widen them)
        bn = bool(batchnorm)
        self.stem = nn.Conv2d(channels, ws[0], 3, 1, 1, bias=not bn)
        self.bn_stem = nn.BatchNorm2d(ws[0]) if bn else nn.Identity()
        layers, cin = [], ws[0]
        for s, w in enumerate(ws):
            for b in range(blocks):
                layers.append(Block(cin, hidden[s][b], w, 2 if (b == 0 and s > 0) else 1, bn))
                cin = w
        self.blocks = nn.ModuleList(layers)
        self.out_dim = ws[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn_stem(self.stem(x)))
        for block in self.blocks:
            h = block(h)
        return h.mean(dim=(2, 3))


def spec(config: dict) -> ArchSpec:
    c = {**DEFAULTS, **config}
    nb, ns = c["blocks"], c["stages"]
    spaces = [Space("pixels", shared=True)]
    params, probes, stages = [], [], []

    def conv(key, out, inp, bias):
        params.append(Param(f"{key}.weight", (out, inp, None, None)))
        if bias:
            params.append(Param(f"{key}.bias", (out,)))

    bias = not c["batchnorm"]
    bn = []                                          # BatchNorm modules and the space each normalizes
    spaces.append(Space("res0"))
    conv("stem", "res0", "pixels", bias)
    bn.append(("bn_stem", "res0"))
    for s in range(ns):
        res = f"res{s}"
        if s > 0:
            spaces.append(Space(res))
        group = [res]
        for b in range(nb):
            i = s * nb + b
            blk, inner = f"blocks.{i}", f"s{s}b{b}"
            read = f"res{s - 1}" if (b == 0 and s > 0) else res
            spaces.append(Space(inner))
            group.append(inner)
            conv(f"{blk}.conv1", inner, read, bias)
            conv(f"{blk}.conv2", res, inner, bias)
            bn += [(f"{blk}.bn1", inner), (f"{blk}.bn2", res)]
            if b == 0 and s > 0:
                conv(f"{blk}.shortcut", res, read, bias)
                bn.append((f"{blk}.bn_short", res))
            probes += [Probe(inner, f"{blk}.conv2", "in", axis=1), Probe(res, blk, "out", axis=1)]
        stages.append(tuple(group))
    probes.insert(0, Probe("res0", "blocks.0", "in", axis=1))
    if c["batchnorm"]:       # BN's affine vectors sit on the conv's written axis; merging reads the fused form
        for module, space in bn:
            params += [Param(f"{module}.weight", (space,)), Param(f"{module}.bias", (space,))]
    return ArchSpec("resnet", spaces, params, probes=probes, output=f"res{ns - 1}", build=lambda cfg: Backbone(**cfg),
                    resize=resize, width_spaces=tuple(f"res{s}" for s in range(ns)), check=check_compatible,
                    stages=stages, merge_form=fuse_batchnorm if c["batchnorm"] else None,
                    resize_spaces=resize_spaces, defaults="resnet")


def resize(config: dict, widths: list[int]) -> dict:
    """The configuration with stage widths `widths` (inner widths follow the spaces' own sizes,
    set by `hidden` where a merge widens them)."""
    c = {**DEFAULTS, **config}
    if len(widths) != c["stages"]:
        raise ValueError(f"a ResNet takes one target width per stage ({c['stages']}), got {list(widths)}")
    if any(w < 1 for w in widths):
        raise ValueError(f"target widths must be positive, got {list(widths)}")
    return {**config, "widths": [int(w) for w in widths], "hidden": None}


def resize_spaces(config: dict, widths: dict[str, int]) -> dict:
    """The configuration whose every space has the width `widths` gives it (stage and block spaces)."""
    c = {**DEFAULTS, **config}
    ws = [widths.get(f"res{s}", w) for s, w in enumerate(stage_widths(c))]
    old = c.get("hidden") or [[w] * c["blocks"] for w in stage_widths(c)]
    hidden = [[widths.get(f"s{s}b{b}", old[s][b]) for b in range(c["blocks"])] for s in range(c["stages"])]
    return {**config, "widths": ws, "hidden": hidden}


def check_compatible(configs: list[dict]) -> None:
    for attr, what in (("blocks", "block counts"), ("stages", "stage counts"), ("channels", "input channels")):
        vals = [{**DEFAULTS, **c}[attr] for c in configs]
        if len(set(vals)) != 1:
            raise ValueError(f"cannot merge ResNets with different {what} {vals}")
    if any({**DEFAULTS, **c}["batchnorm"] for c in configs):
        raise ValueError("ResNets with BatchNorm merge in their fused form: model.merge_form() folds every "
                         "BatchNorm into its conv (foldmerge.merge and the CLI do it themselves)")


@torch.no_grad()
def fuse_batchnorm(config: dict, src) -> tuple[dict, dict]:
    """(configuration, state) of the same function as the BatchNorm ResNet backbone `src` (eval
    mode) with every BatchNorm folded into the conv before it: W' = γ/σ·W, b' = β − γ·μ/σ
    (σ = sqrt(var + eps))."""
    cfg = {**config, "batchnorm": False}
    p = next(src.parameters())
    dst = Backbone(**cfg).to(dtype=p.dtype, device=p.device)
    pairs = [("stem", "bn_stem")] + [(f"blocks.{i}.{c}", f"blocks.{i}.{n}") for i, blk in enumerate(src.blocks)
                                     for c, n in (("conv1", "bn1"), ("conv2", "bn2"), ("shortcut", "bn_short"))
                                     if getattr(blk, c) is not None]
    for conv_name, bn_name in pairs:
        conv, bn = src.get_submodule(conv_name), src.get_submodule(bn_name)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        out = dst.get_submodule(conv_name)
        out.weight.copy_(conv.weight * scale[:, None, None, None])
        out.bias.copy_(bn.bias - bn.running_mean * scale)
    return cfg, dst.state_dict()
