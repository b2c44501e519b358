"""Hugging Face's `ViTModel` (pre-LN) as the `hf-vit` family: ViT checkpoints where users keep them.

The backbone is `transformers.ViTModel` without its pooler, held as `vit`, so its parameters keep
their Hugging Face names under `vit.` (as in `ViTForImageClassification`). Its features are the
final LayerNorm's output at the CLS token, which `ViTForImageClassification`'s classifier reads.
Dropout is off. Parameter names are those of the installed transformers' modules (5.x:
`vit.layers.{l}.attention.q_proj`, `….mlp.fc1`); `from_pretrained` maps checkpoints to them.

Spaces as in our own ViT (`arch.vit`): the shared pixels, the residual stream `res`, per layer
`qk{l}` and `v{l}` (split into heads) and `mlp{l}`. The patch embedding is a Conv2d of stride p,
a linear map at every patch location: its weight (out, in, p, p) has one merged axis, the
written `res` (it reads the shared pixels), so it is merged by the `embed` M with the class
token, position table and its bias, which are summed into one tensor. The output space is `res`
itself (no projection): the heads read the merged stream after the final LayerNorm.
"""
from __future__ import annotations

import torch
from torch import nn

from ..spec import ArchSpec, Norm, Param, Probe, Space, check_sizes, resize_transformer

# transformers is imported where a Hugging Face ViT is built: it adds about 2 s to every command's start
# (measured here: torch alone 2.0 s, with transformers 4.1 s), and most merges hold no Hugging Face ViT

DEFAULTS = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128,
            "image_size": 28, "patch_size": 7, "num_channels": 1, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
            "qkv_bias": True}


def hf_config(config: dict):
    from transformers import ViTConfig
    return ViTConfig(**{**DEFAULTS, **config}, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     attn_implementation="eager")


class Backbone(nn.Module):
    def __init__(self, **config):
        super().__init__()
        from transformers import ViTModel
        c = {**DEFAULTS, **config}
        sizes = {k: c[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                   "image_size", "patch_size", "num_channels")}
        check_sizes("ViT", sizes, "hidden_size", "num_attention_heads")
        if not c["qkv_bias"]:
            raise ValueError("the hf-vit spec covers ViTs with query/key/value biases (qkv_bias true)")
        self.vit = ViTModel(hf_config(c), add_pooling_layer=False)
        self.out_dim = c["hidden_size"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).last_hidden_state[:, 0]


def spec(config: dict) -> ArchSpec:
    c = {**DEFAULTS, **config}
    heads = c["num_attention_heads"]
    e = "vit.embeddings"
    spaces = [Space("pixels", shared=True), Space("res")]
    params = [Param(f"{e}.cls_token", (None, None, "res"), merge_at="embed"),
              Param(f"{e}.position_embeddings", (None, None, "res"), merge_at="embed"),
              Param(f"{e}.patch_embeddings.projection.weight", ("res", "pixels", None, None), merge_at="embed"),
              Param(f"{e}.patch_embeddings.projection.bias", ("res",), merge_at="embed")]
    norms, probes = [], []
    for l in range(c["num_hidden_layers"]):
        b = f"vit.layers.{l}"
        qk, v, mlp = f"qk{l}", f"v{l}", f"mlp{l}"
        spaces += [Space(qk, heads=heads), Space(v, heads=heads), Space(mlp)]
        for name, out, inp, at in (("attention.q_proj", qk, "res", f"{b}.layernorm_before"),
                                   ("attention.k_proj", qk, "res", f"{b}.layernorm_before"),
                                   ("attention.v_proj", v, "res", f"{b}.layernorm_before"),
                                   ("attention.o_proj", "res", v, None),
                                   ("mlp.fc1", mlp, "res", None), ("mlp.fc2", "res", mlp, None)):
            params += [Param(f"{b}.{name}.weight", (out, inp), unmerge_at=at), Param(f"{b}.{name}.bias", (out,))]
        norms += [Norm(f"{b}.layernorm_before", "res"), Norm(f"{b}.layernorm_after", "res")]
        probes += [Probe("res", f"{b}.layernorm_before", "in"), Probe(qk, f"{b}.attention.q_proj"),
                   Probe(qk, f"{b}.attention.k_proj"), Probe(v, f"{b}.attention.v_proj"),
                   Probe(mlp, f"{b}.mlp.fc2", "in")]
    norms.append(Norm("vit.layernorm", "res"))
    probes += [Probe("res", "vit.layernorm", "in"), Probe("res", "")]
    return ArchSpec("hf-vit", spaces, params, norms, probes, output="res", build=lambda cfg: Backbone(**cfg),
                    resize=resize, width_spaces=("res", "mlp0"), check=check_compatible, defaults="hf-vit")


def resize(config: dict, widths: list[int]) -> dict:
    return resize_transformer(config, widths, "ViT", ("hidden_size", "intermediate_size"),
                              config.get("num_attention_heads", DEFAULTS["num_attention_heads"]))


def check_compatible(configs: list[dict]) -> None:
    for attr, what in (("num_hidden_layers", "layer counts"), ("num_attention_heads", "attention head counts"),
                       ("patch_size", "patch sizes"), ("image_size", "image sizes"),
                       ("num_channels", "channel counts"), ("hidden_act", "activations")):
        vals = [c.get(attr, DEFAULTS[attr]) for c in configs]
        if len(set(map(str, vals))) != 1:
            raise ValueError(f"cannot merge ViTs with different {what} {vals}")
