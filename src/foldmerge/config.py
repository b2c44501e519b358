"""`foldmerge merge --config merge.yaml`: a merge described in a file, as mergekit users keep theirs.

The file is turned into the command line it stands for and parsed by the same parser, so a
config and the flags it names give one merge (the test checks it). Keys:

    models:                      # two or more; a path, or a path with the task of its merge data
      - path: runs/src/bbc_0-2-s0
        task: bbc:0-2            # needed for a Hugging Face directory that does not record it
      - runs/src/bbc_3-4-s1
    method: fs-merge             # any `foldmerge merge --method`
    options:                     # any merge flag, underscores or dashes: param, epochs, lr, widths: [64, 128] …
      param: diag+lowrank(12)
    per_task: 200                # and: seed, augment, held_out, calibrate, select, …
    out: runs/merged             # the output directory

Every top-level key but models/options/out is a merge flag too (`per_task` is `--per-task`);
an unknown key, here or under options, is refused with one line naming it.
"""
from __future__ import annotations

from pathlib import Path

def config_argv(path: str, parser) -> list[str]:
    """The `merge` argument list that the YAML file at `path` stands for."""
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of keys (models, method, options, out, …)")
    flags = {a.dest: a for a in _merge_parser(parser)._actions if a.option_strings}
    models = data.get("models")
    if not isinstance(models, list) or len(models) < 2:
        raise ValueError(f"--config {path}: 'models' must list two or more model directories")
    paths, tasks = [], []
    for m in models:
        if isinstance(m, dict):
            extra = set(m) - {"path", "task"}
            if extra or "path" not in m:
                raise ValueError(f"--config {path}: a model entry takes 'path' and 'task', got {sorted(m)}")
            paths.append(str(m["path"]))
            tasks.append(m.get("task"))
        else:
            paths.append(str(m))
            tasks.append(None)
    if any(tasks) and not all(tasks):
        raise ValueError(f"--config {path}: give a task for every model or for none")
    argv = ["merge", *paths] + (["--tasks", *map(str, tasks)] if all(tasks) else [])
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"--config {path}: 'options' must be a mapping of merge flags")
    rest = {k: v for k, v in data.items() if k not in ("models", "options")}
    for where, entries in (("", rest), ("options.", options)):
        for key, value in entries.items():
            dest = str(key).replace("-", "_")
            if dest not in flags or dest in ("config", "help", "tasks"):
                raise ValueError(f"--config {path}: unknown key '{where}{key}'")
            argv += _flag(flags[dest], value)
    return argv


def _merge_parser(parser):
    import argparse
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["merge"]


def _flag(action, value) -> list[str]:
    import argparse
    flag = action.option_strings[-1]
    if action.nargs == 0:                      # store_true
        return [flag] if value else []
    if isinstance(value, list):
        if action.nargs in ("+", "*"):
            return [flag, *map(str, value)]
        if isinstance(action, argparse._AppendAction):
            return [x for v in value for x in (flag, str(v))]
        raise ValueError(f"{flag} takes one value, not a list")
    if value is None:
        return []
    return [flag, str(value)]
