"""`foldmerge merge --config merge.yaml`: a merge described in a file, as mergekit users keep theirs.

The file is read into the same settings and method options the command line's flags give, and
checked against the same declarations (`foldmerge.api.SETTINGS`, each method's options); flags
given on the command line override it. Keys:

    models:                      # two or more; a path, or a path with the task of its merge data
      - path: runs/src/bbc_0-2-s0
        task: bbc:0-2            # needed for a Hugging Face directory that does not record it
      - runs/src/bbc_3-4-s1
    method: fs-merge             # any `foldmerge merge --method`
    options:                     # the method's options (and any setting): param, epochs, lr, widths: [64, 128] …
      param: diag+lowrank(12)
    per_task: 200                # settings: seed, augment, held_out, calibrate, select, out, force, …
    out: runs/merged

A method option may also stand at the top level. Relative paths (models, out, a method's model or
tensors file) are read from the YAML file's folder. An unknown key, a key given twice, a value
outside its grammar and a YAML alias are refused with one line naming the file and the key.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from .api import SETTING, select_grid
from .errors import did_you_mean
from .io import real
from .methods import METHODS, get_method
from .options import INTEGER_TEXT, NUMBER_TEXT, FilePath, ModelRef, TensorFile, check_value


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice and aliases (which can expand a small file into a
    huge document)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: YAML aliases (*name) are not supported here")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: a key must be a name, not "
                                     f"{type(key).__name__} {key!r:.40}")
            if key in seen:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


# Numbers as the command line reads them (`options.INTEGER_TEXT`, `NUMBER_TEXT`): YAML 1.1 would also
# read 1_0 as 10, 0x10 as 16, 1:30 as 90 and 010 as 8; here those are text, which the options refuse.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(rf"^(?:{INTEGER_TEXT.pattern})$"), list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(rf"^(?:{NUMBER_TEXT.pattern})$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
                              list("-+0123456789."))
_Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node), 10))


def read(path: str, method: str | None = None) -> dict:
    """The merge the YAML file at `path` describes: {"models", "tasks", "method", "settings",
    "options"}, every key and value checked (`method`: the command line's, which overrides the file's)."""
    where = f"--config {path}"
    try:
        data = yaml.load(Path(path).read_text(), Loader=_Loader)
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be a merge description") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of keys (models, method, options, out, …)")
    method = method or data.get("method") or "fs-merge"
    if not isinstance(method, str):
        raise ValueError(f"{where}: method must be a method's name, got {method!r}")
    try:
        declared = get_method(method).options
    except ValueError as e:
        raise ValueError(f"{where}: method: {e}") from None
    options_of = {o.name: o for o in declared}
    readers = {}
    for m in METHODS.values():
        for o in m.options:
            readers.setdefault(o.name, []).append(m.name)
    folder = real(path).parent
    paths, tasks, files, labelled = _models(data.get("models"), where)
    paths = [_here(folder, p) for p in paths]
    files, labelled = ([_here(folder, f) for f in specs] if specs else None for specs in (files, labelled))
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"{where}: 'options' must be a mapping of the method's options")
    settings, chosen = {}, {}
    top = {k: v for k, v in data.items() if k not in ("models", "method", "options")}
    for prefix, entries in (("", top), ("options.", options)):
        for key, value in entries.items():
            name = str(key).replace("-", "_")
            if name in ("tasks", "data", "eval_data"):
                entry = name.rstrip("s") if name == "tasks" else name
                raise ValueError(f"{where}: {prefix}{key}: give each model's {entry} in its entry under models "
                                 f"(- path: DIR  {entry}: …)")
            if name in SETTING:
                target, option = settings, SETTING[name]
            elif name in readers:
                if name not in options_of:
                    raise ValueError(f"{where}: {prefix}{key} is not an option of method {method!r} (it is "
                                     f"{', '.join(readers[name])}'s){did_you_mean(name, options_of)}")
                target, option = chosen, options_of[name]
            else:
                known = [*SETTING, *readers, "models", "method", "options"]
                raise ValueError(f"{where}: unknown key '{prefix}{key}'{did_you_mean(name, known)}")
            if name in settings or name in chosen:
                raise ValueError(f"{where}: {name} is given twice (at the top level and under options)")
            if value is not None:
                try:
                    target[name] = check_value(option, value)
                except ValueError as e:
                    raise ValueError(f"{where}: {prefix}{key}: {str(e).split(': ', 1)[-1]}") from None
                if isinstance(option.kind, (FilePath, ModelRef, TensorFile)) and isinstance(target[name], str):
                    target[name] = _here(folder, target[name])
    if "select" in settings:
        try:
            select_grid(get_method(method), settings["select"], chosen)
        except ValueError as e:
            raise ValueError(f"{where}: select: {e}") from None
    return {"models": paths, "tasks": tasks, "data": files, "eval_data": labelled, "method": method,
            "settings": settings, "options": chosen, "file": path}


def _here(folder: Path, path: str) -> str:
    """A path of the file, read from the file's folder if it is relative."""
    return path if Path(path).is_absolute() else str(folder / path)


ENTRY = ("path", "task", "data", "eval_data")      # a models entry's keys


def _models(models, where: str) -> tuple[list[str], list | None, list | None, list | None]:
    """(paths, tasks, data specs, labelled data specs; None where no entry gives one) of the models entries."""
    if models is None:
        return [], None, None, None
    if not isinstance(models, list) or len(models) < 2:
        raise ValueError(f"{where}: 'models' must list two or more model directories")
    columns = {k: [] for k in ENTRY}
    for m in models:
        if isinstance(m, str):
            m = {"path": m}
        if not isinstance(m, dict) or set(m) - set(ENTRY) or not isinstance(m.get("path"), str) or \
                not all(isinstance(m.get(k), (str, type(None))) for k in ENTRY):
            raise ValueError(f"{where}: a model entry is a path or a mapping of {', '.join(ENTRY)} (texts), "
                             f"got {m!r}")
        for k in ENTRY:
            columns[k].append(m.get(k))
    for key in ENTRY[1:]:
        if any(columns[key]) and not all(columns[key]):
            raise ValueError(f"{where}: give a {key} for every model or for none")
    return (columns["path"], *[columns[k] if all(columns[k]) else None for k in ENTRY[1:]])
