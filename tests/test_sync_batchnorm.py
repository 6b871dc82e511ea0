"""SyncBatchNorm: BatchNorm over the global batch of a data-parallel run, on the CPU (gloo)."""

from pathlib import Path

import torch
import torch.distributed as dist
from process_group import spawn
from torch import nn

from rid_fast.train.distributed import Processes, shard
from rid_fast.train.sync_batchnorm import SyncBatchNorm, convert_batchnorm


def _batchnorm_worker(rank, out_dir):
    """Each process normalises its half of a batch; outputs, input gradients, summed parameter
    gradients and running statistics are saved for the parent to compare with one BatchNorm."""
    results = {}
    for name, shape in (("2d", (8, 3, 4, 5)), ("1d", (6, 4))):
        x, weights, reference = _batchnorm_case(shape)
        layer = convert_batchnorm(reference)
        assert isinstance(layer, SyncBatchNorm)
        mine = shard(torch.arange(shape[0]), Processes(rank, 2))
        x_mine = x[mine].clone().requires_grad_(True)
        out = layer(x_mine)
        (out * weights[mine]).sum().backward()
        grads = torch.cat([layer.weight.grad, layer.bias.grad])
        dist.all_reduce(grads)  # each process's loss is its share of the global one: their gradients add
        results[name] = {"out": out.detach(), "x_grad": x_mine.grad, "param_grad": grads,
                         "running": torch.cat([layer.running_mean, layer.running_var])}  # fmt: skip
    torch.save(results, Path(out_dir) / f"bn{rank}.pt")


def _batchnorm_case(shape):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1
    weights = torch.randn(shape, generator=gen, dtype=torch.float64)
    layer = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1]).double()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(shape[1], generator=gen, dtype=torch.float64) + 0.5)
        layer.bias.copy_(torch.randn(shape[1], generator=gen, dtype=torch.float64))
    return x, weights, layer


def test_sync_batchnorm_is_batchnorm_over_the_global_batch(tmp_path):
    spawn(_batchnorm_worker, str(tmp_path))
    parts = [torch.load(tmp_path / f"bn{rank}.pt") for rank in range(2)]
    for name, shape in (("2d", (8, 3, 4, 5)), ("1d", (6, 4))):
        x, weights, reference = _batchnorm_case(shape)
        x.requires_grad_(True)
        out = reference(x)
        (out * weights).sum().backward()
        expected = {"out": out.detach(), "x_grad": x.grad}
        for key in ("out", "x_grad"):
            torch.testing.assert_close(torch.cat([p[name][key] for p in parts]), expected[key], rtol=1e-12, atol=1e-12)
        for part in parts:
            grads = torch.cat([reference.weight.grad, reference.bias.grad])
            torch.testing.assert_close(part[name]["param_grad"], grads, rtol=1e-12, atol=1e-12)
            running = torch.cat([reference.running_mean, reference.running_var])
            torch.testing.assert_close(part[name]["running"], running, rtol=1e-12, atol=1e-12)


def test_sync_batchnorm_in_one_process_and_in_eval_mode_is_batchnorm():
    x, _, reference = _batchnorm_case((8, 3, 4, 5))
    layer = convert_batchnorm(nn.Sequential(_batchnorm_case((8, 3, 4, 5))[2]))[0]
    assert isinstance(layer, SyncBatchNorm) and list(layer.state_dict()) == list(reference.state_dict())
    assert torch.equal(layer(x), reference(x))
    layer.eval(), reference.eval()
    assert torch.equal(layer(x), reference(x))
