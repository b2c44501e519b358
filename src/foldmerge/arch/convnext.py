"""Hugging Face's ConvNeXt as a merge spec: the code a table cannot say (its table is families/convnext.json).

Why code: a ConvNeXt is stages of blocks, each stage at its own width, not one stream of layers; the
loader's transformer layouts have one width and one layer path. Spaces: per stage i the stream
`stage{i}` (channels of an image-shaped tensor), per block the MLP hidden `mlp{i}.{j}`. The patch
embedding (a conv of stride p reading the shared pixels) writes `stage0`; from stage 1 on a
LayerNorm and a 2x2 conv of stride 2 write the next stage's stream from the last one's. A block is
x + pwconv2(gelu(pwconv1(LN(dwconv(x))))) (the layer-scale gain folded into pwconv2 on loading):
the depthwise convolution acts on each channel of the stream alone, so it is declared, as the
LayerNorms are, a module that runs in merged width (`Norm`: FS-Merge learns its kernels there,
alignment methods merge them by M); pwconv1 and pwconv2 are linear maps on the channels (the
tensor is channels-last between them). The features are the final LayerNorm of the spatial mean.
"""
from __future__ import annotations

from ..spec import ArchSpec, Norm, Param, Probe, Space


def _blocks(table, c):
    """(stage i, block j, its path under the prefix) of every block."""
    for i, depth in enumerate(c["depths"]):
        for j in range(depth):
            yield i, j, f"{table.prefix}.encoder.stages.{i}.layers.{j}"


def spec(table, c: dict, build, check) -> ArchSpec:
    """The spec at config `c`; `build` makes the backbone, `check` is the family's compatibility test."""
    p, stages = table.prefix, c["num_stages"]
    if len(c["hidden_sizes"]) != stages or len(c["depths"]) != stages:
        raise ValueError(f"a convnext of {stages} stages gives {len(c['hidden_sizes'])} hidden sizes and "
                         f"{len(c['depths'])} depths")
    spaces = [Space("pixels", shared=True)] + [Space(f"stage{i}") for i in range(stages)]
    stem = f"{p}.{table.patch}"
    params = [Param(f"{stem}.weight", ("stage0", "pixels", None, None)), Param(f"{stem}.bias", ("stage0",))]
    norms = [Norm(f"{p}.embeddings.layernorm", "stage0")]
    probes = [Probe("stage0", f"{p}.embeddings.layernorm", axis=1)]
    for i in range(1, stages):
        down = f"{p}.encoder.stages.{i}.downsampling_layer"
        norms.append(Norm(f"{down}.0", f"stage{i - 1}"))
        params += [Param(f"{down}.1.weight", (f"stage{i}", f"stage{i - 1}", None, None)),
                   Param(f"{down}.1.bias", (f"stage{i}",))]
        probes.append(Probe(f"stage{i}", f"{down}.1", axis=1))
    for i, j, b in _blocks(table, c):
        s, hid = f"stage{i}", f"mlp{i}.{j}"
        spaces.append(Space(hid))
        norms += [Norm(f"{b}.dwconv", s), Norm(f"{b}.layernorm", s)]
        params += [Param(f"{b}.pwconv1.weight", (hid, s)), Param(f"{b}.pwconv1.bias", (hid,)),
                   Param(f"{b}.pwconv2.weight", (s, hid)), Param(f"{b}.pwconv2.bias", (s,))]
        probes += [Probe(s, f"{b}.dwconv", "in", axis=1), Probe(hid, f"{b}.pwconv2", "in")]
    last = f"stage{stages - 1}"
    norms.append(Norm(f"{p}.layernorm", last))
    probes.append(Probe(last, ""))
    return ArchSpec(table.family, spaces, params, norms, probes, output=last, build=build,
                    resize=lambda cfg, widths: resize(table, {**c, **cfg}, widths),
                    width_spaces=tuple(f"stage{i}" for i in range(stages)),
                    check=check, defaults="hf-vit")


def layer_scales(table, c: dict):
    """(gain, projection) of every block's layer-scale gain (none where layer_scale_init_value <= 0:
    transformers then builds no gain)."""
    if c["layer_scale_init_value"] > 0:
        for _, _, b in _blocks(table, c):
            yield f"{b}.layer_scale_parameter", f"{b}.pwconv2"


def resize(table, c: dict, widths: list[int]) -> dict:
    """The configuration at the given stage widths (the first stages'; the rest keep theirs). A block's
    MLP is four times its stage's width (transformers fixes it)."""
    sizes = list(c["hidden_sizes"])
    if not 1 <= len(widths) <= len(sizes) or any(int(w) < 1 for w in widths):
        raise ValueError(f"a convnext takes one to {len(sizes)} positive stage widths, got {list(widths)}")
    sizes[:len(widths)] = [int(w) for w in widths]
    return {**c, "hidden_sizes": sizes}

