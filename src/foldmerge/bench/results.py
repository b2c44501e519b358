"""Bench results as `foldmerge report` reads them: one loader that checks a JSON file, and one flat
list of points per bench (panel, method, per-task and joint accuracy, seconds, learnable
parameters), whatever layout the bench wrote its rows in.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import mean_std

# bench name: the keys its JSON must hold (a file cut short loses its last keys, `command` among them)
REQUIRED = {"vit": ("rows", "setting"), "text": ("rows", "setting"), "cnn": ("rows",), "mlp": ("runs", "vary"),
            "gating": ("main",), "defaults": ("rows",), "select": ("rows",), "cost": ("rows",),
            "scale": ("rows", "gaps"), "data-efficiency": ("rows", "curves", "arch")}


def load_result(path: str | Path) -> dict:
    """A bench's --json output, checked; anything else raises ValueError with one line."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}; truncated?)") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    if not isinstance(result, dict) or "bench" not in result:
        raise ValueError(f"{path}: not a foldmerge bench result (no 'bench' key)")
    bench = result["bench"]
    if bench not in REQUIRED:
        raise ValueError(f"{path}: unknown bench {bench!r}; a report reads {', '.join(REQUIRED)}")
    missing = [k for k in REQUIRED[bench] + ("command",) if k not in result]
    if missing:
        raise ValueError(f"{path}: a {bench} result without {missing[0]!r} (truncated, or written by another version)")
    return result


def _point(panel, method, per_task, joint=None, seconds=None, params=None) -> dict:
    return {"panel": str(panel), "method": method, "per_task": per_task, "joint": joint, "seconds": seconds,
            "params": params}


def points(result: dict) -> list[dict]:
    """Every measured accuracy of a result; each replicate (seed or pair) is its own point."""
    bench, out = result["bench"], []
    if bench in ("vit", "text"):
        label = f"ViT {result['setting']}" if bench == "vit" else f"BERT {result['setting']}"
        for r in result["rows"]:
            out.append(_point(label, r["method"], r["per_task"], r.get("joint"), r.get("seconds"),
                              r.get("learnable_parameters")))
    elif bench == "cnn":
        for r in result["rows"]:
            out.append(_point(f"{r['pair']} x{r['width']}", r["method"], r["avg"], r.get("joint"), r.get("seconds")))
    elif bench == "mlp":
        for r in result["runs"]:
            out.append(_point(f"{result['vary']} {r['value']}", r["method"], r["per_task"], r.get("joint"),
                              r.get("seconds")))
    elif bench == "gating":
        for r in result["main"]:
            out.append(_point(f"{r['set']} tasks", r["method"], r["mean"], None, r.get("seconds")))
    elif bench == "defaults":
        for r in result["rows"]:
            out.append(_point(r["setting"], r["method"], r["per_task"], r.get("joint"), r.get("seconds")))
    elif bench == "select":
        for r in result["rows"]:
            out.append(_point(r["setting"], f"{r['method']}, validation pick", r["test_at_validation_pick"]))
            out.append(_point(r["setting"], f"{r['method']}, label-free pick", r["test_at_label_free_pick"]))
    elif bench == "scale":
        for r in result["rows"]:
            out.append(_point(f"{r['originals']} originals", f"{r['method']} w{r['width']} d{r['depth']}",
                              r["per_task"], r.get("joint"), r.get("seconds"), r.get("learnable_parameters")))
    elif bench == "data-efficiency":
        for r in result["rows"]:
            if r["originals"] is not None:
                out.append(_point(f"{r['originals']} originals", r["method"], r["per_task"], r.get("joint"),
                                  r.get("seconds"), r.get("learnable_parameters")))
    return [p for p in out if p["per_task"] is not None]


def summary(pts: list[dict], keys: tuple[str, ...] = ("panel", "method")) -> list[dict]:
    """Mean and sample std over replicates per value of `keys`, in the order first seen."""
    out = []
    for key in dict.fromkeys(tuple(p[k] for k in keys) for p in pts):
        sel = [p for p in pts if tuple(p[k] for k in keys) == key]
        pt, pt_sd = mean_std(p["per_task"] for p in sel)
        j, j_sd = mean_std(p.get("joint") for p in sel)
        out.append({**dict(zip(keys, key)), "per_task": pt, "per_task_std": pt_sd, "joint": j, "joint_std": j_sd,
                    "n": len(sel), "seconds": mean_std(p.get("seconds") for p in sel)[0], "params": sel[0].get("params")})
    return out


def signed(mean, std, missing: str = "–") -> str:
    """A difference as its tables print it: '+1.2 ± 0.3' (no ± for one seed), `missing` for None."""
    return missing if mean is None else f"{mean:+.1f}" + (f" ± {std:.1f}" if std else "")
