"""`io.write_tensors`, the one safetensors writer (models, Hugging Face exports, checkpoints): it writes
one tensor at a time, and safetensors' own reader reads back every tensor exactly, for generated
tensors of every dtype, shape (scalars and empty ones included) and layout (views, transposes)."""
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from foldmerge.io import DTYPES, map_tensors, write_tensors


def generated(seed: int) -> dict:
    r, g = random.Random(seed), torch.Generator().manual_seed(seed)
    out = {}
    for i in range(r.randint(1, 12)):
        dtype = r.choice(list(DTYPES.values()))
        shape = [r.choice([0, 1, 2, 3, 7]) for _ in range(r.randint(0, 3))]
        t = (torch.rand(shape, generator=g) * 200 - 100).to(dtype) if dtype != torch.bool else \
            torch.rand(shape, generator=g) > 0.5
        if t.dim() == 2 and r.random() < 0.5:
            t = t.T                                          # not contiguous
        out[f"{r.choice(['a', 'b.c', 'layer.0.weight'])}{i}"] = t
    return out


@pytest.mark.parametrize("seed", range(25))
def test_what_write_tensors_writes_safetensors_reads_back_exactly(tmp_path, seed):
    tensors = generated(seed)
    path = tmp_path / "w.safetensors"
    write_tensors(tensors, path, metadata={"format": "pt", "seed": seed})
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "seed": str(seed)}
    mapped = map_tensors(path)                       # and our own reader of the same files
    assert all(torch.equal(mapped[n], t) for n, t in tensors.items())


def test_write_tensors_refuses_a_dtype_safetensors_has_no_code_for(tmp_path):
    with pytest.raises(ValueError, match="no safetensors code"):
        write_tensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "z.safetensors")
