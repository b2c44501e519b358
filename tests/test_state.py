"""No hidden state in the core: caches belong to an object a merge is handed, evaluation leaves the
model as it found it, and a merge gives the same model whatever ran before it in the process."""
import importlib
import pkgutil
import weakref

import torch

import foldmerge
from foldmerge.context import FeatureCache
from foldmerge.evaluation import evaluate
from foldmerge.model import TaskModel

# memos of the installed data sets' files (read-only inputs; Task.split hands out copies) and of the
# checkout's commit: no merge computes into them
FILE_MEMOS = {"foldmerge.data.tasks._split", "foldmerge.data.tasks._normalizer", "foldmerge.data.datasets.load_images",
              "foldmerge.data.texts.load_texts", "foldmerge.data.texts.tokenizer", "foldmerge.provenance.git_commit",
              # the families' tables shipped in the package, and the schema each table's keys make
              "foldmerge.arch.encoder.tables", "foldmerge.arch.encoder._config_schema"}


def library_modules():
    for info in pkgutil.walk_packages(foldmerge.__path__, "foldmerge."):
        if not info.name.startswith(("foldmerge.bench", "foldmerge.__main__")):
            yield importlib.import_module(info.name)


def test_no_module_of_the_library_holds_a_cache():
    found = []
    for module in library_modules():
        for name, value in vars(module).items():
            where = f"{module.__name__}.{name}"
            if isinstance(value, (weakref.WeakKeyDictionary, weakref.WeakValueDictionary)):
                found.append(where)
            elif hasattr(value, "cache_info") and getattr(value, "__module__", "") == module.__name__ \
                    and where not in FILE_MEMOS:
                found.append(where)
    assert found == []


def pair():
    out = []
    for k, t in enumerate(["mnist:0-4", "mnist:5-9"]):
        torch.manual_seed(k)
        out.append(TaskModel("mlp", {"in_dim": 20, "hidden": [8]}, [t]))
    return out, [torch.randn(12, 20, generator=torch.Generator().manual_seed(k)) for k in range(2)]


def test_a_merge_is_the_same_whatever_ran_before_it_and_the_cache_is_the_callers():
    src, data = pair()
    first = foldmerge.merge(src, data, method="fs-merge", epochs=3)
    foldmerge.merge(src, [d + 1 for d in data], method="distill", epochs=2)
    cache = FeatureCache()
    again = foldmerge.merge(src, data, method="fs-merge", epochs=3, cache=cache)
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert len(cache._store) == 2                 # the sources' features, in the cache handed in


def test_evaluate_leaves_the_models_mode_as_it_was():
    model = TaskModel("mlp", {"in_dim": 784, "hidden": [8]}, ["mnist:0-4"])
    model.train()
    evaluate(model)
    assert model.training
    model.eval()
    evaluate(model)
    assert not model.training
    model.train()
    model.backbone.eval()                         # a mixed state comes back as it was, module by module
    evaluate(model)
    assert model.training and not model.backbone.training and model.heads[0].training
