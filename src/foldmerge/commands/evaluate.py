"""`foldmerge eval MODEL… [--split test|val] [--ensemble]`: per-task and joint accuracy of saved models;
given sources, also their heads side by side (and the ensemble)."""
from __future__ import annotations

from ..api import load
from ..evaluation import Ensemble, SourceHeads, evaluate
from ..provenance import environment
from ..tables import print_json, print_table
from . import add_common, command_line, set_threads


def add_arguments(p) -> None:
    p.add_argument("models", nargs="+", help="model directories")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--ensemble", action="store_true",
                   help="also the ensemble reference of the models (features averaged, for ViTs each scaled to "
                        "unit mean |f| first; every head applied: the FS-Merge paper's ensemble row)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (read with torch's "
                                                               "weights-only unpickler)")
    add_common(p)


def run(args) -> None:
    set_threads(args)
    out, models = [], []
    for p in args.models:
        model = load(p, allow_pickle=args.allow_pickle)
        models.append(model)
        out.append({"model": p, "method": model.meta.get("method", model.meta.get("kind", "?")),
                    **evaluate(model, split=args.split)})
    names = [t.name for m in models for t in m.tasks]
    together = len(models) > 1 and len(set(names)) == len(names)
    if args.ensemble and not together:
        raise ValueError("--ensemble needs two or more models whose tasks all differ")
    if together:     # the models as sources: their heads side by side, and the ensemble if asked
        out.append({"model": "heads side by side", "method": "sources",
                    **evaluate(SourceHeads(models), split=args.split)})
        if args.ensemble:
            out.append({"model": "ensemble", "method": "ensemble", **evaluate(Ensemble(models), split=args.split)})
    if args.json:
        print_json({"results": out, "command": command_line(), "environment": environment()})
        return
    rows = []
    for r in out:
        for t, acc in r["per_task"].items():
            rows.append({"model": r["model"], "task": t, "per_task": acc, "joint": r.get("joint", {}).get(t),
                         "routed": r.get("routed", {}).get(t)})
        if len(r["per_task"]) > 1:
            rows.append({"model": r["model"], "task": "mean", "per_task": r["per_task_mean"],
                         "joint": r.get("joint_mean"), "routed": r.get("routed_mean")})
    columns = [("model", "model"), ("task", "task"), ("per_task", "per-task acc %"), ("joint", "joint acc %")]
    if any(r["routed"] is not None for r in rows):      # a gated model: the head its gate picks
        columns.append(("routed", "routed acc %"))
    print_table(rows, f"{args.split} accuracy", columns)
