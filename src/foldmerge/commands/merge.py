"""`foldmerge merge MODEL… [--method M] [options] --out DIR`, or `--config merge.yaml`.

Every flag is made from a declaration: the merge settings (`foldmerge.api.SETTINGS`) and each
method's options (`foldmerge.methods.METHODS`), grouped per method in --help with their defaults.
The flags are collected as text and handed to `foldmerge.merge`, which reads and checks them.
"""
from __future__ import annotations

import argparse
import os

from .. import config
from ..api import SETTING, SETTINGS, merge
from ..clip import is_clip_dir, merge_clip
from ..methods import METHODS, get_method
from ..options import Choice, Flag, Option
from ..tables import print_json, print_table, result_row
from . import add_common, command_line, set_threads


def _read(option: Option, value):
    """A flag's text, read by the option's grammar (an error names the flag)."""
    try:
        return option.kind.from_command_line(value)
    except ValueError as e:
        raise ValueError(f"{option.flag}: {e}") from None


def _help(option: Option, owner: str = "", others=()) -> str:
    """The option's help with its default and source; a flag that several methods read says each one's."""
    def one(o: Option, grammar: bool) -> str:
        text = o.help + (f" ({o.kind.describe()})" if grammar else "")
        return text + (f" (default {o.default_text()})" if o.default_text() else "")
    differ = any(type(o.kind) is not type(option.kind) or o.kind != option.kind for _, o in others)
    text = (f"{owner}: " if differ else "") + one(option, differ and isinstance(option.kind, Choice))
    for method, other in others:        # the same flag, read by another method
        if not differ and other.help == option.help and other.default_text() == option.default_text():
            text += f"; also {method}"
        else:
            text += f"; {method}: " + one(other, differ and isinstance(other.kind, Choice))
    return text.replace("%", "%%")


def _metavar(option: Option, others) -> str:
    """The flag's metavar: the one grammar's, or every reader's choices together."""
    kinds = [option.kind] + [o.kind for _, o in others]
    if len(kinds) > 1 and all(isinstance(k, Choice) for k in kinds):
        return "{" + ",".join(dict.fromkeys(v for k in kinds for v in k.values)) + "}"
    return option.kind.metavar


def _add(group, option: Option, owner: str = "", others=()) -> None:
    kwargs = {"dest": option.name, "default": argparse.SUPPRESS, "help": _help(option, owner, others)}
    if isinstance(option.kind, Flag):
        group.add_argument(option.flag, action="store_true", **kwargs)
    elif option.name == "select":
        group.add_argument(option.flag, action="append", metavar=option.kind.metavar, **kwargs)
    else:
        group.add_argument(option.flag, metavar=_metavar(option, others),
                           nargs="+" if option.kind.many else None, **kwargs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.usage = "foldmerge merge MODEL… [--method METHOD] [options] --out DIR\n       foldmerge merge --config FILE [options]"
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="model directories: foldmerge's or Hugging Face's (with --config: these replace its models)")
    p.add_argument("--config", metavar="FILE", help="a YAML file naming models, method, options and out "
                   "(docs/cli.md); flags on the command line override it")
    p.add_argument("--method", default=argparse.SUPPRESS, metavar="METHOD",
                   help=f"{' | '.join(METHODS)} (default: fs-merge, the flagship); each method's options are below")
    group = p.add_argument_group("merge settings")
    for option in SETTINGS:
        _add(group, option)
    readers: dict[str, list] = {}
    for m in METHODS.values():
        for o in m.options:
            readers.setdefault(o.name, []).append((m.name, o))
    for m in METHODS.values():
        own = [o for o in m.options if readers[o.name][0][0] == m.name]
        shared = [o.flag for o in m.options if readers[o.name][0][0] != m.name]
        group = p.add_argument_group(f"method {m.name}: {m.summary}",
                                     description=f"also reads {', '.join(shared)} (above)" if shared else None)
        for o in own:
            _add(group, o, m.name, readers[o.name][1:])
    p.add_argument("--eval-data", nargs="+", metavar="DATA",
                   help="labelled examples to score the merge and its sources on, one per task in model order: "
                        "a folder of class sub-folders named by the labels, or a table FILE:COLUMN[:LABEL] "
                        "(label column default 'label'; labels as the model names them, or class indices); "
                        "unset: the built-in tasks' test splits (docs/evaluation.md)")
    add_common(p)


def run(args) -> None:
    set_threads(args)
    given = vars(args)
    method = given.get("method")
    declared = set(SETTING) | {o.name for m in METHODS.values() for o in m.options}
    flags = {k: v for k, v in given.items() if k in declared}
    models, tasks, data, eval_data, settings, options = list(args.models), None, None, None, {}, {}
    if args.config:
        described = config.read(args.config, method)
        method = method or described["method"]
        models = models or described["models"]
        tasks = None if args.models else described["tasks"]
        data = None if args.models else described["data"]
        eval_data = None if args.models else described["eval_data"]
        settings, options = described["settings"], described["options"]
    method = method or "fs-merge"
    readers = {o.name: o for o in get_method(method).options}
    for name, value in flags.items():       # the command line's flags, read, override the file
        if name in SETTING:
            settings[name] = _read(SETTING[name], value)
        else:                               # another method's option stays as typed: merge refuses it
            options[name] = _read(readers[name], value) if name in readers else value
    if "tasks" in settings:
        tasks = settings.pop("tasks")
    if not models:
        raise ValueError("merge needs two or more model directories (or --config FILE naming them)")
    if "out" not in settings:
        raise ValueError("merge needs --out DIR (or out: in the --config file)")
    if "data" in settings and data:
        raise ValueError("give the data in the --config file's models entries or with --data, not both")
    data = settings.pop("data", None) or data
    eval_data = args.eval_data or eval_data
    per_task = settings.pop("per_task", None)
    common = dict(tasks=tasks, eval_data=eval_data, score=True, command=command_line(), config_file=args.config,
                  **settings, **options)
    clips = [is_clip_dir(m) for m in models if isinstance(m, (str, os.PathLike))]
    if any(clips):
        return _merge_clips(args, models, clips, data, per_task, method, common)
    if data:                                # per model, from files: per_task examples of each task
        merged = merge(models, data, method, per_task=per_task, **common)
    else:
        merged = merge(models, per_task or SETTING["per_task"].default, method, **common)
    rows, fid = merged.meta.get("scores") or [], merged.meta.get("fidelity") or {}
    out = settings["out"]
    if args.json:
        print_json({"out": out, "meta": merged.meta, "test": rows[-1] if rows else None})
        return
    name = method + (f" {options['variant']}" if "variant" in options else "")
    title = f"merged {len(models)} models -> {out}" + (" (accuracy on --eval-data)" if eval_data else "")
    unscored = "" if rows else {"projection": "; projection heads: embeddings, no accuracy",
                                "lm": "; language models: perplexity below, no accuracy" if fid else
                                "; language models: no accuracy (perplexity with --fidelity N)"}.get(
        merged.head_kind, "; no accuracy: a task has no built-in labelled data (give --eval-data)")
    print_table([result_row(r["model"], r, merged.meta["wall_seconds"] if r is rows[-1] else None) for r in rows]
                or [result_row(name, None, merged.meta["wall_seconds"])], title,
                footer=f"seed {merged.meta['seed']}{unscored}")
    if fid and merged.head_kind == "projection":
        print_table([{"task": t, "examples": f["examples"], "cosine": f["cosine"]} for t, f in fid.items()],
                    "fidelity to the sources: mean cosine of the merge's embeddings with each source's (held-out "
                    "unlabeled examples)", [("task", "task"), ("examples", "examples"), ("cosine", "cosine")])
    elif fid and merged.head_kind == "lm":
        print_table([{"task": t, "examples": f["examples"], "source": f["source_perplexity"],
                      "ensemble": f["ensemble_perplexity"], "merge": f["perplexity"], "agreement": f["agreement"]}
                     for t, f in fid.items()],
                    "perplexity of each source, of the sources' ensemble (their probabilities averaged) and of the "
                    "merge on held-out text of each source (unlabeled), and how often the source's and the merge's "
                    "next-token predictions agree",
                    [("task", "text of"), ("examples", "examples"), ("source", "source ppl"),
                     ("ensemble", "ensemble ppl"), ("merge", "merge ppl"), ("agreement", "agreement %")])
    elif fid:
        print_table([{"task": t, "examples": f["examples"], "agreement": f["agreement"], "kl": f["kl"]}
                     for t, f in fid.items()], "fidelity to the sources, no labels needed (held-out unlabeled "
                     "examples)", [("task", "task"), ("examples", "examples"), ("agreement", "agreement %"),
                                   ("kl", "KL")])


def _merge_clips(args, models, clips, data, per_task, method, common) -> None:
    """CLIPModel sources: each tower merged on its own data (`foldmerge.clip`); --data gives per model
    its images, then its texts."""
    if not all(clips) or len(clips) != len(models):
        other = next((m for m in models if not isinstance(m, (str, os.PathLike)) or not is_clip_dir(m)), None)
        raise ValueError(f"a merge of CLIPModels takes CLIPModel folders only (each is two towers); {other} is not one")
    for key in ("tasks", "eval_data"):
        if common.get(key):
            raise ValueError(f"--{key.replace('_', '-')} does not apply to CLIPModels (their heads are projections)")
    if not data or len(data) != 2 * len(models):
        raise ValueError(f"a merge of CLIPModels needs --data with two entries per model, its images then its "
                         f"texts ({2 * len(models)} in all), got {len(data or [])}")
    kept = {k: v for k, v in common.items() if k not in ("tasks", "eval_data", "score", "out", "force") and v is not None}
    if per_task:
        kept["per_task"] = per_task
    result = merge_clip(models, data[0::2], data[1::2], method, out=common["out"], force=common.get("force", False),
                        **kept)
    out = common["out"]
    if args.json:
        print_json({"out": out, "meta": {"image": result["image"].meta, "text": result["text"].meta}})
        return
    rows = [{"task": t, "tower": tower, "examples": f["examples"], "cosine": f["cosine"]}
            for tower in ("image", "text") for t, f in (result[tower].meta.get("fidelity") or {}).items()]
    print_table(rows or [{"task": "-", "tower": "-", "examples": 0, "cosine": None}],
                f"merged {len(models)} CLIPModels -> {out} (a CLIPModel per source in {out}/hf)",
                [("task", "task"), ("tower", "tower"), ("examples", "examples"), ("cosine", "cosine")],
                footer="fidelity to the sources: mean cosine of each merged tower's embeddings with its source's "
                       "(held-out unlabeled examples)")
