"""Training the source models to be merged (FS-Merge paper, appendix E.1).

MLPs: SGD, lr 0.01, batch size 10, cross-entropy, 1 epoch (2 when depth > 4 or width > 256);
Fashion-MNIST: 10 epochs at lr 0.001. Each model starts from its own seed. Every family's recipe
and where it came from: `foldmerge.arch.defaults.SOURCES`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from .arch.defaults import SOURCES
from .data import Task
from .evaluation import evaluate
from .hf import load_backbone
from .model import TaskModel
from .train import TrainConfig, fit


def paper_schedule(task: Task, hidden: list[int]) -> tuple[int, float]:
    """(epochs, lr) of appendix E.1 for an MLP on this task."""
    if task.dataset == "fmnist":
        return 10, 0.001
    return (2 if len(hidden) > 4 or max(hidden) > 256 else 1), 0.01


def source_dirname(task: Task, seed: int) -> str:
    """Folder name of a source model: mnist:0-4, seed 0 -> mnist_0-4-s0; mnist/rot90:0-4 -> mnist-rot90_0-4-s0."""
    return f"{task.slug}-s{seed}"


def fit_classifier(model: TaskModel, task: Task | str, cfg: TrainConfig, limit: int | None = None,
                   desc: str | None = None, checkpoint=None) -> list[float]:
    """Train `model` (its first head) on `task`'s training split with cross-entropy; `limit` caps
    the images. The one supervised loop every source model (MLP, ViT, a user's own) goes through;
    `checkpoint`: a `foldmerge.checkpoint.Checkpoint` to save to and resume from."""
    task = Task.parse(task)
    x, y = task.split("train")
    if limit:
        x, y = x[:limit], y[:limit]

    def loss_fn(xb, yb):
        return F.cross_entropy(model(xb)[0], yb)

    model.train()
    history = fit(list(model.parameters()), loss_fn, (x, y), cfg, desc=desc or f"train on {task}",
                  checkpoint=checkpoint)
    model.eval()
    return history


def train_source(task: Task | str, hidden: list[int], seed: int, epochs: int | None = None,
                 lr: float | None = None, batch_size: int = SOURCES["mlp"].values["batch_size"],
                 checkpoint=None) -> TaskModel:
    task = Task.parse(task)
    auto_epochs, auto_lr = paper_schedule(task, hidden)
    epochs = auto_epochs if epochs is None else epochs
    lr = auto_lr if lr is None else lr
    torch.manual_seed(seed)
    model = TaskModel("mlp", {"in_dim": 784, "hidden": list(hidden)}, [task])
    cfg = TrainConfig(epochs=epochs, lr=lr, momentum=SOURCES["mlp"].values["momentum"], schedule="constant",
                      batch_size=batch_size, seed=seed)
    fit_classifier(model, task, cfg, desc=f"train {task} (seed {seed})", checkpoint=checkpoint)
    model.meta = {"kind": "source", "task": task.name, "seed": seed, "train": cfg.as_dict(),
                  "test_accuracy": evaluate(model, [task])["per_task_mean"],
                  "val_accuracy": evaluate(model, [task], split="val")["per_task_mean"]}
    return model


VIT, BERT, RESNET, FINE_TUNE = (SOURCES[k].values for k in ("vit", "bert", "resnet", "fine-tune"))


def train_vit_source(task: Task | str, config: dict, seed: int, pretrain_task: Task | str | None = None,
                     pretrain_epochs: int = VIT["pretrain_epochs"], epochs: int = VIT["epochs"],
                     lr: float = VIT["lr"], batch_size: int = VIT["batch_size"],
                     weight_decay: float = VIT["weight_decay"], limit: int | None = None,
                     checkpoint=None) -> TaskModel:
    """A ViT source in the paper's two stages (appendix D): "pre-training" from `seed` on
    `pretrain_task`, then fine-tuning on `task`; heads are frozen class embeddings
    (`class_embeddings`), so every model's features live in one shared output space.
    AdamW, cosine schedule; `limit` caps the training images per stage (quick runs, tests)."""
    return train_staged_source("vit", task, config, seed, pretrain_task, pretrain_epochs, epochs, lr, batch_size,
                               weight_decay, limit, head="class-embedding", checkpoint=checkpoint)


def train_bert_source(task: Task | str, config: dict, seed: int, pretrain_task: Task | str | None = None,
                      pretrain_epochs: int = BERT["pretrain_epochs"], epochs: int = BERT["epochs"],
                      lr: float = BERT["lr"], batch_size: int = BERT["batch_size"],
                      weight_decay: float = BERT["weight_decay"], limit: int | None = None, start: str | None = None,
                      checkpoint=None) -> TaskModel:
    """A BERT source (Hugging Face `BertModel` from a config) from `seed`, optionally "pre-trained"
    on a first task, fine-tuned on `task` with a linear head, as `BertForSequenceClassification`.
    `start`: a Hugging Face BERT directory (e.g. all-MiniLM-L6-v2) whose weights and sizes the
    backbone starts from instead (`config` is then ignored; the head is new, from `seed`)."""
    init_state = None
    if start is not None:
        config, init_state = load_backbone(start)
    return train_staged_source("bert", task, config, seed, pretrain_task, pretrain_epochs, epochs, lr, batch_size,
                               weight_decay, limit, head="linear", init_state=init_state, start=start,
                               checkpoint=checkpoint)


def train_resnet_source(task: Task | str, config: dict, seed: int, epochs: int = RESNET["epochs"],
                        lr: float = RESNET["lr"], batch_size: int = RESNET["batch_size"],
                        weight_decay: float = RESNET["weight_decay"], limit: int | None = RESNET["limit"],
                        checkpoint=None) -> TaskModel:
    """A ResNet source with BatchNorm (ZipIt!'s setting) from `seed`, trained on `task` with a frozen
    class-embedding head (ZipIt! heads are fixed CLIP text embeddings). AdamW, cosine schedule;
    `limit` caps the training images. Saved with its BatchNorm; merging reads the fused form."""
    return train_staged_source("resnet", task, config, seed, None, 0, epochs, lr, batch_size, weight_decay, limit,
                               head="class-embedding", checkpoint=checkpoint)


def train_staged_source(arch: str, task: Task | str, config: dict, seed: int, pretrain_task, pretrain_epochs: int,
                        epochs: int, lr: float, batch_size: int, weight_decay: float, limit: int | None,
                        head: str, init_state: dict | None = None, start: str | None = None,
                        checkpoint=None) -> TaskModel:
    """A transformer source in one or two stages from `seed`: the backbone trained on
    `pretrain_task` (if any), then on `task` with a new head. AdamW, cosine schedule."""
    task = Task.parse(task)
    stages = ([(Task.parse(pretrain_task), pretrain_epochs)] if pretrain_task is not None else []) + [(task, epochs)]
    torch.manual_seed(seed)
    backbone_state = init_state
    accuracies = {}
    for k, (t, n_epochs) in enumerate(stages):
        model = TaskModel(arch, dict(config), [t], head=head)
        if backbone_state is not None:
            model.backbone.load_state_dict(backbone_state)
        cfg = TrainConfig.adamw(n_epochs, lr, batch_size, seed * 100 + k, weight_decay)
        fit_classifier(model, t, cfg, limit,
                       desc=f"{'pre-train' if k < len(stages) - 1 else 'fine-tune'} {arch} on {t} (seed {seed})",
                       checkpoint=checkpoint)
        backbone_state = model.backbone.state_dict()
        accuracies[t.name] = evaluate(model, [t], split="val")["per_task_mean"]
    model.meta = {"kind": "source", "task": task.name, "seed": seed,
                  **({"start": str(Path(start).resolve())} if start else {}),
                  "pretrain_task": stages[0][0].name if len(stages) > 1 else None,
                  "val_accuracy": accuracies[task.name], "pretrain_val_accuracy": accuracies.get(stages[0][0].name)
                  if len(stages) > 1 else None,
                  "test_accuracy": evaluate(model, [task])["per_task_mean"]}
    return model


def pretrain_union(arch: str, config: dict, tasks, seed: int, epochs: int = 3, lr: float = 1e-3,
                   batch_size: int = 64, weight_decay: float = 0.01) -> TaskModel:
    """The one pre-trained start of the same-start setting (the gating-merge paper's ViT-B from
    ImageNet-21K, scaled down): a backbone trained from `seed` on the union of `tasks`, their
    classes kept apart (one linear head over all of them, dropped afterwards). Returned as a
    TaskModel with the first task's frozen class-embedding head, the base of task vectors."""
    tasks = [Task.parse(t) for t in tasks]
    torch.manual_seed(seed)
    model = TaskModel(arch, dict(config), [tasks[0]], head="class-embedding")
    head = torch.nn.Linear(model.feature_dim, sum(t.num_classes for t in tasks))
    xs, ys, offset = [], [], 0
    for t in tasks:
        x, y = t.split("train")
        xs.append(x)
        ys.append(y + offset)
        offset += t.num_classes
    cfg = TrainConfig.adamw(epochs, lr, batch_size, seed, weight_decay)
    model.train()
    fit(list(model.backbone.parameters()) + list(head.parameters()),
        lambda xb, yb: F.cross_entropy(head(model.features(xb)), yb), (torch.cat(xs), torch.cat(ys)), cfg,
        desc=f"pre-train {arch} on {' + '.join(t.name for t in tasks)} (seed {seed})")
    model.eval()
    model.meta = {"kind": "pretrained", "tasks": [t.name for t in tasks], "seed": seed, "train": cfg.as_dict()}
    return model


def fine_tune(base: TaskModel, task: Task | str, seed: int, epochs: int = FINE_TUNE["epochs"],
              lr: float = FINE_TUNE["lr"], batch_size: int = FINE_TUNE["batch_size"],
              weight_decay: float = FINE_TUNE["weight_decay"], limit: int | None = None,
              checkpoint=None) -> TaskModel:
    """A source fine-tuned from `base`'s backbone on `task` (frozen class-embedding head, AdamW,
    cosine): the models the gating merge, task arithmetic and TIES combine."""
    task = Task.parse(task)
    torch.manual_seed(seed)
    model = TaskModel(base.arch, dict(base.backbone_config), [task], head="class-embedding")
    model.backbone.load_state_dict(base.backbone.state_dict())
    cfg = TrainConfig.adamw(epochs, lr, batch_size, seed, weight_decay)
    fit_classifier(model, task, cfg, limit, desc=f"fine-tune on {task} (seed {seed})", checkpoint=checkpoint)
    start = str(Path(base.meta["path"]).resolve()) if "path" in base.meta else base.meta.get("tasks")
    model.meta = {"kind": "source", "task": task.name, "seed": seed, "start": start, "train": cfg.as_dict(),
                  "val_accuracy": evaluate(model, [task], split="val")["per_task_mean"],
                  "test_accuracy": evaluate(model, [task])["per_task_mean"]}
    return model
