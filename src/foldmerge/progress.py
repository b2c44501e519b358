"""Progress bars (rich) on stderr, so stdout stays clean for tables and --json.

Bars show only when stderr is a terminal; FOLDMERGE_PROGRESS=0 turns them off, =1 forces them.
Status lines also go to a redirected stderr (a log file shows what a long run is doing);
FOLDMERGE_PROGRESS=0 silences them too.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


def enabled() -> bool:
    flag = os.environ.get("FOLDMERGE_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false", "no")
    return _console.is_terminal


class _Bar:
    def __init__(self, progress: Progress | None, task_id):
        self._p, self._id = progress, task_id

    def advance(self, n: int = 1, **fields) -> None:
        if self._p is not None:
            self._p.update(self._id, advance=n, **fields)

    def set(self, **fields) -> None:
        if self._p is not None:
            self._p.update(self._id, **fields)


@contextmanager
def bar(total: int, desc: str, show: bool | None = None):
    """`with bar(n, "training") as b: b.advance(1, info="loss 0.1")`."""
    if not (enabled() if show is None else show):
        yield _Bar(None, None)
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=_console, transient=True)
    with progress:
        task_id = progress.add_task(desc, total=total, info="")
        yield _Bar(progress, task_id)


def status(message: str) -> None:
    """A one-line note on stderr (e.g. 'training source 1/2')."""
    if os.environ.get("FOLDMERGE_PROGRESS") not in ("0", "false", "no"):
        _console.print(f"[dim]{message}[/dim]")
