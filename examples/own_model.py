"""Merge your own model: a residual MLP defined here, outside foldmerge, merged by FS-Merge and ZipIt!."""
import torch
from torch import nn

import foldmerge
from foldmerge.sources import fit_classifier
from foldmerge.spec import ArchSpec, Norm, Param, Probe, Space
from foldmerge.train import TrainConfig


class ResidualMLP(nn.Module):
    """x -> Linear -> blocks of h + fc2(relu(fc1(LayerNorm(h)))) -> LayerNorm: the features."""

    def __init__(self, in_dim=784, width=64, hidden=128, blocks=2):
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(width), "fc1": nn.Linear(width, hidden),
                                                   "fc2": nn.Linear(hidden, width)}) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        h = self.inp(x.flatten(1))
        for b in self.blocks:
            h = h + b["fc2"](torch.relu(b["fc1"](b["norm"](h))))
        return self.norm(h)


def residual_mlp_spec(config: dict) -> ArchSpec:
    """Spaces: the pixels (shared by every model), the residual stream, each block's hidden layer."""
    blocks = config.get("blocks", 2)
    spaces = [Space("pixels", shared=True), Space("res")] + [Space(f"hidden{i}") for i in range(blocks)]
    params = [Param("inp.weight", ("res", "pixels")), Param("inp.bias", ("res",))]
    norms, probes = [Norm("norm", "res")], []
    for i in range(blocks):
        b, hidden = f"blocks.{i}", f"hidden{i}"
        params += [Param(f"{b}.fc1.weight", (hidden, "res")), Param(f"{b}.fc1.bias", (hidden,)),
                   Param(f"{b}.fc2.weight", ("res", hidden)), Param(f"{b}.fc2.bias", ("res",))]
        norms.append(Norm(f"{b}.norm", "res"))
        probes += [Probe("res", f"{b}.norm", "in"), Probe(hidden, f"{b}.fc2", "in")]   # where ZipIt! looks
    probes += [Probe("res", "norm", "in"), Probe("res", "", "out")]
    return ArchSpec("residual-mlp", spaces, params, norms, probes, output="res",
                    build=lambda c: ResidualMLP(**c), width_spaces=("res", "hidden0"),
                    resize=lambda c, w: {**c, "width": w[0], **({"hidden": w[1]} if len(w) > 1 else {})})


foldmerge.register_arch("residual-mlp", residual_mlp_spec)


def main():
    # Two models from different seeds on different tasks. Models trained elsewhere enter the same way:
    # build the TaskModel, then model.backbone.load_state_dict(...) and model.heads[0].load_state_dict(...).
    sources = []
    for seed, task in enumerate(["mnist:0-4", "mnist:5-9"]):
        torch.manual_seed(seed)
        model = foldmerge.TaskModel("residual-mlp", {"width": 64, "hidden": 128, "blocks": 2}, [task])
        fit_classifier(model, task, TrainConfig(epochs=1, lr=0.01, momentum=0.0, schedule="constant",
                                                batch_size=10), limit=6000)
        sources.append(model)

    data = foldmerge.merge_sample(sources, per_task=64)       # 64 unlabeled training images per task
    own = [foldmerge.evaluate(m)["per_task_mean"] for m in sources]
    print(f"originals per-task {sum(own) / len(own):.1f}")
    for method in ("average", "zipit", "fs-merge"):            # every option at its default
        r = foldmerge.evaluate(foldmerge.merge(sources, data, method=method))
        print(f"{method:9s} per-task {r['per_task_mean']:.1f}  joint {r['joint_mean']:.1f}")


if __name__ == "__main__":
    main()
