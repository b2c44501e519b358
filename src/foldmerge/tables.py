"""Result tables: rich tables for people, plain dicts for --json."""
from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def result_row(name: str, result: dict | None = None, seconds: float | None = None, **extra) -> dict:
    """One table row from an `evaluate` result (per-task / joint means)."""
    row = {"method": name,
           "per_task": result.get("per_task_mean") if result else None,
           "joint": result.get("joint_mean") if result else None,
           "seconds": seconds}
    if result:
        row["per_task_by_task"] = result.get("per_task")
        row["joint_by_task"] = result.get("joint")
    row.update(extra)
    return row


def print_table(rows: list[dict], title: str, columns: list[tuple[str, str]] | None = None,
                footer: str | None = None) -> None:
    columns = columns or [("method", "method"), ("per_task", "per-task acc %"),
                          ("joint", "joint acc %"), ("seconds", "seconds")]
    table = Table()
    for i, (_, label) in enumerate(columns):
        table.add_column(label, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[_fmt(row.get(key)) for key, _ in columns])
    console = Console(file=sys.stdout, width=max(100, Console().width))
    console.print(f"[bold]{title}[/bold]")
    console.print(table)
    if footer:
        console.print(footer)


def print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
