"""The gating merge's model (Ye et al., "Merging Vision Transformers from Different Tasks and
Domains", section 3.2): a merged backbone in which some modules are mixed per input.

A small CNN, the gate, reads the input x and gives P(x) = softmax(G(x)) over the N sources.
Every *gated* parameter keeps all N source values and is used as

    W(x) = Σ_k p_k(x) · W_k                                        (eq. 2)

without ever materialising a weight per input: a gated linear layer computes
Σ_k p_k(x) (W_k h + b_k), which equals (Σ_k p_k W_k) h + Σ_k p_k b_k; a gated LayerNorm
scales the normalized input by Σ_k p_k γ_k and shifts it by Σ_k p_k β_k; a gated tensor used
as it is (a ViT's class token, position table) becomes one mixture per input. Every other
parameter is the base merge's (AvgMean or RegMean). The classifier is chosen, not merged:
`route(x)` = argmax_k p_k(x) names the head that answers (eq. 3), and `forward` still returns
every head's logits so that per-task accuracy with a known task can be read too.

A GatedModel is a TaskModel (backbone, heads, tasks, config, save) whose state holds the
gated stacks (N, …) in place of the merged tensors, plus the gate; `foldmerge eval` loads it
back (`io.load_model`). Its parameter count is what it stores: base, stacks, gate, heads.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .model import TaskModel

GATE_DEFAULTS = {"channels": 1, "width": 32}


class GateNet(nn.Module):
    """A three-layer CNN over images: (B, C, H, W) -> (B, n) logits. `trunk` is what a gate
    pre-trained on another task hands on; `head` is the task-number classifier."""

    def __init__(self, n: int, channels: int = GATE_DEFAULTS["channels"], width: int = GATE_DEFAULTS["width"]):
        super().__init__()
        w = int(width)
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * w, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"the gating network reads images (B, C, H, W); got inputs of shape {tuple(x.shape)}")
        return self.head(self.trunk(x))


def _mix(p: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """Σ_k p[b, k] stack[k]: one mixture per input, (B, *stack.shape[1:])."""
    return torch.einsum("bk,k...->b...", p.to(stack.dtype), stack)


class GatedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())            # (N, out, in)
        self.bias = None if bias is None else nn.Parameter(bias.clone())
        self.p: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        p, lead = self.p, (h.shape[0],) + (1,) * (h.dim() - 1)
        bias = [None] * len(self.weight) if self.bias is None else self.bias
        return sum(p[:, k].reshape(lead).to(h.dtype) * F.linear(h, w, b)
                   for k, (w, b) in enumerate(zip(self.weight, bias)))


class GatedLayerNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(weight.clone()), nn.Parameter(bias.clone()), eps
        self.p: torch.Tensor | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = F.layer_norm(h, h.shape[-1:], eps=self.eps)
        per_input = (h.shape[0],) + (1,) * (h.dim() - 2) + (-1,)      # (B, 1…, width) over h's middle axes
        return z * _mix(self.p, self.weight).reshape(per_input) + _mix(self.p, self.bias).reshape(per_input)


class GatedModel(TaskModel):
    def __init__(self, arch: str, backbone: dict[str, Any], tasks, head_bias: bool = True, head: str = "linear",
                 gated: list[str] = (), gate: dict | None = None):
        super().__init__(arch, backbone, tasks, head_bias, head)
        n = len(self.tasks)
        if n < 2:
            raise ValueError("a gated model routes between at least two sources")
        self.gated = list(gated)
        self.gate_config = {**GATE_DEFAULTS, **(gate or {})}
        self.gate = GateNet(n, **self.gate_config)
        self.fixed_route: int | None = None     # an oracle gate: every input goes to this source
        params = dict(self.backbone.named_parameters())
        unknown = [k for k in self.gated if k not in params]
        if unknown:
            raise ValueError(f"cannot gate {unknown[0]!r}: the {arch} backbone has no such parameter")
        self._modules_gated, self._raw = [], []
        by_module: dict[str, dict[str, str]] = {}          # module path -> {attribute: state key}
        for k in self.gated:
            path, _, name = k.rpartition(".")
            by_module.setdefault(path, {})[name] = k
        for path, keys in by_module.items():
            module, names = self.backbone.get_submodule(path), set(keys)
            # N copies of the merged value until `load_stacks` puts each source's own there
            stacked = {name: torch.stack([params[key].detach()] * n) for name, key in keys.items()}
            own = {name for name, _ in module.named_parameters(recurse=False)}
            if isinstance(module, nn.Linear) and names == own:
                self._replace(path, GatedLinear(stacked["weight"], stacked.get("bias")))
            elif isinstance(module, nn.LayerNorm) and names == own == {"weight", "bias"}:
                self._replace(path, GatedLayerNorm(stacked["weight"], stacked["bias"], module.eps))
            elif isinstance(module, (nn.Linear, nn.LayerNorm)):
                raise ValueError(f"cannot gate part of {path!r}: a gated layer gates all its parameters")
            else:        # a tensor the family's forward uses as it is: one stack, one mixture per input
                for name, key in keys.items():
                    del module._parameters[name]
                    setattr(module, name, None)
                    stack = nn.Parameter(stacked[name])
                    self.register_parameter("raw__" + key.replace(".", "__"), stack)
                    self._raw.append((module, name, stack))

    def _replace(self, path: str, new: nn.Module) -> None:
        parent, _, child = path.rpartition(".")
        setattr(self.backbone.get_submodule(parent) if parent else self.backbone, child, new)
        self._modules_gated.append(new)

    # ------------------------------------------------------------------ routing
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """P(x) = softmax(G(x)) (eq. 1): (B, N); one-hot when `fixed_route` is set (an oracle)."""
        if self.fixed_route is not None:
            p = torch.zeros(len(x), len(self.tasks), device=x.device)
            p[:, self.fixed_route] = 1.0
            return p
        return F.softmax(self.gate(x.to(next(self.gate.parameters()).dtype)), dim=1)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The head each input is answered by: argmax_k p_k(x) (eq. 3)."""
        return self.probabilities(x).argmax(1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        p = self.probabilities(x)
        for m in self._modules_gated:
            m.p = p
        try:
            for module, name, stack in self._raw:      # plain attributes for this pass only
                setattr(module, name, _mix(p, stack))
            return self.backbone(x)
        finally:
            for m in self._modules_gated:
                m.p = None
            for module, name, _ in self._raw:
                setattr(module, name, None)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(x)
        return [h(f) for h in self.heads]

    # ------------------------------------------------------------------ files
    def config(self) -> dict[str, Any]:
        return {**super().config(), "kind": "gated", "gated": self.gated, "gate": self.gate_config}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "GatedModel":
        return cls(cfg["arch"], cfg["backbone"], cfg["tasks"], cfg.get("head_bias", True), cfg.get("head", "linear"),
                   gated=cfg.get("gated", []), gate=cfg.get("gate"))

    def load_stacks(self, sources) -> None:
        """Fill every gated stack with the sources' own values (source k at index k)."""
        states = [s.backbone.state_dict() for s in sources]
        mine = dict(self.named_parameters())
        with torch.no_grad():
            for key in self.gated:
                own = mine.get("raw__" + key.replace(".", "__"))
                if own is None:
                    own = mine[f"backbone.{key}"]
                own.copy_(torch.stack([s[key] for s in states]).to(own.dtype))
