"""Hugging Face's ResNet as a merge spec: the code a table cannot say (its table is families/hf-resnet.json).

Why code: a ResNet is stages of blocks whose shortcut is the identity or a projection, so which space
a block writes depends on the block; and every convolution is followed by a BatchNorm. The BatchNorm
is folded into the convolution before it when a model loads (exact in eval mode:
W' = W·γ/√(σ²+ε), b' = β − μγ/√(σ²+ε)); the backbone holds convolutions with biases and no
BatchNorm (`fuse`), and a saved model gets BatchNorms that pass their input through (`unfuse`).
Spaces: the stream after the stem (`stem`) and after every block that projects its shortcut
(`res{i}.{j}`); an identity shortcut keeps the stream's space, so the blocks it joins write into it.
Each block's inner convolutions write spaces of their own (`conv{i}.{j}.{k}`). The features are
the spatial mean of the last block's output.
"""
from __future__ import annotations

import torch
from torch import nn

from ..spec import ArchSpec, Param, Probe, Space


def _layers(c: dict):
    """(stage, block, in width, out width, stride) of every block, as transformers builds them."""
    width = c["embedding_size"]
    for i, (out, depth) in enumerate(zip(c["hidden_sizes"], c["depths"])):
        for j in range(depth):
            stride = (2 if i > 0 or c["downsample_in_first_stage"] else 1) if j == 0 else 1
            yield i, j, width, out, stride
            width = out


def spec(table, c: dict, build, check) -> ArchSpec:
    """The spec at config `c`; `build` makes the backbone, `check` is the family's compatibility test."""
    p = table.prefix
    if len(c["hidden_sizes"]) != len(c["depths"]):
        raise ValueError(f"a resnet gives {len(c['hidden_sizes'])} hidden sizes and {len(c['depths'])} depths")
    convs = 2 if c["layer_type"] == "basic" else 3
    stem = f"{p}.embedder.embedder.convolution"
    spaces = [Space("pixels", shared=True), Space("stem")]
    params = [Param(f"{stem}.weight", ("stem", "pixels", None, None)), Param(f"{stem}.bias", ("stem",))]
    probes = [Probe("stem", f"{p}.embedder", axis=1)]
    stream, stage_spaces = "stem", []
    for i, j, cin, cout, stride in _layers(c):
        b = f"{p}.encoder.stages.{i}.layers.{j}"
        inner = stream                           # what the block reads
        if cin != cout or stride != 1:           # a projected shortcut starts a new stream space
            stream = f"res{i}.{j}"
            spaces.append(Space(stream))
            params += [Param(f"{b}.shortcut.convolution.weight", (stream, inner, None, None)),
                       Param(f"{b}.shortcut.convolution.bias", (stream,))]
        if j == c["depths"][i] - 1:
            stage_spaces.append(stream)
        for k in range(convs):
            writes = stream if k == convs - 1 else f"conv{i}.{j}.{k}"
            if writes != stream:
                spaces.append(Space(writes))
                probes.append(Probe(writes, f"{b}.layer.{k}", axis=1))
            conv = f"{b}.layer.{k}.convolution"
            params += [Param(f"{conv}.weight", (writes, inner, None, None)), Param(f"{conv}.bias", (writes,))]
            inner = writes
        probes.append(Probe(stream, b, axis=1))
    probes.append(Probe(stream, ""))
    return ArchSpec(table.family, spaces, params, [], probes, output=stream, build=build,
                    resize=lambda cfg, widths: resize({**c, **cfg}, widths),
                    width_spaces=tuple(stage_spaces),
                    check=check, defaults="resnet")


def resize(c: dict, widths: list[int]) -> dict:
    """The configuration at the given stage widths (the first stages'; the rest keep theirs)."""
    sizes = list(c["hidden_sizes"])
    if not 1 <= len(widths) <= len(sizes) or any(int(w) < 1 for w in widths):
        raise ValueError(f"a resnet takes one to {len(sizes)} positive stage widths, got {list(widths)}")
    shares = c["embedding_size"] == sizes[0] and not c["downsample_in_first_stage"]   # stage 0 adds to the stem
    sizes[:len(widths)] = [int(w) for w in widths]
    return {**c, "hidden_sizes": sizes, **({"embedding_size": sizes[0]} if shares else {})}



def _norms(state: dict):
    """The path of every convolution that a BatchNorm follows (`X.convolution`, `X.normalization`)."""
    return [k[:-len(".normalization.running_mean")] for k in state if k.endswith(".normalization.running_mean")]


def fuse(encoder: nn.Module) -> None:
    """Every convolution a BatchNorm follows gets a bias, and the BatchNorm becomes the identity."""
    for path in _norms(encoder.state_dict()):
        owner = encoder.get_submodule(path)
        conv = owner.convolution
        owner.convolution = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                      conv.padding, conv.dilation, conv.groups, bias=True)
        owner.normalization = nn.Identity()


def fold_batchnorm(state: dict, eps: float = 1e-5) -> dict:
    """A Hugging Face state with each BatchNorm folded into the convolution before it (eval mode)."""
    out = dict(state)
    for path in _norms(state):
        n = f"{path}.normalization"
        scale = out.pop(f"{n}.weight") / torch.sqrt(out.pop(f"{n}.running_var") + eps)
        out[f"{path}.convolution.weight"] = out[f"{path}.convolution.weight"] * scale[:, None, None, None]
        out[f"{path}.convolution.bias"] = out.pop(f"{n}.bias") - out.pop(f"{n}.running_mean") * scale
        out.pop(f"{n}.num_batches_tracked", None)
    return out


def unfuse(state: dict, eps: float = 1e-5) -> dict:
    """The fused state as Hugging Face's modules hold it: each bias in a BatchNorm that otherwise passes
    its input through (mean 0, variance 1, gain √(1+ε), so that the gain over √(variance+ε) is one)."""
    out = dict(state)
    for key in [k for k in state if k.endswith(".convolution.bias")]:
        n = key[:-len(".convolution.bias")] + ".normalization"
        bias = out.pop(key)
        out.update({f"{n}.weight": torch.full_like(bias, (1 + eps) ** 0.5), f"{n}.bias": bias,
                    f"{n}.running_mean": torch.zeros_like(bias), f"{n}.running_var": torch.ones_like(bias),
                    f"{n}.num_batches_tracked": torch.zeros((), dtype=torch.long)})
    return out
