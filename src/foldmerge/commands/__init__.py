"""The library's command-line commands (`foldmerge.cli` dispatches to them), one module each with
`add_arguments(parser)` and `run(args)`, and what they share."""
from __future__ import annotations

import argparse
import shlex
import sys

import torch

from ..options import Integer, Kind


def argtype(kind: Kind):
    """An argparse `type` that reads one word by `kind`'s grammar."""
    def parse(text: str):
        try:
            return kind.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = kind.metavar.lower() or "value"
    return parse


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    add_threads(p)


def add_threads(p: argparse.ArgumentParser, show: bool = True) -> None:
    p.add_argument("--threads", type=argtype(Integer(1)), default=None,
                   help="torch CPU threads (default: torch's choice)" if show else argparse.SUPPRESS)


def set_threads(args) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def command_line() -> str:
    """The command as a shell would take it back (arguments with spaces quoted)."""
    return "foldmerge " + shlex.join(sys.argv[1:])
