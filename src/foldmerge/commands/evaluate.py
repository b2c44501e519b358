"""`foldmerge eval MODEL… [--split test|val] [--ensemble]`: per-task and joint accuracy of saved models;
given sources of different tasks, also their heads side by side (and the ensemble); of one task,
their logits averaged (the ensemble of models of one task)."""
from __future__ import annotations

from ..api import load
from ..evaluation import Ensemble, SourceHeads, evaluate
from ..heads import share
from ..inputs import labelled as labelled_examples
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
    p.add_argument("--eval-data", nargs="+", metavar="DATA",
                   help="labelled examples, one per task in the order of the models' tasks: a folder of class "
                        "sub-folders named by the labels, or a table FILE:COLUMN[:LABEL] (label column default "
                        "'label'); unset: the built-in tasks' --split")
    add_common(p)


def run(args) -> None:
    set_threads(args)
    models = [load(p, allow_pickle=args.allow_pickle) for p in args.models]
    pairs = [(m, t) for m in models for t in m.tasks]
    if args.eval_data and len(args.eval_data) != len(pairs):
        raise ValueError(f"--eval-data needs one labelled file or folder per task ({len(pairs)}: "
                         f"{', '.join(t.name for _, t in pairs)}), got {len(args.eval_data)}")
    unscored = [t.name for _, t in pairs if not t.builtin]
    if unscored and not args.eval_data:
        raise ValueError(f"task {unscored[0]!r} has no built-in labelled data: give --eval-data (one per task)")
    labelled = {t.name: labelled_examples(m, t, spec) for (m, t), spec in zip(pairs, args.eval_data)} \
        if args.eval_data else None

    def score(model):
        return evaluate(model, labelled=labelled) if labelled else evaluate(model, split=args.split)
    out = [{"model": p, "method": m.meta.get("method", m.meta.get("kind", "?")), **score(m)}
           for p, m in zip(args.models, models)]
    try:             # the models as sources: which heads answer one task (`foldmerge.heads`)
        sharing = share(models) if len(models) > 1 else None
    except ValueError:
        sharing = None
    if args.ensemble and sharing is None:
        raise ValueError("--ensemble needs two or more models, of one task or of tasks that all differ")
    if sharing is not None and sharing.shared:    # models of one task: their logits averaged, the ensemble
        out.append({"model": "logits averaged per task", "method": "ensemble",
                    **score(SourceHeads(models, sharing.index, sharing.tasks))})
    elif sharing is not None:     # their heads side by side, and the ensemble if asked
        out.append({"model": "heads side by side", "method": "sources", **score(SourceHeads(models))})
        if args.ensemble:
            out.append({"model": "ensemble", "method": "ensemble", **score(Ensemble(models))})
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
    print_table(rows, "accuracy on --eval-data" if labelled else f"{args.split} accuracy", columns)
