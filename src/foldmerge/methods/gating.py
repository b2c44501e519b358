"""The gating merge (Ye et al., "Merging Vision Transformers from Different Tasks and Domains",
sections 3.2-3.3, Algorithm 1), for sources fine-tuned from one pre-trained model.

  1. a gating network (`foldmerge.gated.GateNet`) learns, from the unlabeled merge samples,
     which source's task an input comes from (label: the sample's owner);
  2. the merge of every module by `rest` (AvgMean or RegMean: the paper's "Ours + AvgMean / RegMean");
  3. the Embedding and Norm modules (our ViT also has `proj`, the map to the features the
     frozen heads read: an "output" unit, gated with them), and the m attention and m MLP
     modules of lowest weight similarity (`foldmerge.similarity`, eq. 4), are gated: per input
     a mixture of the sources' weights with the gate's probabilities (eq. 2);
  4. the head is the gate's argmax (eq. 3).

`gate_norms=False` leaves Embedding, Norm and output to the `rest` merge (the paper's Table 2
ablations). The result is a `GatedModel`. Costs beyond the `rest` merge: N copies of each gated
module and the gate (`meta["parameters"]`, `meta["mflops_per_input"]`).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from ..context import Context
from ..evaluation import forward_mflops
from ..gated import GATE_DEFAULTS, GatedModel, GateNet
from ..options import Choice, Integer, Number, Option, TensorFile, YesNo, method
from ..similarity import DEFAULT_STRATEGY, STRATEGIES, lowest
from ..train import TrainConfig
from . import average, regmean
from .common import by_family, cat_with_owner, check_same_backbone, copy_heads

DEFAULTS = {"m": 1, "rest": "regmean", "gate_width": GATE_DEFAULTS["width"], "gate_epochs": 30, "gate_lr": 3e-3,
            "gate_batch_size": 64}
RESTS = ("average", "regmean")
GATE = "bench gating, Table 8 (docs/benchmarks/gating.md): of the widths measured, the one that told the samples " \
       "apart best"
GATE_TRAIN = "the recipe bench gating trained its gates with (docs/benchmarks/gating.md)"

OPTIONS = (
    Option("m", Integer(0), "attention and MLP modules of lowest weight similarity to gate", DEFAULTS["m"],
           "the gating paper's choice"),
    Option("rest", Choice(RESTS), "how the ungated modules merge", DEFAULTS["rest"],
           "the gating paper's better one; bench gating's too, at every m"),
    Option("gate_norms", YesNo(), "gate the embedding, norm and output modules too", True, "the gating paper's"),
    Option("strategy", Choice(STRATEGIES), "how weight similarity is computed", DEFAULT_STRATEGY,
           "the gating paper's Table 9"),
    Option("alpha", Number(0, 1), "with rest regmean: RegMean's alpha", by_family("alpha", "regmean", ("regmean",)),
           when=("rest", ("regmean",))),
    Option("gate_width", Integer(1), "channels of the gate CNN's first layer", DEFAULTS["gate_width"], GATE),
    Option("gate_epochs", Integer(1), "epochs of gate training", DEFAULTS["gate_epochs"], GATE_TRAIN),
    Option("gate_lr", Number(positive=True), "AdamW learning rate of the gate", DEFAULTS["gate_lr"], GATE_TRAIN),
    Option("gate_batch_size", Integer(1), "gate training batch size", DEFAULTS["gate_batch_size"], GATE_TRAIN),
    Option("gate_start", TensorFile(), "a pre-trained gate trunk to start from (a .safetensors file of "
           "GateNet.trunk's state; Python: the state dict)"),
)


def train_gate(data: list[torch.Tensor], width: int = DEFAULTS["gate_width"], epochs: int = DEFAULTS["gate_epochs"],
               lr: float = DEFAULTS["gate_lr"], batch_size: int = DEFAULTS["gate_batch_size"], seed: int = 0,
               start: dict | None = None, context=None) -> tuple[GateNet, float]:
    """A gate trained to tell the N samples apart (labels: which sample); `start`: a pre-trained
    trunk's state (`GateNet.trunk`). Returns (gate, its accuracy on the training samples, %)."""
    x, owner = cat_with_owner(data)
    torch.manual_seed(seed)
    gate = GateNet(len(data), channels=x.shape[1], width=width)
    if start is not None:
        gate.trunk.load_state_dict(start)
    cfg = TrainConfig.adamw(epochs, lr, batch_size, seed)
    gate.train()
    (context or Context()).train(list(gate.parameters()), lambda xb, yb: F.cross_entropy(gate(xb), yb), (x, owner),
                                 cfg, desc="train the gate", modules=[gate])
    gate.eval()
    with torch.no_grad():
        acc = 100.0 * (gate(x).argmax(1) == owner).float().mean().item()
    return gate, acc


def gated_keys(models, m: int, gate_norms: bool, strategy: str) -> tuple[list[str], dict]:
    """The parameter keys to gate, and for the record the chosen modules with their similarities."""
    spec = models[0].spec
    keys, chosen = [], {}
    if gate_norms:
        for u in spec.units:
            if u.kind in ("embedding", "norm", "output"):
                keys += u.keys
    for kind in ("attention", "mlp"):
        picked = lowest(models, kind, m, strategy)
        chosen[kind] = {name: round(sim, 6) for name, _, sim in picked}
        for _, ks, _ in picked:
            keys += ks
    return keys, chosen


@method("gating", OPTIONS, "the gating merge: a gate picks each input's task and mixes the least similar "
        "modules (one start)")
def merge(models, data, seed, context, m, rest, gate_norms, strategy, alpha, gate_width, gate_epochs, gate_lr,
          gate_batch_size, gate_start):
    o = {"m": m, "rest": rest, "gate_width": gate_width, "gate_epochs": gate_epochs, "gate_lr": gate_lr,
         "gate_batch_size": gate_batch_size}
    check_same_backbone(models, "the gating merge")
    if not models[0].spec.units:
        raise ValueError(f"the gating merge needs the spec's units (modules); the {models[0].arch} spec has none")
    if any(len(s.tasks) != 1 for s in models):
        raise ValueError("the gating merge routes between sources of one task each")
    if data is None or len(data) != len(models) or any(len(d) == 0 for d in data):
        raise ValueError("the gating merge needs a non-empty data tensor per model (to train the gate)")
    if any(d.dim() != 4 for d in data):
        raise ValueError(f"the gating merge reads images (B, C, H, W); the merge data have shape {tuple(data[0].shape[1:])}")
    keys, chosen = gated_keys(models, int(o["m"]), bool(gate_norms), strategy)   # refuses an unknown strategy

    merged = (regmean.merge(models, data, alpha=alpha) if o["rest"] == "regmean" else average.merge(models))
    gate, gate_acc = train_gate(data, o["gate_width"], o["gate_epochs"], o["gate_lr"], o["gate_batch_size"],
                                seed, start=gate_start, context=context)

    cfg = merged.config()
    out = GatedModel(cfg["arch"], cfg["backbone"], cfg["tasks"], cfg["head_bias"], cfg["head"], gated=keys,
                     gate={"channels": gate.trunk[0].in_channels, "width": o["gate_width"]})
    p = next(merged.backbone.parameters())
    out = out.to(dtype=p.dtype, device=p.device)
    with torch.no_grad():
        base_state = merged.backbone.state_dict()
        for name, t in out.backbone.named_parameters():
            if name in base_state and name not in keys:
                t.copy_(base_state[name])
        out.load_stacks(models)
        out.gate.load_state_dict(gate.state_dict())
    copy_heads(out, [merged])
    out.eval()
    out.meta = {"method": "gating", "rest": o["rest"], "rest_meta": merged.meta, "m": int(o["m"]),
                "gate_norms": bool(gate_norms), "strategy": strategy, "gated_modules": chosen,
                "gate": {"width": o["gate_width"], "epochs": o["gate_epochs"], "lr": o["gate_lr"],
                         "batch_size": o["gate_batch_size"], "pretrained": gate_start is not None,
                         "train_accuracy": round(gate_acc, 2)},
                "parameters": out.num_parameters(), "mflops_per_input": forward_mflops(out, data[0][:1])}
    return out
