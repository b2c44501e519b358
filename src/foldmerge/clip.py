"""A CLIPModel merged: two towers and a temperature, each tower through the one merge.

A CLIPModel folder holds an image tower with its projection, a text tower with its projection, and
the logit scale. Each tower is a model of a family with a table (`clip-vision`, `clip-text`) whose
head is its projection into the image-text space. A merge of n CLIPs:

  1. reads each source as its two towers (`load_clip`): one-head TaskModels whose task is named by the
     source's folder;
  2. merges the image towers on each source's images and the text towers on each source's texts, each
     by `foldmerge.merge` with the same method, options and seed (projections give embeddings: there
     is no routing calibration);
  3. writes per source a CLIPModel: both merged towers, that source's two projections as the merge left
     them (the last U folded in) and its logit scale; `CLIPModel.from_pretrained` loads it.

What a merged CLIP keeps of the image-text alignment: source k's folder embeds images and texts in
source k's own space, as far as each tower's merge reconstructs source k's embeddings. Where both
towers reconstruct them exactly, every similarity, and so every zero-shot prediction and retrieval,
is source k's. No source's images are aligned with another source's texts: sources from different
starts embed into unrelated spaces, so the merge keeps n spaces, one per task folder, over one pair of
towers. `foldmerge bench clip` measures what each method keeps on a tiny pair trained here
(docs/huggingface.md).

The output directory: the image tower's merge (what `foldmerge.load` reads: config.json,
model.safetensors, its card), `text-tower/` the text tower's, `hf/<task>/` the CLIPModel per source
with the source's tokenizer and image processor files; written beside the target and swapped in
whole.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import hf
from .api import merge
from .arch import encoder
from .card import card
from .io import ModelFileError, check_target, identity, save_model
from .model import TaskModel

TOWERS = (("image", "CLIPVisionModelWithProjection", "vision_config", "vision_model", "visual_projection"),
          ("text", "CLIPTextModelWithProjection", "text_config", "text_model", "text_projection"))


def is_clip_dir(path) -> bool:
    """A Hugging Face folder of a whole CLIPModel."""
    if not hf.is_hf_dir(path):
        return False
    try:
        return (hf.read_json(Path(path) / "config.json").get("architectures") or [None])[0] in hf.WHOLE
    except ModelFileError:
        return False


def load_clip(path, allow_pickle: bool = False) -> tuple[TaskModel, TaskModel, torch.Tensor]:
    """(image tower, text tower, logit scale) of a CLIPModel folder: each tower a one-head TaskModel of
    its family (its projection the head), read as strictly as any Hugging Face source."""
    import transformers
    path = Path(path)
    cfg = hf._hf_config(path)
    if cfg["architectures"][0] not in hf.WHOLE:
        raise ModelFileError(f"{path} is a {cfg['architectures'][0]}, not a CLIPModel")
    whole, weights = hf.read_model(path, cfg, allow_pickle)
    towers = []
    for _, name, section, body, projection in TOWERS:
        part = getattr(whole.config, section)
        tower = getattr(transformers, name)(type(part)(**{**part.to_dict(), "projection_dim": whole.config.projection_dim}))
        # the tower's config.json, as task_model reads one: its class, and the task a merge recorded
        settings = {**tower.config.to_dict(), "architectures": [name], "foldmerge_task": cfg.get("foldmerge_task")}
        setattr(tower, body, getattr(whole, body))           # the same modules: nothing copied or made up
        setattr(tower, projection, getattr(whole, projection))
        towers.append(hf.task_model(path, settings, tower, None, weights))
        towers[-1].meta.update(clip_tower=section, sha256=hf.weights_sha256(path, towers[-1].meta.get(
            "loaded_from_pickle")))
    return towers[0], towers[1], whole.logit_scale.detach().clone()


def merge_clip(sources, images, texts, method: str = "fs-merge", out=None, force: bool = False, **settings) -> dict:
    """Merge CLIPModel folders (module docstring). `images`, `texts`: per source, its unlabeled images
    and texts (data specs as --data's, or tensors its towers read); the other keywords are
    `foldmerge.merge`'s (seed, per_task, fidelity, the method's options). Returns {"image": the merged
    image tower, "text": the merged text tower, "clips": per source its CLIPModel}; with `out`, saves
    them there."""
    paths = [hf.cached(s) for s in sources]
    target = check_target(out, force, inputs=[*paths, *_files(images), *_files(texts)]) if out is not None else None
    seen = identity(target) if target is not None else None
    loaded = [load_clip(p, settings.get("allow_pickle", False)) for p in paths]
    settings = {**settings, "calibrate": "none"}
    base = settings.pop("base", None)        # task arithmetic's and TIES's common start: a CLIPModel too
    bases = load_clip(hf.cached(base), settings.get("allow_pickle", False))[:2] if base is not None and \
        not isinstance(base, TaskModel) and is_clip_dir(hf.cached(base)) else (base, base)
    image = _merge_tower([m[0] for m in loaded], images, method, _with_base(settings, bases[0]))
    text = _merge_tower([m[1] for m in loaded], texts, method, _with_base(settings, bases[1]))
    clips = [clip_model(image, text, k, scale) for k, (_, _, scale) in enumerate(loaded)]
    if target is not None:
        image.meta["clip"] = {"text_tower": "text-tower", "tasks": [t.slug for t in image.tasks]}

        def extra(folder: Path) -> None:
            (folder / "README.md").write_text(card(image.meta, "a foldmerge merge of CLIPModels: the image tower "
                                                   "(the text tower in text-tower/, a CLIPModel per source in hf/)")
                                              + "\n")
            save_model(text, folder / "text-tower", text.meta)
            (folder / "text-tower" / "README.md").write_text(card(text.meta, "a foldmerge merge of CLIPModels: the "
                                                                  "text tower") + "\n")
            for task, clip, path in zip(image.tasks, clips, paths):
                where = folder / "hf" / task.slug
                with hf.quiet_transformers():
                    clip.save_pretrained(where)
                hf.copy_processor_files(path, where)
        save_model(image, target, image.meta, extra=extra, expect=seen)
    return {"image": image, "text": text, "clips": clips}


def _with_base(settings: dict, base) -> dict:
    return settings if base is None else {**settings, "base": base}


def _files(given) -> list:
    return [g for g in given if isinstance(g, (str, os.PathLike))] if isinstance(given, (list, tuple)) else []


def _merge_tower(towers: list[TaskModel], data, method: str, settings: dict) -> TaskModel:
    if not isinstance(data, (list, tuple)) or len(data) != len(towers):
        raise ValueError(f"a CLIP merge needs one set of {towers[0].meta['clip_tower'].split('_')[0]} examples per "
                         f"source ({len(towers)})")
    return merge(towers, list(data), method, **settings)


def clip_model(image: TaskModel, text: TaskModel, k: int, logit_scale: torch.Tensor):
    """Source k's CLIPModel: both merged towers, its projections as the merge left them, its logit scale."""
    import transformers
    tables = encoder.tables()
    configs = {}
    for tower, (_, _, section, _, _) in zip((image, text), TOWERS):
        configs[section] = encoder.hf_config(tables[tower.arch], tower.backbone_config).to_dict()
    dim = image.heads[k].out_features
    config = transformers.CLIPConfig(**configs, projection_dim=dim)
    config.foldmerge_task = image.tasks[k].name
    config.architectures = ["CLIPModel"]
    with hf.quiet_transformers():
        clip = transformers.CLIPModel(config)
    state = {}
    for tower, (_, _, _, body, projection) in zip((image, text), TOWERS):
        ours = encoder.to_hf_state(tables[tower.arch], tower.backbone_config, tower.backbone.state_dict())
        state.update({k_: v for k_, v in ours.items() if k_.startswith(body + ".")})
        state[f"{projection}.weight"] = tower.heads[k].weight.detach()
    state["logit_scale"] = logit_scale
    hf._load_exact(clip, {k_: v.detach().float().contiguous() for k_, v in state.items()})
    return clip.eval()

