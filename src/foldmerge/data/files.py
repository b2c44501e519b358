"""Examples from the user's own files: what `--data` (unlabeled) and `--eval-data` (labelled) read.

A data spec names a file or a folder, and for a table the column to read: `PATH` or `PATH:COLUMN`;
labelled data (`--eval-data`) may name the label column too, `PATH:COLUMN:LABEL` (default `label`).
A column is named or given by its position (0, 1, …); a path that exists as given is never split
at a colon.

  a folder of images      flat, or with one level of class sub-folders (unlabeled: their names are
                          ignored; labelled: each sub-folder's name is its images' label)
  a `datasets` folder     saved with `Dataset.save_to_disk` (a `DatasetDict`: its `train` split)
  .txt                    one example per line (blank lines skipped)
  .csv .tsv .jsonl .json .parquet
                          a table; COLUMN names the examples' column (needed when it has several)
  .npy .safetensors       tensors already preprocessed: used as they are (.safetensors: PATH:KEY
                          when the file holds several)

Tables and `datasets` folders are read by the `datasets` library's local builders (offline), images
by Pillow; nothing here parses a format by hand. Every failure is one ValueError naming the file and
the cause: a missing file or column, an empty file, an unreadable image.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file

# the `datasets` library is imported where a table is read: it adds about 2 s to the start of every
# command (measured here: torch alone 2.0 s, with datasets 4.1 s), and most merges read no table
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TABLES = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
TENSORS = (".npy", ".safetensors")


@dataclass
class Examples:
    """Examples read from a spec: texts (str), images (file paths, or PIL images a table held) or
    one tensor of preprocessed inputs; with their labels where the spec gives them."""
    kind: str                      # "text" | "image" | "tensor"
    items: list | torch.Tensor
    source: str
    labels: list | None = None

    def __len__(self) -> int:
        return len(self.items)

    def take(self, index) -> "Examples":
        """The examples at `index` (a list of positions), in that order."""
        if isinstance(self.items, torch.Tensor):
            items = self.items[torch.as_tensor(index, dtype=torch.long)]
        else:
            items = [self.items[i] for i in index]
        labels = None if self.labels is None else [self.labels[i] for i in index]
        return Examples(self.kind, items, self.source, labels)


def split_spec(spec: str, parts: int = 1) -> tuple:
    """(path, column, …) of `PATH[:COLUMN]` (`parts` 1) or `PATH[:COLUMN[:LABEL]]` (2); None where not given."""
    spec = os.fspath(spec)
    if not spec or "\x00" in spec:
        raise ValueError(f"expected a data file or folder, got {spec!r}")
    head, rest = spec, []
    while True:
        if os.path.exists(head):
            return (Path(head), *[r or None for r in rest], *[None] * (parts - len(rest)))
        head, sep, tail = head.rpartition(":")
        if not sep or not head or len(rest) == parts:
            raise ValueError(f"data {spec}: no such file or folder")
        rest.insert(0, tail)


def read(spec: str, labelled: bool = False) -> Examples:
    """The examples `spec` names; `labelled`: also their labels (a class sub-folder's name, or the
    table's label column)."""
    path, column, label = split_spec(spec, 2) if labelled else (*split_spec(spec), None)
    where = f"data {spec}"
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file() or \
                (path / "dataset_info.json").is_file():
            return _table(_from_disk(path, where), column, where, labelled, label)
        return _image_folder(path, where, labelled)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if labelled:
            raise ValueError(f"{where}: a text file holds no labels; give a table with a label column")
        lines = [line.strip() for line in _text(path, where).splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{where}: the file holds no example (no non-blank line)")
        return Examples("text", lines, str(path))
    if suffix in TABLES:
        return _table(_load_table(path, TABLES[suffix], where), column, where, labelled, label)
    if suffix in TENSORS:
        if labelled:
            raise ValueError(f"{where}: a tensor file holds no labels; give a table with a label column")
        return Examples("tensor", _tensor(path, column, where), str(path))
    if suffix in IMAGE_SUFFIXES:
        raise ValueError(f"{where}: one image; give the folder that holds the images")
    raise ValueError(f"{where}: unknown kind of file {suffix or '(no suffix)'}; expected a folder of images, a "
                     ".txt, .csv, .tsv, .jsonl, .json, .parquet, .npy or .safetensors file, or a datasets folder")


def _text(path: Path, where: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where}: not UTF-8 text") from None


def _image_folder(path: Path, where: str, labelled: bool) -> Examples:
    files, labels = [], []
    for entry in sorted(path.iterdir()):
        if entry.is_file() and entry.suffix.lower() in IMAGE_SUFFIXES:
            files.append(entry)
            labels.append(None)
        elif entry.is_dir():
            for f in sorted(entry.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                    labels.append(entry.name)
    if not files:
        raise ValueError(f"{where}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)}), flat or in "
                         "class sub-folders")
    if labelled and any(x is None for x in labels):
        raise ValueError(f"{where}: labelled images live in class sub-folders named by their labels")
    return Examples("image", files, str(path), labels if labelled else None)


def _load_table(path: Path, builder: str, where: str):
    import datasets
    datasets.disable_progress_bars()
    extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", **extra)
    except Exception as e:         # the builders raise many kinds for a file they cannot read
        raise ValueError(f"{where}: cannot read it as {builder} ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:160]})") from None
    if len(table) == 0:
        raise ValueError(f"{where}: the file holds no example")
    return table


def _from_disk(path: Path, where: str):
    import datasets
    datasets.disable_progress_bars()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:         # as above
        raise ValueError(f"{where}: not a readable datasets folder ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0][:160]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"{where}: a DatasetDict without a 'train' split (it has {', '.join(loaded)})")
        loaded = loaded["train"]
    if len(loaded) == 0:
        raise ValueError(f"{where}: the dataset holds no example")
    return loaded


def _table(table, column: str | None, where: str, labelled: bool, label: str | None) -> Examples:
    names = list(table.column_names)
    column, label = (_column(names, c, where) if c is not None else None for c in (column, label))
    label = label or "label"
    # unnamed, the examples' column is the one column of texts or images (the label's aside)
    candidates = [c for c in names if c != label and _holds_examples(table.features[c])]
    if column is None:
        if len(candidates) != 1:
            raise ValueError(f"{where}: say which column holds the examples (PATH:COLUMN); it has "
                             f"{', '.join(names)}")
        column = candidates[0]
    if column not in names:
        raise ValueError(f"{where}: no column {column!r}; it has {', '.join(names)}")
    if labelled and label not in names:
        raise ValueError(f"{where}: no label column {label!r}; it has {', '.join(names)}")
    values = table[column]
    labels = [str(x) for x in table[label]] if labelled else None
    if all(isinstance(v, str) for v in values):
        return Examples("text", list(values), where.split(" ", 1)[1], labels)
    if all(isinstance(v, Image.Image) for v in values):
        return Examples("image", list(values), where.split(" ", 1)[1], labels)
    kinds = sorted({type(v).__name__ for v in values})
    raise ValueError(f"{where}: column {column!r} holds {', '.join(kinds)}; expected texts or images")


def _holds_examples(feature) -> bool:
    """Whether a table column (its `datasets` feature) holds texts or images."""
    kind = type(feature).__name__
    return kind == "Image" or (kind == "Value" and getattr(feature, "dtype", "") in ("string", "large_string"))


def _column(names: list[str], given: str, where: str) -> str:
    """A column named, or given by its position."""
    if given in names:
        return given
    if given.isdigit() and int(given) < len(names):
        return names[int(given)]
    raise ValueError(f"{where}: no column {given!r}; it has {', '.join(names)}")


def _tensor(path: Path, key: str | None, where: str) -> torch.Tensor:
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}: not a readable .npy array ({str(e).splitlines()[0][:120]})") from None
        if array.dtype.kind not in "fiu":
            raise ValueError(f"{where}: an array of {array.dtype}; expected numbers")
        return torch.from_numpy(np.ascontiguousarray(array))
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{where}: not a readable .safetensors file ({str(e).splitlines()[0][:120]})") from None
    if key is None and len(tensors) != 1:
        raise ValueError(f"{where}: it holds {len(tensors)} tensors; say which (PATH:KEY): {', '.join(tensors)}")
    key = key or next(iter(tensors))
    if key not in tensors:
        raise ValueError(f"{where}: no tensor {key!r}; it holds {', '.join(tensors)}")
    return tensors[key]


def open_image(item, where: str) -> Image.Image:
    """An image of a folder (its path) or of a table, opened and decoded; one line if it cannot be."""
    if isinstance(item, Image.Image):
        return item
    try:
        with Image.open(item) as image:
            image.load()
            return image.copy()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(f"{where}: cannot read image {item} ({type(e).__name__})") from None


def describe(examples: Examples) -> dict:
    """What a merge records of the examples it read."""
    return {"source": examples.source, "kind": examples.kind, "examples": len(examples)}
