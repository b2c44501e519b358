"""`foldmerge train-sources --tasks T… [--arch mlp|vit|bert|resnet] --out DIR`: one source model per
task, each from its own seed, saved to DIR/<task>-s<seed>."""
from __future__ import annotations

from pathlib import Path

from ..api import load
from ..arch import resnet, vit
from ..checkpoint import Checkpoint, checkpoint_dir
from ..data import Task
from ..data.texts import MAX_TOKENS, tokenizer
from ..hf import load_backbone
from ..io import check_target, identity
from ..options import Integer, Number
from ..sources import (
    BERT,
    FINE_TUNE,
    RESNET,
    VIT,
    fine_tune,
    source_dirname,
    train_bert_source,
    train_resnet_source,
    train_source,
    train_vit_source,
)
from ..tables import print_json, print_table
from . import add_common, argtype, command_line, set_threads


def add_arguments(p) -> None:
    p.add_argument("--tasks", nargs="+", required=True, help="task specs, e.g. mnist:0-4 mnist:5-9")
    p.add_argument("--arch", choices=["mlp", "vit", "bert", "resnet"], default="mlp",
                   help="bert: Hugging Face BertModel from a config (--width hidden, --depth layers, --heads; "
                        "WordPiece vocabulary of all-MiniLM-L6-v2, 128 positions) for text tasks (bbc:…); "
                        "resnet: a ResNet with BatchNorm (--multiplier, --base, --blocks). How each family trains, "
                        "and where each recipe came from: docs/defaults.md")
    p.add_argument("--multiplier", type=argtype(Integer(1)), default=1, help="ResNet: width multiplier (default 1)")
    p.add_argument("--base", type=argtype(Integer(1)), default=resnet.SOURCE_CONFIG["base"],
                   help="ResNet: channels of the first stage at multiplier 1 (default 8: bench cnn's ResNet-8)")
    p.add_argument("--blocks", type=argtype(Integer(1)), default=resnet.SOURCE_CONFIG["blocks"],
                   help="ResNet: basic blocks per stage (default 1: ResNet-8; 3 is ResNet-20)")
    p.add_argument("--hidden", nargs="+", type=argtype(Integer(1)), default=[128], help="MLP: hidden widths (one per layer)")
    p.add_argument("--width", type=argtype(Integer(1)), default=64, help="ViT: residual width (default 64)")
    p.add_argument("--mlp-dim", type=argtype(Integer(1)), default=None, help="ViT: MLP hidden width (default 2 x width)")
    p.add_argument("--depth", type=argtype(Integer(1)), default=4, help="ViT: blocks (default 4)")
    p.add_argument("--heads", type=argtype(Integer(1)), default=4, help="ViT: attention heads (default 4)")
    p.add_argument("--pretrain-task", default="mnist/transpose",
                   help="ViT: task of the 'pre-training' stage before fine-tuning (default mnist/transpose)")
    p.add_argument("--limit", type=argtype(Integer(1)), default=None,
                   help=f"cap the training images per stage (default: all of them; resnet {RESNET['limit']}: bench "
                        "cnn's sources)")
    p.add_argument("--from", dest="start", metavar="DIR",
                   help="BERT: fine-tune from this Hugging Face BertModel directory (a pre-trained start, e.g. "
                        "all-MiniLM-L6-v2); its sizes replace --width/--depth/--heads. ViT: fine-tune from this "
                        "foldmerge ViT model (1 epoch, AdamW lr 3e-4 unless --epochs/--lr): same-start sources for "
                        "task-arithmetic, TIES and gating")
    p.add_argument("--seeds", nargs="+", type=argtype(Integer(0)), default=None, help="one seed per task (default 0, 1, …)")
    p.add_argument("--epochs", type=argtype(Integer(0)), default=None,
                   help=f"default by --arch: mlp paper E.1 (1 or 2; fmnist 10); vit {VIT['pretrain_epochs']} "
                        f"pre-training + {VIT['epochs']}; bert {BERT['epochs']}; resnet {RESNET['epochs']}; --from a "
                        f"ViT {FINE_TUNE['epochs']} (docs/defaults.md)")
    p.add_argument("--lr", type=argtype(Number(positive=True)), default=None,
                   help=f"default by --arch: mlp paper E.1 (0.01; fmnist 0.001); vit {VIT['lr']:g}; bert "
                        f"{BERT['lr']:g}; resnet {RESNET['lr']:g}; --from a ViT {FINE_TUNE['lr']:g} (docs/defaults.md)")
    p.add_argument("--out", required=True, help="directory; each model goes to OUT/<task>-s<seed>")
    p.add_argument("--force", action="store_true", help="replace models already at those paths (atomically)")
    p.add_argument("--checkpoint-every", type=argtype(Integer(1)), metavar="N",
                   help="save each model's training state every N epochs to <model>.resume/")
    p.add_argument("--resume", action="store_true", help="continue stopped training from <model>.resume/ "
                                                         "(same command; models already saved are kept)")
    add_common(p)


def run(args) -> None:
    set_threads(args)
    tasks = [Task.parse(t) for t in args.tasks]
    seeds = args.seeds if args.seeds is not None else list(range(len(tasks)))
    if len(seeds) != len(tasks):
        raise ValueError(f"--seeds needs one seed per task ({len(tasks)}), got {len(seeds)}")
    if args.arch in ("vit", "bert") and args.width % args.heads:
        raise ValueError(f"--width {args.width} is not divisible by --heads {args.heads}")
    paths = [Path(args.out) / source_dirname(task, seed) for task, seed in zip(tasks, seeds)]
    if len(set(paths)) != len(paths):
        raise ValueError("two of --tasks / --seeds give the same model path")
    seen = {}
    for path in paths:                 # every place written checked before any training
        inputs = [args.start] if args.start else []
        if not (args.resume and (path / "config.json").is_file()):
            check_target(path, args.force, inputs=inputs)
            seen[path] = identity(path)
        if args.checkpoint_every or args.resume:
            check_target(checkpoint_dir(path), True, inputs=inputs, kind="checkpoint", flag="the checkpoint directory")
    if (args.arch == "bert") != all(t.is_text for t in tasks) or len({t.is_text for t in tasks}) > 1:
        raise ValueError("--arch bert trains on text tasks (bbc:…), mlp, vit and resnet on image tasks")
    if args.arch == "vit":
        config = {**vit.SOURCE_CONFIG, "width": args.width, "depth": args.depth, "heads": args.heads,
                  "mlp_dim": args.mlp_dim or 2 * args.width}
    elif args.arch == "bert" and args.start:
        config = load_backbone(args.start)[0]
    elif args.arch == "resnet":
        config = {**resnet.SOURCE_CONFIG, "width": args.multiplier, "base": args.base, "blocks": args.blocks}
    elif args.arch == "bert":             # the vocabulary and length of the text tasks' tokens
        config = {"vocab_size": tokenizer().get_vocab_size(), "hidden_size": args.width,
                  "num_hidden_layers": args.depth, "num_attention_heads": args.heads,
                  "intermediate_size": args.mlp_dim or 4 * args.width, "max_position_embeddings": MAX_TOKENS}
    else:
        config = {"hidden": args.hidden}
    start_model = None
    if args.start and args.arch == "vit":
        start_model = load(args.start)
        if start_model.arch != "vit":
            raise ValueError(f"--from {args.start} is a {start_model.arch} model; --arch vit fine-tunes a ViT")
    elif args.start and args.arch != "bert":
        raise ValueError("--from (a pre-trained start) applies to --arch bert and vit")
    rows = []
    for task, seed, path in zip(tasks, seeds, paths):
        resume_dir = checkpoint_dir(path)
        if args.resume and (path / "config.json").is_file() and not resume_dir.exists():
            model = load(path)              # trained and saved before the run stopped
        else:
            ck = None
            resuming = args.resume and resume_dir.exists()
            if args.checkpoint_every or resuming:
                fingerprint = {"task": task.name, "seed": seed, "arch": args.arch, "config": config,
                               "epochs": args.epochs, "lr": args.lr, "limit": args.limit,
                               "pretrain_task": args.pretrain_task, "start": args.start}
                ck = Checkpoint(resume_dir, args.checkpoint_every, fingerprint, resume=resuming)
            if args.arch == "bert":
                model = train_bert_source(task, config, seed, limit=args.limit, start=args.start,
                                          **({} if args.epochs is None else {"epochs": args.epochs}),
                                          **({"lr": args.lr} if args.lr else {}), checkpoint=ck)
            elif start_model is not None:
                model = fine_tune(start_model, task, seed, limit=args.limit,
                                  **({} if args.epochs is None else {"epochs": args.epochs}),
                                  **({"lr": args.lr} if args.lr else {}), checkpoint=ck)
            elif args.arch == "resnet":
                model = train_resnet_source(task, config, seed, **({"limit": args.limit} if args.limit else {}),
                                            **({} if args.epochs is None else {"epochs": args.epochs}),
                                            **({"lr": args.lr} if args.lr else {}), checkpoint=ck)
            elif args.arch == "vit":
                stage = {} if args.epochs is None else {"epochs": args.epochs}
                model = train_vit_source(task, config, seed, pretrain_task=args.pretrain_task, limit=args.limit,
                                         **stage, **({"lr": args.lr} if args.lr else {}), checkpoint=ck)
            else:
                model = train_source(task, args.hidden, seed, epochs=args.epochs, lr=args.lr, checkpoint=ck)
            model.meta["command"] = command_line()
            model.save(path, seen.get(path, False))
            if ck is not None:
                ck.remove()
        rows.append({"task": task.name, "seed": seed, "path": str(path),
                     "val": model.meta["val_accuracy"], "test": model.meta["test_accuracy"]})
    if args.json:
        print_json({"models": rows})
    else:
        print_table(rows, "source models", [("task", "task"), ("seed", "seed"), ("val", "val acc %"),
                                            ("test", "test acc %"), ("path", "saved to")])
