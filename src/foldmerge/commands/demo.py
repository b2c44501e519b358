"""`foldmerge demo [--seed S] [--per-task N] [--out DIR]`: the `make demo` run."""
from __future__ import annotations

from ..demo import run_demo
from ..options import Integer
from ..tables import print_json, print_table
from . import add_common, argtype, command_line, set_threads


def add_arguments(p) -> None:
    p.add_argument("--seed", type=argtype(Integer(0)), default=0)
    p.add_argument("--per-task", type=argtype(Integer(1)), default=64)
    p.add_argument("--out", default=None, help="also save the sources and merged models here")
    add_common(p)


def run(args) -> None:
    set_threads(args)
    result = run_demo(seed=args.seed, per_task=args.per_task, out=args.out)
    result["command"] = command_line()
    if args.json:
        print_json(result)
        return
    s = result["setting"]
    print_table(result["rows"],
                f"MNIST {s['tasks'][0]} vs {s['tasks'][1]}: MLP 784-{'-'.join(map(str, s['hidden']))}, "
                f"{s['per_task_images']} unlabeled images per task",
                footer=f"measured now; seed {s['seed']} (sources seeds {s['source_seeds']}); "
                       f"{result['total_seconds']:.0f} s in all; command: {result['command']}")
