"""Hugging Face encoders described as data: one table per family (`arch/families/*.json`), read here.

A family whose Hugging Face names are regular needs no code of its own: its table names the
transformers classes, the prefix its `…ForSequenceClassification` keeps the encoder under, the
tensors summed into the residual stream, each layer's modules, the layer whose output (after an
activation) the classifier reads, the classifier, and the config keys a backbone is built from.
This module turns a table into a backbone (the transformers encoder itself, held under its
prefix, so its parameters keep their Hugging Face names) and a merge spec. Adding a family is
adding a table (docs/families.md).

Two layouts. Text encoders are post-LN: every block's output is LayerNorm(x + sublayer(x)), so every
LayerNorm sits on the residual stream `res`. Image encoders (ViT, DeiT, DINOv2) are pre-LN (`_pre_ln_spec`);
their classifier reads the stream at the class token, or two vectors of it side by side (`pooling`),
and DINOv2's layer-scale gains are folded into the projections before them when a model loads. Spaces: `res`; per layer l the attention spaces
`qk{l}` and `v{l}` (split into the heads) and the MLP hidden `mlp{l}`; the features `feat` the
heads read. Where a family's embeddings have a width of their own (ELECTRA's `embedding_size`), they
live in `emb` and a projection writes `res`. Sites: the embedding tables are summed into one
tensor before the embeddings' LayerNorm, so one M (`embed`) merges them; Q, K and V read one
tensor through one U; every other M and U is the module's own. Dropout is off (a SuperNet with
dropout would not be one function).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, create_model,
                      model_validator)
from torch import nn
from torch.nn import functional as F

from ..schema import Number, first_problem
from ..spec import ArchSpec, Norm, Param, Probe, Space, Unit, check_sizes, resize_transformer
from . import convnext, hf_resnet

FOLDER = Path(__file__).parent / "families"
Name = Annotated[StrictStr, Field(min_length=1)]
# what a config key holds: a size (>= 1), an index (>= 0, or null), a positive number, any finite number
# (ConvNeXt's layer_scale_init_value: <= 0 means no gains), a name, a boolean, settings (an object of
# names, numbers and booleans: a decoder's rope_parameters)
KINDS = {"size": (Annotated[StrictInt, Field(ge=1)], None), "index": (Annotated[StrictInt, Field(ge=0)] | None, None),
         "sizes": (Annotated[list[Annotated[StrictInt, Field(ge=1)]], Field(min_length=1)] | None, None),
         "optional size": (Annotated[StrictInt, Field(ge=1)] | None, None),
         "number": (Annotated[Number, Field(gt=0)], None), "real": (Number, None), "name": (Name, None),
         "bool": (StrictBool, None), "settings": (dict[StrictStr, StrictStr | Number | StrictBool | None] | None, None)}
ACTIVATIONS = {"tanh": torch.tanh, "gelu": F.gelu, "relu": F.relu}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Attention(_Strict):
    query: Name
    key: Name
    value: Name
    output: Name
    norm: Name


class MLP(_Strict):
    up: Name
    down: Name
    norm: Name
    gate: Name | None = None                      # a gated MLP's gate (Llama's SwiGLU: down(act(gate x) * up x))


class Fused(_Strict):
    """Queries, keys and values computed by one module (GPT-2's c_attn, GPT-NeoX's query_key_value): the
    backbone holds them as three linear maps under it (`FusedQKV`: query, key, value), joined again on saving."""
    module: Name                                  # under the layer
    interleaved: StrictBool = False               # per head [q_h, k_h, v_h] (GPT-NeoX), else [q, k, v] (GPT-2)


class Features(_Strict):
    layer: Name                                   # full name in the backbone (under the prefix if inside the encoder)
    activation: Literal["tanh", "gelu", "relu"]


class Projection(_Strict):
    layer: Name                                   # under the prefix
    width: Name                                   # the config key of the embeddings' width


class Roles(_Strict):
    width: Name
    layers: Name
    heads: Name
    mlp: Name                                     # the MLP's width, or (mlp_is_ratio) its ratio to the width
    mlp_is_ratio: StrictBool = False              # DINOv2: mlp_ratio
    pad: Name | None = None                       # text: the padding id, masked out of attention
    kv_heads: Name | None = None                  # decoders: the key and value heads (grouped-query attention)
    # RoBERTa's position ids start after the padding id: a text reads at most max_position_embeddings - pad - 1
    positions_after_pad: StrictBool = False
    positions: Name = "max_position_embeddings"  # text: the position table's size (the most tokens read)
    # where the MLP's width key may be null: that many times the width (GPT-2's n_inner)
    mlp_when_null: Annotated[StrictInt, Field(ge=1)] | None = None


class Distilled(_Strict):
    """A classifier per token of two (DeiT's class and distillation tokens), their logits averaged."""
    sequence: Name
    classifiers: Annotated[list[Name], Field(min_length=2, max_length=2)]


class Classes(_Strict):
    """The transformers classes of one model type: its config, its encoder, its sequence classifier (and
    the distilled one, where the family has it)."""
    config: Name
    base: Name
    sequence: Name
    distilled: Distilled | None = None
    # where the classifier's config is another class holding the encoder's under a key (CLIP's
    # CLIPConfig with its vision_config): that class and that key
    sequence_config: Name | None = None
    section: Name | None = None


class Embedding(_Strict):
    """A table summed into the stream only where a boolean config key is set (ERNIE's task types)."""
    name: Name
    when: Name


class Token(_Strict):
    """A tensor of the stream's space summed into it (or held beside it: DINOv2's mask token), with its
    number of axes: (1, n, width) unless said."""
    name: Name
    axes: Annotated[StrictInt, Field(ge=1, le=3)] = 3


class LayerScale(_Strict):
    """Per-channel gains on a block's attention and MLP outputs (DINOv2; ConvNeXt's on its MLP): each
    folded into the output projection before it on loading (the backbone holds none), written as ones
    on saving."""
    attention: Name | None = None                 # under the layer
    mlp: Name


class Table(_Strict):
    """One family's table (a file in arch/families)."""
    family: Name
    about: Name
    model_types: dict[StrictStr, Classes] = Field(min_length=1)   # the first is the default
    layout: Literal["post-ln", "pre-ln", "decoder", "convnext", "resnet"] = "post-ln"
    input: Literal["text", "image"]
    base_arguments: dict[StrictStr, StrictBool] = {}
    prefix: Name
    embeddings: list[Name | Embedding] = []       # text: the tables summed into the stream
    embedding_norm: Name | None = None            # post-LN: the LayerNorm after that sum
    embedding_projection: Projection | None = None
    tokens: list[Name | Token] = []               # images: class (and distillation) tokens, positions
    patch: Name | None = None                     # images: the patch embedding (a Conv2d of stride p)
    patch_bias: StrictBool = True                 # CLIP's has none
    layer: Annotated[StrictStr, Field(pattern=r"\{l\}")] | None = None     # transformers: a layer's path
    attention: Attention | None = None
    mlp: MLP | None = None
    final_norm: Name | None = None                # pre-LN: the LayerNorm after the last layer
    layer_scale: LayerScale | None = None
    features: Features | None = None              # None: the stream at the first token is the features
    # images: what the classifier reads (`pooling` in docs/families.md)
    # decoders: "tokens", the final norm's output at every position (a language model's head reads each)
    pooling: Literal["first", "first+mean", "mean", "pooler", "tokens"] = "first"
    classifier: Name
    # classifier: logits of the task's classes; projection: a map into an embedding space, no bias (CLIP's towers)
    # lm: a language model's head (next-token logits over the vocabulary at every position, no bias)
    head: Literal["classifier", "projection", "lm"] = "classifier"
    requires: dict[StrictStr, StrictBool] = {}    # boolean config keys the spec covers one value of
    bias_key: Name | None = None                  # decoders: the boolean config key that gives attention biases
    attention_biases: list[Literal["query", "key", "value", "output"]] = []     # decoders: biases always there
    linear_biases: StrictBool = False             # decoders: every linear map has a bias (GPT-2, GPT-NeoX)
    rotary: StrictBool = True                     # decoders: queries and keys rotated by position (else positions
    # are a table summed into the stream, GPT-2's, and the queries' and keys' maps are learned)
    fused_qkv: Fused | None = None
    transposed: list[Name] = []                   # modules under the layer whose weights are (in, out): GPT-2's Conv1D
    tied_head: StrictBool = False                 # the LM head is the token table (GPT-2): tied in the merge too
    roles: Roles | None = None                    # transformers: which config keys size the model
    keys: dict[StrictStr, Literal["size", "optional size", "index", "number", "real", "name", "bool", "sizes",
                                  "settings"]]
    defaults: dict[StrictStr, object]
    dropout: list[Name]
    must_match: dict[StrictStr, Name]        # besides the model type

    @model_validator(mode="after")
    def _transformer_parts(self):
        if self.layout in ("post-ln", "pre-ln", "decoder") and None in (self.layer, self.attention, self.mlp,
                                                                        self.roles):
            raise ValueError(f"a {self.layout} table names its layer, attention, mlp and roles")
        f = self.fused_qkv
        if f and [self.attention.query, self.attention.key, self.attention.value] != \
                [f"{f.module}.{r}" for r in ("query", "key", "value")]:
            raise ValueError(f"a table with fused_qkv names the attention's query, key and value {f.module}.query, "
                             f"{f.module}.key and {f.module}.value")
        return self


@lru_cache(maxsize=None)
def tables() -> dict[str, Table]:
    """Every family's table, by family name; a table that does not fit the schema is a bug of ours."""
    out = {}
    for path in sorted(FOLDER.glob("*.json")):
        try:
            table = Table.model_validate(json.loads(path.read_text()))
        except ValidationError as e:
            raise RuntimeError(f"{path}: {first_problem(e)}") from None
        out[table.family] = table
    return out


def poolings(table: Table) -> tuple[str, ...]:
    """What a classifier of the family may read: the table's pooling, and both first tokens where a
    model type has a distilled classifier."""
    return (table.pooling,) + (("first+second",) if any(c.distilled for c in table.model_types.values()) else ())


@lru_cache(maxsize=None)
def _config_schema(family: str) -> type[BaseModel]:
    table = tables()[family]
    return create_model(f"{family} backbone", __config__=ConfigDict(strict=True, extra="forbid"),
                        model_type=(Literal[tuple(table.model_types)] | None, None),
                        pooling=(Literal[poolings(table)] | None, None),
                        **{k: KINDS[kind] for k, kind in table.keys.items()})


def config_of(table: Table, config: dict) -> dict:
    """`config` checked against the family's keys (one line naming the field), with the defaults filled
    in; `model_type` says which of the family's model types (and transformers classes) it is, `pooling`
    which tokens its classifier reads (foldmerge's key: the classifier class, not the encoder, says it)."""
    try:
        _config_schema(table.family).model_validate(config)
    except ValidationError as e:
        raise ValueError(f"a {table.family} backbone: {first_problem(e)}") from None
    c = {"model_type": next(iter(table.model_types)), **table.defaults, **config}
    r = table.roles
    if r is not None and r.mlp_when_null and c.get(r.mlp) is None:
        c[r.mlp] = r.mlp_when_null * c[r.width]
    return {**c, "pooling": c.get("pooling") or table.pooling}


def classes(table: Table, config: dict) -> Classes:
    return table.model_types[config_of(table, config)["model_type"]]


def hf_config(table: Table, config: dict):
    """The transformers config of a backbone at `config` (dropout off, eager attention)."""
    import transformers
    c = config_of(table, config)
    kept = {k: v for k, v in c.items() if k not in ("model_type", "pooling")}
    return getattr(transformers, classes(table, c).config)(**kept, **{k: 0.0 for k in table.dropout},
                                                            attn_implementation="eager")


def _place(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` under `root`, making empty parents as needed."""
    *parents, last = name.split(".")
    at = root
    for p in parents:
        if not hasattr(at, p):
            at.add_module(p, nn.Module())
        at = getattr(at, p)
    at.add_module(last, module)


class FusedQKV(nn.Module):
    """One module's queries, keys and values as three linear maps (each its own space in the spec),
    returning what the fused one did: [q, k, v], or per head [q_h, k_h, v_h] (`heads`, GPT-NeoX's)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, heads: int | None):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(d_in, d_out, bias=bias) for _ in range(3))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.query(x), self.key(x), self.value(x)]
        if self.heads is None:
            return torch.cat(parts, dim=-1)
        return torch.cat([p.unflatten(-1, (self.heads, -1)) for p in parts], dim=-1).flatten(-2)


def _unfuse(table: Table, config: dict, state: dict) -> dict:
    """Hugging Face's fused and transposed tensors as the backbone holds them (`FusedQKV`, nn.Linear): views
    of them where a view can be one (a transposed or a split weight), so a memory-mapped source stays
    mapped; GPT-NeoX's per-head interleaving is the one copy."""
    c, f, out = config_of(table, config), table.fused_qkv, dict(state)
    for l in range(c[table.roles.layers]):
        b = f"{table.prefix}.{table.layer.format(l=l)}"
        for name in table.transposed:
            out[f"{b}.{name}.weight"] = out[f"{b}.{name}.weight"].T
        if f:
            for kind in ("weight", "bias"):
                t = out.pop(f"{b}.{f.module}.{kind}", None)
                if t is None:
                    continue
                parts = t.unflatten(0, (c[table.roles.heads], 3, -1)).unbind(1) if f.interleaved else t.chunk(3)
                for role, part in zip(("query", "key", "value"), parts):
                    out[f"{b}.{f.module}.{role}.{kind}"] = part.reshape(-1, *t.shape[1:])
    return out


def _fuse(table: Table, config: dict, state: dict) -> dict:
    """`_unfuse` undone: the tensors as Hugging Face's modules hold them."""
    c, f, out = config_of(table, config), table.fused_qkv, dict(state)
    for l in range(c[table.roles.layers]):
        b = f"{table.prefix}.{table.layer.format(l=l)}"
        if f:
            for kind in ("weight", "bias"):
                keys = [f"{b}.{f.module}.{role}.{kind}" for role in ("query", "key", "value")]
                if keys[0] not in out:
                    continue
                parts = [out.pop(k) for k in keys]
                if f.interleaved:
                    heads = c[table.roles.heads]
                    t = torch.stack([p.unflatten(0, (heads, -1)) for p in parts], 1).flatten(0, 2)
                else:
                    t = torch.cat(parts)
                out[f"{b}.{f.module}.{kind}"] = t
        for name in table.transposed:
            out[f"{b}.{name}.weight"] = out[f"{b}.{name}.weight"].T.contiguous()
    return out


class Backbone(nn.Module):
    """The family's transformers encoder under its prefix, and the features layer where the family's
    classifier keeps it outside the encoder. Reads token ids (batch x length, padded with the pad id) or
    images (batch x channels x height x width), as its table's `input` says."""

    def __init__(self, table: Table, config: dict):
        super().__init__()
        import transformers
        c = config_of(table, config)
        r = table.roles
        for key, value in table.requires.items():
            if c[key] != value:
                raise ValueError(f"the {table.family} spec covers models with {key} {str(value).lower()}")
        if r is not None:
            check_sizes(table.family, {k: c[k] for k, kind in table.keys.items() if kind == "size"}, r.width, r.heads)
        self.family, self.pad_token_id = table.family, c[r.pad] if r is not None and r.pad else None
        encoder = getattr(transformers, classes(table, c).base)(hf_config(table, c), **table.base_arguments)
        self.add_module(table.prefix, encoder)
        for l in range(c[r.layers] if table.transposed or table.fused_qkv else 0):
            layer = encoder.get_submodule(table.layer.format(l=l))
            for name in table.transposed:            # Conv1D, weight (in, out): the nn.Linear computing the same
                old = layer.get_submodule(name)
                _place(layer, name, nn.Linear(*old.weight.shape, bias=old.bias is not None))
            if table.fused_qkv:
                old = layer.get_submodule(table.fused_qkv.module)
                _place(layer, table.fused_qkv.module,
                       FusedQKV(old.in_features, old.out_features // 3, old.bias is not None,
                                c[r.heads] if table.fused_qkv.interleaved else None))
        f = table.features
        if f and not f.layer.startswith(table.prefix + "."):
            _place(self, f.layer, nn.Linear(c[r.width], c[r.width]))
        self.features_layer, self.activation = (f.layer, ACTIVATIONS[f.activation]) if f else (None, None)
        self.reads, self.pooling = table.input, c["pooling"]
        if table.layout == "resnet":               # BatchNorms folded into the convolutions (`from_hf_state`)
            hf_resnet.fuse(encoder)
        for gain, _ in _layer_scales(table, c):      # folded into the projections before them (`from_hf_state`)
            owner, _, name = gain[len(table.prefix) + 1:].rpartition(".")
            holder = encoder.get_submodule(owner)
            if len(list(holder.parameters())) == 1:     # a module holding only the gain (DINOv2's): the identity
                _place(encoder, owner, nn.Identity())
            else:                                   # a tensor of its layer, skipped when None (ConvNeXt's)
                delattr(holder, name)
                setattr(holder, name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encoder = getattr(self, tables()[self.family].prefix)
        if self.reads == "text":
            if x.is_floating_point():
                raise ValueError(f"a {self.family} reads token ids (integers), not floating-point inputs")
            mask = None if self.pad_token_id is None else (x != self.pad_token_id).long()
            if mask is None and self.pooling == "tokens":     # a decoder reads every position (causally); said
                mask = torch.ones_like(x)                       # outright, or GPT-2 warns that none was given
            out = encoder(input_ids=x, attention_mask=mask)
            if self.pooling == "pooler":      # CLIP's text tower: the final LayerNorm at the end-of-text token
                return out.pooler_output
            if self.pooling == "tokens":      # a decoder: every position's features, for its LM head
                return out.last_hidden_state
            first = out.last_hidden_state[:, 0]
        else:
            if not x.is_floating_point():
                raise ValueError(f"a {self.family} reads images (floating point), not integers")
            # in the patch embedding's dtype (transformers' ViT casts them itself, its ConvNeXt does not)
            out = encoder(pixel_values=x.to(encoder.get_submodule(tables()[self.family].patch).weight.dtype))
            if self.pooling == "pooler":      # the encoder's own pooling (ConvNeXt: LayerNorm of the mean; ResNet: mean)
                return out.pooler_output.flatten(1)
            stream = out.last_hidden_state
            if self.pooling == "first+mean":              # the class token beside the patches' mean
                return torch.cat([stream[:, 0], stream[:, 1:].mean(1)], dim=-1)
            if self.pooling == "first+second":            # the class and distillation tokens
                return torch.cat([stream[:, 0], stream[:, 1]], dim=-1)
            if self.pooling == "mean":                    # the patches' mean (CLIP's classifier)
                return stream[:, 1:].mean(1)
            first = stream[:, 0]
        if self.features_layer is None:
            return first
        return self.activation(self.get_submodule(self.features_layer)(first))


def spec(family: str, config: dict) -> ArchSpec:
    table = tables()[family]
    if table.layout == "pre-ln":
        return _pre_ln_spec(table, config_of(table, config))
    if table.layout == "decoder":
        return _decoder_spec(table, config_of(table, config))
    if table.layout in ("convnext", "resnet"):          # stages of convolutional blocks: the spec is code
        layout = convnext if table.layout == "convnext" else hf_resnet
        return layout.spec(table, config_of(table, config), lambda cfg: Backbone(table, cfg),
                           lambda configs: check_compatible(table, configs))
    c = config_of(table, config)
    r, p = table.roles, table.prefix
    heads = c[r.heads]
    proj = table.embedding_projection
    if proj and c[proj.width] == c[r.width]:
        proj = None                              # the encoder has no projection at equal widths
    stream = "emb" if proj else "res"            # the space the embedding tables write
    spaces = [Space("res"), Space("feat")] + ([Space("emb")] if proj else [])
    present = _embeddings(table, c)
    params = [Param(f"{p}.{e}", (None, stream), merge_at="embed") for e in present]
    wb = ("weight", "bias")
    embedding_keys = tuple(f"{p}.{e}" for e in present) + tuple(f"{p}.{table.embedding_norm}.{x}" for x in wb)
    units = [Unit("embedding", "embedding", embedding_keys + (
        tuple(f"{p}.{proj.layer}.{x}" for x in wb) if proj else ()))]
    norms = [Norm(f"{p}.{table.embedding_norm}", stream)]
    probes = [Probe(stream, f"{p}.{table.embedding_norm}")]
    reads = f"{p}.{table.embedding_norm}"          # the module whose output the next layer reads
    if proj:
        params += [Param(f"{p}.{proj.layer}.weight", ("res", "emb"), unmerge_at=reads),
                   Param(f"{p}.{proj.layer}.bias", ("res",))]
        probes.append(Probe("res", f"{p}.{proj.layer}"))
        reads = f"{p}.{proj.layer}"
    a, m = table.attention, table.mlp
    for l in range(c[r.layers]):
        b, qk, v, hid = f"{p}.{table.layer.format(l=l)}", f"qk{l}", f"v{l}", f"mlp{l}"
        spaces += _block_spaces(l, heads)
        params += _block_params(table, b, l, reads)
        norms += [Norm(f"{b}.{a.norm}", "res"), Norm(f"{b}.{m.norm}", "res")]
        units += [Unit(f"{b}.attention", "attention", tuple(f"{b}.{n}.{x}" for n in (a.query, a.key, a.value, a.output)
                                                            for x in wb)),
                  Unit(f"{b}.{a.norm}", "norm", tuple(f"{b}.{a.norm}.{x}" for x in wb)),
                  Unit(f"{b}.mlp", "mlp", tuple(f"{b}.{n}.{x}" for n in (m.up, m.down) for x in wb)),
                  Unit(f"{b}.{m.norm}", "norm", tuple(f"{b}.{m.norm}.{x}" for x in wb))]
        probes += [Probe(qk, f"{b}.{a.query}"), Probe(qk, f"{b}.{a.key}"), Probe(v, f"{b}.{a.value}"),
                   Probe(hid, f"{b}.{m.down}", "in"), Probe("res", f"{b}.{a.norm}"), Probe("res", f"{b}.{m.norm}")]
        reads = f"{b}.{m.norm}"
    f = table.features.layer
    params += [Param(f"{f}.weight", ("feat", "res")), Param(f"{f}.bias", ("feat",))]
    probes.append(Probe("feat", ""))
    units.append(Unit(f, "output", (f"{f}.weight", f"{f}.bias")))
    return ArchSpec(family, spaces, params, norms, probes, output="feat", build=lambda cfg: Backbone(table, cfg),
                    resize=lambda cfg, widths: resize(table, cfg, widths), width_spaces=("res", "mlp0"),
                    check=lambda configs: check_compatible(table, configs), units=units, defaults="bert",
                    depth=lambda cfg: config_of(table, cfg)[r.layers])


def _embeddings(table: Table, c: dict) -> list[str]:
    """The text tables a model of `c` sums into its stream (a token-type table only where it has types, an
    `Embedding` only where its switch is set)."""
    return [e.name if isinstance(e, Embedding) else e for e in table.embeddings
            if (c[e.when] if isinstance(e, Embedding) else "token_type" not in e or c.get("type_vocab_size", 1) > 0)]


def _block_spaces(l: int, heads: int) -> list[Space]:
    """Block l's own spaces: query/key and value, split into the heads, and the MLP hidden."""
    return [Space(f"qk{l}", heads=heads), Space(f"v{l}", heads=heads), Space(f"mlp{l}")]


def _block_params(table: Table, b: str, l: int, reads: str) -> list[Param]:
    """Block l's (at `b`) linear maps, in either layout: Q, K and V read the stream through one U at the
    module `reads` (post-LN: the previous LayerNorm; pre-LN: the block's own), every other map through its own."""
    a, m, qk, v, hid = table.attention, table.mlp, f"qk{l}", f"v{l}", f"mlp{l}"
    params = []
    for name, out, inp, at in ((a.query, qk, "res", reads), (a.key, qk, "res", reads), (a.value, v, "res", reads),
                               (a.output, "res", v, None), (m.up, hid, "res", None), (m.down, "res", hid, None)):
        params += [Param(f"{b}.{name}.weight", (out, inp), unmerge_at=at), Param(f"{b}.{name}.bias", (out,))]
    return params


def _pre_ln_spec(table: Table, c: dict) -> ArchSpec:
    """A pre-LN encoder (ViT, DeiT; CLIP's text tower): the stream `res` is written by the patch
    embedding (a linear map at every patch location, reading the shared pixels) summed with the tokens
    and the position table, or for text by the token and position tables, so one M (`embed`) merges them all; every block reads it through the LayerNorm
    before its attention and the one before its MLP; the final LayerNorm's output at the first token
    is the features (the output space is `res` itself)."""
    r, p, a, m = table.roles, table.prefix, table.attention, table.mlp
    heads = c[r.heads]
    if table.input == "text":                    # CLIP's text tower: token and position tables summed
        spaces = [Space("res")]
        params = [Param(f"{p}.{e}", (None, "res"), merge_at="embed") for e in _embeddings(table, c)]
    else:
        spaces = [Space("pixels", shared=True), Space("res")]
        tokens = [t if isinstance(t, Token) else Token(name=t) for t in table.tokens]
        params = [Param(f"{p}.{t.name}", (None,) * (t.axes - 1) + ("res",), merge_at="embed") for t in tokens]
        params += [Param(f"{p}.{table.patch}.weight", ("res", "pixels", None, None), merge_at="embed")]
        if table.patch_bias:
            params.append(Param(f"{p}.{table.patch}.bias", ("res",), merge_at="embed"))
    norms, probes = [], []
    if table.embedding_norm:                     # CLIP's: the stream starts as the embeddings' LayerNorm
        norms.append(Norm(f"{p}.{table.embedding_norm}", "res"))
        probes.append(Probe("res", f"{p}.{table.embedding_norm}"))
    for l in range(c[r.layers]):
        b, qk, v, hid = f"{p}.{table.layer.format(l=l)}", f"qk{l}", f"v{l}", f"mlp{l}"
        before = f"{b}.{a.norm}"
        spaces += _block_spaces(l, heads)
        params += _block_params(table, b, l, before)
        norms += [Norm(before, "res"), Norm(f"{b}.{m.norm}", "res")]
        probes += [Probe("res", before, "in"), Probe(qk, f"{b}.{a.query}"), Probe(qk, f"{b}.{a.key}"),
                   Probe(v, f"{b}.{a.value}"), Probe(hid, f"{b}.{m.down}", "in")]
    norms.append(Norm(f"{p}.{table.final_norm}", "res"))
    copies = 2 if c["pooling"] in ("first+mean", "first+second") else 1
    # the features are the final norm's output at the first token, or two vectors of it side by side
    probes += [Probe("res", f"{p}.{table.final_norm}", "in"),
               Probe("res", "") if copies == 1 else Probe("res", f"{p}.{table.final_norm}")]
    return ArchSpec(table.family, spaces, params, norms, probes, output="res", feature_copies=copies,
                    build=lambda cfg: Backbone(table, cfg), resize=lambda cfg, widths: resize(table, cfg, widths),
                    width_spaces=("res", "mlp0"), check=lambda configs: check_compatible(table, configs),
                    defaults="hf-vit", depth=lambda cfg: config_of(table, cfg)[r.layers],
                    deepen=lambda cfg, backbone, depth: deepen(table, cfg, backbone, depth))


def _decoder_spec(table: Table, c: dict) -> ArchSpec:
    """A pre-norm decoder (Llama, Mistral, Qwen2, GPT-NeoX; GPT-2): the token table (and GPT-2's position
    table) writes the stream `res`. Where queries and keys are rotated by position after their
    projections (`rotary`), their spaces `q{l}` and `k{l}` are fixed (`Space.fixed`: per-source multiples
    of the identity commute with the rotations; a learned map would mix rotation frequencies; a partial
    rotary, GPT-NeoX's, is fixed whole); else they share one learned space `qk{l}`, as in an encoder. The
    values `v{l}` are learned where every query head has its own (the output projection reads them), and
    fixed under grouped-query attention, where the output projection reads `o{l}`, each query head's
    weighted values of its group (`Space.derived`). The MLP's up (and a gated MLP's gate) projection
    writes `mlp{l}`, its down projection reads it. GPT-NeoX's parallel attention and MLP both read the
    stream through their norms as a sequential block does, so the spec is the same. The features are
    the final norm's output at every position, which the LM head reads; where the head is the token
    table (`tied_head`), the merge keeps it so (`ArchSpec.tied_output`)."""
    r, p, a, m = table.roles, table.prefix, table.attention, table.mlp
    heads, kv = c[r.heads], c[r.kv_heads] if r.kv_heads else c[r.heads]
    grouped = kv != heads
    roles = {"query": a.query, "key": a.key, "value": a.value, "output": a.output}
    biased = set(roles.values()) if c.get(table.bias_key or "", False) else {roles[x] for x in table.attention_biases}
    if table.linear_biases:
        biased |= set(roles.values()) | {m.up, m.down, m.gate}
    spaces = [Space("res")]
    params = [Param(f"{p}.{e}", (None, "res"), merge_at="embed") for e in _embeddings(table, c)]
    norms, probes = [], []
    for l in range(c[r.layers]):
        b, v, o, hid = (f"{p}.{table.layer.format(l=l)}", f"v{l}", f"o{l}", f"mlp{l}")
        q, k = (f"q{l}", f"k{l}") if table.rotary else (f"qk{l}", f"qk{l}")
        before = f"{b}.{a.norm}"
        spaces += ([Space(q, heads=heads, fixed=True), Space(k, heads=kv, fixed=True)] if table.rotary else
                   [Space(q, heads=heads)])
        spaces += [Space(v, heads=kv, fixed=grouped), Space(hid)] + ([Space(o, heads=heads, derived=True)]
                                                                     if grouped else [])
        reads = o if grouped else v
        mlp = ([(m.gate, hid, "res", f"{b}.{m.norm}")] if m.gate else []) + [(m.up, hid, "res", f"{b}.{m.norm}"),
                                                                            (m.down, "res", hid, None)]
        for name, out, inp, at in ((a.query, q, "res", before), (a.key, k, "res", before), (a.value, v, "res", before),
                                   (a.output, "res", reads, None), *mlp):
            params.append(Param(f"{b}.{name}.weight", (out, inp), unmerge_at=at))
            if name in biased:
                params.append(Param(f"{b}.{name}.bias", (out,)))
        norms += [Norm(before, "res"), Norm(f"{b}.{m.norm}", "res")]
        probes += [Probe("res", before, "in"), Probe(q, f"{b}.{a.query}"), Probe(k, f"{b}.{a.key}"),
                   Probe(v, f"{b}.{a.value}"), Probe(reads, f"{b}.{a.output}", "in"), Probe(hid, f"{b}.{m.down}", "in")]
    norms.append(Norm(f"{p}.{table.final_norm}", "res"))
    probes += [Probe("res", f"{p}.{table.final_norm}", "in"), Probe("res", "")]
    return ArchSpec(table.family, spaces, params, norms, probes, output="res",
                    build=lambda cfg: Backbone(table, cfg), resize=lambda cfg, widths: resize(table, cfg, widths),
                    width_spaces=("res", "mlp0"), check=lambda configs: check_compatible(table, configs),
                    defaults="hf-vit", depth=lambda cfg: config_of(table, cfg)[r.layers],
                    deepen=lambda cfg, backbone, depth: deepen(table, cfg, backbone, depth),
                    tied_output="embed" if table.tied_head else None)


def _layer_scales(table: Table, config: dict):
    """(gain key, projection) of every layer-scale gain of the backbone, with the prefix."""
    if table.layout == "convnext":
        yield from convnext.layer_scales(table, config_of(table, config))
        return
    if table.layout == "resnet":
        return
    ls, n = table.layer_scale, config_of(table, config)[table.roles.layers]
    for l in range(n if ls else 0):
        b = f"{table.prefix}.{table.layer.format(l=l)}"
        yield f"{b}.{ls.attention}", f"{b}.{table.attention.output}"
        yield f"{b}.{ls.mlp}", f"{b}.{table.mlp.down}"


def from_hf_state(table: Table, config: dict, state: dict) -> dict:
    """A Hugging Face state as the backbone holds it: each layer-scale gain g folded into the projection
    whose output it scales (g * (W x + b) = (g W) x + g b), each BatchNorm into its convolution."""
    if table.layout == "resnet":
        return hf_resnet.fold_batchnorm(state)
    out = _unfuse(table, config, state) if table.fused_qkv or table.transposed else dict(state)
    for gain, proj in _layer_scales(table, config):
        g = out.pop(gain)
        out[f"{proj}.weight"] = out[f"{proj}.weight"] * g[:, None]
        out[f"{proj}.bias"] = out[f"{proj}.bias"] * g
    return out


def to_hf_state(table: Table, config: dict, state: dict) -> dict:
    """The backbone's state as Hugging Face's class holds it: the gains as ones (they are folded in), the
    BatchNorms passing their input through."""
    if table.layout == "resnet":
        return hf_resnet.unfuse(state)
    out = dict(state)
    for gain, proj in _layer_scales(table, config):
        out[gain] = torch.ones_like(out[f"{proj}.bias"])
    return _fuse(table, config, out) if table.fused_qkv or table.transposed else out


def deepen(table: Table, config: dict, backbone: nn.Module, depth: int) -> tuple[dict, dict]:
    """A pre-LN backbone with identity blocks appended up to `depth` blocks: each a copy of the last
    block with its attention output and MLP down projections zero, so it adds nothing to the stream
    and the deeper model computes what the source does."""
    r, p = table.roles, table.prefix
    have = config_of(table, config)[r.layers]
    state = backbone.state_dict()
    last = f"{p}.{table.layer.format(l=have - 1)}."
    zero = tuple(f"{n}." for n in (table.attention.output, table.mlp.down))
    for l in range(have, depth):
        new = f"{p}.{table.layer.format(l=l)}."
        for k, v in list(state.items()):
            if k.startswith(last):
                rest = k[len(last):]
                state[new + rest] = torch.zeros_like(v) if rest.startswith(zero) else v.clone()
    return {**config, r.layers: depth}, state


def resize(table: Table, config: dict, widths: list[int]) -> dict:
    """The configuration at hidden size widths[0] and MLP width widths[1] (default: the source's)."""
    r, proj = table.roles, table.embedding_projection
    if table.layout == "convnext":
        return convnext.resize(table, config_of(table, config), widths)
    if table.layout == "resnet":
        return hf_resnet.resize(config_of(table, config), widths)
    if r.mlp_is_ratio:                           # the MLP's width is a ratio of the stream's
        c = config_of(table, config)
        mlp = int(c[r.width] * c[r.mlp]) if len(widths) < 2 else int(widths[1])
        out = resize_transformer(config, widths[:1], table.family, (r.width,), c[r.heads])
        if mlp % out[r.width]:                   # transformers takes a whole ratio
            raise ValueError(f"a {table.family}'s MLP width is a whole {r.mlp} times its width; {mlp} is not one at "
                             f"width {out[r.width]}")
        return {**out, r.mlp: mlp // out[r.width]}
    out = resize_transformer(config, widths, table.family, (r.width, r.mlp), config.get(r.heads, table.defaults[r.heads]))
    c = {**table.defaults, **config}
    if proj and c[proj.width] == c[r.width]:
        out[proj.width] = out[r.width]           # embeddings in the residual stream: they take its width
    return out


def check_compatible(table: Table, configs: list[dict]) -> None:
    """Equal values of the keys that must match (layer and head counts, vocabulary…); else one clear error."""
    for key, what in {"model_type": "model types", "pooling": "classifier inputs (tokens read)",
                      **table.must_match}.items():
        vals = [config_of(table, c)[key] for c in configs]
        if len(set(map(str, vals))) != 1:
            raise ValueError(f"cannot merge {table.family} models with different {what} {vals}")
