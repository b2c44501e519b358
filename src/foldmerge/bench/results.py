"""Results as `foldmerge report` reads them: one loader that checks a JSON file (a bench's, or the
--json of `foldmerge merge` or `foldmerge eval`), one flat list of points per bench (panel, method,
per-task and joint accuracy, seconds, learnable parameters, MFLOPs), whatever layout the bench
wrote its rows in, and the roles a report gives methods (reference levels, distillation, merges).
"""
from __future__ import annotations

from pathlib import Path

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictInt, StrictStr, ValidationError

from ..io import read_json
from ..schema import Number as Num
from ..schema import first_problem
from . import mean_std


# ------------------------------------------------------------------ the schemas of what a report reads
# Strict (a string is not a number, a number not a boolean) and finite; fields a report does not read
# may hold anything (a bench's JSON keeps more than its report shows).
Count = Annotated[StrictInt, Field(ge=0)]
Text = Annotated[StrictStr, Field(min_length=1)]
Label = Union[StrictStr, StrictInt]


class _Read(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _Row(_Read):
    method: Text
    seconds: Num | None = None


class _Bench(_Read):
    bench: Text
    command: StrictStr
    date: StrictStr | None = None
    total_seconds: Num | None = None
    cells: Count | None = None
    cells_from_cache: Count | None = None
    environment: dict[StrictStr, JsonValue] | None = None


class _Accuracy(_Row):
    per_task: Num | None
    joint: Num | None = None
    learnable_parameters: Count | None = None


class _Correlation(_Read):
    per_cell: dict[StrictStr, Num | None] = {}
    pooled: Num | None
    merges: Count


class _Setting(_Accuracy):
    setting: Label


class VitText(_Bench):
    setting: Label
    rows: list[_Accuracy]


class _CnnRow(_Row):
    pair: Label
    width: Num
    avg: Num | None
    joint: Num | None = None
    mflops: Num | None = None


class Cnn(_Bench):
    rows: list[_CnnRow]
    correlation: _Correlation | None = None


class _MlpRun(_Accuracy):
    value: Label


class Mlp(_Bench):
    runs: list[_MlpRun]
    vary: Text
    dataset: StrictStr | None = None


class _GatingRow(_Row):
    set: Label
    mean: Num | None
    mflops: Num | None = None


class Gating(_Bench):
    main: list[_GatingRow]


class Defaults(_Bench):
    rows: list[_Setting]


class _SelectRow(_Row):
    setting: Label
    test_at_validation_pick: Num | None
    test_at_label_free_pick: Num | None


class Select(_Bench):
    rows: list[_SelectRow]


class _CostRow(_Row):
    n: Count
    seconds: Num
    peak_bytes: Num | None = None
    time_ratio: Num | None = None
    memory_ratio: Num | None = None


class Cost(_Bench):
    rows: list[_CostRow]


class _ScaleRow(_Accuracy):
    originals: Count
    width: Count
    depth: Count


class _Gap(_Read):
    width: Count
    depth: Count
    originals: Count
    seeds: Count
    source_parameters: Count
    per_task_of: dict[StrictStr, Num | None]
    gap_per_task: Num | None
    gap_per_task_std: Num | None
    gap_joint: Num | None
    gap_joint_std: Num | None


class Scale(_Bench):
    rows: list[_ScaleRow]
    gaps: list[_Gap]


class _EfficiencyRow(_Accuracy):
    originals: Count | None


class _Curve(_Read):
    method: Text
    originals: Count | None
    per_task: Num | None
    per_task_std: Num | None
    joint: Num | None
    joint_std: Num | None


class DataEfficiency(_Bench):
    arch: Text
    seeds: Count
    total_per_task: Count | None = None
    rows: list[_EfficiencyRow]
    curves: list[_Curve]


class _SameTaskRow(_Row):
    family: Text
    dataset: Text
    seed: Count
    accuracy: Num | None
    mflops: Num | None = None


class _FamilyRow(_Accuracy):
    family: Text


class Families(_Bench):
    rows: list[_FamilyRow]


class _ClipRow(_Row):
    task: Text
    zero_shot: Num
    matched: Num
    image_cosine: Num | None = None
    text_cosine: Num | None = None


class Clip(_Bench):
    tasks: list[Text]
    rows: list[_ClipRow]


class _LmRow(_Row):
    setting: Text


class Lm(_Bench):
    settings: list[Text]
    domains: list[Text]
    rows: list[_LmRow]


class _ScalingRow(_Row):
    width: Count
    dtype: Text
    mode: Literal["lazy", "whole"]
    source_bytes: Count
    peak_bytes: Num


class _Fit(_Read):
    method: Text
    mode: Text
    dtype: Text
    memory_per_source_byte: Num


class Scaling(_Bench):
    rows: list[_ScalingRow]
    fits: list[_Fit]


class SameTask(_Bench):
    rows: list[_SameTaskRow]
    correlation: _Correlation


class _TrialRow(_Row):
    cell: Text
    trial: Text
    val_per_task: Num
    val_joint: Num | None
    learnable_parameters: Count | None = None


class TuneFs(_Bench):
    settings: list[Text]
    split: Literal["val"]
    rows: list[_TrialRow]


# bench name -> the schema of its JSON
BENCHES: dict[str, type[_Bench]] = {"vit": VitText, "text": VitText, "cnn": Cnn, "mlp": Mlp, "gating": Gating,
                                    "defaults": Defaults, "select": Select, "cost": Cost, "scale": Scale,
                                    "data-efficiency": DataEfficiency, "same-task": SameTask,
                                    "families": Families, "tune-fs": TuneFs, "clip": Clip, "lm": Lm,
                                    "scaling": Scaling}


class _Scores(_Read):
    """One evaluation's accuracies: {per_task: {task: %}, per_task_mean: %, joint…}."""
    per_task: dict[StrictStr, Num]
    per_task_mean: Num | None
    joint: dict[StrictStr, Num] = {}
    joint_mean: Num | None = None


class _MergeMeta(_Read):
    method: Text
    command: StrictStr | None = None
    wall_seconds: Num | None = None
    options: dict[StrictStr, JsonValue] | None = None
    provenance: dict[StrictStr, JsonValue] | None = None


class MergeResult(_Read):
    """`foldmerge merge --json`."""
    out: StrictStr
    meta: _MergeMeta
    test: _Scores


class _Evaluated(_Scores):
    model: StrictStr
    method: StrictStr
    split: Label | None = None


class EvalResult(_Read):
    """`foldmerge eval --json`."""
    results: Annotated[list[_Evaluated], Field(min_length=1)]


# reference levels, not methods: a method name (lower case) -> the level it is
REFERENCES = {"originals": "originals", "individual": "originals", "ensemble": "ensemble",
              "random guess": "random guess"}
# a merge whose forward costs more MFLOPs than this times one original's is larger than one model
SIZE_TOLERANCE = 1.01


def load_result(path: str | Path) -> dict:
    """A bench's, merge's or eval's --json output, checked; anything else raises ValueError with one line."""
    path = Path(path)
    result = read_json(path)
    if not isinstance(result, dict) or not {"bench", "out", "meta", "test", "results"} & set(result):
        raise ValueError(f"{path}: not a foldmerge bench, merge or eval result (no 'bench', 'test' or 'results' key)")
    schema = {"merge": MergeResult, "eval": EvalResult}.get(kind(result)) or BENCHES.get(kind(result))
    if schema is None:
        raise ValueError(f"{path}: unknown bench {result['bench']!r}; a report reads {', '.join(BENCHES)}, merge and "
                         "eval results")
    try:
        schema.model_validate(result)
    except ValidationError as e:
        raise ValueError(f"{path}: {first_problem(e)} (truncated, edited, or written by another version?)") from None
    return result


def kind(result: dict) -> str:
    """The bench's name, or 'merge' / 'eval' for the --json of those commands (they name no bench)."""
    if "bench" in result:
        return result["bench"] if isinstance(result["bench"], str) else repr(result["bench"])
    return "eval" if "results" in result else "merge"


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
    elif bench == "families":
        for r in result["rows"]:
            out.append(_point(f"{r['family']} ({r.get('modality', '?')})", r["method"], r["per_task"], r.get("joint"),
                              r.get("seconds"), r.get("learnable_parameters")))
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
