"""Command line: foldmerge train-sources | merge | eval | demo.

Every error a user can cause ends in one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from pathlib import Path

import torch


QUIET_HELP = "no progress bars or status lines (tables and --json output stay)"


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in the one-line form of every other error, and --quiet on every
    (sub)command: subparsers are made of this class too, and theirs defaults to SUPPRESS so that a
    subcommand given without it keeps the top level's value."""

    def __init__(self, *args, quiet_default=argparse.SUPPRESS, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--quiet", action="store_true", default=quiet_default, help=QUIET_HELP)

    def error(self, message: str):
        print(f"foldmerge: error: {message.splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2)


def count(least: int):
    """An integer option that must be >= `least`."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < least:
            raise argparse.ArgumentTypeError(f"must be {'positive' if least == 1 else f'>= {least}'}, got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def real(positive: bool = False):
    """A finite number (NaN and Inf refused), positive if asked."""
    def parse(text: str) -> float:
        import math
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or (positive and v <= 0):
            raise argparse.ArgumentTypeError(f"must be a finite{' positive' if positive else ''} number, got {text}")
        return v
    parse.__name__ = "number"
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")




def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    ap = Parser(prog="foldmerge", description=__doc__.splitlines()[0], quiet_default=False)
    ap.add_argument("--version", action="version", version=f"foldmerge {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-sources", help="train one source model (MLP or ViT) per task, each from its own seed")
    p.add_argument("--tasks", nargs="+", required=True, help="task specs, e.g. mnist:0-4 mnist:5-9")
    p.add_argument("--arch", choices=["mlp", "vit", "bert", "resnet"], default="mlp",
                   help="bert: Hugging Face BertModel from a config (--width hidden, --depth layers, --heads; "
                        "WordPiece vocabulary of all-MiniLM-L6-v2, 128 positions) for text tasks (bbc:…); "
                        "resnet: a ResNet with BatchNorm (--multiplier, --base, --blocks; 4 epochs on --limit "
                        "images, default 6000: bench cnn's sources)")
    p.add_argument("--multiplier", type=count(1), default=1, help="ResNet: width multiplier (default 1)")
    p.add_argument("--base", type=count(1), default=8,
                   help="ResNet: channels of the first stage at multiplier 1 (default 8: bench cnn's ResNet-8)")
    p.add_argument("--blocks", type=count(1), default=1,
                   help="ResNet: basic blocks per stage (default 1: ResNet-8; 3 is ResNet-20)")
    p.add_argument("--hidden", nargs="+", type=count(1), default=[128], help="MLP: hidden widths (one per layer)")
    p.add_argument("--width", type=count(1), default=64, help="ViT: residual width (default 64)")
    p.add_argument("--mlp-dim", type=count(1), default=None, help="ViT: MLP hidden width (default 2 x width)")
    p.add_argument("--depth", type=count(1), default=4, help="ViT: blocks (default 4)")
    p.add_argument("--heads", type=count(1), default=4, help="ViT: attention heads (default 4)")
    p.add_argument("--pretrain-task", default="mnist/transpose",
                   help="ViT: task of the 'pre-training' stage before fine-tuning (default mnist/transpose)")
    p.add_argument("--limit", type=count(1), default=None, help="ViT: cap the training images per stage")
    p.add_argument("--from", dest="start", metavar="DIR",
                   help="BERT: fine-tune from this Hugging Face BertModel directory (a pre-trained start, e.g. "
                        "all-MiniLM-L6-v2); its sizes replace --width/--depth/--heads. ViT: fine-tune from this "
                        "foldmerge ViT model (1 epoch, AdamW lr 3e-4 unless --epochs/--lr): same-start sources for "
                        "task-arithmetic, TIES and gating")
    p.add_argument("--seeds", nargs="+", type=count(0), default=None, help="one seed per task (default 0, 1, …)")
    p.add_argument("--epochs", type=count(0), default=None, help="default: paper E.1 (1 or 2; 10 for fmnist)")
    p.add_argument("--lr", type=real(positive=True), default=None, help="default: paper E.1 (0.01; 0.001 for fmnist)")
    p.add_argument("--out", required=True, help="directory; each model goes to OUT/<task>-s<seed>")
    p.add_argument("--force", action="store_true", help="replace models already at those paths (atomically)")
    p.add_argument("--checkpoint-every", type=count(1), metavar="N",
                   help="save each model's training state every N epochs to <model>.resume/")
    p.add_argument("--resume", action="store_true", help="continue stopped training from <model>.resume/ "
                                                         "(same command; models already saved are kept)")
    _common(p)

    p = sub.add_parser("merge", help="merge source models into one model with every task's head")
    p.add_argument("models", nargs="+", help="model directories (from train-sources or merge, or Hugging Face "
                                              "directories)")
    p.add_argument("--config", metavar="FILE", help="a YAML file naming models, method, options and out "
                                                    "(foldmerge.config); flags given after it override it")
    p.add_argument("--method", default="fs-merge",
                   help="fs-merge | distill | average | slerp | regmean | zipit | permute | weight-matching | cca | "
                        "pleas | opt | task-arithmetic | ties | gating (the last three for sources fine-tuned from "
                        "one pre-trained model)")
    p.add_argument("--variant", choices=["local", "global", "seq"],
                   help="FS-Merge objective (default global; seq = merge the models one after another)")
    p.add_argument("--last-epochs", type=count(0), help="FS-Merge seq.: epochs of the last stage (default --epochs)")
    p.add_argument("--param", help="M/U parameterization: full | diag | diag+lowrank(R)")
    p.add_argument("--init", choices=["first", "average", "random", "zipit", "regmean"],
                   help="FS-Merge M/U init (first|average|random|zipit) or distillation student init "
                        "(first|average|regmean|random)")
    p.add_argument("--widths", nargs="+", type=count(1),
                   help="target widths (default: model 1's): MLP one per hidden layer; ViT residual width "
                        "[MLP width]; more than the architecture takes is an error")
    p.add_argument("--epochs", type=count(0), help="default: appendix E.1 for MLPs (FS-Merge global and distillation "
                                                   "1000, local 15000)" + _TRANSFORMER_DEFAULT.format("100"))
    p.add_argument("--lr", type=real(positive=True), help="default: 0.1 for MLPs (E.1)" + _TRANSFORMER_DEFAULT.format("1e-3"))
    p.add_argument("--momentum", type=real())
    p.add_argument("--schedule", choices=["constant", "step", "cosine"])
    p.add_argument("--warmup", type=real(),
                   help="cosine schedule: fraction of training spent warming up (default: the paper's 20 epochs "
                        "of its default run, appendix E.1: 0.02 of FS-Merge global's and distillation's 1000 "
                        "epochs, 20/15000 of FS-Merge local's)")
    p.add_argument("--weight-decay", type=real(), help="default 0 for MLPs" + _TRANSFORMER_DEFAULT.format("0.001"))
    p.add_argument("--batch-size", type=count(1), help="default: the whole merge sample (gradient descent) for MLPs"
                                                       + _TRANSFORMER_DEFAULT.format("128"))
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="FS-Merge / distillation optimizer (default sgd for "
                                                                 "MLPs" + _TRANSFORMER_DEFAULT.format("adamw")[1:])
    p.add_argument("--targets", choices=["all", "own-task"])
    p.add_argument("--target-scale", help="match | none | a number (default match for MLPs, E.1; none for ViTs and "
                                          "BERTs, E.2)")
    p.add_argument("--form", choices=["folded", "supernet"], help="how the SuperNet is run in training")
    p.add_argument("--output-map", choices=["learned", "fixed"],
                   help="distillation: learn the map from student to source features (MLP default) or keep "
                        "it the identity (transformer default)")
    p.add_argument("--alpha", type=real(), help="RegMean: off-diagonal scale (default 0.5 for MLPs, 0.9 for ViTs); ZipIt!: repeated-match "
                                                "factor (default 0.3)")
    p.add_argument("--beta", type=real(), help="ZipIt!: within-model merge budget in [0, 1] (default 0.5 for MLPs, "
                                              "0.125 for ViTs: validation's choices, README 'Defaults')")
    p.add_argument("--stop-layer", type=count(1), help="ZipIt!: zip hidden layers (a ResNet's stages) 1..N only "
                                                       "(partial zipping)")
    p.add_argument("--reset-bn", choices=["yes", "no"],
                   help="average / permute / weight-matching / zipit: reset every layer's channel statistics on the "
                        "merge sample after merging (ZipIt!'s BatchNorm reset, REPAIR). Default: yes for sources "
                        "with BatchNorm (ResNets), no otherwise: bench cnn, where it takes Permute from 43 to 92 %% "
                        "and ZipIt! from 41 to 93 %% per task")
    p.add_argument("--budget", type=real(), help="PLeaS: extra merged width per space, in [0, 1] (default 0: one "
                                                "model's size; 1 keeps every neuron)")
    p.add_argument("--ridge", type=real(), help="PLeaS: ridge of the layer-wise least squares (default 1e-4, relative)")
    p.add_argument("--t", type=real(), help="SLERP: interpolation point for two models (default 0.5)")
    p.add_argument("--filter", help="opt: tokens that define a neuron: cls | full | window-K")
    p.add_argument("--reg", type=real(), help="opt: Sinkhorn regularization λ (0 = exact, hard alignment); cca: "
                                             "covariance regularization (default 1e-4 of the mean eigenvalue)")
    p.add_argument("--base", metavar="DIR", help="task-arithmetic / TIES: the pre-trained model the sources were "
                                                 "fine-tuned from (a model directory)")
    p.add_argument("--lam", type=real(positive=True), help="task arithmetic: λ, the task vectors' scale (default 0.5, "
                   "see README 'Merging models from one start'); TIES: λ (default 1, the TIES paper's)")
    p.add_argument("--density", type=real(positive=True), help="TIES: share of each task vector kept (default 0.2, "
                   "the TIES paper's)")
    p.add_argument("--m", type=count(0), help="gating: attention and MLP modules of lowest weight similarity to gate "
                   "(default 1)")
    p.add_argument("--rest", choices=["average", "regmean"], help="gating: how the ungated modules merge "
                   "(default regmean, the gating paper's better one)")
    p.add_argument("--gate-norms", choices=["yes", "no"], help="gating: gate the embedding, norm and output modules "
                   "too (default yes, the paper's)")
    p.add_argument("--strategy", choices=["concat-combined", "concat-separate", "separate-combined",
                                          "separate-separate"],
                   help="gating: how weight similarity is computed (default concat-combined, the paper's Table 9)")
    p.add_argument("--gate-width", type=count(1),
                   help="gating: channels of the gate CNN's first layer (default 32: bench gating, Table 8)")
    p.add_argument("--gate-epochs", type=count(1), help="gating: epochs of gate training (default 30)")
    p.add_argument("--zipit-alpha", type=real(), help="FS-Merge with --init zipit: ZipIt!'s alpha (default: ZipIt!'s)")
    p.add_argument("--zipit-beta", type=real(), help="FS-Merge with --init zipit: ZipIt!'s beta (default: ZipIt!'s)")
    p.add_argument("--regmean-alpha", type=real(), help="distillation with --init regmean: RegMean's alpha (default: "
                                                       "RegMean's)")
    p.add_argument("--per-task", type=count(1), default=64, help="unlabeled training images per task (default 64)")
    p.add_argument("--held-out", type=count(0), default=0, metavar="N",
                   help="fs-merge (global) and distill: stop early on N further unlabeled examples per task, "
                        "keeping the epoch with the lowest held-out loss (paper F.8 uses 200; default 0: off)")
    p.add_argument("--patience", type=count(1), help="with --held-out: epochs without improvement before stopping "
                                                     "(default 20)")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="Hugging Face sources: the task of each model (e.g. bbc:0-2 bbc:3-4), where its config "
                        "does not record one; the merge sample is drawn from it")
    p.add_argument("--augment", type=count(0),
                   help="augmented images per task made from them (crop, flip, solarize/blur, MixUp; default 1024 "
                        "for RegMean, whose Grams gained from them in 7 of 8 settings of bench defaults, 0 for "
                        "the other methods: README 'Defaults')")
    p.add_argument("--select", action="append", metavar="ARG=V1,V2,…",
                   help="choose this option's value without labels: each value merges from half of every model's "
                        "sample and is scored by agreement with the sources on the other half; the best is merged "
                        "from the whole sample (repeat for a grid; README 'Choosing hyperparameters without labels')")
    p.add_argument("--calibrate", choices=["routing", "none"], default="routing",
                   help="routing (default): fit each head's offset and scale on the merge sample so that joint "
                        "accuracy holds up; no per-task prediction changes (README, 'Joint accuracy'); none: the "
                        "heads as the method made them")
    p.add_argument("--accelerator", choices=["cpu", "cuda", "auto"],
                   help="train under Lightning Fabric on this device (default: plain PyTorch on the CPU)")
    p.add_argument("--devices", type=count(1), default=1, help="with --accelerator: processes/devices for DDP (default 1)")
    p.add_argument("--precision", choices=["32-true", "bf16-mixed"], help="with --accelerator (default 32-true)")
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("--out", required=True, help="output model directory (never an input, nor inside one)")
    p.add_argument("--force", action="store_true", help="replace a model already at --out (atomically; other "
                                                        "files there are kept)")
    p.add_argument("--checkpoint-every", type=count(1), metavar="N",
                   help="save the training state every N epochs to OUT.resume/ (removed once the model is saved)")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped merge from OUT.resume/ (same command; bit-identical result on CPU)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle checkpoints (read with torch's weights-only unpickler)")
    _common(p)

    p = sub.add_parser("eval", help="per-task and joint accuracy of saved models")
    p.add_argument("models", nargs="+", help="model directories")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--ensemble", action="store_true",
                   help="also the ensemble reference of the models (features averaged, for ViTs each scaled to "
                        "unit mean |f| first; every head applied: the FS-Merge paper's ensemble row)")
    p.add_argument("--allow-pickle", action="store_true")
    _common(p)

    p = sub.add_parser("report", help="a Markdown + self-contained HTML report with figures from bench --json files")
    p.add_argument("results", nargs="+", metavar="RESULTS.json", help="--json files of any foldmerge bench")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="report directory (report.md, report.html, *.png); an earlier report there is replaced")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p = sub.add_parser("bench", help="benchmarks that reproduce the papers' tables (measured now)")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("mlp", help="FS-Merge paper Table 2 and Tables 9-14: MLP pairs on MNIST/Fashion-MNIST halves")
    b.add_argument("--dataset", choices=["mnist", "fmnist"], default="mnist")
    b.add_argument("--vary", choices=["depth", "width"], default="depth")
    b.add_argument("--seeds", type=count(1), default=5, help="number of seeds (pairs 0..N-1; default 5)")
    b.add_argument("--values", nargs="+", type=count(1), help="depths or widths to run (default: the paper's)")
    b.add_argument("--methods", nargs="+", help="only these rows or methods (default: all)")
    b.add_argument("--jobs", type=count(1), default=None, help="worker processes (default: one per core)")
    b.add_argument("--epochs-scale", type=real(positive=True), default=1.0,
                   help="multiply every training epoch count (1 = the paper's; <1 for a quick look)")
    b.add_argument("--retune", action="store_true", help="choose the hyperparameters on validation again")
    b.add_argument("--out", default="runs/bench", help="cache for source models and tuning (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    b.add_argument("--threads", type=count(1), default=None, help=argparse.SUPPRESS)
    b = bench.add_parser("defaults", help="every method with its CLI defaults on MNIST / Fashion-MNIST class splits")
    b.add_argument("--datasets", nargs="+", default=["mnist", "fmnist"], help="mnist and/or fmnist (default both)")
    b.add_argument("--depths", nargs="+", type=count(1), default=[2, 4], help="MLP depths, width 128 (default 2 4)")
    b.add_argument("--seeds", type=count(1), default=1, help="seed pairs per setting (default 1)")
    b.add_argument("--methods", nargs="+", help="only these rows or methods (default: all)")
    b.add_argument("--out", default="runs/bench", help="cache for source models (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    b.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")
    b = bench.add_parser("select", help="label-free selection (--select) against labelled validation")
    b.add_argument("--settings", nargs="+", help="of: 'mnist d2' 'mnist d4' 'fmnist d2' 'fmnist d4' 'vit pairs16' "
                                                  "(default all)")
    b.add_argument("--methods", nargs="+", help="of: regmean zipit opt (default all)")
    b.add_argument("--out", default="runs/bench", help="cache for source models (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    b.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")
    b = bench.add_parser("text", help="FS-Merge paper F.6/F.8/F.4: BERT pairs (from scratch, or one MiniLM start)")
    b.add_argument("--setting", choices=["scratch", "minilm"], default="scratch",
                   help="scratch: small BERTs from distinct seeds; minilm: all-MiniLM-L6-v2 fine-tuned per task")
    b.add_argument("--pairs", type=count(1), default=None, help="how many of the task pairs (default all: 2)")
    b.add_argument("--methods", nargs="+", help="only these rows or methods (default: all)")
    b.add_argument("--sweep", action="store_true", help="also F.8's data-count sweep on the first pair")
    b.add_argument("--out", default="runs/bench", help="cache for source models (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    b.add_argument("--threads", type=count(1), default=None, help=argparse.SUPPRESS)
    b = bench.add_parser("gating", help="the gating-merge paper: ViTs fine-tuned from one start, 3/6/12 tasks, domains")
    b.add_argument("--tables", nargs="+", default=None, metavar="TABLE",
                   help="of: main similarity strategies gate domain scratch (default all)")
    b.add_argument("--sizes", nargs="+", type=count(1), default=None, help="merge sizes of the main table (default 3 6 12)")
    b.add_argument("--out", default="runs/bench", help="cache for source models (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    b.add_argument("--threads", type=count(1), default=None, help=argparse.SUPPRESS)
    b = bench.add_parser("cnn", help="ZipIt! Table 1: ResNets with BatchNorm from different seeds, two tasks each")
    b.add_argument("--pairs", nargs="+", default=None, metavar="PAIR",
                   help="of: mnist fmnist cross (default all: MNIST 0-4/5-9, Fashion-MNIST 0-4/5-9, MNIST 0-4 + "
                        "Fashion-MNIST 0-4)")
    b.add_argument("--widths", nargs="+", type=count(1), default=None, help="width multipliers (default 1 4)")
    b.add_argument("--seeds", type=count(1), default=None, help="seed pairs per cell (default 3)")
    b.add_argument("--methods", nargs="+", default=None, help="only these rows or methods (default all)")
    b.add_argument("--out", default="runs/bench", help="cache for source models and measured cells (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    b.add_argument("--threads", type=count(1), default=None, help=argparse.SUPPRESS)
    b = bench.add_parser("vit", help="FS-Merge paper 3.2: ViT pairs from different inits and tasks")
    b.add_argument("--setting", choices=["pairs16", "pairs100", "groups4", "groups8"], default="pairs16")
    b.add_argument("--pairs", "--groups", dest="pairs", type=count(1), default=None,
                   help="run only the first N pairs or groups (default all: 3 pairs, 2 groups of 4, 1 of 8)")
    b.add_argument("--methods", nargs="+", help="only these rows or methods (default: all)")
    b.add_argument("--small", action="store_true", help="a smaller ViT (depth 2, width 32) for a quick look")
    b.add_argument("--limit", type=count(1), help="cap the training images per source stage (quick look)")
    b.add_argument("--source-epochs", type=count(1), nargs=2, default=[3, 2], metavar=("PRE", "FINE"),
                   help="pre-training and fine-tuning epochs of the sources (default 3 2)")
    b.add_argument("--epochs-scale", type=real(positive=True), default=1.0, help="multiply every merge's epochs")
    b.add_argument("--retune", action="store_true", help="choose the hyperparameters on validation again")
    b.add_argument("--no-tune", action="store_true",
                   help="skip the validation search and use appendix E.2's bold values")
    b.add_argument("--out", default="runs/bench", help="cache for source models and tuning (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    b.add_argument("--threads", type=count(1), default=None, help=argparse.SUPPRESS)

    b = bench.add_parser("data-efficiency", help="FS-Merge paper Figures 4-7: accuracy against 16-1024 originals per task")
    b.add_argument("--arch", choices=["mlp", "vit", "bert"], default="mlp",
                   help="mlp: bench mlp's MNIST pair; vit: bench vit's first pair; bert: bench text's first pair "
                        "(default mlp)")
    b.add_argument("--counts", nargs="+", type=count(1), default=None,
                   help="original examples per task (default 16 32 64 128 256 512 1024; images augmented to 1024)")
    b.add_argument("--seeds", type=count(1), default=None, help="seed pairs (default mlp 3, vit 1, bert 1)")
    b.add_argument("--out", default="runs/bench", help="cache for source models and measured cells (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    b.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")
    b = bench.add_parser("scale", help="FS-Merge minus distillation as the ViT grows (width 64-192, depth 4-6)")
    b.add_argument("--configs", nargs="+", default=None, metavar="WxD",
                   help="ViT sizes WIDTHxDEPTH (default 64x4 128x4 64x6 192x4 128x6 192x6, cheapest first)")
    b.add_argument("--originals", nargs="+", type=count(1), default=None,
                   help="original images per task, of 16 (+800 augmented) and 100 (+1000) (default both)")
    b.add_argument("--seeds", type=count(1), default=1, help="merge seeds per cell (default 1)")
    b.add_argument("--out", default="runs/bench", help="cache for source models and measured cells (default runs/bench)")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    b.add_argument("--threads", type=count(1), default=None, help="torch CPU threads (default: torch's choice)")
    b = bench.add_parser("cost", help="time and peak memory of FS-Merge (folded, SuperNet, seq.) vs distillation")
    b.add_argument("--n", nargs="+", type=count(1), default=[2, 4, 8], help="numbers of models (default 2 4 8)")
    b.add_argument("--per-task", type=count(1), default=1024, help="merge images per model (default 1024)")
    b.add_argument("--width", type=count(1), default=64, help="ViT width, heads of 16 (default 64)")
    b.add_argument("--patch", type=count(1), default=7, help="ViT patch size; 4 gives 50 tokens (default 7: 17)")
    b.add_argument("--epochs", type=count(0), default=5, help="epochs of every run (default 5)")
    b.add_argument("--methods", nargs="+", help="only these rows (default all)")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    b.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true")
    b.add_argument("--repeats", type=count(1), default=1, help="runs per cell; the median is reported (default 1)")
    b.add_argument("--same-process", action="store_true",
                   help="time each n's runs in one process, methods alternating (steadier ratios on a busy machine)")
    b.add_argument("--steps", type=count(0), default=0, metavar="ROUNDS",
                   help="time training steps, not whole runs: each n in one process, methods alternating "
                        "in blocks of 4 steps for ROUNDS rounds (e.g. 30; steadier ratios on a busy machine)")
    b.add_argument("--against", metavar="SRC",
                   help="with --steps: also time the folded FS-Merge step of another checkout (its src folder, "
                        "e.g. of `git worktree add /tmp/old COMMIT`), side by side in the same processes")
    b.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    b.add_argument("--threads", type=count(1), default=None, help="torch threads per run (default torch's choice)")

    p = sub.add_parser("demo", help="MNIST 0-4 vs 5-9: train two MLPs, merge, print the table")
    p.add_argument("--seed", type=count(0), default=0)
    p.add_argument("--per-task", type=count(1), default=64)
    p.add_argument("--out", default=None, help="also save the sources and merged models here")
    _common(p)
    return ap


_TRANSFORMER_DEFAULT = " (ViTs and BERTs: {}, the ViT bench's validated choice, README 'Defaults')"


def _command_line() -> str:
    """The command as a shell would take it back (arguments with spaces quoted)."""
    import shlex
    return "foldmerge " + shlex.join(sys.argv[1:])


def cmd_train_sources(args) -> None:
    from .data import Task
    from .report import print_json, print_table
    from .sources import source_dirname, train_source, train_vit_source
    tasks = [Task.parse(t) for t in args.tasks]
    seeds = args.seeds if args.seeds is not None else list(range(len(tasks)))
    if len(seeds) != len(tasks):
        raise ValueError(f"--seeds needs one seed per task ({len(tasks)}), got {len(seeds)}")
    if args.arch in ("vit", "bert") and args.width % args.heads:
        raise ValueError(f"--width {args.width} is not divisible by --heads {args.heads}")
    from .io import check_target
    paths = [Path(args.out) / source_dirname(task, seed) for task, seed in zip(tasks, seeds)]
    if len(set(paths)) != len(paths):
        raise ValueError("two of --tasks / --seeds give the same model path")
    for path in paths:                 # every target checked before any training
        if not (args.resume and (path / "config.json").is_file()):
            check_target(path, args.force)
    if (args.arch == "bert") != all(t.is_text for t in tasks) or len({t.is_text for t in tasks}) > 1:
        raise ValueError("--arch bert trains on text tasks (bbc:…), mlp, vit and resnet on image tasks")
    if args.arch == "vit":
        from .bench.vit import VIT
        config = {**VIT, "width": args.width, "depth": args.depth, "heads": args.heads,
                  "mlp_dim": args.mlp_dim or 2 * args.width}
    elif args.arch == "bert" and args.start:
        from .hf import load_backbone
        config = load_backbone(args.start)[0]
    elif args.arch == "resnet":
        from .bench.cnn import RESNET
        config = {**RESNET, "width": args.multiplier, "base": args.base, "blocks": args.blocks}
    elif args.arch == "bert":             # the vocabulary and length of the text tasks' tokens
        from .data.texts import MAX_TOKENS, tokenizer
        config = {"vocab_size": tokenizer().get_vocab_size(), "hidden_size": args.width,
                  "num_hidden_layers": args.depth, "num_attention_heads": args.heads,
                  "intermediate_size": args.mlp_dim or 4 * args.width, "max_position_embeddings": MAX_TOKENS}
    else:
        config = {"hidden": args.hidden}
    start_model = None
    if args.start and args.arch == "vit":
        from .api import load
        start_model = load(args.start)
        if start_model.arch != "vit":
            raise ValueError(f"--from {args.start} is a {start_model.arch} model; --arch vit fine-tunes a ViT")
    elif args.start and args.arch != "bert":
        raise ValueError("--from (a pre-trained start) applies to --arch bert and vit")
    rows = []
    from .checkpoint import Checkpoint, checkpoint_dir, checkpointing
    for task, seed, path in zip(tasks, seeds, paths):
        resume_dir = checkpoint_dir(path)
        if args.resume and (path / "config.json").is_file() and not resume_dir.exists():
            from .api import load
            model = load(path)              # trained and saved before the run stopped
        else:
            ck = None
            resuming = args.resume and resume_dir.exists()
            if args.checkpoint_every or resuming:
                fingerprint = {"task": task.name, "seed": seed, "arch": args.arch, "config": config,
                               "epochs": args.epochs, "lr": args.lr, "limit": args.limit,
                               "pretrain_task": args.pretrain_task, "start": args.start}
                ck = Checkpoint(resume_dir, args.checkpoint_every, fingerprint, resume=resuming)
            with checkpointing(ck):
                if args.arch == "bert":
                    from .sources import train_bert_source
                    model = train_bert_source(task, config, seed, limit=args.limit, start=args.start,
                                              **({} if args.epochs is None else {"epochs": args.epochs}),
                                              **({"lr": args.lr} if args.lr else {}))
                elif start_model is not None:
                    from .sources import fine_tune
                    model = fine_tune(start_model, task, seed, limit=args.limit,
                                      **({} if args.epochs is None else {"epochs": args.epochs}),
                                      **({"lr": args.lr} if args.lr else {}))
                elif args.arch == "resnet":
                    from .bench.cnn import SOURCE_TRAINING
                    from .sources import train_resnet_source
                    model = train_resnet_source(task, config, seed, limit=args.limit or SOURCE_TRAINING["limit"],
                                                epochs=SOURCE_TRAINING["epochs"] if args.epochs is None else args.epochs,
                                                **({"lr": args.lr} if args.lr else {}))
                elif args.arch == "vit":
                    stage = {} if args.epochs is None else {"epochs": args.epochs}
                    model = train_vit_source(task, config, seed, pretrain_task=args.pretrain_task, limit=args.limit,
                                             **stage, **({"lr": args.lr} if args.lr else {}))
                else:
                    model = train_source(task, args.hidden, seed, epochs=args.epochs, lr=args.lr)
            model.meta["command"] = _command_line()
            model.save(path)
            if ck is not None:
                ck.remove()
        rows.append({"task": task.name, "seed": seed, "path": str(path),
                     "val": model.meta["val_accuracy"], "test": model.meta["test_accuracy"]})
    if args.json:
        print_json({"models": rows})
    else:
        print_table(rows, "source models", [("task", "task"), ("seed", "seed"), ("val", "val acc %"),
                                            ("test", "test acc %"), ("path", "saved to")])


MERGE_OPTIONS = ("variant", "last_epochs", "param", "init", "widths", "epochs", "lr", "momentum", "schedule", "warmup",
                 "weight_decay", "batch_size", "optimizer", "targets", "target_scale", "form", "alpha", "beta",
                 "stop_layer", "reset_bn", "budget", "ridge", "t", "filter", "reg", "zipit_alpha", "zipit_beta", "regmean_alpha", "output_map",
                 "patience", "base", "lam", "density", "m", "rest", "gate_norms", "strategy", "gate_width",
                 "gate_epochs")


def cmd_merge(args) -> None:
    from . import selection
    from .api import load, merge
    from .evaluation import evaluate
    from .io import check_target
    from .methods import get_method
    from .report import print_json, print_table, result_row
    fn = get_method(args.method)
    accepted = set(inspect.signature(fn).parameters)
    options = {k: getattr(args, k) for k in MERGE_OPTIONS if getattr(args, k) is not None}
    bad = [k for k in options if k not in accepted]
    if bad:
        raise ValueError(f"--{bad[0].replace('_', '-')} does not apply to method {args.method!r}")
    for flag in ("gate_norms", "reset_bn"):
        if flag in options:
            options[flag] = options[flag] == "yes"
    if "target_scale" in options and options["target_scale"] not in ("match", "none"):
        try:
            options["target_scale"] = float(options["target_scale"])
        except ValueError:
            raise ValueError("--target-scale must be match, none or a number") from None
    engine = None
    if args.accelerator or args.devices != 1 or args.precision:
        from .engine import Engine
        engine = Engine(args.accelerator or "cpu", args.devices, args.precision or "32-true")
    check_target(args.out, args.force, inputs=args.models + ([args.base] if args.base else []))   # before any work
    from .checkpoint import checkpoint_dir
    resume_dir = checkpoint_dir(args.out)
    from .hf import check_tokenizers, is_hf_dir, load_hf, save_hf
    hf = [is_hf_dir(p) for p in args.models]
    if args.tasks is not None and len(args.tasks) != len(args.models):
        raise ValueError(f"--tasks needs one task per model ({len(args.models)}), got {len(args.tasks)}")
    if any(hf):
        check_tokenizers([p for p, h in zip(args.models, hf) if h])
    models = [load_hf(p, args.tasks[k] if args.tasks else None) if hf[k] else load(p, allow_pickle=args.allow_pickle)
              for k, p in enumerate(args.models)]
    if "base" in options:
        options["base"] = load(options["base"], allow_pickle=args.allow_pickle)
    merged = merge(models, args.per_task, method=args.method, seed=args.seed, augment=args.augment,
                   engine=engine, calibrate=args.calibrate, select=selection.parse(args.select),
                   checkpoint_every=args.checkpoint_every or 0, checkpoint_dir=resume_dir, resume=args.resume,
                   keep_checkpoint=True, held_out=args.held_out, **options)
    merged.meta["command"] = _command_line()
    merged.save(args.out)
    if any(hf):            # also what transformers loads: OUT/hf/backbone and OUT/hf/<task>
        save_hf(merged, Path(args.out) / "hf", models)
    if args.checkpoint_every or args.resume:
        from .checkpoint import Checkpoint
        Checkpoint.remove_dir(resume_dir)
    result = evaluate(merged)
    if args.json:
        print_json({"out": args.out, "meta": merged.meta, "test": result})
    else:
        print_table([result_row(args.method + (f" {options['variant']}" if "variant" in options else ""),
                                result, merged.meta["wall_seconds"])],
                    f"merged {len(models)} models -> {args.out}", footer=f"seed {args.seed}")


def cmd_eval(args) -> None:
    from .api import load
    from .evaluation import Ensemble, SourceHeads, evaluate
    from .report import print_json, print_table
    out, models = [], []
    for p in args.models:
        model = load(p, allow_pickle=args.allow_pickle)
        models.append(model)
        out.append({"model": p, "method": model.meta.get("method", model.meta.get("kind", "?")),
                    **evaluate(model, split=args.split)})
    names = [t.name for m in models for t in m.tasks]
    together = len(models) > 1 and len(set(names)) == len(names)
    if args.ensemble and not together:
        raise ValueError("--ensemble needs two or more models whose tasks all differ")
    if together:     # the models as sources: their heads side by side, and the ensemble if asked
        out.append({"model": "heads side by side", "method": "sources",
                    **evaluate(SourceHeads(models), split=args.split)})
        if args.ensemble:
            out.append({"model": "ensemble", "method": "ensemble", **evaluate(Ensemble(models), split=args.split)})
    if args.json:
        print_json({"results": out})
        return
    rows = []
    for r in out:
        for t, acc in r["per_task"].items():
            rows.append({"model": r["model"], "task": t, "per_task": acc, "joint": r.get("joint", {}).get(t),
                         "routed": r.get("routed", {}).get(t)})
        if len(r["per_task"]) > 1:
            rows.append({"model": r["model"], "task": "mean", "per_task": r["per_task_mean"],
                         "joint": r.get("joint_mean"), "routed": r.get("routed_mean")})
    columns = [("model", "model"), ("task", "task"), ("per_task", "per-task acc %"), ("joint", "joint acc %")]
    if any(r["routed"] is not None for r in rows):      # a gated model: the head its gate picks
        columns.append(("routed", "routed acc %"))
    print_table(rows, f"{args.split} accuracy", columns)


def cmd_demo(args) -> None:
    from .demo import run_demo
    from .report import print_json, print_table
    result = run_demo(seed=args.seed, per_task=args.per_task, out=args.out)
    result["command"] = _command_line()
    if args.json:
        print_json(result)
        return
    s = result["setting"]
    print_table(result["rows"],
                f"MNIST {s['tasks'][0]} vs {s['tasks'][1]}: MLP 784-{'-'.join(map(str, s['hidden']))}, "
                f"{s['per_task_images']} unlabeled images per task",
                footer=f"measured now; seed {s['seed']} (sources seeds {s['source_seeds']}); "
                       f"{result['total_seconds']:.0f} s in all; command: {result['command']}")


def cmd_bench(args) -> None:
    if args.bench == "vit":
        return cmd_bench_vit(args)
    if args.bench == "cost":
        return cmd_bench_cost(args)
    if args.bench == "cnn":
        from .bench import cnn
        result = cnn.run_bench(pairs=tuple(args.pairs or cnn.PAIRS), widths=tuple(args.widths or cnn.WIDTHS),
                               seeds=args.seeds or cnn.SEEDS, methods=args.methods, out=args.out)
        return _report_bench(result, args, cnn.print_report)
    if args.bench == "data-efficiency":
        from .bench import efficiency
        result = efficiency.run_bench(arch=args.arch, counts=tuple(args.counts or efficiency.COUNTS), seeds=args.seeds,
                                      out=args.out)
        return _report_bench(result, args, efficiency.print_report)
    if args.bench == "scale":
        from .bench import scale
        configs = tuple(scale.parse_config(c) for c in args.configs) if args.configs else scale.CONFIGS
        result = scale.run_bench(configs=configs, originals=tuple(args.originals or scale.SAMPLES), seeds=args.seeds,
                                 out=args.out)
        return _report_bench(result, args, scale.print_report)
    if args.bench == "gating":
        from .bench import gating
        result = gating.run_bench(tables=tuple(args.tables or gating.TABLES), sizes=tuple(args.sizes or gating.SIZES),
                                  out=args.out)
        return _report_bench(result, args, gating.print_report)
    if args.bench == "text":
        from .bench import text
        result = text.run_bench(setting=args.setting, pairs=args.pairs, methods=args.methods, sweep=args.sweep,
                                out=args.out)
        return _report_bench(result, args, text.print_report)
    if args.bench == "select":
        from .bench import selection
        result = selection.run_bench(settings=args.settings, methods=args.methods, out=args.out)
        return _report_bench(result, args, selection.print_report)
    if args.bench == "defaults":
        from .bench import defaults
        result = defaults.run_bench(datasets=tuple(args.datasets), depths=tuple(args.depths), seeds=args.seeds,
                                    methods=args.methods, out=args.out)
        return _report_bench(result, args, defaults.print_report)
    from .bench import mlp
    result = mlp.run_bench(dataset=args.dataset, vary=args.vary, seeds=args.seeds, values=args.values,
                           methods=args.methods, jobs=args.jobs, out=args.out,
                           epochs_scale=args.epochs_scale, retune=args.retune)
    _report_bench(result, args, mlp.print_report)


def cmd_bench_vit(args) -> None:
    from .bench import vit
    if args.epochs_scale <= 0 or (args.limit is not None and args.limit < 1):
        raise ValueError("--epochs-scale and --limit must be positive")
    result = vit.run_bench(setting=args.setting, pairs=args.pairs, out=args.out, small=args.small,
                           limit=args.limit, epochs_scale=args.epochs_scale, methods=args.methods,
                           source_epochs=tuple(args.source_epochs), tune_=not args.no_tune, retune=args.retune)
    _report_bench(result, args, vit.print_report)


def cmd_bench_cost(args) -> None:
    from .bench import cost
    result = cost.run_bench(ns=tuple(args.n), per_task=args.per_task, epochs=args.epochs, device=args.device,
                            threads=args.threads, methods=args.methods, precision=args.precision,
                            repeats=args.repeats, width=args.width, patch=args.patch, same_process=args.same_process,
                            steps=args.steps, against=args.against)
    _report_bench(result, args, cost.print_report)


def _report_bench(result: dict, args, print_report) -> None:
    """Every bench ends alike: the command, machine, date and commit that made it, --json written,
    the table printed."""
    import datetime
    from .provenance import environment
    result["command"] = _command_line()
    result["environment"] = environment()
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.json:
        _write_json_atomic(args.json, result)
    print_report(result, result["command"])
    if args.json:
        print(f"every measurement written to {args.json}")


def _write_json_atomic(path: str, obj) -> None:
    import json
    import os
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, target)


def cmd_report(args) -> None:
    from .figures import build_report
    from .report import print_json
    done = build_report(args.results, args.out, _command_line())
    if args.json:
        print_json(done)
        return
    print(f"report of {len(done['results'])} result(s) written to {done['out']}: {', '.join(done['files'])}")


COMMANDS = {"train-sources": cmd_train_sources, "merge": cmd_merge, "eval": cmd_eval, "demo": cmd_demo,
            "bench": cmd_bench, "report": cmd_report}


def _expand_config(argv: list[str], parser) -> list[str]:
    """`merge --config FILE [flags]` -> the merge command line FILE stands for, then those flags."""
    if argv[:1] != ["merge"]:
        return argv
    for i, a in enumerate(argv):
        if a == "--config" or a.startswith("--config="):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else None)
            if value is None:
                raise ValueError("--config needs a file")
            rest = argv[1:i] + argv[i + (1 if "=" in a else 2):]
            from .config import config_argv
            return config_argv(value, parser) + rest
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = _expand_config(list(sys.argv[1:] if argv is None else argv), parser)
    except ValueError as e:
        print(f"foldmerge: error: {e}", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:            # a bad argument (one line said), --help or --version
        return e.code if isinstance(e.code, int) else 2
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "quiet", False):
        os.environ["FOLDMERGE_PROGRESS"] = "0"
    import signal

    def terminated(signum, frame):     # SIGTERM unwinds like ^C, so temporaries are removed on the way out
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, terminated)
    from .data import DataMissing
    from .io import ModelFileError
    try:
        COMMANDS[args.command](args)
    except (ValueError, DataMissing, ModelFileError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"foldmerge: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("foldmerge: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
