"""BERT (post-LN), as Hugging Face's `BertModel`, described as data (FS-Merge appendix F.6; docs/architecture.md).

The backbone is `transformers.BertModel` itself, held as `bert`, so that its parameters keep
their Hugging Face names under the prefix `bert.` (as in `BertForSequenceClassification`). It
reads token ids (batch x length, padded with `pad_token_id`) and gives the pooler's output,
tanh(W h_[CLS] + b), which the task heads read, as `BertForSequenceClassification`'s
classifier does. Dropout is off (probabilities 0): a merge and its evaluation need none, and a
SuperNet with dropout would not be one function.

Spaces: the residual stream `res` (one space from the embeddings through every layer: BERT is
post-LN, each block's output is LayerNorm(x + sublayer(x)), so every LayerNorm sits on `res`);
per layer l the attention spaces `qk{l}` and `v{l}` (split into the heads) and the MLP hidden
`mlp{l}`; the pooler's output `feat`. Sites: the word, position and token-type tables are
summed into one tensor before the embeddings' LayerNorm, so one M (`embed`) merges them; Q, K
and V read the previous LayerNorm's output through one U; every other M and U is the layer's own.
"""
from __future__ import annotations

import torch
from torch import nn

from ..spec import ArchSpec, Norm, Param, Probe, Space, check_sizes, resize_transformer

# transformers is imported where a BERT is built: it adds about 2 s to every command's start
# (measured here: torch alone 2.0 s, with transformers 4.1 s), and most merges hold no BERT

DEFAULTS = {"vocab_size": 30522, "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
            "intermediate_size": 512, "max_position_embeddings": 512, "type_vocab_size": 2,
            "layer_norm_eps": 1e-12, "pad_token_id": 0, "hidden_act": "gelu"}


def hf_config(config: dict):
    from transformers import BertConfig
    c = {**DEFAULTS, **config}
    return BertConfig(**c, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      attn_implementation="eager")


class Backbone(nn.Module):
    def __init__(self, **config):
        super().__init__()
        from transformers import BertModel
        c = {**DEFAULTS, **config}
        sizes = {k: c[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size", "max_position_embeddings", "type_vocab_size")}
        check_sizes("BERT", sizes, "hidden_size", "num_attention_heads")
        self.pad_token_id = c["pad_token_id"]
        self.bert = BertModel(hf_config(c), add_pooling_layer=True)
        self.out_dim = c["hidden_size"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.is_floating_point():
            raise ValueError("a BERT reads token ids (integers), not floating-point inputs")
        mask = (ids != self.pad_token_id).long()
        return self.bert(input_ids=ids, attention_mask=mask).pooler_output


def spec(config: dict) -> ArchSpec:
    c = {**DEFAULTS, **config}
    heads = c["num_attention_heads"]
    e = "bert.embeddings"
    spaces = [Space("res"), Space("feat")]
    params = [Param(f"{e}.word_embeddings.weight", (None, "res"), merge_at="embed"),
              Param(f"{e}.position_embeddings.weight", (None, "res"), merge_at="embed"),
              Param(f"{e}.token_type_embeddings.weight", (None, "res"), merge_at="embed")]
    norms = [Norm(f"{e}.LayerNorm", "res")]
    probes = [Probe("res", f"{e}.LayerNorm")]
    reads = f"{e}.LayerNorm"                       # the LayerNorm whose output the next layer reads
    for l in range(c["num_hidden_layers"]):
        b = f"bert.encoder.layer.{l}"
        qk, v, mlp = f"qk{l}", f"v{l}", f"mlp{l}"
        spaces += [Space(qk, heads=heads), Space(v, heads=heads), Space(mlp)]
        for name, out, inp, at in (("attention.self.query", qk, "res", reads),
                                   ("attention.self.key", qk, "res", reads),
                                   ("attention.self.value", v, "res", reads),
                                   ("attention.output.dense", "res", v, None),
                                   ("intermediate.dense", mlp, "res", None),
                                   ("output.dense", "res", mlp, None)):
            params += [Param(f"{b}.{name}.weight", (out, inp), unmerge_at=at), Param(f"{b}.{name}.bias", (out,))]
        norms += [Norm(f"{b}.attention.output.LayerNorm", "res"), Norm(f"{b}.output.LayerNorm", "res")]
        probes += [Probe(qk, f"{b}.attention.self.query"), Probe(qk, f"{b}.attention.self.key"),
                   Probe(v, f"{b}.attention.self.value"), Probe(mlp, f"{b}.output.dense", "in"),
                   Probe("res", f"{b}.attention.output.LayerNorm"), Probe("res", f"{b}.output.LayerNorm")]
        reads = f"{b}.output.LayerNorm"
    params += [Param("bert.pooler.dense.weight", ("feat", "res")), Param("bert.pooler.dense.bias", ("feat",))]
    probes.append(Probe("feat", ""))
    return ArchSpec("bert", spaces, params, norms, probes, output="feat", build=lambda cfg: Backbone(**cfg),
                    resize=resize, width_spaces=("res", "mlp0"), check=check_compatible, defaults="bert")


def resize(config: dict, widths: list[int]) -> dict:
    """The configuration at hidden size widths[0] and intermediate size widths[1] (default: the source's)."""
    return resize_transformer(config, widths, "BERT", ("hidden_size", "intermediate_size"),
                              config.get("num_attention_heads", DEFAULTS["num_attention_heads"]))


def check_compatible(configs: list[dict]) -> None:
    """Same vocabulary, layer and head counts, positions and token types; else one clear error."""
    for attr, what in (("vocab_size", "vocabulary sizes"), ("num_hidden_layers", "layer counts"),
                       ("num_attention_heads", "attention head counts"),
                       ("max_position_embeddings", "position table sizes"), ("type_vocab_size", "token-type counts"),
                       ("pad_token_id", "padding token ids"), ("hidden_act", "activations")):
        vals = [c.get(attr, DEFAULTS[attr]) for c in configs]
        if len(set(map(str, vals))) != 1:
            raise ValueError(f"cannot merge BERTs with different {what} {vals}")
