"""`foldmerge report RESULTS.json… --out DIR`: a Markdown + self-contained HTML report with figures
(`foldmerge.bench.figures`) from the --json files of benches, merges and evaluations."""
from __future__ import annotations

from ..commands import command_line
from ..tables import print_json
from .figures import build_report


def add_arguments(p) -> None:
    p.add_argument("results", nargs="+", metavar="RESULTS.json", help="--json files of any foldmerge bench")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="report directory (report.md, report.html, *.png); an earlier report there is replaced")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")


def run(args) -> None:
    done = build_report(args.results, args.out, command_line())
    if args.json:
        print_json(done)
        return
    print(f"report of {len(done['results'])} result(s) written to {done['out']}: {', '.join(done['files'])}")
