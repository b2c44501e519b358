"""`foldmerge bench clip`: what a merge of two CLIPs from different seeds keeps of their image-text
alignment.

Two tiny CLIPModels (transformers' own class: image tower 2 layers at width 64 on 28 x 28 grey images
in 7 x 7 patches, text tower 2 layers at width 64, projection 32), trained here contrastively from
seeds 0 and 1, one on MNIST with captions of its digits ("a photo of the digit seven", …), the other on
Fashion-MNIST with captions of its items ("a photo of a sneaker", …), words as tokens. Each merge
(`foldmerge.clip.merge_clip`) reads 200 unlabeled training images and 200 captions per source; the
trained merges run 200 epochs (400 steps) from `first`.

Measured per method, on each task's test images, with the task's CLIPModel out of the merge (its
source's projections and logit scale, the merged towers): zero-shot accuracy (the class whose prompts'
mean text embedding is the most similar), the mean cosine of the merged image and text embeddings with
the source's (how much of the source's embedding space each tower keeps), and the matched similarity
(the mean cosine of an image's embedding with its class's text embedding: the alignment itself).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional as F

from ..clip import merge_clip
from ..data import Task
from ..progress import status

NAMES = {"mnist": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
         "fmnist": ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]}
TEMPLATES = {"mnist": ["a photo of the digit {}", "the number {}", "handwritten {}", "a picture of a {}"],
             "fmnist": ["a photo of a {}", "a {}", "clothing : {}", "a picture of the {}"]}
SPECIALS = ["[pad]", "[unk]", "[bos]", "[eos]"]          # eos not id 2: transformers reads id 2 as a legacy CLIP's
LENGTH = 10
TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=LENGTH, pad_token_id=0, bos_token_id=2, eos_token_id=3)
VISION = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=28,
              patch_size=7, num_channels=1)
PROJECTION = 32
TRAIN = dict(epochs=4, lr=1e-3, batch_size=128, limit=20000)
PER_TASK, TEST = 200, 2000
TRAINED = {"init": "first", "epochs": 200, "batch_size": 128}
PLAN = [("average", "average", {}), ("ZipIt!", "zipit", {}), ("permute", "permute", {}),
        ("distill", "distill", TRAINED), ("fs-merge diag+lowrank(12)", "fs-merge", {"param": "diag+lowrank(12)", **TRAINED})]
TASKS = ("mnist", "fmnist")


def vocabulary() -> dict[str, int]:
    words = sorted({w for t in TASKS for s in TEMPLATES[t] + NAMES[t] for w in s.replace("{}", "").split()})
    return {w: i for i, w in enumerate(SPECIALS + words)}


def tokens(texts: list[str]) -> torch.Tensor:
    """Word ids: [bos] words [eos], padded to LENGTH."""
    vocab = vocabulary()
    rows = []
    for t in texts:
        ids = [vocab["[bos]"]] + [vocab.get(w, vocab["[unk]"]) for w in t.split()][:LENGTH - 2] + [vocab["[eos]"]]
        rows.append(ids + [vocab["[pad]"]] * (LENGTH - len(ids)))
    return torch.tensor(rows)


def captions(task: str, labels: torch.Tensor, g: torch.Generator) -> list[str]:
    pick = torch.randint(len(TEMPLATES[task]), (len(labels),), generator=g)
    return [TEMPLATES[task][int(p)].format(NAMES[task][int(y)]) for p, y in zip(pick, labels)]


def train_source(task: str, seed: int, path: Path):
    """A CLIPModel trained contrastively from `seed` on `task`'s images and captions, saved at `path`."""
    import transformers
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(text_config={**TEXT, "vocab_size": len(vocabulary())}, vision_config=VISION,
                                     projection_dim=PROJECTION)
    model = transformers.CLIPModel(config)
    x, y = Task.parse(task).split("train")
    x, y = x[:TRAIN["limit"]], y[:TRAIN["limit"]]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=0.01)
    model.train()
    for epoch in range(TRAIN["epochs"]):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), TRAIN["batch_size"]):
            idx = order[i:i + TRAIN["batch_size"]]
            out = model(input_ids=tokens(captions(task, y[idx], g)), pixel_values=x[idx], return_loss=True)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        status(f"  {task} source (seed {seed}): epoch {epoch + 1}, loss {out.loss.item():.3f}")
    model.eval().save_pretrained(path)
    return path


@torch.no_grad()
def scores(clip, reference, task: str) -> dict:
    """Zero-shot accuracy %, matched similarity, and the cosine of its embeddings with `reference`'s
    (None: no reference) on `task`'s first TEST test images."""
    x, y = Task.parse(task).split("test")
    x, y = x[:TEST], y[:TEST]
    prompts = [tokens([t.format(n) for t in TEMPLATES[task]]) for n in NAMES[task]]

    def embed(model):       # each tower's pooled features through its projection, as CLIPModel's forward does
        image = F.normalize(model.visual_projection(model.vision_model(pixel_values=x).pooler_output), dim=-1)
        text = torch.stack([F.normalize(model.text_projection(model.text_model(input_ids=p).pooler_output), dim=-1
                                        ).mean(0) for p in prompts])
        return image, F.normalize(text, dim=-1)
    image, text = embed(clip)
    out = {"zero_shot": 100.0 * ((image @ text.T).argmax(1) == y).float().mean().item(),
           "matched": (image * text[y]).sum(1).mean().item()}
    if reference is not None:
        ref_image, ref_text = embed(reference)
        out.update(image_cosine=(image * ref_image).sum(1).mean().item(),
                   text_cosine=(text * ref_text).sum(1).mean().item())
    return out


def run_bench(methods: list[str] | None = None, out: str = "runs/bench", seed: int = 0) -> dict:
    import transformers
    cache, t0 = Path(out) / "clip", time.perf_counter()
    paths = [train_source(t, k, cache / f"{t}-seed{k}") for k, t in enumerate(TASKS)]
    sources = [transformers.CLIPModel.from_pretrained(p).eval() for p in paths]
    g = torch.Generator().manual_seed(seed)
    images, texts = [], []
    for t in TASKS:
        x, y = Task.parse(t).split("train")
        pick = torch.randperm(len(x), generator=g)[:PER_TASK]
        images.append(x[pick])
        texts.append(tokens(captions(t, y[pick], g)))
    rows = []
    for t, s in zip(TASKS, sources):
        rows.append({"method": "originals", "task": t, **scores(s, None, t)})
    for name, method, opts in PLAN:
        if methods and name not in methods and method not in methods:
            continue
        start = time.perf_counter()
        result = merge_clip(paths, images, texts, method, seed=seed, fidelity=0, **opts)
        seconds = time.perf_counter() - start
        for k, (t, s) in enumerate(zip(TASKS, sources)):
            rows.append({"method": name, "task": t, **scores(result["clips"][k], s, t), "seconds": seconds,
                         "options": opts})
        status(f"  {name}: zero-shot " + " / ".join(f"{r['zero_shot']:.1f}" for r in rows[-2:]) + f" ({seconds:.0f} s)")
    return {"bench": "clip", "tasks": list(TASKS), "per_task": PER_TASK, "test": TEST,
            "source_training": TRAIN, "trained_merges": TRAINED, "seed": seed, "rows": rows,
            "total_seconds": time.perf_counter() - t0}


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(120, Console().width))
    table = Table(title="Two CLIPs from different seeds (MNIST + captions, Fashion-MNIST + captions) merged: "
                        "per task, zero-shot accuracy % / matched similarity / image, text cosine with the source")
    table.add_column("method")
    for t in result["tasks"]:
        table.add_column(t, justify="right")
    table.add_column("seconds", justify="right")
    for name in dict.fromkeys(r["method"] for r in result["rows"]):
        sel = {r["task"]: r for r in result["rows"] if r["method"] == name}
        cells = []
        for t in result["tasks"]:
            r = sel.get(t)
            cos = "" if r is None or "image_cosine" not in r else f" / {r['image_cosine']:.2f}, {r['text_cosine']:.2f}"
            cells.append("-" if r is None else f"{r['zero_shot']:.1f} / {r['matched']:.2f}{cos}")
        secs = next((f"{r['seconds']:.0f}" for r in sel.values() if r.get("seconds") is not None), "-")
        table.add_row(name, *cells, secs)
    console.print(table)
    console.print(f"measured now: seed {result['seed']} (sources seeds 0, 1); {result['total_seconds'] / 60:.1f} min; "
                  f"command: {command}")
