"""Tasks: what a model's head answers. A built-in task is a data set restricted to some classes,
with train/val/test splits; a model's own task is its head alone (a name and its class labels, as
a Hugging Face config's id2label gives them), whose examples the user brings (`--data`).

A built-in task spec is `DATASET[/VIEW][:CLASSES]`, e.g. `mnist:0-4`, `fmnist:5-9`, `mnist:0,2,4`,
`mnist` (all ten classes) or `mnist/rot90:0-4`. A VIEW is a fixed transform of every image of
the task, which makes a distinct task from the same data: rot90, rot180, rot270, flip
(left-right), transpose, invert (255 − pixel), noise (Gaussian, σ 64 grey levels, one fixed
draw per split). Labels are re-indexed 0..C-1 in the order the classes are listed, so
each task has its own head. The validation split is a fixed 10% of the task's training
images (split seed 0, independent of any experiment seed); the test split is the data
set's own test set.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .datasets import canonical_name, is_text, load_data, load_images, num_classes

VAL_FRACTION = 0.10
SPLIT_SEED = 0
VIEWS = {
    "rot90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rot180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rot270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "flip": lambda x: x[:, :, ::-1],
    "transpose": lambda x: np.swapaxes(x, 1, 2),
    "invert": lambda x: 255 - x,
    # Gaussian pixel noise, σ = 64 grey levels, clipped; one fixed draw (seed 0) per split
    "noise": lambda x: np.clip(x + np.random.default_rng(0).normal(0.0, 64.0, x.shape), 0, 255).astype(np.uint8),
}


# the class list of a task spec: numbers and ranges a-b, comma-separated (`0-4`, `1,3,5`, `0-2,7`)
CLASS_LIST = re.compile(r"\s*[0-9]+(\s*-\s*[0-9]+)?(\s*,\s*[0-9]+(\s*-\s*[0-9]+)?)*\s*")     # ASCII digits


def _parse_classes(text: str) -> tuple[int, ...]:
    if not CLASS_LIST.fullmatch(text):
        raise ValueError(f"classes {text!r} must be numbers and ranges a-b, comma-separated (e.g. 0-4 or 1,3,5)")
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
        if hi_i < lo_i:
            raise ValueError(f"class range {part.strip()!r} is empty")
        out.extend(range(lo_i, hi_i + 1))
    if len(set(out)) != len(out):
        raise ValueError(f"classes {text!r} repeat a class")
    if len(out) < 2:
        raise ValueError(f"classes {text!r} are one class; a classifier needs two or more (one trains with zero loss)")
    return tuple(out)


@dataclass(frozen=True)
class Task:
    dataset: str                  # a built-in data set, or "" for a task known by its head alone
    classes: tuple                # built-in: the data set's class indices; own: the class labels
    view: str = ""
    title: str = ""               # own: the task's name

    @classmethod
    def own(cls, name: str, labels) -> "Task":
        """A task known by its head alone: its name and its class labels, in the head's order."""
        labels = tuple(str(x) for x in labels)
        if not isinstance(name, str) or not name.strip() or any(c in name for c in "\n\r\x00"):
            raise ValueError(f"a task's name must be a non-empty line of text, got {name!r}")
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"task {name!r}: a classifier's labels must be two or more and distinct, got "
                             f"{list(labels)}")
        return cls("", labels, "", name.strip())

    @classmethod
    def parse(cls, spec: "str | dict | Task") -> "Task":
        """A task from its spec: a built-in one (`mnist:0-4`), or an own one as its config records it
        ({"name": …, "labels": […]})."""
        if isinstance(spec, Task):
            return spec
        if isinstance(spec, dict):
            if set(spec) != {"name", "labels"} or not isinstance(spec["labels"], list):
                raise ValueError(f"an own task is recorded as {{name, labels}}, got {spec!r}")
            return cls.own(spec["name"], spec["labels"])
        name, sep, cls_text = str(spec).partition(":")
        name, _, view = name.partition("/")
        view = view.strip().lower()
        if view and view not in VIEWS:
            raise ValueError(f"bad task spec {spec!r}: unknown view {view!r}; use one of {', '.join(VIEWS)}")
        dataset = canonical_name(name.strip())
        if view and is_text(dataset):
            raise ValueError(f"bad task spec {spec!r}: views are image transforms; {dataset} is a text data set")
        total = num_classes(dataset)
        try:
            classes = _parse_classes(cls_text) if sep else tuple(range(total))
        except ValueError as e:
            raise ValueError(f"bad task spec {spec!r}: {e}") from None
        if any(c < 0 or c >= total for c in classes):
            raise ValueError(f"bad task spec {spec!r}: classes must be in 0..{total - 1}")
        return cls(dataset, classes, view)

    @property
    def builtin(self) -> bool:
        """Whether the task has built-in data (splits to draw from and score on)."""
        return bool(self.dataset)

    def record(self) -> "str | dict":
        """The task as a model's config records it (`Task.parse` reads it back)."""
        return self.name if self.builtin else {"name": self.title, "labels": list(self.classes)}

    @property
    def labels(self) -> tuple[str, ...]:
        """The class labels, in the head's order."""
        return tuple(str(c) for c in self.classes)

    @property
    def name(self) -> str:
        if not self.builtin:
            return self.title
        c = self.classes
        if c == tuple(range(c[0], c[-1] + 1)) and len(c) > 1:
            text = f"{c[0]}-{c[-1]}"
        else:
            text = ",".join(map(str, c))
        return f"{self.dataset}{'/' + self.view if self.view else ''}:{text}"

    @property
    def slug(self) -> str:
        """The name as a folder name: mnist:0-4 -> mnist_0-4; mnist/rot90:0,2 -> mnist-rot90_0.2;
        an own task's name with anything but letters, digits, '.', '_' and '-' made '_'."""
        if not self.builtin:
            return re.sub(r"[^\w.-]", "_", self.title).strip(".") or "task"
        return self.name.replace("/", "-").replace(":", "_").replace(",", ".")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_text(self) -> bool:
        """Whether a built-in task's inputs are token ids (text) rather than images (an own task's
        inputs are whatever its model reads: False)."""
        return self.builtin and is_text(self.dataset)

    def __str__(self) -> str:
        return self.name

    # ----------------------------------------------------------------------- splits
    def split(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(images float32 (N,1,28,28) normalized, or token ids int64 (N, length) for a text
        task; labels int64 in 0..C-1). The installed files are read once per process (`_split`);
        each call returns its own copy, so no caller can change what the next one reads."""
        if which not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got {which!r}")
        if not self.builtin:
            raise ValueError(f"task {self.name!r} has no built-in data: give its unlabeled examples with --data "
                             "(and labelled ones with --eval-data)")
        x, y = _split(self, which)
        return x.clone(), y.clone()

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """An unlabeled merge sample: n training images (never validation or test) drawn with `seed`."""
        x, _ = self.split("train")
        if n > len(x):
            raise ValueError(f"task {self} has only {len(x)} training images, asked for {n}")
        g = torch.Generator().manual_seed(int(seed))
        idx = torch.randperm(len(x), generator=g)[:n]
        return x[idx]


@lru_cache(maxsize=4)
def _normalizer(dataset: str) -> tuple[float, float]:
    x = load_images(dataset)["train_x"]
    x = x.astype(np.float32) / 255.0
    return float(x.mean()), float(x.std())


@lru_cache(maxsize=32)
def _split(task: Task, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_data(task.dataset)
    part = "test" if which == "test" else "train"
    xs, ys = data[f"{part}_x"], data[f"{part}_y"]
    keep = np.flatnonzero(np.isin(ys, task.classes))
    if which != "test":
        rng = np.random.default_rng(SPLIT_SEED)
        keep = keep[rng.permutation(len(keep))]
        n_val = int(round(VAL_FRACTION * len(keep)))
        keep = np.sort(keep[:n_val] if which == "val" else keep[n_val:])
    remap = np.full(num_classes(task.dataset), -1, dtype=np.int64)
    remap[list(task.classes)] = np.arange(len(task.classes))
    y = torch.from_numpy(remap[ys[keep]])
    if task.is_text:
        return torch.from_numpy(np.ascontiguousarray(xs[keep])), y
    mean, std = _normalizer(task.dataset)
    images = VIEWS[task.view](xs[keep]) if task.view else xs[keep]
    x = torch.from_numpy(np.ascontiguousarray(images).astype(np.float32) / 255.0)
    x = ((x - mean) / std).unsqueeze(1)
    return x, y


def parse_tasks(specs) -> list[Task]:
    return [Task.parse(s) for s in specs]
