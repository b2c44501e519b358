"""Where the data packages installed from the package registries keep their files."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import DataMissing


def package_dir(name: str, what: str, hint: str) -> Path:
    """The folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing(f"{what} is not installed: {hint}")
    return Path(list(spec.submodule_search_locations)[0])
