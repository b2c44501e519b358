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

from ..evaluation import forward_mflops
from ..gated import GATE_DEFAULTS, GateNet, GatedModel
from ..similarity import DEFAULT_STRATEGY, lowest
from ..train import TrainConfig, fit
from .common import cat_with_owner, check_same_backbone, copy_heads

# Defaults: a gate of width 32 trained 30 epochs with AdamW at 3e-3 (batch 64): on `bench gating`'s
# 12 tasks (Table 8) width 32 tells the merge samples apart 95.5 % of the time against width 16's
# 88.8 % and width 8's 81.0 %, and the merge gains 7 points (69.7 against 62.6 per task) for 0.04M
# parameters; m = 1 and RegMean for the ungated rest (the paper's better one, ours too at every m).
DEFAULTS = {"m": 1, "rest": "regmean", "gate_width": GATE_DEFAULTS["width"], "gate_epochs": 30, "gate_lr": 3e-3,
            "gate_batch_size": 64}
RESTS = ("average", "regmean")


def train_gate(data: list[torch.Tensor], width: int = DEFAULTS["gate_width"], epochs: int = DEFAULTS["gate_epochs"],
               lr: float = DEFAULTS["gate_lr"], batch_size: int = DEFAULTS["gate_batch_size"], seed: int = 0,
               start: dict | None = None) -> tuple[GateNet, float]:
    """A gate trained to tell the N samples apart (labels: which sample); `start`: a pre-trained
    trunk's state (`GateNet.trunk`). Returns (gate, its accuracy on the training samples, %)."""
    x, owner = cat_with_owner(data)
    torch.manual_seed(seed)
    gate = GateNet(len(data), channels=x.shape[1], width=width)
    if start is not None:
        gate.trunk.load_state_dict(start)
    cfg = TrainConfig.adamw(epochs, lr, batch_size, seed)
    gate.train()
    fit(list(gate.parameters()), lambda xb, yb: F.cross_entropy(gate(xb), yb), (x, owner), cfg, desc="train the gate")
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


def merge(models, data, m: int | None = None, rest: str | None = None, gate_norms: bool = True,
          strategy: str = DEFAULT_STRATEGY, alpha: float | None = None, gate_width: int | None = None,
          gate_epochs: int | None = None, gate_lr: float | None = None, gate_batch_size: int | None = None,
          gate_start: dict | None = None, seed: int = 0):
    o = {k: v if v is not None else DEFAULTS[k] for k, v in
         {"m": m, "rest": rest, "gate_width": gate_width, "gate_epochs": gate_epochs, "gate_lr": gate_lr,
          "gate_batch_size": gate_batch_size}.items()}
    check_same_backbone(models, "the gating merge")
    if not models[0].spec.units:
        raise ValueError(f"the gating merge needs the spec's units (modules); the {models[0].arch} spec has none")
    if any(len(s.tasks) != 1 for s in models):
        raise ValueError("the gating merge routes between sources of one task each")
    if data is None or len(data) != len(models) or any(len(d) == 0 for d in data):
        raise ValueError("the gating merge needs a non-empty data tensor per model (to train the gate)")
    if any(d.dim() != 4 for d in data):
        raise ValueError(f"the gating merge reads images (B, C, H, W); the merge data have shape {tuple(data[0].shape[1:])}")
    if o["rest"] not in RESTS:
        raise ValueError(f"gating --rest (how the ungated modules merge) must be one of {', '.join(RESTS)}, "
                         f"got {o['rest']!r}")
    if int(o["m"]) < 0:
        raise ValueError(f"m must be >= 0, got {o['m']}")
    keys, chosen = gated_keys(models, int(o["m"]), bool(gate_norms), strategy)   # refuses an unknown strategy

    from . import average, regmean
    merged = (regmean.merge(models, data, alpha=alpha) if o["rest"] == "regmean" else average.merge(models))
    gate, gate_acc = train_gate(data, o["gate_width"], o["gate_epochs"], o["gate_lr"], o["gate_batch_size"],
                                seed, start=gate_start)

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
