"""How a model turns raw examples (texts, images) into the tensor its backbone reads: the model's own
preprocessing, never one of ours in its place.

  a Hugging Face model    its tokenizer (`AutoTokenizer` from its directory; truncated at its
                          position embeddings) or its image processor (`AutoImageProcessor`)
  foldmerge's models      what their built-in task's data went through: MNIST and Fashion-MNIST
                          images as 28 x 28 grey levels normalized by their data set's mean and
                          deviation; BBC texts as all-MiniLM-L6-v2's WordPiece ids, 128 at most
Tensors already preprocessed are used as they are. Texts of one merge are padded to one length
(the models of a text merge share one vocabulary, so one padding id).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .arch import encoder
from .data import texts
from .data.files import Examples, open_image
from .data.files import read as read_examples
from .data.tasks import _normalizer
from .hf import TOKENIZER_FILES, quiet_transformers
from .model import TaskModel, padding_id

# transformers is imported where a Hugging Face tokenizer or image processor is loaded: it adds
# about 2 s to every command's start (measured here), and only Hugging Face models need them
TEXT_FAMILIES = tuple(name for name, table in encoder.tables().items() if table.input == "text")
IMAGE_SIZE = 28                    # foldmerge's image models read 28 x 28 grey levels


def reads(model: TaskModel) -> str:
    """What the model's backbone reads: "text" (token ids) or "image"."""
    return "text" if model.arch in TEXT_FAMILIES else "image"


def preprocess(model: TaskModel, examples: Examples) -> torch.Tensor:
    """The tensor `model` reads for `examples` (one row per example); one line naming the data if the
    model cannot read them."""
    where = f"data {examples.source}"
    if examples.kind == "tensor":
        return examples.items
    if examples.kind != reads(model):
        raise ValueError(f"{where}: holds {examples.kind}s, but model {model.meta.get('path', '')!s} reads "
                         f"{reads(model)}s")
    if examples.kind == "text":
        return _tokens(model, list(examples.items))
    return _pixels(model, [open_image(i, where) for i in examples.items], where)


def _hf_dir(model: TaskModel) -> Path | None:
    """The Hugging Face directory whose tokenizer or image processor the model reads with: its own, or
    for a merge of Hugging Face models its export's first classifier (which carries them)."""
    if model.meta.get("source_format") == "huggingface":
        return Path(model.meta["path"])
    export = Path(model.meta.get("path", "")) / "hf"
    if model.meta.get("path") and export.is_dir():
        return next((export / t.slug for t in model.tasks if (export / t.slug / "config.json").is_file()), None)
    return None


def _tokens(model: TaskModel, items: list[str]) -> torch.Tensor:
    folder = _hf_dir(model)
    if folder is None:                                   # ours: the built-in texts' tokenizer
        return torch.from_numpy(texts.tokenize(items))
    import transformers
    files = [f for f in TOKENIZER_FILES if f != "preprocessor_config.json"]
    if not any((folder / f).is_file() for f in files):      # transformers would make an empty tokenizer: all [UNK]
        raise ValueError(f"{folder} holds no tokenizer ({', '.join(files[:3])}, …) to read texts with: save the "
                         "model's tokenizer beside it (tokenizer.save_pretrained), or give the texts as token ids "
                         "(.npy)")
    try:
        with quiet_transformers():
            tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: no tokenizer to read texts with ({str(e).strip().splitlines()[0][:160]})") \
            from None
    if len(tok) <= len(set(tok.all_special_ids)):
        raise ValueError(f"{folder}: its tokenizer has no vocabulary beyond its special tokens, so every word would "
                         "read as unknown")
    length = min(max_tokens(model), tok.model_max_length or 512)
    ids = tok(items, truncation=True, max_length=length)["input_ids"]
    empty = next((t for t, row in zip(items, ids) if t.strip() and not row), None)
    if empty is not None:
        raise ValueError(f"{folder}: its tokenizer ({type(tok).__name__}) reads the text {empty[:60]!r} as no tokens at all")
    pad = padding_id(model)
    # a causal model's (CLIP's text tower, a decoder) padding is never attended to: no padding mask
    masks = getattr(model.backbone, "pad_token_id", pad) is not None
    if masks and tok.pad_token_id is not None and tok.pad_token_id != pad:
        raise ValueError(f"{folder}: the tokenizer pads with id {tok.pad_token_id}, the model with {pad}")
    return pad_ids([torch.tensor(row, dtype=torch.long) for row in ids], pad)


def max_tokens(model: TaskModel) -> int:
    """The most tokens a text model reads: its position table's size, less the positions before the first
    one where its position ids start after the padding id (RoBERTa's)."""
    c, table = model.backbone_config, encoder.tables().get(model.arch)
    if table is None or table.roles is None:
        return c.get("max_position_embeddings", 512)
    c = encoder.config_of(table, c)
    positions = c[table.roles.positions]
    if table.roles.positions_after_pad:
        return positions - c[table.roles.pad] - 1
    return positions


def check_same_tokens(models: list[TaskModel], examples: list[Examples], sample: int = 32) -> None:
    """Refuse text models whose tokenizers split the given texts differently: up to `sample` texts of
    each model's data, tokenized by every model's own tokenizer, must give the same ids (the check of
    the tokenizers themselves, at load time, can miss a difference only these texts show)."""
    texts = [t for e in examples if e.kind == "text" for t in list(e.items)[:sample]]
    if len(models) < 2 or not texts:
        return
    ids = [_tokens(m, texts) for m in models]
    for k in range(1, len(models)):
        first, other = ids[0], ids[k]
        length = max(first.shape[1], other.shape[1])
        first, other = (pad_ids(list(t), -1, length) for t in (first, other))
        differ = (first != other).any(1).nonzero()
        if len(differ):
            i = int(differ[0])
            names = [m.meta.get("path", f"model {j + 1}") for j, m in enumerate((models[0], models[k]))]
            raise ValueError(f"{names[0]} and {names[1]} tokenize the text {texts[i][:60]!r} differently "
                             f"({_row(first[i])} vs {_row(other[i])}): their token ids would not mean the same "
                             "words; merge models that share one tokenizer")


def _row(ids: torch.Tensor) -> str:
    kept = [int(x) for x in ids if x >= 0]
    return "[" + ", ".join(map(str, kept[:8])) + (", …]" if len(kept) > 8 else "]")


def pad_ids(rows: list[torch.Tensor], pad: int, length: int | None = None) -> torch.Tensor:
    """Token id rows padded with `pad` to `length` (default: the longest)."""
    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r[:length]
    return out


def common_length(tensors: list[torch.Tensor], pad: int) -> list[torch.Tensor]:
    """Every model's token ids padded to the longest row of all (a merge stacks them)."""
    length = max(t.shape[1] for t in tensors)
    return [pad_ids(list(t), pad, length) if t.shape[1] < length else t for t in tensors]


def _pixels(model: TaskModel, images: list, where: str) -> torch.Tensor:
    folder = _hf_dir(model)
    if folder is None:                                   # ours: the built-in images' preprocessing
        task = next((t for t in model.tasks if t.builtin), None)
        if task is None:
            raise ValueError(f"{where}: the model records no preprocessing for its images")
        mean, std = _normalizer(task.dataset)
        grey = [np.asarray(i.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) / 255.0
                for i in images]
        return ((torch.from_numpy(np.stack(grey)) - mean) / std).unsqueeze(1)
    import transformers
    try:
        with quiet_transformers():
            processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: no image processor to read images with (preprocessor_config.json: "
                         f"{str(e).strip().splitlines()[0][:120]})") from None
    channels = model.backbone_config.get("num_channels", 3)
    images = [i.convert("RGB" if channels == 3 else "L") for i in images]
    try:
        return processor(images=images, return_tensors="pt")["pixel_values"]
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: the image processor cannot read these images "
                         f"({str(e).strip().splitlines()[0][:120]})") from None


def labelled(model: TaskModel, task, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, class indices) of the labelled examples `spec` names (`--eval-data`) for `task`, one of
    `model`'s: a label is one of the task's labels (a Hugging Face model's id2label names, a built-in
    task's class numbers) or a class index."""
    examples = spec if isinstance(spec, Examples) else read_examples(spec, labelled=True)
    names = {name: k for k, name in enumerate(task.labels)}
    index = []
    for value in examples.labels:
        if value in names:
            index.append(names[value])
        elif value.lstrip("-").isdigit() and 0 <= int(value) < task.num_classes and not task.builtin:
            index.append(int(value))
        else:
            raise ValueError(f"data {examples.source}: label {value!r} is none of task {task.name!r}'s "
                             f"({', '.join(task.labels[:10])}{', …' if task.num_classes > 10 else ''})")
    return preprocess(model, examples), torch.tensor(index, dtype=torch.long)
