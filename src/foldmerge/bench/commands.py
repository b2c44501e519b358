"""`foldmerge bench …`: the benchmarks that reproduce the papers' tables, measured now (the harness's
command; `foldmerge.cli` dispatches to it)."""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from ..commands import add_threads, argtype, command_line, set_threads
from ..options import Integer, Number
from ..provenance import environment
from . import (clip, cnn, cost, defaults, efficiency, families, gating, lm, mlp, same_task, scale, scaling, selection,
               text,
               tune_fs, vit)


def _methods_out_json(b, cache: str = "source models") -> None:
    """The flags most benches share: --methods, --out (their cache), --json, --threads."""
    b.add_argument("--methods", nargs="+", default=None, help="only these rows or methods (default all)")
    b.add_argument("--out", default="runs/bench", help=f"cache for {cache} (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    add_threads(b, show=False)


def add_arguments(p) -> None:
    bench = p.add_subparsers(dest="bench", required=True, parser_class=type(p))
    b = bench.add_parser("mlp", help="FS-Merge paper Table 2 and Tables 9-14: MLP pairs on MNIST/Fashion-MNIST halves")
    b.add_argument("--dataset", choices=["mnist", "fmnist"], default="mnist")
    b.add_argument("--vary", choices=["depth", "width"], default="depth")
    b.add_argument("--seeds", type=argtype(Integer(1)), default=5, help="number of seeds (pairs 0..N-1; default 5)")
    b.add_argument("--values", nargs="+", type=argtype(Integer(1)), help="depths or widths to run (default: the paper's)")
    b.add_argument("--methods", nargs="+", help="only these rows or methods (default: all)")
    b.add_argument("--jobs", type=argtype(Integer(1)), default=None, help="worker processes (default: one per core)")
    b.add_argument("--epochs-scale", type=argtype(Number(positive=True)), default=1.0,
                   help="multiply every training epoch count (1 = the paper's; <1 for a quick look)")
    b.add_argument("--retune", action="store_true", help="choose the hyperparameters on validation again")
    b.add_argument("--out", default="runs/bench", help="cache for source models and tuning (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    add_threads(b, show=False)
    b = bench.add_parser("defaults", help="every method with its CLI defaults on MNIST / Fashion-MNIST class splits")
    b.add_argument("--datasets", nargs="+", default=["mnist", "fmnist"], help="mnist and/or fmnist (default both)")
    b.add_argument("--depths", nargs="+", type=argtype(Integer(1)), default=[2, 4], help="MLP depths, width 128 (default 2 4)")
    b.add_argument("--seeds", type=argtype(Integer(1)), default=1, help="seed pairs per setting (default 1)")
    b.add_argument("--methods", nargs="+", help="only these rows or methods (default: all)")
    b.add_argument("--out", default="runs/bench", help="cache for source models (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    add_threads(b)
    b = bench.add_parser("select", help="label-free selection (--select) against labelled validation")
    b.add_argument("--settings", nargs="+", help="of: 'mnist d2' 'mnist d4' 'fmnist d2' 'fmnist d4' 'vit pairs16' "
                                                  "(default all)")
    b.add_argument("--methods", nargs="+", help="of: regmean zipit opt (default all)")
    b.add_argument("--out", default="runs/bench", help="cache for source models (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    add_threads(b)
    b = bench.add_parser("text", help="FS-Merge paper F.6/F.8/F.4: BERT pairs (from scratch, or one MiniLM start)")
    b.add_argument("--setting", choices=["scratch", "minilm"], default="scratch",
                   help="scratch: small BERTs from distinct seeds; minilm: all-MiniLM-L6-v2 fine-tuned per task")
    b.add_argument("--pairs", type=argtype(Integer(1)), default=None, help="how many of the task pairs (default all: 2)")
    b.add_argument("--methods", nargs="+", help="only these rows or methods (default: all)")
    b.add_argument("--sweep", action="store_true", help="also F.8's data-count sweep on the first pair")
    b.add_argument("--out", default="runs/bench", help="cache for source models (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    add_threads(b, show=False)
    b = bench.add_parser("gating", help="the gating-merge paper: ViTs fine-tuned from one start, 3/6/12 tasks, domains")
    b.add_argument("--tables", nargs="+", default=None, metavar="TABLE",
                   help="of: main similarity strategies gate domain scratch (default all)")
    b.add_argument("--sizes", nargs="+", type=argtype(Integer(1)), default=None, help="merge sizes of the main table (default 3 6 12)")
    b.add_argument("--out", default="runs/bench", help="cache for source models (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    add_threads(b, show=False)
    b = bench.add_parser("cnn", help="ZipIt! Table 1: ResNets with BatchNorm from different seeds, two tasks each")
    b.add_argument("--pairs", nargs="+", default=None, metavar="PAIR",
                   help="of: mnist fmnist cross (default all: MNIST 0-4/5-9, Fashion-MNIST 0-4/5-9, MNIST 0-4 + "
                        "Fashion-MNIST 0-4)")
    b.add_argument("--widths", nargs="+", type=argtype(Integer(1)), default=None, help="width multipliers (default 1 4)")
    b.add_argument("--seeds", type=argtype(Integer(1)), default=None, help="seed pairs per cell (default 3)")
    b.add_argument("--methods", nargs="+", default=None, help="only these rows or methods (default all)")
    b.add_argument("--out", default="runs/bench", help="cache for source models and measured cells (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    add_threads(b, show=False)
    b = bench.add_parser("same-task", help="two models of one task from different seeds into one: MLPs, ViTs, "
                                           "ResNets on MNIST and Fashion-MNIST, every method, fidelity vs accuracy")
    b.add_argument("--families", nargs="+", default=None, metavar="FAMILY", help="of: mlp vit resnet (default all)")
    b.add_argument("--datasets", nargs="+", default=None, help="of: mnist fmnist (default both)")
    b.add_argument("--seeds", type=argtype(Integer(1)), default=None, help="seed pairs per cell (default 1)")
    b.add_argument("--methods", nargs="+", default=None, help="only these rows or methods (default all)")
    b.add_argument("--out", default="runs/bench", help="cache for source models and measured cells (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    add_threads(b, show=False)
    b = bench.add_parser("families", help="Hugging Face families (RoBERTa, DistilBERT, DeiT) from different seeds: "
                                          "FS-Merge, distillation, alignment, averaging")
    b.add_argument("--families", nargs="+", default=None, metavar="FAMILY",
                   help=f"of: {' '.join(families.FAMILIES)} (default all)")
    _methods_out_json(b)
    b = bench.add_parser("clip", help="two tiny CLIPModels from different seeds (MNIST, Fashion-MNIST with captions) "
                                      "merged tower by tower: zero-shot accuracy and what each method keeps of the "
                                      "image-text alignment")
    _methods_out_json(b)
    b = bench.add_parser("lm", help="Llama- and GPT-2-shaped language models from different seeds (one text, or two "
                                    "domains of BBC News) merged: perplexity per domain against the sources and the "
                                    "ensemble")
    b.add_argument("--settings", nargs="+", default=None, metavar="SETTING",
                   help=f"of: {' '.join(lm.SETTINGS)} (default all)")
    b.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE", help=f"of: {' '.join(lm.SHAPES)} (default all)")
    _methods_out_json(b)
    b = bench.add_parser("scaling", help="peak memory and time of a merge of two language models against their size, "
                                         "read lazily (--lazy) and whole, float32 and bfloat16")
    b.add_argument("--widths", nargs="+", type=argtype(Integer(64)), default=None,
                   help=f"decoder widths, multiples of 64 (default {' '.join(map(str, scaling.WIDTHS))})")
    b.add_argument("--dtypes", nargs="+", default=None, help=f"of: {' '.join(scaling.DTYPES)} (default both)")
    b.add_argument("--methods", nargs="+", default=None, help=f"of: {', '.join(scaling.METHODS)} (default all)")
    b.add_argument("--out", default="runs/bench", help="cache for the source models (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    b = bench.add_parser("tune-fs", help="FS-Merge against distillation on validation splits: the same number of "
                                         "trials each, one change to the validated options per trial")
    b.add_argument("--cells", nargs="+", default=None, metavar="CELL", help=f"of: {' '.join(tune_fs.CELLS)} (default all)")
    b.add_argument("--methods", nargs="+", default=None, help=f"of: {' '.join(tune_fs.TRIALS)} (default both)")
    b.add_argument("--seed", type=argtype(Integer(0)), default=0, help="the merge sample's seed (default 0)")
    b.add_argument("--out", default="runs/bench", help="cache for source models and trials (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    add_threads(b, show=False)
    b = bench.add_parser("vit", help="FS-Merge paper 3.2: ViT pairs from different inits and tasks")
    b.add_argument("--setting", choices=["pairs16", "pairs100", "groups4", "groups8"], default="pairs16")
    b.add_argument("--pairs", "--groups", dest="pairs", type=argtype(Integer(1)), default=None,
                   help="run only the first N pairs or groups (default all: 3 pairs, 2 groups of 4, 1 of 8)")
    b.add_argument("--methods", nargs="+", help="only these rows or methods (default: all)")
    b.add_argument("--small", action="store_true", help="a smaller ViT (depth 2, width 32) for a quick look")
    b.add_argument("--limit", type=argtype(Integer(1)), help="cap the training images per source stage (quick look)")
    b.add_argument("--source-epochs", type=argtype(Integer(1)), nargs=2, default=[3, 2], metavar=("PRE", "FINE"),
                   help="pre-training and fine-tuning epochs of the sources (default 3 2)")
    b.add_argument("--epochs-scale", type=argtype(Number(positive=True)), default=1.0, help="multiply every merge's epochs")
    b.add_argument("--retune", action="store_true", help="choose the hyperparameters on validation again")
    b.add_argument("--no-tune", action="store_true",
                   help="skip the validation search and use appendix E.2's bold values")
    b.add_argument("--out", default="runs/bench", help="cache for source models and tuning (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    add_threads(b, show=False)

    b = bench.add_parser("data-efficiency", help="FS-Merge paper Figures 4-7: accuracy against 16-1024 originals per task")
    b.add_argument("--arch", choices=["mlp", "vit", "bert"], default="mlp",
                   help="mlp: bench mlp's MNIST pair; vit: bench vit's first pair; bert: bench text's first pair "
                        "(default mlp)")
    b.add_argument("--counts", nargs="+", type=argtype(Integer(1)), default=None,
                   help="original examples per task (default 16 32 64 128 256 512 1024; images augmented to 1024)")
    b.add_argument("--seeds", type=argtype(Integer(1)), default=None, help="seed pairs (default mlp 3, vit 1, bert 1)")
    b.add_argument("--out", default="runs/bench", help="cache for source models and measured cells (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    add_threads(b)
    b = bench.add_parser("scale", help="FS-Merge minus distillation as the ViT grows (width 64-192, depth 4-6)")
    b.add_argument("--configs", nargs="+", default=None, metavar="WxD",
                   help="ViT sizes WIDTHxDEPTH (default 64x4 128x4 64x6 192x4 128x6 192x6, cheapest first)")
    b.add_argument("--originals", nargs="+", type=argtype(Integer(1)), default=None,
                   help="original images per task, of 16 (+800 augmented) and 100 (+1000) (default both)")
    b.add_argument("--seeds", type=argtype(Integer(1)), default=1, help="merge seeds per cell (default 1)")
    b.add_argument("--out", default="runs/bench", help="cache for source models and measured cells (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    add_threads(b)
    b = bench.add_parser("cost", help="time and peak memory of FS-Merge (folded, SuperNet, seq.) vs distillation")
    b.add_argument("--n", nargs="+", type=argtype(Integer(1)), default=[2, 4, 8], help="numbers of models (default 2 4 8)")
    b.add_argument("--per-task", type=argtype(Integer(1)), default=1024, help="merge images per model (default 1024)")
    b.add_argument("--width", type=argtype(Integer(1)), default=64, help="ViT width, heads of 16 (default 64)")
    b.add_argument("--patch", type=argtype(Integer(1)), default=7, help="ViT patch size; 4 gives 50 tokens (default 7: 17)")
    b.add_argument("--epochs", type=argtype(Integer(0)), default=5, help="epochs of every run (default 5)")
    b.add_argument("--methods", nargs="+", help="only these rows (default all)")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    b.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    b.add_argument("--repeats", type=argtype(Integer(1)), default=1, help="runs per cell; the median is reported (default 1)")
    b.add_argument("--same-process", action="store_true",
                   help="time each n's runs in one process, methods alternating (steadier ratios on a busy machine)")
    b.add_argument("--steps", type=argtype(Integer(0)), default=0, metavar="ROUNDS",
                   help="time training steps, not whole runs: each n in one process, methods alternating "
                        "in blocks of 4 steps for ROUNDS rounds (e.g. 30; steadier ratios on a busy machine)")
    b.add_argument("--against", metavar="SRC",
                   help="with --steps: also time the folded FS-Merge step of another checkout (its src folder, "
                        "e.g. of `git worktree add /tmp/old COMMIT`), side by side in the same processes")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    b.add_argument("--threads", type=argtype(Integer(1)), default=None, help="torch threads per run (default torch's choice)")


def run(args) -> None:
    set_threads(args)
    if args.bench == "vit":
        return _vit(args)
    if args.bench == "cost":
        return _cost(args)
    if args.bench == "cnn":
        result = cnn.run_bench(pairs=tuple(args.pairs or cnn.PAIRS), widths=tuple(args.widths or cnn.WIDTHS),
                               seeds=args.seeds or cnn.SEEDS, methods=args.methods, out=args.out)
        return _report_bench(result, args, cnn.print_report)
    if args.bench == "same-task":
        result = same_task.run_bench(families=tuple(args.families or same_task.FAMILIES),
                                     datasets=tuple(args.datasets or same_task.DATASETS),
                                     seeds=args.seeds or same_task.SEEDS, methods=args.methods, out=args.out)
        return _report_bench(result, args, same_task.print_report)
    if args.bench == "tune-fs":
        result = tune_fs.run_bench(cells=tuple(args.cells or tune_fs.CELLS), out=args.out, seed=args.seed,
                                   methods=tuple(args.methods or tune_fs.TRIALS))
        return _report_bench(result, args, tune_fs.print_report)
    if args.bench == "scaling":
        result = scaling.run_bench(out=args.out, widths=tuple(args.widths or scaling.WIDTHS),
                                   dtypes=tuple(args.dtypes or scaling.DTYPES),
                                   methods=tuple(args.methods or scaling.METHODS))
        return _report_bench(result, args, scaling.print_report)
    if args.bench == "lm":
        result = lm.run_bench(settings=tuple(args.settings or lm.SETTINGS), methods=args.methods,
                              out=args.out, shapes=tuple(args.shapes or lm.SHAPES))
        return _report_bench(result, args, lm.print_report)
    if args.bench == "clip":
        return _report_bench(clip.run_bench(methods=args.methods, out=args.out), args, clip.print_report)
    if args.bench == "families":
        result = families.run_bench(families=tuple(args.families or families.FAMILIES), methods=args.methods,
                                    out=args.out)
        return _report_bench(result, args, families.print_report)
    if args.bench == "data-efficiency":
        result = efficiency.run_bench(arch=args.arch, counts=tuple(args.counts or efficiency.COUNTS), seeds=args.seeds,
                                      out=args.out)
        return _report_bench(result, args, efficiency.print_report)
    if args.bench == "scale":
        configs = tuple(scale.parse_config(c) for c in args.configs) if args.configs else scale.CONFIGS
        result = scale.run_bench(configs=configs, originals=tuple(args.originals or scale.SAMPLES), seeds=args.seeds,
                                 out=args.out)
        return _report_bench(result, args, scale.print_report)
    if args.bench == "gating":
        result = gating.run_bench(tables=tuple(args.tables or gating.TABLES), sizes=tuple(args.sizes or gating.SIZES),
                                  out=args.out)
        return _report_bench(result, args, gating.print_report)
    if args.bench == "text":
        result = text.run_bench(setting=args.setting, pairs=args.pairs, methods=args.methods, sweep=args.sweep,
                                out=args.out)
        return _report_bench(result, args, text.print_report)
    if args.bench == "select":
        result = selection.run_bench(settings=args.settings, methods=args.methods, out=args.out)
        return _report_bench(result, args, selection.print_report)
    if args.bench == "defaults":
        result = defaults.run_bench(datasets=tuple(args.datasets), depths=tuple(args.depths), seeds=args.seeds,
                                    methods=args.methods, out=args.out)
        return _report_bench(result, args, defaults.print_report)
    result = mlp.run_bench(dataset=args.dataset, vary=args.vary, seeds=args.seeds, values=args.values,
                           methods=args.methods, jobs=args.jobs, out=args.out,
                           epochs_scale=args.epochs_scale, retune=args.retune)
    _report_bench(result, args, mlp.print_report)


def _vit(args) -> None:
    if args.epochs_scale <= 0 or (args.limit is not None and args.limit < 1):
        raise ValueError("--epochs-scale and --limit must be positive")
    result = vit.run_bench(setting=args.setting, pairs=args.pairs, out=args.out, small=args.small,
                           limit=args.limit, epochs_scale=args.epochs_scale, methods=args.methods,
                           source_epochs=tuple(args.source_epochs), tune_=not args.no_tune, retune=args.retune)
    _report_bench(result, args, vit.print_report)


def _cost(args) -> None:
    result = cost.run_bench(ns=tuple(args.n), per_task=args.per_task, epochs=args.epochs, device=args.device,
                            threads=args.threads, methods=args.methods, precision=args.precision,
                            repeats=args.repeats, width=args.width, patch=args.patch, same_process=args.same_process,
                            steps=args.steps, against=args.against)
    _report_bench(result, args, cost.print_report)


def _report_bench(result: dict, args, print_report) -> None:
    """Every bench ends alike: the command, machine, date and commit that made it, --json written,
    the table printed."""
    result["command"] = command_line()
    result["environment"] = environment()
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.json:
        _write_json_atomic(args.json, result)
    print_report(result, result["command"])
    if args.json:
        print(f"every measurement written to {args.json}")


def _write_json_atomic(path: str, obj) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, target)
