"""Where training runs: Lightning Fabric (device, precision, data-parallel processes) around the one loop.

`Engine(accelerator, devices, precision).run(fn, *args)` launches `fn(*args)` under a Fabric:
in this process for one device, or in one process per device for data parallelism (DDP:
gloo on CPU, NCCL on CUDA; started by spawning, so a library call or the CLI can launch it),
and returns rank 0's result. `fn` receives the Fabric as its first argument and hands it to
`train.fit` (through the merge's `foldmerge.context.Context`), which then runs each step so:

  * each rank takes an equal contiguous share of every batch;
  * gradients (and the logged loss) are averaged over ranks, each share weighted by its
    size, in one all-reduce per step: for a loss that is a mean over examples (every loss
    here) that is exactly the gradient one process would compute on the whole batch;
  * the loss runs under Fabric's autocast ("bf16-mixed": bfloat16 matmuls, float32 weights).

Every rank builds the same model from the same seed and sees the same batch order, so the
ranks stay identical without broadcasting weights. Without an engine nothing changes.

`parallel` "fsdp" (with two or more devices) shards instead of copying: the modules a loss trains are
put under one root that PyTorch's FSDP (`torch.distributed.fsdp.fully_shard`, over every rank of the
Fabric's process group) shards, so each rank holds 1/N of their parameters, gradients and optimizer
state; the root's forward runs the loss, so FSDP gathers the parameters before it and reduce-scatters
(averages) the gradients after backward. Each rank's loss is weighted by its share before backward,
so that average is again the whole batch's gradient. After training the parameters are gathered
and put back as ordinary ones. Fabric's own FSDP strategy wraps one module that is then called
(and refuses the CPU), while a merge's loss is a function of several modules: hence the root here.
"""
from __future__ import annotations

import logging
import os
import pickle
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

# lightning_fabric is imported when a Fabric is made: it adds about 2.6 s to every command's start
# (measured here), and only runs under --accelerator use it

ACCELERATORS = ("cpu", "cuda", "auto")
PRECISIONS = ("32-true", "bf16-mixed")
PARALLEL = ("ddp", "fsdp")

@dataclass
class Engine:
    accelerator: str = "cpu"
    devices: int = 1
    precision: str = "32-true"
    parallel: str = "ddp"

    def __post_init__(self):
        if self.accelerator not in ACCELERATORS:
            raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {self.accelerator!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.parallel == "fsdp" and self.devices < 2:
            raise ValueError("parallel 'fsdp' shards over processes: give devices 2 or more")
        if self.accelerator == "cuda" and not torch.cuda.is_available():
            raise ValueError("accelerator 'cuda' asked for, but torch sees no CUDA device here")
        if self.accelerator == "cuda" and self.devices > torch.cuda.device_count():
            raise ValueError(f"{self.devices} CUDA devices asked for, {torch.cuda.device_count()} present")

    def fabric(self):
        from lightning_fabric import Fabric
        if os.environ.get("FOLDMERGE_PROGRESS") == "0":      # --quiet: Lightning's notes too (its import
            logging.getLogger("lightning_fabric").setLevel(logging.WARNING)   # sets its own level)
        strategy = "ddp_spawn" if self.devices > 1 else "auto"
        return Fabric(accelerator=self.accelerator, devices=self.devices, strategy=strategy,
                      precision=self.precision)

    def run(self, fn, *args):
        """fn(fabric, *args) on every rank; rank 0's result.

        The result comes back through a file in a private (0700) temporary folder, pickled as
        multiprocessing would pickle it through a pipe: Lightning's launcher waits for the ranks to
        exit before it reads their pipe, so a result past the pipe's 64 KiB buffer (a merged model
        of any size) left rank 0 blocked writing it, and the run hanging."""
        with tempfile.TemporaryDirectory(prefix="foldmerge-ranks-") as folder:
            where = Path(folder) / "result.pickle"
            self.fabric().launch(_on_rank, fn, where, *args)
            with open(where, "rb") as f:
                return pickle.load(f)


def _on_rank(fabric, fn, where, *args):
    try:
        result = fn(fabric, *args)
        if fabric.global_rank == 0:
            with open(where, "wb") as f:
                pickle.dump(result, f)
    finally:
        if fabric.world_size > 1 and torch.distributed.is_initialized():
            # leave together and close the process group before the spawned process exits
            # (a rank that exits with gloo threads still running can abort)
            fabric.barrier()
            torch.distributed.destroy_process_group()


# --------------------------------------------------------- what `fit` uses per step
def shard(batch, fabric):
    """This rank's contiguous share of a batch and its weight (share size x ranks / batch size)."""
    if fabric is None or fabric.world_size == 1:
        return batch, 1.0
    m, r, w = len(batch[0]), fabric.global_rank, fabric.world_size
    lo, hi = m * r // w, m * (r + 1) // w
    return [t[lo:hi] for t in batch], (hi - lo) * w / m


def autocast(fabric):
    return fabric.autocast() if fabric is not None else nullcontext()


def average_gradients(params, loss: torch.Tensor, weight: float, fabric, sharded: bool = False) -> float:
    """Average weight-scaled gradients and loss over ranks (one all-reduce); the global loss.
    `sharded`: FSDP averaged the (already weighted) gradients; only the loss is averaged here."""
    if fabric is None or fabric.world_size == 1:
        return loss.item()
    if sharded:
        return fabric.all_reduce(loss.detach().reshape(1) * weight, reduce_op="mean").item()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                     + [loss.detach().reshape(1)]) * weight
    flat = fabric.all_reduce(flat, reduce_op="mean")
    o = 0
    for p in params:
        p.grad = flat[o:o + p.numel()].view_as(p).clone()
        o += p.numel()
    return flat[-1].item()


# --------------------------------------------------------- parallel "fsdp"
class _Step(torch.nn.Module):
    """The modules one loss trains, under one root: its forward runs a function of them."""

    def __init__(self, modules):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)

    def forward(self, fn, *args):
        return fn(*args)


class Sharded:
    """`modules` sharded over the Fabric's ranks by FSDP (module docstring). `params` (parameters of
    `modules`) are what the optimizer steps: `self.params` are their shards. `self(fn, *args)` runs
    fn with the parameters gathered. `gather()` ends it: each parameter whole again, an ordinary
    parameter (ties kept), on the modules it came from."""

    def __init__(self, fabric, modules, params):
        # imported here: torch.distributed.fsdp adds 1.5 s to an import (measured here), for --parallel fsdp only
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        self.root = _Step(modules)
        self.sites: dict[int, list] = {}           # a parameter -> every (module, name) holding it
        self.requires_grad: dict[int, bool] = {}
        for mod in self.root.modules():
            for name, p in mod.named_parameters(recurse=False):
                self.sites.setdefault(id(p), []).append((mod, name))
                self.requires_grad[id(p)] = p.requires_grad
        missing = [p for p in params if id(p) not in self.sites]
        if missing:
            raise ValueError("training under parallel 'fsdp': a trained parameter lies outside the modules given")
        wanted = [self.sites[id(p)][0] for p in params]
        fully_shard(self.root, mesh=init_device_mesh(fabric.device.type, (fabric.world_size,)))
        self.params = [getattr(mod, name) for mod, name in wanted]

    def __call__(self, fn, *args):
        return self.root(fn, *args)

    @torch.no_grad()
    def gather(self) -> None:
        self.root.unshard()
        # FSDP hooks the modules' state_dict / load_state_dict to put its shards back first: unhook them,
        # or saving the merged model would read the shards (private to torch; pinned in constraints.txt)
        group = self.root._get_fsdp_state()._fsdp_param_group
        for handles in (group._module_to_pre_save_state_dict_hook_handle,
                        group._module_to_pre_load_state_dict_hook_handle):
            for handle in handles.values():
                handle.remove()
            handles.clear()
        for key, places in self.sites.items():
            whole = torch.nn.Parameter(getattr(*places[0]).detach().clone(), requires_grad=self.requires_grad[key])
            for mod, name in places:
                setattr(mod, name, whole)
