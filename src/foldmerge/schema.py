"""The model config files foldmerge reads, each checked against one schema at the edge.

A model directory's `config.json` is foldmerge's (`arch`: a `TaskModel` or a gated model) or
Hugging Face's (`model_type`; only the fields foldmerge reads are checked, the rest are
transformers'). The schemas are strict: a string is not a number ("16" is not 16), nor a boolean
("false" is not false), a number is not a boolean, and a list holds what it says. A file that does
not fit is refused in one line naming the file, the field, what was found and what is expected,
before a model is built from it.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, JsonValue, StrictBool, StrictInt, StrictStr,
                      ValidationError, validate_call)

from .errors import ModelFileError

Positive = Annotated[StrictInt, Field(ge=1)]
Name = Annotated[StrictStr, Field(min_length=1)]
# finite; in a strict model an int is a number, a boolean or a string is not
Number = Annotated[float, Field(allow_inf_nan=False)]
Probability = Annotated[Number, Field(ge=0, le=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class OwnTask(_Strict):
    """A task that is a model's head (no built-in data set): its name and its class labels in order."""
    name: Name
    labels: list[Union[StrictStr, StrictInt]] = Field(min_length=2)


class ModelConfig(_Strict):
    """foldmerge's own config.json (`TaskModel.config`, and `GatedModel.config` with kind "gated")."""
    arch: Name
    backbone: dict[StrictStr, JsonValue]
    tasks: list[Union[Name, OwnTask]] = Field(min_length=1)
    head_bias: StrictBool = True
    head: Literal["linear", "class-embedding", "projection", "lm"] = "linear"
    kind: Literal["gated"] | None = None
    gated: list[Name] = []
    gate: dict[StrictStr, Positive] | None = None
    meta: dict[StrictStr, JsonValue] = {}


class HFConfig(BaseModel):
    """The fields of a Hugging Face config.json that foldmerge reads; the others are transformers'.
    Each may be absent; present, it holds what it says (null is not a size)."""
    model_config = ConfigDict(strict=True, extra="allow")
    model_type: Name
    architectures: list[Name] = None
    id2label: dict[StrictStr, StrictStr] = None
    num_labels: Positive = None
    vocab_size: Positive = None
    hidden_size: Positive = None
    num_hidden_layers: Positive = None
    num_attention_heads: Positive = None
    intermediate_size: Positive = None
    max_position_embeddings: Positive = None
    type_vocab_size: Positive = None
    image_size: Positive = None
    patch_size: Positive = None
    num_channels: Positive = None
    layer_norm_eps: Annotated[Number, Field(gt=0)] = None
    pad_token_id: Annotated[StrictInt, Field(ge=0)] | None = None        # null: no padding token
    hidden_act: Name = None
    qkv_bias: StrictBool = None
    foldmerge_task: Name = None
    # the other families' sizes, and the fields of every transformers config its loader reads before ours
    embedding_size: Positive = None
    dim: Positive = None
    n_layers: Positive = None
    n_heads: Positive = None
    hidden_dim: Positive = None
    label2id: dict[StrictStr, Annotated[StrictInt, Field(ge=0)]] = None
    hidden_dropout_prob: Probability = None
    attention_probs_dropout_prob: Probability = None
    classifier_dropout: Probability | None = None
    dropout: Probability = None
    attention_dropout: Probability = None
    seq_classif_dropout: Probability = None
    initializer_range: Annotated[Number, Field(ge=0)] = None
    is_decoder: StrictBool = None
    tie_word_embeddings: StrictBool = None
    use_cache: StrictBool = None
    dtype: Literal["float32", "float16", "bfloat16", "float64", "auto"] | None = None
    torch_dtype: Literal["float32", "float16", "bfloat16", "float64", "auto"] | None = None


class LoopState(_Strict):
    """The training loop that was running when a checkpoint was written (`checkpoint.Checkpoint.save`)."""
    fit: Annotated[StrictInt, Field(ge=0)]
    epoch: Annotated[StrictInt, Field(ge=0)]
    step: Annotated[StrictInt, Field(ge=0)]
    history: list[float]            # a loss may have been inf
    opt_state: dict[Annotated[StrictStr, Field(pattern=r"^\d+$")], dict[StrictStr, JsonValue]]
    param_groups: list[dict[StrictStr, JsonValue]]


class CheckpointState(_Strict):
    """A checkpoint's state.json: the run's fingerprint, the save interval, the loss histories of the
    loops that finished (by loop number), the running loop, and the integrity hash over both files."""
    fingerprint: dict[StrictStr, JsonValue]
    every: Positive
    finished: dict[Annotated[StrictStr, Field(pattern=r"^\d+$")], list[float]]
    current: LoopState | None
    integrity: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]


def strict_arguments(fn):
    """`fn` whose arguments are checked against its annotations first, strictly (a family's Backbone
    constructor: its signature is the schema of its `backbone` config); one ValueError line naming
    the argument, what was found and what is expected."""
    checked = validate_call(fn, config=ConfigDict(strict=True, arbitrary_types_allowed=True))

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return checked(*args, **kwargs)
        except ValidationError as e:
            raise ValueError(first_problem(e)) from None
    return call


def check(schema: type[BaseModel], data, where: Path | str) -> dict:
    """`data` if it fits `schema`; else one line: the file, the first field that does not fit, what was
    found and what is expected."""
    try:
        schema.model_validate(data)
    except ValidationError as e:
        raise ModelFileError(f"{where}: {first_problem(e)}") from None
    return data


def first_problem(e: ValidationError) -> str:
    # the most specific error: of a union (a task is a name or a head), the branch that got furthest
    err = max(e.errors(), key=lambda x: len(x["loc"]))
    loc = [p for p in err["loc"] if isinstance(p, int) or not re.search(r"^[A-Z]|[-\[]", p)]
    field = ".".join(str(p) for p in loc)
    found = repr(err.get("input"))
    found = found if len(found) <= 40 else found[:37] + "..."
    if err["type"] == "missing":
        return f"the field {field!r} is missing"
    if err["type"] == "extra_forbidden":
        return f"unknown field {field!r}"
    return f"{'field ' + repr(field) if field else 'the file'}: found {found}, expected {_expected(err)}"


def _expected(err: dict) -> str:
    if err["type"] in ("dict_type", "model_type", "model_attributes_type"):
        return "a JSON object"
    if err["type"] == "too_short":
        n = err.get("ctx", {}).get("min_length", 1)
        return f"at least {n} item{'s' if n != 1 else ''}"
    msg = err["msg"]
    for prefix in ("Input should be ", "Value should be ", "Input should have "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg[0].lower() + msg[1:]
