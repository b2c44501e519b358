"""Merges bigger than memory (`--lazy`): two sources merge, and the merged model is saved with its Hugging
Face export, under a memory cap below the size of ONE of them (so below the merged model's too) when read
as memory maps, folded parameter by parameter and written to a temporary file's pages
(`io.MappedTensors`), then streamed to disk a tensor at a time; read whole, they do not merge.

The cap is the kernel's limit on a process's private writable memory (RLIMIT_DATA), measured from
the level a child process has after importing and loading once (so the code's own set-up is not
counted), in a child so the limit binds nothing else. A memory-mapped file's pages are not private
memory: what the cap counts is exactly what a merge allocates. glibc's malloc keeps freed blocks
below its (adaptive, up to 32 MiB) threshold for reuse; the child fixes the threshold, so that every
block this size of model frees goes back as a large model's tensors always do."""
import os
import subprocess
import sys

import pytest
import torch

CHILD = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
import foldmerge
from foldmerge.loading import load

def private():
    for line in open("/proc/self/status"):
        if line.startswith("VmData"):
            return int(line.split()[1]) * 1024

paths, mode, cap, method, options = sys.argv[1:3], sys.argv[3], int(sys.argv[4]), sys.argv[5], json.loads(sys.argv[6])
out = sys.argv[7] if len(sys.argv) > 7 else None
ids = [torch.randint(3, 500, (4, 8), generator=torch.Generator().manual_seed(k)) for k in range(2)]
load(paths[0], lazy=True)                  # the code a load sets up, before the baseline
base = private()
resource.setrlimit(resource.RLIMIT_DATA, (base + cap, base + cap))
try:
    foldmerge.merge(paths, ids, method, lazy=mode == "lazy", calibrate="none", fidelity=0, out=out, **options)
except (MemoryError, RuntimeError) as e:
    print("out of memory:", str(e).splitlines()[0][:160])
    sys.exit(3)
print("merged")
"""


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two Llama-shaped models of ~96 MiB each (8 layers at width 512), written by plain transformers."""
    import transformers
    folder = tmp_path_factory.mktemp("big")
    paths = []
    for k in range(2):
        torch.manual_seed(k)
        config = transformers.LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                                          num_key_value_heads=8, intermediate_size=1024, vocab_size=4000,
                                          max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
        transformers.LlamaForCausalLM(config).save_pretrained(folder / f"lm {k}")
        paths.append(folder / f"lm {k}")
    return paths


def run(paths, mode, cap, method, options="{}", out=None):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "1", "FOLDMERGE_PROGRESS": "0",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CHILD, *map(str, paths), mode, str(cap), method, options,
                           *([str(out)] if out else [])],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc are Linux's")
def test_a_lazy_merge_completes_and_saves_under_a_cap_below_one_source_and_a_whole_one_does_not(sources, tmp_path):
    cap = int(0.85 * (sources[0] / "model.safetensors").stat().st_size)     # not even the merged model fits
    lazy = run(sources, "lazy", cap, "average", out=tmp_path / "average")
    assert lazy.returncode == 0 and "merged" in lazy.stdout, lazy.stdout + lazy.stderr[-2000:]
    assert (tmp_path / "average" / "model.safetensors").stat().st_size > cap
    whole = run(sources, "whole", cap, "average")
    assert whole.returncode == 3 and "out of memory" in whole.stdout, whole.stdout + whole.stderr[-2000:]
    # FS-Merge local under the same cap (read whole it needs several times the sources' size)
    local = run(sources, "lazy", cap, "fs-merge", '{"variant": "local", "epochs": 2}', out=tmp_path / "local")
    assert local.returncode == 0 and "merged" in local.stdout, local.stdout + local.stderr[-2000:]
    assert (tmp_path / "local" / "hf" / "backbone" / "backbone.safetensors").is_file()
