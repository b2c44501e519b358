"""Hugging Face directories in and out: merge the models users keep as `save_pretrained` folders.

In: `load_hf(dir, task)` reads a classifier directory of a family with a table
(`arch/families/*.json`: `BertForSequenceClassification`, `RobertaForSequenceClassification`, …,
`ViTForImageClassification`, `DeiTForImageClassification` (and `…WithTeacher`: one head on both tokens),
`Dinov2ForImageClassification`, `CLIPForImageClassification`, `ConvNextForImageClassification`,
`ResNetForImageClassification`; its
`config.json` names the class;
weights through `from_pretrained(dir, local_files_only=True)`, safetensors, never remote code) as a
one-head TaskModel of that family: the backbone is its encoder (under the table's prefix) and the
features layer where the classifier keeps one beside it, the head its classifier. A `BertModel`
directory (no head, e.g. all-MiniLM-L6-v2) is a start to fine-tune from (`load_backbone`,
`train-sources --from`); another headless encoder is refused as a merge input with the reason. The
task is given, or read from the `foldmerge_task` key a directory written here carries, or is the
model's head (its labels and the directory's name).

Out: `write_hf(merged, dir, sources)` writes what standard code loads (`save_hf` into a fresh
directory swapped into place; a merge writes it inside its output directory, in the same swap):
  OUT/backbone/        the merged encoder (`BertModel`, `ViTModel`, …): config.json, backbone.safetensors and its index
  OUT/<task>/          per task a `…ForSequenceClassification` / `…ForImageClassification` whose classifier is that task's
                       merged head (the folded U inside it), `id2label` kept from its source,
                       so `AutoModelFor…Classification.from_pretrained(OUT/<task>)` gives
                       the merged model's predictions for that task; its weights are two shards,
                       backbone.safetensors (a hard link to the backbone's: on disk once) and
                       classifier.safetensors
and copies the tokenizer (or image processor) files of the first source into each.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .arch import encoder
from .data import Task
from .io import (ModelFileError, check_finite, load_pickle, map_tensors, parameters_on_meta, read_json, real, swap_in,
                 tmp_beside, write_tensors)
from .model import TaskModel
from .provenance import file_sha256
from .schema import HFConfig, check

# transformers (and huggingface_hub, which comes with it) is imported where it is used: it adds about
# 2 s to every command's start (measured here: torch alone 2.0 s, with transformers 4.1 s), and only
# Hugging Face directories need it

# Hugging Face class -> (our family, the attribute holding its backbone, the backbone's own class);
# a backbone class alone (no head) is a pre-trained start to fine-tune, not a merge input. Each
# family is a table (arch/families).
TABLES = encoder.tables()
CLASSES = {c.sequence: (t.family, t.prefix, c.base) for t in TABLES.values() for c in t.model_types.values()}
# a classifier per token of two, logits averaged (DeiT's with-teacher class): read as one head on both tokens
DISTILLED = {c.distilled.sequence: c.distilled for t in TABLES.values() for c in t.model_types.values() if c.distilled}
CLASSES.update({d: (t.family, t.prefix, c.base) for t in TABLES.values() for c in t.model_types.values()
                for d in ([c.distilled.sequence] if c.distilled else [])})
HEADLESS = {c.base for t in TABLES.values() for c in t.model_types.values()}
WHOLE = ("CLIPModel",)          # two towers, each a family's model: read by `load_clip`
CLASSIFIER = {t.family: t.classifier for t in TABLES.values()}
TOKENIZER_FILES = ("vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model",
                   "added_tokens.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "preprocessor_config.json")          # the last: an image processor's
BACKBONE_KEYS = tuple(TABLES["bert"].keys)
CONFIG_KEYS = {t.family: ("model_type", *t.keys) for t in TABLES.values()}


def is_hf_dir(path: str | os.PathLike) -> bool:
    """A Hugging Face model directory: a config.json with `model_type` (ours has `arch`)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = read_json(cfg)
    except ModelFileError:
        return False                 # then read as foldmerge's, which says what is wrong with it
    return isinstance(data, dict) and "model_type" in data and "arch" not in data


def _hf_config(path: Path) -> dict:
    cfg = read_json(path / "config.json")
    check(HFConfig, cfg, path / "config.json")
    if cfg.get("auto_map"):
        raise ModelFileError(f"{path} needs trust_remote_code (its config has auto_map); foldmerge never runs "
                             "a model's own code")
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in CLASSES and arch not in HEADLESS and arch not in WHOLE:
        raise ModelFileError(f"{path}: Hugging Face class {arch!r} (model_type {cfg.get('model_type')!r}) has no merge "
                             f"spec here; supported: {', '.join(sorted(set(CLASSES) | set(WHOLE)))} (and their encoders "
                             "without a head, as starts to fine-tune)")
    return cfg


def load_backbone(path: str | os.PathLike) -> tuple[dict, dict]:
    """(backbone config, state dict in the bert family's names) of a `BertModel` or
    `BertForSequenceClassification` directory: a pre-trained start (e.g. all-MiniLM-L6-v2) to
    fine-tune from (`train-sources --from DIR`)."""
    path = Path(path)
    cfg = _hf_config(path)
    if cfg["architectures"][0] not in ("BertModel", "BertForSequenceClassification"):
        raise ModelFileError(f"{path}: a pre-trained start must be a BERT (BertModel), not a {cfg['architectures'][0]}")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelFileError(f"{path} has no model.safetensors (foldmerge reads Hugging Face weights as safetensors)")
    try:
        raw = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ModelFileError(f"{weights}: cannot read it: {str(e).splitlines()[0][:200]}") from None
    state = {}
    for k, v in raw.items():
        name = k[len("bert."):] if k.startswith("bert.") else k
        if name.startswith(("embeddings.", "encoder.", "pooler.")) and "position_ids" not in name:
            state[f"bert.{name}"] = v
    check_finite(state, str(path))
    return {k: cfg[k] for k in BACKBONE_KEYS if k in cfg}, state


def read_weights(path: Path, allow_pickle: bool = False, lazy: bool = False) -> tuple[dict, Path]:
    """(tensors, the file read) of a Hugging Face directory: model.safetensors (or its shards; `lazy`:
    memory-mapped, `io.map_tensors`); a pytorch_model.bin only with `allow_pickle`, read with torch's
    weights-only unpickler."""
    if (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        files = _shards(path / "model.safetensors.index.json")
    elif (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        if not allow_pickle:
            raise ModelFileError(f"{path} holds pytorch_model.bin, a pickle, which can run code when read: pass "
                                 "--allow-pickle to read it with torch's weights-only unpickler, or convert it "
                                 "to safetensors")
        files = [path / "pytorch_model.bin"] if (path / "pytorch_model.bin").is_file() else \
            _shards(path / "pytorch_model.bin.index.json")
    else:
        raise ModelFileError(f"{path} holds no weights (model.safetensors or pytorch_model.bin)")
    state = {}
    for f in files:
        if f.suffix == ".safetensors" and lazy:
            state.update(map_tensors(f))
        elif f.suffix == ".safetensors":
            try:
                state.update(load_file(str(f)))
            except (SafetensorError, OSError) as e:
                raise ModelFileError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0][:160]})") \
                    from None
        else:
            state.update(load_pickle(f))
    return state, files[0]


def _shards(index: Path) -> list[Path]:
    try:
        names = sorted(set(read_json(index)["weight_map"].values()))
    except (ModelFileError, KeyError, AttributeError, TypeError):
        raise ModelFileError(f"{index}: not a weight index (a weight_map of tensor names to files)") from None
    files = [index.parent / n for n in names]
    if any(Path(n).name != n or not f.is_file() for n, f in zip(names, files)):
        raise ModelFileError(f"{index}: names a shard that is not a file beside it")
    return files


def load_hf(path: str | os.PathLike, task=None, allow_pickle: bool = False, lazy: bool = False):
    """A `BertForSequenceClassification` / `ViTForImageClassification` directory as a one-head
    TaskModel of the bert / hf-vit family. Its weights are read as they are and must be exactly the
    model's (a missing or an unexpected tensor is refused, naming it): nothing is initialized at random."""
    path = Path(path)
    cfg = _hf_config(path)
    if cfg["architectures"][0] in HEADLESS:
        heads = " or ".join(sorted({c.sequence for t in TABLES.values() for c in t.model_types.values()
                                    if c.base == cfg["architectures"][0]}))
        how = (f"foldmerge train-sources --arch bert --from {path} --tasks …" if cfg["architectures"][0] == "BertModel"
               else f"as a {heads}")
        raise ModelFileError(f"{path} is a {cfg['architectures'][0]} without a classification head: a merge input "
                             f"needs one; fine-tune it first ({how})")
    if cfg["architectures"][0] in WHOLE:
        raise ModelFileError(f"{path} is a {cfg['architectures'][0]}, two towers: it merges tower by tower "
                             "(foldmerge.clip; `foldmerge merge` does so when every source is one)")
    hf, weights = read_model(path, cfg, allow_pickle, lazy)
    return task_model(path, cfg, hf, task, weights, lazy)


def read_model(path: Path, cfg: dict, allow_pickle: bool, lazy: bool = False):
    """(the transformers model of the class config.json names, the weights file read), every tensor
    the model's and every one of its tensors in the file. `lazy`: the model holds the file's mapped
    tensors as they are (no copy, their dtype), under the class's names (`_class_names`: transformers' plain
    renames of older names; a file that needs its other conversions is refused)."""
    state, weights = read_weights(path, allow_pickle, lazy)
    check_finite(state, str(path))
    import transformers
    try:
        with quiet_transformers():          # transformers maps the file's names to its modules'
            config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            with torch.device("meta"), warnings.catch_warnings():     # the config's shapes, nothing allocated
                warnings.simplefilter("ignore")
                expected = getattr(transformers, cfg["architectures"][0])(config).state_dict()
            wrong = next((k for k, v in state.items() if k in expected and expected[k].shape != v.shape), None)
            if wrong is not None:
                raise ModelFileError(f"{weights}: tensor {wrong!r} is {tuple(state[wrong].shape)}, but config.json "
                                     f"makes it {tuple(expected[wrong].shape)}")
            if lazy:
                with parameters_on_meta():
                    hf = getattr(transformers, cfg["architectures"][0])(config)
                result = hf.load_state_dict(_class_names(hf, state), strict=False, assign=True)
                hf.tie_weights()                     # a head that is the token table (GPT-2's)
                info = {"missing_keys": [k for k, p in hf.named_parameters() if p.is_meta],
                        "unexpected_keys": result.unexpected_keys}
                hf.eval()
            else:
                hf, info = getattr(transformers, cfg["architectures"][0]).from_pretrained(
                    None, config=config, state_dict=state, output_loading_info=True)
    except ModelFileError:
        raise
    except Exception as e:       # transformers' and huggingface_hub's config checks raise many kinds
        raise ModelFileError(f"{path}: cannot load it: {(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}"
                             ) from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        wrong = [k for k in info.get(kind) or () if "position_ids" not in str(k)]
        if wrong:                           # never a tensor made up at random, nor one ignored
            raise ModelFileError(f"{weights} does not hold exactly the model's tensors: {kind.split('_')[0]} "
                                 f"{wrong[0]!r}")
    return hf, weights


def _class_names(hf, state: dict) -> dict:
    """The file's tensors under the names the class gives them: transformers' plain renames of older
    names (GPT-NeoX's `embed_out` for its LM head, LayerNorm's gamma and beta) applied, as its own
    loading does; its other conversions (tensors split or joined) are not, and such a file is refused."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
        rules = [(re.compile(s), t.target_patterns[0]) for t in get_model_conversion_mapping(hf)
                 if type(t) is WeightRenaming and len(t.target_patterns) == 1 and not getattr(t, "scope_prefix", None)
                 for s in t.source_patterns]
    except (ImportError, AttributeError, TypeError):       # a transformers without them: the names as they are
        rules = []
    out = {}
    for key, value in state.items():
        for pattern, target in rules:
            key = pattern.sub(target, key)
        out[key] = value
    return out


def task_model(path: Path, cfg: dict, hf, task, weights: Path, lazy: bool = False) -> TaskModel:
    """The one-head TaskModel of `hf`, a transformers model of a class with a table, as config `cfg` describes
    it (`lazy`: holding `hf`'s tensors themselves, no copy)."""
    family, attr, _ = CLASSES[cfg["architectures"][0]]
    projection = TABLES[family].head == "projection"
    lm = TABLES[family].head == "lm"
    if projection or lm:    # no labels of their own: the outputs are an embedding's dimensions (never one task
        # by their names, heads.PLACEHOLDER) or a vocabulary's tokens (one task per vocabulary: one LM head)
        key, prefix, what = (("projection_dim", "EMBED", "projects into an embedding space") if projection else
                             ("vocab_size", "TOKEN", "predicts the next token"))
        if task is not None:
            raise ModelFileError(f"{path} is a {cfg['architectures'][0]}: its head {what}, not onto a task's classes, "
                                 "so no --tasks applies to it")
        size = cfg.get(key)
        if not isinstance(size, int) or isinstance(size, bool) or size < 2:
            raise ModelFileError(f"{path / 'config.json'}: {key} must be an integer >= 2, got {size!r}")
        labels = {str(i): f"{prefix}_{i}" for i in range(size)}
    else:
        # transformers leaves id2label (and num_labels) out of config.json when they are its defaults:
        # two classes, LABEL_0 and LABEL_1
        labels = cfg.get("id2label") or {str(i): f"LABEL_{i}" for i in range(cfg.get("num_labels") or 2)}
    task = _task(path, task, cfg.get("foldmerge_task"), labels)
    if labels and len(labels) != task.num_classes:
        raise ModelFileError(f"{path} has {len(labels)} labels but task {task} has {task.num_classes} classes")
    if task.builtin and task.is_text != (TABLES[family].input == "text"):
        raise ModelFileError(f"{path} is a {cfg['architectures'][0]}, but task {task} is "
                             f"{'text' if task.is_text else 'images'}")
    kind = TABLES[family].model_types.get(cfg.get("model_type"))
    section = cfg.get(kind.section) if kind is not None and kind.section else cfg     # CLIP's vision_config
    if not isinstance(section, dict):
        raise ModelFileError(f"{path / 'config.json'}: {kind.section} must be an object of the encoder's settings")
    backbone = {k: section[k] for k in CONFIG_KEYS[family] if k in section and k != "model_type"}
    backbone.update({"model_type": cfg["model_type"]} if "model_type" in cfg else {})
    distilled = DISTILLED.get(cfg["architectures"][0])
    if distilled:
        backbone["pooling"] = "first+second"
    try:
        with parameters_on_meta() if lazy else nullcontext():
            model = TaskModel(family, backbone, [task], head_bias=not (projection or lm),
                              head="projection" if projection else "lm" if lm else "linear")
    except ValueError as e:
        raise ModelFileError(f"{path}: {str(e).splitlines()[0]}") from None
    # the backbone's tensors under their Hugging Face names: the encoder's, and the features layer
    # where the family's classifier keeps it beside the encoder (RoBERTa's classifier.dense)
    theirs = encoder.from_hf_state(TABLES[family], backbone, hf.state_dict())
    body = {k: theirs[k] for k in model.backbone.state_dict() if k in theirs}
    try:
        _load_exact(model.backbone, body, assign=lazy)
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from None
    if distilled:          # (W_c t_0 + b_c + W_d t_1 + b_d) / 2: one head on both tokens
        cls_head, dist_head = (hf.get_submodule(n) for n in distilled.classifiers)
        head = {"weight": torch.cat([cls_head.weight, dist_head.weight], dim=1) / 2,
                "bias": (cls_head.bias + dist_head.bias) / 2}
    else:
        head = {k: v for k, v in hf.get_submodule(CLASSIFIER[family]).state_dict().items() if k in ("weight", "bias")}
    model.heads[0].load_state_dict(head, assign=lazy)     # lazy: the file's tensors themselves
    model.meta = {"path": str(path.resolve()), "hf_class": cfg["architectures"][0],
                  **({} if projection or lm else {"id2label": {int(k): v for k, v in labels.items()}}),
                  "source_format": "huggingface",
                  **({"loaded_from_pickle": str(weights.resolve())} if weights.suffix != ".safetensors" else {})}
    model.eval()
    return model


@contextmanager
def quiet_transformers():
    """transformers' own progress bars and load reports off while a model or tokenizer loads: a load
    that fails says so in one line of ours, and one that works prints nothing."""
    from transformers.utils import logging as hf_logging
    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def weights_sha256(path: str | os.PathLike, pickled: str | None = None) -> str | None:
    """The SHA-256 of a Hugging Face directory's weights file (the pickle read, if one was; None for
    sharded weights)."""
    weights = Path(pickled) if pickled else Path(path) / "model.safetensors"
    return file_sha256(weights) if weights.is_file() else None


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def cached(name: str | os.PathLike) -> Path:
    """The local folder of a Hub id (`owner/name`) in the local Hugging Face cache, offline; a path that
    does not exist stays as it is (the load then says so)."""
    if not HUB_ID.fullmatch(str(name)):
        return Path(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(str(name), local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ModelFileError(f"{name} is neither a folder nor a model in the local Hugging Face cache (this "
                             f"machine is offline): download it first (huggingface-cli download {name})") from None


def model_name(path: Path) -> str:
    """A model's name: its directory's, or for a Hub id read from the local cache
    (`models--ORG--NAME/snapshots/REVISION`), the repository's NAME rather than the revision hash."""
    path = real(path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.split("--", 2)[-1]
    return path.name


def _task(path: Path, given, recorded, id2label: dict) -> Task:
    """A Hugging Face classifier's task: the one given (a built-in task spec), else the one its config
    records (written here), else its head: the directory's name and id2label's labels."""
    if given is not None:
        return Task.parse(given)
    try:
        keys = sorted(int(k) for k in id2label)
    except (TypeError, ValueError):
        raise ModelFileError(f"{path / 'config.json'}: id2label's keys must be class indices, got "
                             f"{sorted(id2label)[:3]}") from None
    if keys != list(range(len(keys))):
        raise ModelFileError(f"{path / 'config.json'}: id2label must name classes 0…{len(keys) - 1}, got {keys}")
    labels = [id2label[str(k)] if str(k) in id2label else id2label[k] for k in keys]
    if isinstance(recorded, str) and recorded.strip():
        try:
            return Task.parse(recorded)        # a built-in task recorded by foldmerge's export
        except ValueError:
            pass
    name = recorded if isinstance(recorded, str) and recorded.strip() else model_name(path)
    try:
        return Task.own(name, labels)
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from None


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer a Hugging Face directory holds (None if it holds none)."""
    import transformers
    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return None
    try:
        with quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:          # transformers' tokenizer and config readers raise many kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ModelFileError(f"{path}: its tokenizer does not load ({first})") from None


def tokenizer_identity(tok) -> dict:
    """What makes two tokenizers give the same ids: the vocabulary, the special tokens and their ids, and
    (for a fast tokenizer) its normalizer, pre-tokenizer and model settings."""
    out = {"vocabulary": tok.get_vocab(), "special tokens": dict(zip(tok.all_special_tokens, tok.all_special_ids))}
    if getattr(tok, "is_fast", False):
        spec = json.loads(tok.backend_tokenizer.to_str())
        out.update({k: spec.get(k) for k in ("normalizer", "pre_tokenizer")})
        out["model settings"] = {k: v for k, v in (spec.get("model") or {}).items() if k != "vocab"}
    out["lowercasing"] = getattr(tok, "do_lower_case", None)
    return out


def check_tokenizers(paths) -> None:
    """Sources whose tokenizers differ (vocabulary, special tokens, normalization) cannot share an
    embedding table: token ids would mean different words. One clear error naming what differs."""
    for p in paths:                 # each config through its schema first: transformers reads it to load a tokenizer
        _hf_config(Path(p))
    seen = [(p, load_tokenizer(p)) for p in paths]
    seen = [(p, tokenizer_identity(t)) for p, t in seen if t is not None]
    for p, ident in seen[1:]:
        first, base = seen[0]
        diff = [k for k in base if base[k] != ident.get(k)]
        if diff:
            raise ModelFileError(f"the sources' tokenizers differ ({first} and {p}: their {diff[0]} differs), so "
                                 "token ids mean different words")


def save_hf(merged, out: str | os.PathLike, sources=()) -> Path:
    """`write_hf` into a directory written beside `out` and renamed into place."""
    out = real(out)
    check_finite(merged.state_dict(), f"refusing to save {out}")
    tmp = tmp_beside(out)
    try:
        write_hf(merged, tmp, sources)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_hf(merged, out: Path, sources=()) -> None:
    """The merged backbone and one classifier directory per task (module docstring), into the
    existing, empty directory `out`."""
    with quiet_transformers():
        _write_hf(merged, out, sources)


BACKBONE_SHARD = "backbone.safetensors"
HEAD_SHARD = "classifier.safetensors"


def _write_hf(merged, out: Path, sources=()) -> None:
    import transformers
    kinds = {family: (name, attr, base) for name, (family, attr, base) in CLASSES.items()}
    if merged.arch not in kinds:
        raise ValueError(f"Hugging Face output is for the {', '.join(sorted(kinds))} families; this model is a "
                         f"{merged.arch}")
    name, attr, base_name = kinds[merged.arch]
    table = TABLES[merged.arch]
    chosen = encoder.classes(table, merged.backbone_config)       # the sources' model type's (XLM-R, CamemBERT…)
    distilled = chosen.distilled if encoder.config_of(table, merged.backbone_config)["pooling"] == "first+second" \
        else None
    name, base_name = (distilled.sequence if distilled else chosen.sequence), chosen.base
    cls, base_cls = getattr(transformers, name), getattr(transformers, base_name)
    tmp = Path(out)
    config = encoder.hf_config(table, merged.backbone_config)
    ours = encoder.to_hf_state(table, merged.backbone_config, merged.backbone.state_dict())
    bert_state = {k[len(attr) + 1:]: v for k, v in ours.items() if k.startswith(attr + ".")}
    beside = {k: v for k, v in ours.items() if not k.startswith(attr + ".")}     # a features layer beside it
    dtype = next(merged.backbone.parameters()).dtype        # the merge's (the sources' under --lazy: bfloat16…)
    config.dtype = str(dtype).removeprefix("torch.")
    # the Hugging Face models are built without parameters and take the merged tensors themselves (no
    # copy: under --lazy these lie in a file's pages, and the export holds no second model)
    with parameters_on_meta():
        base = base_cls(config, **table.base_arguments)
    _load_exact(base, bert_state, assign=True)
    base.to(dtype)
    # the backbone's tensors are written once, as a shard whose names carry the classifiers' prefix
    # (`bert.…`), which the headless class reads too; each task directory hard-links that shard beside
    # its own small classifier shard, so the backbone is on disk once and every directory loads alone
    shard = {f"{attr}.{k}": v.detach().contiguous() for k, v in base.state_dict().items()}
    (tmp / "backbone").mkdir(parents=True)
    config.architectures = [base_name]
    config.save_pretrained(tmp / "backbone")
    _save_shards(tmp / "backbone", {BACKBONE_SHARD: shard})
    first = _processor_folder([Path(s.meta["path"]) for s in sources if s.meta.get("path")])
    if first is not None:           # the base model reads what the task folders read
        copy_processor_files(first, tmp / "backbone")
    tied = merged.head_kind == "lm" and lm_head_tied(merged)   # a GPT-2 whose head stayed its token table
    for i, task in enumerate(merged.tasks):
        owner = next((s for s in sources if task.name in [t.name for t in s.tasks]), None)
        labels = (owner.meta.get("id2label") if owner else None) or {c: str(c) for c in range(task.num_classes)}
        cfg = encoder.hf_config(table, merged.backbone_config)
        if chosen.sequence_config:          # the classifier's config holds the encoder's (CLIP's vision_config)
            cfg = getattr(transformers, chosen.sequence_config)(**{chosen.section: cfg.to_dict()})
        if merged.head_kind == "projection":     # each task's own embedding width
            cfg.projection_dim = task.num_classes
        elif merged.head_kind == "lm":     # tied to the token table where the family's is and the merge kept it
            cfg.tie_word_embeddings = tied
        else:
            cfg.num_labels = task.num_classes
            cfg.id2label = {int(k): v for k, v in labels.items()}
            cfg.label2id = {v: int(k) for k, v in cfg.id2label.items()}
        cfg.foldmerge_task = task.name
        cfg.architectures = [name]
        cfg.dtype = config.dtype
        with parameters_on_meta():
            hf = cls(cfg)
        full = {**{f"{attr}.{k}": v for k, v in bert_state.items()}, **beside}
        w, b = merged.heads[i].weight.detach(), merged.heads[i].bias
        b = None if b is None else b.detach()
        head = CLASSIFIER[merged.arch]
        if distilled:          # one head on both tokens as two whose logits are averaged (exact: x2 then /2)
            for name_, part in zip(distilled.classifiers, w.chunk(2, dim=1)):
                full.update({f"{name_}.weight": 2 * part, f"{name_}.bias": b})
        elif tied:                              # the head is the token table: tied again below
            full[f"{head}.weight"] = full[f"{attr}.{table.embeddings[0]}"]
        else:
            full.update({f"{head}.weight": w, **({f"{head}.bias": b} if b is not None else {})})
        _load_exact(hf, full, assign=True)
        if tied:
            hf.tie_weights()
        hf.to(dtype)
        state = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
        own = {k: v for k, v in state.items() if k not in shard and
               not (tied and k == f"{CLASSIFIER[merged.arch]}.weight")}
        if any(not torch.equal(state[k], v) for k, v in shard.items() if k in state):
            raise AssertionError("a task's classifier would not read the merged backbone")  # a bug of ours
        where = tmp / task.slug
        where.mkdir()
        cfg.save_pretrained(where)
        _link(tmp / "backbone" / BACKBONE_SHARD, where / BACKBONE_SHARD)
        _save_shards(where, {HEAD_SHARD: own}, also={BACKBONE_SHARD: shard})
        if first is not None:
            copy_processor_files(first, where)


def tied_family(model) -> bool:
    """Whether the model's family ties its LM head to its token table (GPT-2's)."""
    return model.arch in TABLES and TABLES[model.arch].tied_head


def lm_head_tied(merged) -> bool:
    """Whether a merged language model's head is its token table: where the family ties them (GPT-2) and
    the merge kept them equal, which FS-Merge, the alignment methods and averaging do
    (`ArchSpec.tied_output`); a merge that learns the head apart (distillation) is saved with a head of its
    own (tie_word_embeddings false)."""
    if not tied_family(merged):
        return False
    table = TABLES[merged.arch]
    emb = merged.backbone.get_parameter(f"{table.prefix}.{table.embeddings[0]}")
    w = merged.heads[0].weight
    return w.shape == emb.shape and torch.allclose(w, emb.to(w), rtol=1e-5, atol=1e-6)


def copy_processor_files(source: Path, target: Path) -> None:
    """The tokenizer and image-processor files `source` holds, copied into `target`."""
    for f in TOKENIZER_FILES:
        if (source / f).is_file():
            shutil.copy2(source / f, target / f)


def _processor_folder(paths: list[Path]) -> Path | None:
    """The first source folder holding tokenizer or image-processor files: a Hugging Face folder itself,
    or a task folder of a merge foldmerge wrote (OUT/hf/<task>), whose files a new merge copies on."""
    for path in paths:
        for folder in [path] + (sorted(p for p in (path / "hf").iterdir() if p.is_dir()) if (path / "hf").is_dir()
                                else []):
            if any((folder / f).is_file() for f in TOKENIZER_FILES):
                return folder
    return None


def _save_shards(folder: Path, shards: dict, also: dict | None = None) -> None:
    """Write `shards` ({file: tensors}) into `folder` with the index that names every shard's tensors,
    those of `also` (shards already there) included."""
    weight_map, total = {}, 0
    for file, tensors in {**shards, **(also or {})}.items():
        for k, v in tensors.items():
            weight_map[k] = file
            total += v.numel() * v.element_size()
    mode = (folder / "config.json").stat().st_mode & 0o777      # as the umask has it (save_file makes 0600)
    for file, tensors in shards.items():
        write_tensors(tensors, folder / file, metadata={"format": "pt"})
        os.chmod(folder / file, mode)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _link(source: Path, target: Path) -> None:
    """A hard link (the same bytes on disk, a file of its own to every reader), or a copy where the
    file system has none."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _load_exact(module, state, assign: bool = False) -> None:
    """load_state_dict that tolerates only the position-ids buffer (HF does not save it); a missing or an
    unexpected tensor is named."""
    result = module.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if "position_ids" not in k]
    if missing:
        raise ValueError(f"tensor {missing[0]!r} is missing")
    if result.unexpected_keys:
        raise ValueError(f"tensor {result.unexpected_keys[0]!r} is not the model's")
