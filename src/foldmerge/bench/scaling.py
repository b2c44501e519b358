"""`foldmerge bench scaling`: memory and time of a merge of two language models against their size,
read lazily (`--lazy`: memory maps, parameter by parameter) and whole.

Llama-shaped decoders (transformers' `LlamaForCausalLM`, 8 layers, MLP twice the width, vocabulary
4,000) at several widths, two sources from seeds 0 and 1 (random weights: memory and time do not depend
on what the weights learned), saved in float32 and in bfloat16. Each merge runs in a fresh process
(`python -m foldmerge.bench.scaling`: nothing of an earlier run is resident) on 8 texts of 64 tokens
per source, one thread, and reports its peak private memory (the RssAnon of /proc, sampled every
millisecond, above the level after the code's set-up: the memory a merge must own; a memory-mapped
file's pages are the file's and are dropped under pressure) and its wall time. Methods: FS-Merge
local (one (M, U) per space, 5 epochs: memory does not depend on them) and averaging. Read whole, sources become float32 (the
in-memory path's dtype); read lazily they keep theirs. The fitted line (least squares) of peak
memory against one source's size gives the slope: bytes a merge holds per byte of a source.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..api import merge
from ..loading import load
from ..progress import status
from .cost import PeakMemory

WIDTHS = (256, 512, 1024, 1536)
DEPTH, VOCAB, TOKENS, TEXTS = 8, 4000, 64, 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHODS = {"fs-merge local": ("fs-merge", {"variant": "local", "epochs": 5}), "average": ("average", {})}
MODES = ("lazy", "whole")


def config(width: int) -> dict:
    return dict(hidden_size=width, num_hidden_layers=DEPTH, num_attention_heads=width // 64,
                num_key_value_heads=width // 64, intermediate_size=2 * width, vocab_size=VOCAB,
                max_position_embeddings=TOKENS, bos_token_id=1, eos_token_id=2)


def make_sources(folder: Path, width: int, dtype: str) -> list[Path]:
    """Two LlamaForCausalLM of `width` from seeds 0 and 1, saved in `dtype` (once: later calls reuse them)."""
    import transformers
    out = []
    for k in range(2):
        path = folder / f"w{width}-{dtype}-seed{k}"
        if not (path / "config.json").is_file():
            torch.manual_seed(k)
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config(width))).to(DTYPES[dtype])
            model.save_pretrained(path)
        out.append(path)
    return out


def measure(paths: list[str], mode: str, method: str) -> dict:
    """One merge in this process, saved with its Hugging Face export (then removed): peak private memory
    above the level after set-up, and seconds."""
    torch.set_num_threads(1)
    ids = [torch.randint(3, VOCAB, (TEXTS, TOKENS), generator=torch.Generator().manual_seed(k)) for k in range(2)]
    load(paths[0], lazy=True)                     # the code a load sets up is not the merge's
    name, options = METHODS[method]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=Path(paths[0]).parent) as scratch, PeakMemory("cpu", private=True) as peak:
        merge(paths, ids, name, lazy=mode == "lazy", calibrate="none", fidelity=0, out=Path(scratch) / "merged",
              **options)
    return {"peak_bytes": peak.bytes, "seconds": time.perf_counter() - start}


def run_bench(out: str = "runs/bench", widths: tuple = WIDTHS, dtypes: tuple = tuple(DTYPES),
              methods: tuple = tuple(METHODS)) -> dict:
    bad = [d for d in dtypes if d not in DTYPES] + [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown dtype or method {bad[0]!r}; of: {', '.join(DTYPES)}; {', '.join(METHODS)}")
    folder, t0, rows = Path(out) / "scaling", time.perf_counter(), []
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FOLDMERGE_PROGRESS": "0"}
    for width in widths:
        for dtype in dtypes:
            paths = make_sources(folder, width, dtype)
            size = sum((p / "model.safetensors").stat().st_size for p in paths[:1])
            params = size // torch.empty((), dtype=DTYPES[dtype]).element_size()
            for method in methods:
                for mode in MODES:
                    done = subprocess.run([sys.executable, "-m", "foldmerge.bench.scaling", mode, method,
                                           *map(str, paths)], capture_output=True, text=True, env=env)
                    if done.returncode != 0:
                        raise RuntimeError(f"scaling run w{width} {dtype} {method} {mode} failed: "
                                           f"{done.stderr.strip().splitlines()[-1:]}")
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    rows.append({"width": width, "dtype": dtype, "method": method, "mode": mode,
                                 "source_parameters": int(params), "source_bytes": size, **r})
                    status(f"  w{width} {dtype} {method} {mode}: {r['peak_bytes'] / 2 ** 20:.0f} MiB, "
                           f"{r['seconds']:.1f} s")
    return {"bench": "scaling", "widths": list(widths), "depth": DEPTH, "vocabulary": VOCAB, "texts": TEXTS,
            "tokens": TOKENS, "rows": rows, "fits": fits(rows), "total_seconds": time.perf_counter() - t0}


def fits(rows: list[dict]) -> list[dict]:
    """Least-squares line of peak memory (and time) against one source's bytes, per method, mode, dtype."""
    out = []
    for key in dict.fromkeys((r["method"], r["mode"], r["dtype"]) for r in rows):
        sel = [r for r in rows if (r["method"], r["mode"], r["dtype"]) == key]
        if len(sel) < 2:
            continue
        x = np.array([r["source_bytes"] for r in sel], dtype=float)
        slope, intercept = np.polyfit(x, [r["peak_bytes"] for r in sel], 1)
        t_slope, t_intercept = np.polyfit(x, [r["seconds"] for r in sel], 1)
        out.append({"method": key[0], "mode": key[1], "dtype": key[2], "memory_per_source_byte": float(slope),
                    "memory_intercept_bytes": float(intercept), "seconds_per_gib": float(t_slope * 2 ** 30),
                    "seconds_intercept": float(t_intercept)})
    return out


def print_report(result: dict, command: str) -> None:
    console = Console(file=sys.stdout, width=max(120, Console().width))
    table = Table(title="Merging two language models: peak private memory and time against one source's size")
    for col in ("width", "dtype", "one source", "method", "mode", "peak MiB", "peak / one source", "seconds"):
        table.add_column(col, justify="left" if col in ("dtype", "method", "mode") else "right")
    for r in result["rows"]:
        table.add_row(str(r["width"]), r["dtype"], f"{r['source_bytes'] / 2 ** 20:.0f} MiB", r["method"], r["mode"],
                      f"{r['peak_bytes'] / 2 ** 20:.0f}", f"{r['peak_bytes'] / r['source_bytes']:.2f}",
                      f"{r['seconds']:.1f}")
    console.print(table)
    fit = Table(title="Fitted: peak memory = slope x one source's bytes + intercept")
    for col in ("method", "mode", "dtype", "slope (bytes per source byte)", "intercept MiB", "seconds per GiB"):
        fit.add_column(col)
    for f in result["fits"]:
        fit.add_row(f["method"], f["mode"], f["dtype"], f"{f['memory_per_source_byte']:.2f}",
                    f"{f['memory_intercept_bytes'] / 2 ** 20:.0f}", f"{f['seconds_per_gib']:.0f}")
    console.print(fit)
    console.print(f"measured now: {result['total_seconds'] / 60:.1f} min; command: {command}")


if __name__ == "__main__":           # one measurement in a fresh process (run_bench starts these)
    print(json.dumps(measure(sys.argv[3:], sys.argv[1], sys.argv[2])))
