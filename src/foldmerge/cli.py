"""Command line: foldmerge train-sources | merge | eval | demo | bench | report.

Each command is a module with `add_arguments(parser)` and `run(args)`, imported only when it is
the command asked for: they import torch, which takes about 2 s to load, and `foldmerge --help`
and `--version` need none of it. Every error a user can cause ends in one line on stderr and
exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback

from .errors import USER_ERRORS, did_you_mean
from .version import __version__

# name: (module with add_arguments / run, one line of help)
COMMANDS = {
    "merge": ("foldmerge.commands.merge", "merge models into one model of the same size with every task's head"),
    "eval": ("foldmerge.commands.evaluate", "per-task and joint accuracy of saved models"),
    "train-sources": ("foldmerge.commands.train_sources",
                      "train one source model per task (MLP, ViT, BERT or ResNet), each from its own seed"),
    "demo": ("foldmerge.commands.demo", "MNIST 0-4 vs 5-9: train two MLPs, merge them, print the table"),
    "bench": ("foldmerge.bench.commands", "benchmarks that reproduce the papers' tables (measured now)"),
    "report": ("foldmerge.bench.report", "a Markdown + HTML report with figures from bench, merge or eval --json "
                                         "files"),
}
QUIET_HELP = "no progress bars or status lines (tables and --json output stay)"


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in the one-line form of every other error (an unknown flag with a
    "did you mean"), and --quiet on every (sub)command: subparsers are made of this class too, and
    theirs defaults to SUPPRESS so that a subcommand given without it keeps the top level's value."""

    def __init__(self, *args, quiet_default=argparse.SUPPRESS, **kwargs):
        # no abbreviations: `--dat` read silently as `--data` would change meaning when a flag is added
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.add_argument("--quiet", action="store_true", default=quiet_default, help=QUIET_HELP)

    def error(self, message: str):
        first = message.splitlines()[0]
        if first.startswith("unrecognized arguments:"):
            first += did_you_mean(first.split(":", 1)[1].split()[0].split("=")[0], _flags(self))
        print(f"foldmerge: error: {first}", file=sys.stderr)
        raise SystemExit(2)


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag of `parser` and of its subcommands."""
    out = []
    for a in parser._actions:
        out += [s for s in a.option_strings if s not in ("-h", "--help")]
        if isinstance(a, argparse._SubParsersAction):
            for p in a.choices.values():
                out += _flags(p)
    return out


def build_parser(command: str | None = None) -> Parser:
    """The parser; only `command`'s arguments are added (its module imported), the others listed."""
    ap = Parser(prog="foldmerge", description=__doc__.splitlines()[0], quiet_default=False)
    ap.add_argument("--version", action="version", version=f"foldmerge {__version__}")
    ap.add_argument("--debug", action="store_true", help="print the traceback behind an error (for a bug "
                    "report); FOLDMERGE_DEBUG=1 does the same")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND",
                            parser_class=Parser)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return ap


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in `argv` (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command_of(argv)
    for a in argv:                     # a name the system gave as bytes that are not UTF-8
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            return _error(ValueError(f"the argument {a!r} is not valid UTF-8 (rename the file or folder); model "
                                     "files record paths as UTF-8 text"), "--debug" in argv)
    try:
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
    except SystemExit as e:            # a bad argument (one line said), --help or --version
        return e.code if isinstance(e.code, int) else 2
    except USER_ERRORS as e:
        return _error(e, "--debug" in argv[:argv.index(command)] if command in argv else "--debug" in argv)
    if getattr(args, "quiet", False):
        quiet()

    def terminated(signum, frame):     # SIGTERM unwinds like ^C, so temporaries are removed on the way out
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        importlib.import_module(COMMANDS[args.command][0]).run(args)
    except USER_ERRORS as e:
        return _error(e, args.debug)
    except KeyboardInterrupt:
        print("foldmerge: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def quiet() -> None:
    """No progress bars or status lines: ours, and the libraries' we run (transformers' and the
    Hugging Face hub's bars; `foldmerge.engine` quiets Lightning's notes)."""
    os.environ["FOLDMERGE_PROGRESS"] = "0"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _error(e: BaseException, debug: bool) -> int:
    """One line on stderr, exit status 2; with --debug (or FOLDMERGE_DEBUG=1) the traceback first."""
    if debug or os.environ.get("FOLDMERGE_DEBUG", "") not in ("", "0"):
        traceback.print_exception(e, file=sys.stderr)
    print(f"foldmerge: error: {_first_line(e)}", file=sys.stderr)
    return 2


# characters that end a line for some reader (str.splitlines, terminals) other than the newline itself:
# a name given by the user (a file's, a config's value) may hold them, and the error stays one line
_BREAKS = {c: repr(c)[1:-1] for c in "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def _first_line(e: BaseException) -> str:
    line = str(e).split("\n")[0].translate(str.maketrans(_BREAKS))
    return line if line.strip() else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
