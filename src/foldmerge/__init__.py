"""foldmerge: merge networks trained from different initializations on different tasks.

The public names are loaded on first use (PEP 562): importing torch takes about 2 s, which
`foldmerge --help` and `--version` do not need.
"""
import importlib

from .version import __version__

_PUBLIC = {"Task": "foldmerge.data", "TaskModel": "foldmerge.model", "evaluate": "foldmerge.api",
           "load": "foldmerge.api", "merge": "foldmerge.api", "merge_form": "foldmerge.api",
           "merge_sample": "foldmerge.api", "FeatureCache": "foldmerge.context", "register_arch": "foldmerge.arch",
           "register_traced": "foldmerge.trace", "METHODS": "foldmerge.methods"}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'foldmerge' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
