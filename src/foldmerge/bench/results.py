"""Results as `foldmerge report` reads them: one loader that checks a JSON file (a bench's, or the
--json of `foldmerge merge` or `foldmerge eval`), one flat list of points per bench (panel, method,
per-task and joint accuracy, seconds, learnable parameters, MFLOPs), whatever layout the bench
wrote its rows in, and the roles a report gives methods (reference levels, distillation, merges).
"""
from __future__ import annotations

import json
from pathlib import Path

from . import mean_std

# bench name: the keys its JSON must hold (a file cut short loses its last keys, `command` among them)
REQUIRED = {"vit": ("rows", "setting"), "text": ("rows", "setting"), "cnn": ("rows",), "mlp": ("runs", "vary"),
            "gating": ("main",), "defaults": ("rows",), "select": ("rows",), "cost": ("rows",),
            "scale": ("rows", "gaps"), "data-efficiency": ("rows", "curves", "arch"),
            "same-task": ("rows", "correlation")}
# what each accuracy of a `merge --json` ("test") or an `eval --json` entry ("results"[i]) must hold
ACCURACY = ("per_task", "per_task_mean")

# reference levels, not methods: a method name (lower case) -> the level it is
REFERENCES = {"originals": "originals", "individual": "originals", "ensemble": "ensemble",
              "random guess": "random guess"}
# a merge whose forward costs more MFLOPs than this times one original's is larger than one model
SIZE_TOLERANCE = 1.01


def load_result(path: str | Path) -> dict:
    """A bench's, merge's or eval's --json output, checked; anything else raises ValueError with one line."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}; truncated?)") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    if not isinstance(result, dict) or not {"bench", "out", "meta", "test", "results"} & set(result):
        raise ValueError(f"{path}: not a foldmerge bench, merge or eval result (no 'bench', 'test' or 'results' key)")
    problem = {"merge": _merge_problem, "eval": _eval_problem}.get(kind(result), _bench_problem)(result)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return result


def kind(result: dict) -> str:
    """The bench's name, or 'merge' / 'eval' for the --json of those commands (they name no bench)."""
    if "bench" in result:
        return result["bench"] if isinstance(result["bench"], str) else repr(result["bench"])
    return "eval" if "results" in result else "merge"


def _bench_problem(result: dict) -> str | None:
    bench = result["bench"]
    if bench not in REQUIRED:
        return f"unknown bench {bench!r}; a report reads {', '.join(REQUIRED)}, merge and eval results"
    missing = [k for k in REQUIRED[bench] + ("command",) if k not in result]
    if missing:
        return f"a {bench} result without {missing[0]!r} (truncated, or written by another version)"
    return None


def _merge_problem(result: dict) -> str | None:
    missing = [k for k in ("out", "meta", "test") if k not in result]
    if missing:
        return f"a merge result without {missing[0]!r} (truncated, or not `foldmerge merge --json`)"
    if not isinstance(result["meta"], dict) or "method" not in result["meta"]:
        return "a merge result without 'meta.method'"
    return _accuracy_problem(result["test"], "a merge result's 'test'")


def _eval_problem(result: dict) -> str | None:
    entries = result["results"]
    if not isinstance(entries, list) or not entries:
        return "an eval result whose 'results' is not a non-empty list"
    for i, entry in enumerate(entries):
        where = f"an eval result's results[{i}]"
        if not isinstance(entry, dict):
            return f"{where} is not an object"
        missing = [k for k in ("model", "method") if k not in entry]
        if missing:
            return f"{where} without {missing[0]!r}"
        problem = _accuracy_problem(entry, where)
        if problem:
            return problem
    return None


def _accuracy_problem(entry, where: str) -> str | None:
    """What is wrong with one evaluation's accuracies ({per_task: {task: %}, per_task_mean: %, joint…}), if anything."""
    if not isinstance(entry, dict):
        return f"{where} is not an object"
    missing = [k for k in ACCURACY if k not in entry]
    if missing:
        return f"{where} without {missing[0]!r} (truncated, or written by another version)"
    for key in ("per_task", "joint"):
        values = entry.get(key, {})
        if not isinstance(values, dict) or not all(_number(v) for v in values.values()):
            return f"{where}: {key!r} is not a table of task: accuracy"
    for key in ("per_task_mean", "joint_mean"):
        if key in entry and not _number(entry[key]):
            return f"{where}: {key!r} is not a number"
    return None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _point(panel, method, per_task, joint=None, seconds=None, params=None, mflops=None) -> dict:
    return {"panel": str(panel), "method": method, "per_task": per_task, "joint": joint, "seconds": seconds,
            "params": params, "mflops": mflops}


def points(result: dict) -> list[dict]:
    """Every measured accuracy of a bench result; each replicate (seed or pair) is its own point.
    A merge or eval result has none (`evaluations` reads those)."""
    bench, out = kind(result), []
    if bench in ("vit", "text"):
        label = f"ViT {result['setting']}" if bench == "vit" else f"BERT {result['setting']}"
        for r in result["rows"]:
            out.append(_point(label, r["method"], r["per_task"], r.get("joint"), r.get("seconds"),
                              r.get("learnable_parameters")))
    elif bench == "cnn":
        for r in result["rows"]:
            out.append(_point(f"CNN {r['pair']} x{r['width']}", r["method"], r["avg"], r.get("joint"),
                              r.get("seconds"), mflops=r.get("mflops")))
    elif bench == "mlp":
        dataset = f" {result['dataset']}" if result.get("dataset") else ""
        for r in result["runs"]:
            out.append(_point(f"MLP{dataset} {result['vary']} {r['value']}", r["method"], r["per_task"],
                              r.get("joint"), r.get("seconds")))
    elif bench == "gating":
        for r in result["main"]:
            out.append(_point(f"one start, {r['set']} tasks", r["method"], r["mean"], None, r.get("seconds"),
                              mflops=r.get("mflops")))
    elif bench == "defaults":
        for r in result["rows"]:
            out.append(_point(f"defaults, {r['setting']}", r["method"], r["per_task"], r.get("joint"),
                              r.get("seconds")))
    elif bench == "select":
        for r in result["rows"]:
            out.append(_point(r["setting"], f"{r['method']}, validation pick", r["test_at_validation_pick"]))
            out.append(_point(r["setting"], f"{r['method']}, label-free pick", r["test_at_label_free_pick"]))
    elif bench == "same-task":
        # one head: no joint accuracy; the sources' level is their mean ("source 1", "source 2", ...)
        sources: dict[tuple, list] = {}
        for r in result["rows"]:
            panel = f"one task, {r['family']} {r['dataset']}"
            if str(r["method"]).startswith("source "):
                sources.setdefault((panel, r["seed"]), []).append(r)
            else:
                out.append(_point(panel, r["method"], r["accuracy"], None, r.get("seconds"), mflops=r.get("mflops")))
        for (panel, _), rows in sources.items():
            out.append(_point(panel, "Originals", sum(r["accuracy"] for r in rows) / len(rows),
                              mflops=rows[0].get("mflops")))
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
                    "n": len(sel), "seconds": mean_std(p.get("seconds") for p in sel)[0], "params": sel[0].get("params"),
                    "mflops": sel[0].get("mflops")})
    return out


# ------------------------------------------------------------------ roles
def reference(method: str) -> str | None:
    """The reference level a row is ('originals', 'ensemble', 'random guess'), or None for a method."""
    return REFERENCES.get(method.lower())


def is_distillation(method: str) -> bool:
    return method.lower().startswith("distill")


def larger_than_one_model(row: dict, panel_rows: list[dict]) -> bool:
    """More MFLOPs per forward than one original (partial ZipIt!, PLeaS with a budget, gating), where
    the bench recorded MFLOPs (cnn, gating); the other benches merge into one model's architecture only."""
    one = next((r for r in panel_rows if reference(r["method"]) == "originals"), None)
    if row.get("mflops") is None or one is None or one.get("mflops") is None:
        return False
    return row["mflops"] > one["mflops"] * SIZE_TOLERANCE


def settings(rows: list[dict]) -> list[dict]:
    """Per panel of `summary` rows: the best merge at one model's size (highest per-task mean among the
    rows that are neither references nor distillation nor larger than one model), the best
    distillation, the originals, the ensemble, and the methods left out as larger."""
    out = []
    for panel in dict.fromkeys(r["panel"] for r in rows):
        sel = [r for r in rows if r["panel"] == panel]
        larger = [r for r in sel if not reference(r["method"]) and larger_than_one_model(r, sel)]
        merges = [r for r in sel if not reference(r["method"]) and not is_distillation(r["method"])
                  and r not in larger]
        out.append({"panel": panel, "merge": _best(merges), "distill": _best(r for r in sel if is_distillation(r["method"])),
                    "originals": next((r for r in sel if reference(r["method"]) == "originals"), None),
                    "ensemble": next((r for r in sel if reference(r["method"]) == "ensemble"), None),
                    "larger": [r["method"] for r in larger]})
    return out


def _best(rows) -> dict | None:
    return max(rows, key=lambda r: r["per_task"], default=None)


# ------------------------------------------------------------------ merge and eval --json
def evaluations(result: dict) -> list[dict]:
    """The rows of a merge's or an eval's --json: model, method and its accuracies (per task, means)."""
    if kind(result) == "merge":
        meta = result["meta"]
        return [{"model": result["out"], "method": meta["method"], "seconds": meta.get("wall_seconds"),
                 **_accuracies(result["test"])}]
    return [{"model": e["model"], "method": e["method"], "seconds": None, **_accuracies(e)} for e in result["results"]]


def _accuracies(entry: dict) -> dict:
    return {"per_task": entry["per_task"], "per_task_mean": entry["per_task_mean"],
            "joint": entry.get("joint", {}), "joint_mean": entry.get("joint_mean")}


def signed(mean, std, missing: str = "–") -> str:
    """A difference as its tables print it: '+1.2 ± 0.3' (no ± for one seed), `missing` for None."""
    return missing if mean is None else f"{mean:+.1f}" + (f" ± {std:.1f}" if std else "")
