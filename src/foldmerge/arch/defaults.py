"""Every default that depends on the family of the models being merged, with where it came from.

One row per family; a row holds groups of values, each group with its evidence. A family whose
values were never validated on it says whose it borrows (`borrows`) and what was measured with
them. A spec names its row (`ArchSpec.defaults`); a user's own architecture takes the "vit" row
unless its spec names another (the values validated on the deepest models measured here).

Groups: "train" (the optimization of every trained merge: FS-Merge and distillation), one per
method ("fs-merge", "distill", "zipit", "regmean", "ensemble"), and "method/variant" where a
variant differs ("fs-merge/local"). `value(row, sections, name)` reads the first group that has it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Group:
    values: dict
    source: str


@dataclass(frozen=True)
class Row:
    groups: dict = field(default_factory=dict)
    borrows: str | None = None
    note: str = ""


MLP = Row({
    "train": Group(dict(optimizer="sgd", batch_size=None, weight_decay=0.0, target_scale="match", epochs=1000,
                        lr=0.1, momentum=0.9, warmup=0.02),
                   "FS-Merge paper appendix E.1: the MNIST grid's bold values, gradient descent on the whole "
                   "sample, targets scaled to one level; warmup 0.02 = its 20 epochs of 1000"),
    "fs-merge": Group(dict(param="full", targets="all"),
                      "paper section 2.1 and E.1: dense maps, every input scored against every source"),
    "fs-merge/local": Group(dict(epochs=15000, warmup=20 / 15000), "appendix E.1 (local FS-Merge)"),
    "distill": Group(dict(targets="all"), "as FS-Merge global (E.1's distillation grid)"),
    "zipit": Group(dict(alpha=0.3, beta=0.5),
                   "bench mlp's validation searches: the best mean validation accuracy over the MNIST and "
                   "Fashion-MNIST bench pairs (docs/benchmarks/defaults.md; those runs' files are not kept)"),
    "regmean": Group(dict(alpha=0.5), "bench select's grid at MLP depths 2 and 4 on MNIST and Fashion-MNIST: the "
                                      "best validation mean (docs/benchmarks/defaults.md)"),
    "ensemble": Group(dict(normalize=False),
                      "the paper's MLP ensemble is the plain mean of the features (bench mlp reproduces it)"),
})

VIT = Row({
    "train": Group(dict(optimizer="adamw", batch_size=128, weight_decay=0.001, target_scale="none", epochs=100,
                        lr=1e-3, momentum=0.9, warmup=0.2),
                   "bench vit pairs16's validation search (distillation and low-rank FS-Merge both chose 100 "
                   "epochs at lr 1e-3, docs/results/bench-vit-pairs16.json); AdamW, batch 128, weight decay "
                   "0.001 and unscaled targets from appendix E.2; warmup 0.2 = E.1's 20 epochs"),
    "fs-merge": Group(dict(param="diag+lowrank(16)", targets="own-task"),
                      "appendix B.2: a residual stream takes diagonal + low-rank maps (dense ones are quadratic "
                      "in width), each input scored against its own source"),
    "distill": Group(dict(targets="own-task"), "as FS-Merge (appendix E.2)"),
    "zipit": Group(dict(alpha=0.3, beta=0.125), "bench vit pairs16's validation search (the ZipIt! authors' values)"),
    "regmean": Group(dict(alpha=0.9), "bench vit pairs16's validation search (appendix E.2's value)"),
    "ensemble": Group(dict(normalize=True),
                      "the FS-Merge authors' ViT ensemble scales each model's features to unit mean |f|"),
})

ROWS = {
    "mlp": MLP,
    "vit": VIT,
    "hf-vit": Row(borrows="vit", note="every Hugging Face table family (ViT, DeiT, DINOv2, CLIP's towers, ConvNeXt, "
                                      "ResNet; the decoders: Llama, Mistral, Qwen2, GPT-2, GPT-NeoX); not measured "
                                      "apart from foldmerge's ViT but by bench lm, which ran its trained merges "
                                      "with these values at 50 epochs"),
    "bert": Row(borrows="vit", note="bench text (from-scratch BERTs) ran with these values and held-out early "
                                    "stopping; not searched on text"),
    "resnet": Row(borrows="vit", note="bench cnn ran the trained merges with these values at 50 epochs; "
                                      "not searched on ResNets"),
}


# How `foldmerge train-sources` (and the benches) train a source model of each family.
SOURCES = {
    "mlp": Group(dict(batch_size=10, momentum=0.0),
                 "FS-Merge paper appendix E.1: SGD at a constant rate, batch 10; 1 epoch at lr 0.01 (2 epochs when "
                 "depth > 4 or width > 256), Fashion-MNIST 10 epochs at lr 0.001"),
    "vit": Group(dict(pretrain_epochs=3, epochs=2, lr=1e-3, batch_size=64, weight_decay=0.01),
                 "the FS-Merge paper's two stages (pre-training on one task, fine-tuning on another), scaled "
                 "down: bench vit's sources; AdamW on a cosine schedule"),
    "bert": Group(dict(pretrain_epochs=3, epochs=3, lr=1e-3, batch_size=32, weight_decay=0.01),
                  "as the ViT's, at a text batch; AdamW on a cosine schedule"),
    "resnet": Group(dict(epochs=4, lr=2e-3, batch_size=128, weight_decay=5e-4, limit=6000),
                    "bench cnn's sources (ResNet-8, 6,000 images of their task); AdamW on a cosine schedule"),
    "fine-tune": Group(dict(epochs=1, lr=3e-4, batch_size=64, weight_decay=0.01),
                       "bench gating's sources, each fine-tuned from one pre-trained ViT; AdamW, cosine"),
}


def row(name: str) -> Row:
    if name not in ROWS:
        raise ValueError(f"unknown defaults row {name!r}; rows: {', '.join(ROWS)}")
    r = ROWS[name]
    return ROWS[r.borrows] if r.borrows else r


def value(name: str, sections: tuple[str, ...], key: str):
    """(value, source) of `key` in the first of `sections` of row `name` that holds it."""
    r = row(name)
    for s in sections:
        g = r.groups.get(s)
        if g is not None and key in g.values:
            return g.values[key], g.source
    raise KeyError(f"the {name} defaults hold no {key!r} in {', '.join(sections)}")


def _words(key: str, v) -> str:
    if v is None and key == "batch_size":
        return "whole sample"
    return f"{v:g}" if isinstance(v, float) else str(v)


def describe(sections: tuple[str, ...], key: str) -> str:
    """The defaults of `key` per row, in words (for --help and the docs), with the values a variant
    of the first section's method takes instead (e.g. fs-merge/local)."""
    own, borrowed = [], []
    for name, r in ROWS.items():
        if r.borrows:
            borrowed.append(name)
            continue
        try:
            v, _ = value(name, sections, key)
        except KeyError:
            continue
        variants = [f"{g.split('/', 1)[1]}: {_words(key, grp.values[key])}" for g, grp in r.groups.items()
                    if g.startswith(sections[0] + "/") and key in grp.values]
        own.append(f"{name} {_words(key, v)}" + (f" ({', '.join(variants)})" if variants else ""))
    lenders = {r.borrows for r in ROWS.values() if r.borrows}
    return "by family: " + ", ".join(own) + (f" ({', '.join(borrowed)}: {', '.join(sorted(lenders))}'s)"
                                             if borrowed else "") + "; docs/defaults.md"
