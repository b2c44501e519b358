"""Declared options: every option of a merge and of each method, described once as data.

An `Option` names its value grammar (a `Kind`), its default and where that default came from,
the options it depends on, and its help. Everything else is made from the declarations:

  * the command line's flags (`foldmerge merge --help`, grouped per method, each default with its
    source): argparse collects strings, `Kind.parse` reads them;
  * the YAML config's checks (`foldmerge.config`): unknown keys get "did you mean …", values go
    through `Kind.check`;
  * the Python API's keyword check (`Method.resolve`);
  * what a merged model records (`meta["options"]`: every declared option, resolved).

A default is a value, or a `Rule` computed from the models being merged (a family's defaults,
`foldmerge.arch.defaults`; the kind of their heads) with a sentence saying what it is and why.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

from .context import Context
from .errors import did_you_mean
from .provenance import describe


# ------------------------------------------------------------------------------ value grammars
class Kind:
    """A value grammar: `parse` reads command-line text, `check` a typed value (YAML, Python),
    where a string is read as on the command line (YAML reads 1e-3 as a string)."""
    metavar = "VALUE"
    many = False            # several values after one flag

    def parse(self, text: str):
        raise NotImplementedError

    def from_command_line(self, value):
        """What argparse stored for the flag (a word; the words of a many-valued flag), read."""
        return self.parse(value)

    def check(self, value):
        if isinstance(value, str):
            return self.parse(value)
        return self.typed(value)

    def typed(self, value):
        raise ValueError(f"expected {self.describe()}, got {value!r}")

    def describe(self) -> str:
        return self.metavar.lower()

    def example(self):
        """A value of the grammar (for the docs and the tests); None where it depends on the merge."""
        return None

    def text(self, value) -> str:
        """`value` as the command line writes it."""
        return str(value)


# the written forms of numbers every grammar reads (ASCII, no separators or padding), and the largest
# values: the int64 torch seeds and counts take, the float32 the training arithmetic holds
INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
NUMBER_TEXT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
LARGEST_INTEGER = 2 ** 63 - 1
LARGEST_NUMBER = 3.4028234663852886e38


@dataclass(frozen=True)
class Integer(Kind):
    least: int = 0
    metavar = "N"

    def parse(self, text):
        # ASCII digits only: Python's int() also reads '1_0', ' 3 ' and other scripts' digits
        if not INTEGER_TEXT.fullmatch(text):
            raise ValueError(f"expected {self.describe()}, got {text!r}")
        return self.typed(int(text))

    def check(self, value):           # from YAML or Python an integer is an int, never text
        return self.typed(value)

    def typed(self, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < self.least:
            raise ValueError(f"expected {self.describe()}, got {value!r}")
        if value > LARGEST_INTEGER:
            raise ValueError(f"expected {self.describe()} up to 2^63 - 1, got {str(value)[:30]}…")
        return value

    def describe(self):
        return "a positive integer" if self.least == 1 else f"an integer >= {self.least}"

    def example(self):
        return self.least + 1


@dataclass(frozen=True)
class Number(Kind):
    low: float | None = None
    high: float | None = None
    positive: bool = False
    below: bool = False          # high itself excluded
    metavar = "X"

    def parse(self, text):
        if not NUMBER_TEXT.fullmatch(text):        # float() also reads '0_5', ' 1 ' and other scripts' digits
            raise ValueError(f"expected {self.describe()}, got {text!r}")
        return self.typed(float(text))

    def typed(self, value):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if number and (isinstance(value, int) or math.isfinite(value)) and abs(value) > LARGEST_NUMBER:
            raise ValueError(f"expected {self.describe()} that float32 holds (up to 3.4e38), got {str(value)[:30]}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                (self.positive and value <= 0) or (self.low is not None and value < self.low) or \
                (self.high is not None and (value > self.high or (self.below and value == self.high))):
            raise ValueError(f"expected {self.describe()}, got {value!r}")
        return float(value)

    def describe(self):
        if self.low is not None and self.high is not None:
            opening = "(" if self.positive and self.low == 0 else "["
            return f"a number in {opening}{self.low:g}, {self.high:g}{')' if self.below else ']'}"
        if self.positive:
            return "a finite positive number"
        return f"a finite number >= {self.low:g}" if self.low is not None else "a finite number"

    def example(self):
        if self.low is not None and self.high is not None:
            return (self.low + self.high) / 2
        return (self.low or 0.0) + 0.5


@dataclass(frozen=True)
class Choice(Kind):
    values: tuple[str, ...] = ()

    @property
    def metavar(self):
        return "{" + ",".join(self.values) + "}"

    def parse(self, text):
        if text not in self.values:
            raise ValueError(f"expected one of {', '.join(self.values)}, got {text!r}{did_you_mean(text, self.values)}")
        return text

    def describe(self):
        return "one of " + ", ".join(self.values)

    def example(self):
        return self.values[-1]


class YesNo(Kind):
    metavar = "{yes,no}"

    def parse(self, text):
        if text not in ("yes", "no"):
            raise ValueError(f"expected yes or no, got {text!r}")
        return text == "yes"

    def typed(self, value):
        if not isinstance(value, bool):
            raise ValueError(f"expected yes or no (true or false), got {value!r}")
        return value

    def example(self):
        return True

    def text(self, value) -> str:
        return "yes" if value else "no"


class Flag(Kind):
    """A switch: given (true) or not."""
    metavar = ""

    def typed(self, value):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value

    def parse(self, text):
        return self.typed({"true": True, "false": False}.get(text, text))

    def from_command_line(self, value):
        return self.typed(value)

    def example(self):
        return True


class Text(Kind):
    metavar = "TEXT"

    def parse(self, text):
        if not text:
            raise ValueError("expected a non-empty text")
        return text


class FilePath(Kind):
    """A file or directory path (also os.PathLike from Python)."""
    metavar = "PATH"

    def parse(self, text):
        if not text or "\x00" in text:
            raise ValueError(f"expected a path, got {text!r}")
        return text

    def typed(self, value):
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise ValueError(f"expected a path, got {value!r}")


class ModelRef(Kind):
    """A model: a directory (read by `foldmerge.merge` and the command line) or, from Python, a TaskModel."""
    metavar = "DIR"

    def parse(self, text):
        return FilePath().parse(text)

    def typed(self, value):
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if hasattr(value, "backbone") and hasattr(value, "tasks"):
            return value
        raise ValueError(f"expected a model directory or a TaskModel, got {type(value).__name__}")


class TensorFile(Kind):
    """Tensors: a .safetensors file (read by `foldmerge.merge` and the command line) or, from Python,
    a dict of tensors."""
    metavar = "FILE"

    def parse(self, text):
        return FilePath().parse(text)

    def typed(self, value):
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, dict) and all(isinstance(k, str) and hasattr(v, "shape") for k, v in value.items()):
            return value
        raise ValueError(f"expected a .safetensors file or a dict of tensors, got {type(value).__name__}")


@dataclass(frozen=True)
class Grammar(Kind):
    """Text matching one of a few forms, e.g. full | diag | diag+lowrank(R); `pattern` is a regular
    expression over the whole text, `forms` its description."""
    pattern: str = ""
    forms: str = ""
    metavar: str = "TEXT"
    sample: str = ""             # an example of the grammar

    def parse(self, text):
        if not isinstance(text, str) or re.fullmatch(self.pattern, text.strip()) is None:
            raise ValueError(f"expected {self.forms}, got {text!r}")
        return text.strip()

    def describe(self):
        return self.forms

    def example(self):
        return self.sample


@dataclass(frozen=True)
class NumberOr(Kind):
    """One of some words, or a number of `number`'s grammar (e.g. match | none | 2.5)."""
    words: tuple[str, ...] = ()
    number: Number = Number(positive=True)

    @property
    def metavar(self):
        return "{" + ",".join(self.words) + ",X}"

    def parse(self, text):
        if text in self.words:
            return text
        try:
            return self.number.parse(text)
        except ValueError:
            raise ValueError(f"expected {self.describe()}, got {text!r}") from None

    def typed(self, value):
        return self.number.typed(value)

    def describe(self):
        return " | ".join(self.words) + " | " + self.number.describe()

    def example(self):
        return self.number.example()


@dataclass(frozen=True)
class ListOf(Kind):
    """One or more values of `item`."""
    item: Kind = Integer()
    many = True

    @property
    def metavar(self):
        return self.item.metavar

    def parse(self, text):            # one command-line word; the flag gathers a list
        return [self.item.parse(text)]

    def from_command_line(self, value):
        return [self.item.parse(w) for w in value]

    def check(self, value):
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"expected one or more of {self.item.describe()}")
            return [self.item.check(v) for v in value]
        return [self.item.check(value)]

    def parse_all(self, texts: list[str]) -> list:
        return [self.item.parse(t) for t in texts]

    def describe(self):
        return f"one or more of {self.item.describe()}"

    def example(self):
        return [self.item.example()]


@dataclass(frozen=True)
class Either(Kind):
    """A value of `first`, or (from Python or YAML) of `other`, e.g. a budget per space."""
    first: Kind = Number()
    other: Callable[[Any], Any] | None = None
    other_text: str = ""

    @property
    def metavar(self):
        return self.first.metavar

    def parse(self, text):
        return self.first.parse(text)

    def typed(self, value):
        try:
            return self.first.typed(value)
        except ValueError:
            if self.other is None:
                raise
        return self.other(value)

    def describe(self):
        return f"{self.first.describe()} or {self.other_text}" if self.other_text else self.first.describe()

    def example(self):
        return self.first.example()


# ------------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class Rule:
    """A default computed from the merge: `fn(c)` with c.models, c.data (None if there is none),
    c.held_out (the held-out data, or None) and c.options (those resolved so far, in declaration
    order), and `text`, what it is and where it came from (for --help)."""
    fn: Callable
    text: str


@dataclass(frozen=True)
class Option:
    name: str                      # the Python keyword; the flag is --name-with-dashes
    kind: Kind
    help: str
    default: Any = None            # a value, a Rule, or None (unset: the help says what happens then)
    source: str = ""               # where a fixed default came from
    when: tuple[str, tuple] | None = None   # (option, values): applies only when that option has one of them
    cli: bool = True               # offered on the command line

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def default_text(self) -> str:
        if isinstance(self.default, Rule):
            return self.default.text
        if self.default is None:
            return ""
        value = {True: "yes", False: "no"}.get(self.default, self.default) if isinstance(self.default, bool) \
            else self.default
        return f"{value}" + (f": {self.source}" if self.source else "")

    def applies(self, resolved: dict) -> bool:
        if self.when is None:
            return True
        other, values = self.when
        return resolved.get(other) in values


def check_value(option: Option, value, where: str = ""):
    """`value` read by the option's grammar, or one ValueError naming the option."""
    try:
        return option.kind.check(value)
    except ValueError as e:
        raise ValueError(f"{where}{option.flag}: {e}") from None


def check_values(options: tuple[Option, ...], given: dict, owner: str) -> dict:
    """`given` (None: not given) read by each option's grammar; an unknown name is refused."""
    by_name = {o.name: o for o in options}
    for k in given:
        if k not in by_name:
            flag = "--" + k.replace("_", "-")
            raise ValueError(f"{flag} does not apply to {owner}{did_you_mean(flag, [o.flag for o in options])}")
    return {k: check_value(by_name[k], v) for k, v in given.items() if v is not None}


def resolve(options: tuple[Option, ...], given: dict, models, data, owner: str, held_out=None) -> dict:
    """Every option's value: given ones checked by their grammar (None: not given), the rest at
    their defaults; an unknown name, or an option given where it does not apply, is refused."""
    given = check_values(options, given, owner)
    out = {}
    for o in options:                   # in declaration order: `when` refers to earlier options
        value = given.get(o.name)
        if value is not None:
            if not o.applies(out):
                other, values = o.when
                raise ValueError(f"{o.flag} applies only when {other} is {' or '.join(map(str, values))} "
                                 f"({owner} has {other} {out.get(other)!r})")
        elif o.applies(out):
            value = o.default.fn(SimpleNamespace(models=models, data=data, held_out=held_out, options=out)) \
                if isinstance(o.default, Rule) else o.default
        out[o.name] = value
    return out


def record(resolved: dict) -> dict:
    """Resolved options as a merged model records them (JSON: models by path, tensors by shape); an
    option left unset, or that does not apply, is left out (the method's own meta says what it did)."""
    return {k: describe(v) for k, v in resolved.items() if v is not None}


@dataclass(frozen=True)
class Lazy:
    """A method that merges layer by layer, so that its sources may be memory-mapped (`--lazy`): for the
    options `when` names (empty: any), which `applies(resolved options, the sources' spec)` checks."""
    when: str = ""
    applies: Callable = lambda options, spec: True


@dataclass
class Method:
    """A merging method: its function and its declared options.

    Calling it checks and resolves the options (`resolve`), then runs
    `fn(models, data, seed=…, context=…, **options)`; the merged model's meta records them."""
    name: str
    fn: Callable
    options: tuple[Option, ...]
    summary: str
    data: str = "required"         # required | optional (only for some options) | none
    held_out: bool = False         # stops early on held-out data (fs-merge, distill)
    doc: str = field(default="", repr=False)
    lazy: Lazy | None = None       # merges layer by layer (average, permute, fs-merge local)

    def check(self, given: dict) -> dict:
        """The options given (None: not given), read by their grammar; an unknown one refused."""
        return check_values(self.options, given, f"method {self.name!r}")

    def resolve(self, models, given: dict, data=None, held_out=None) -> dict:
        """Every option's value: the given ones checked, the rest at their defaults for these models."""
        return resolve(self.options, given, models, data, f"method {self.name!r}", held_out)

    def __call__(self, models, data=None, seed: int = 0, context=None, held_out=None, **given):
        options = self.resolve(models, given, data, held_out)
        unread = [o.flag for o in self.options if isinstance(o.kind, (ModelRef, TensorFile))
                  and isinstance(options[o.name], str)]
        if unread:
            raise ValueError(f"{unread[0]}: give the model or tensors themselves here (foldmerge.load); "
                             "foldmerge.merge and the command line read paths")
        extra = {"held_out": held_out} if self.held_out else {}
        if held_out is not None and not self.held_out:
            raise ValueError(f"held-out early stopping applies to fs-merge and distill, not to {self.name!r}")
        merged = self.fn(models, data, seed=seed, context=context or Context(), **options, **extra)
        merged.meta = {"method": self.name, **merged.meta, "options": record(options)}
        return merged


def method(name: str, options, summary: str, data: str = "required", held_out: bool = False,
           lazy: Lazy | None = None):
    """Decorator: `@method("zipit", OPTIONS, "…")` above a method's merge function makes it a `Method`."""
    def wrap(fn):
        return Method(name, fn, tuple(options), summary, data, held_out, fn.__doc__ or "", lazy)
    return wrap
