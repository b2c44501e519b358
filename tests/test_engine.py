"""Lightning Fabric engine: a 2-process DDP (gloo) merge on CPU equals the one-process merge."""
import os
import subprocess
import sys

import pytest
import torch

import foldmerge
from foldmerge.engine import Engine, Sharded
from foldmerge.model import TaskModel


def sources():
    torch.manual_seed(0)
    return [TaskModel("mlp", {"in_dim": 20, "hidden": [16, 12]}, [t]).double() for t in ("mnist:0-4", "mnist:5-9")]


def sample():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(30, 20, generator=g, dtype=torch.float64) + k for k in range(2)]


# batch 13 of 60 examples: uneven shards (6 + 7) and a last batch of 8; own-task targets
CASES = [("fs-merge", dict(variant="global", param="diag+lowrank(3)", epochs=6, lr=0.05, batch_size=13,
                           targets="own-task")),
         ("distill", dict(epochs=4, lr=0.05, batch_size=None))]


def assert_same(a, b, atol):
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(va, vb, rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("method,opts", CASES)
def test_two_process_ddp_merge_matches_one_process(method, opts):
    one = foldmerge.merge(sources(), sample(), method=method, **opts)
    ddp = foldmerge.merge(sources(), sample(), method=method, engine=Engine("cpu", devices=2), **opts)
    assert ddp.meta["engine"]["devices"] == 2
    assert_same(one, ddp, atol=1e-9)
    assert not torch.equal(one.backbone.layers[0].weight, sources()[0].backbone.layers[0].weight)
    torch.testing.assert_close(ddp.meta["final_loss"], one.meta["final_loss"], rtol=1e-9, atol=0)


@pytest.mark.parametrize("method,opts", CASES)
def test_two_process_fsdp_merge_matches_one_process(method, opts):
    # PyTorch FSDP over two gloo processes: each holds half of every trained parameter; the uneven
    # shards are weighted before FSDP averages the gradients
    one = foldmerge.merge(sources(), sample(), method=method, **opts)
    fsdp = foldmerge.merge(sources(), sample(), method=method, engine=Engine("cpu", devices=2, parallel="fsdp"),
                           **opts)
    assert fsdp.meta["engine"]["parallel"] == "fsdp"
    assert_same(one, fsdp, atol=1e-9)
    torch.testing.assert_close(fsdp.meta["final_loss"], one.meta["final_loss"], rtol=1e-9, atol=0)


def _sharded_on_a_rank(fabric):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 2))
    whole = {k: v.clone() for k, v in net.state_dict().items()}
    sharded = Sharded(fabric, [net], list(net.parameters()))
    rows = [p.to_local().shape[0] for p in sharded.params]
    out = sharded(lambda x: net(x).sum(), torch.ones(3, 6)).item()
    sharded.gather()
    after = net.state_dict()
    return rows, out, all(type(v) is torch.Tensor and torch.equal(v, whole[k]) for k, v in after.items())


def test_fsdp_holds_a_share_of_each_parameter_per_process_and_gathers_them_back():
    rows, out, restored = Engine("cpu", devices=2, parallel="fsdp").run(_sharded_on_a_rank)
    assert rows == [4, 4, 1, 1]                     # half the rows of (8, 6), (8,), (2, 8), (2,)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 2))
    assert out == pytest.approx(net(torch.ones(3, 6)).sum().item(), abs=1e-6)
    assert restored                                 # plain tensors again, the values they had


BIG_RESULT = r"""
import torch
from foldmerge.engine import Engine

def big(fabric):        # each past a pipe's 64 KiB: a tensor (2 MB), bytes (as a merged model comes back)
    return torch.arange(500_000, dtype=torch.float32) + fabric.global_rank, bytes(200_000)

if __name__ == "__main__":
    out, blob = Engine("cpu", devices=2).run(big)
    print("rank 0's", out.numel(), float(out[1]), len(blob))
"""


def test_a_result_bigger_than_a_pipe_comes_back_from_two_processes(tmp_path):
    # Lightning's launcher reads the ranks' pipe only after they exit: a big result sent through it hung
    script = tmp_path / "big.py"
    script.write_text(BIG_RESULT)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "FOLDMERGE_PROGRESS": "0"})
    assert done.returncode == 0 and "rank 0's 500000 1.0 200000" in done.stdout, done.stdout + done.stderr[-2000:]


def test_single_device_engine_and_bf16_autocast_run_on_cpu():
    src = [m.float() for m in sources()]
    data = [d.float() for d in sample()]
    plain = foldmerge.merge(src, data, method="fs-merge", epochs=3, lr=0.05)
    same = foldmerge.merge(src, data, method="fs-merge", epochs=3, lr=0.05, engine=Engine("cpu"))
    assert_same(plain, same, atol=0)
    bf16 = foldmerge.merge(src, data, method="fs-merge", epochs=3, lr=0.05, engine=Engine("cpu", precision="bf16-mixed"))
    assert bf16.backbone.layers[0].weight.dtype == torch.float32        # weights stay float32
    assert 0 < (bf16.backbone.layers[0].weight - plain.backbone.layers[0].weight).abs().max() < 0.05


def test_engine_bad_input():
    with pytest.raises(ValueError, match="precision"):
        Engine("cpu", precision="fp8")
    with pytest.raises(ValueError, match="devices"):
        Engine("cpu", devices=0)
    with pytest.raises(ValueError, match="parallel"):
        Engine("cpu", devices=2, parallel="deepspeed")
    with pytest.raises(ValueError, match="2 or more"):
        Engine("cpu", devices=1, parallel="fsdp")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            Engine("cuda")


def test_a_run_on_a_device_works_on_copies_and_leaves_the_caller_s_models_where_they_were():
    # a rank moves its models to its device: copies, never the caller's (a meta "device" shows a move
    # on a machine without a GPU)
    from foldmerge.api import _merge_on_device

    class OnMeta:
        device = torch.device("meta")
        world_size = 1
    src, data = sources(), sample()
    before = [{k: (v.device, v.data_ptr(), v.clone()) for k, v in m.state_dict().items()} for m in src]
    with pytest.raises(Exception):           # a merge cannot finish on meta tensors; the point is what moved
        _merge_on_device(OnMeta(), src, data, "average", 0, {}, None)
    for m, b in zip(src, before):
        for k, v in m.state_dict().items():
            assert v.device == b[k][0] and v.data_ptr() == b[k][1] and torch.equal(v, b[k][2]), k
    assert all(d.device.type == "cpu" for d in data)
