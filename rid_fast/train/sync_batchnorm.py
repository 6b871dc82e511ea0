r"""BatchNorm over the global batch of a data-parallel run, on the CPU (gloo) as on CUDA (NCCL).

Each process holds a shard of the global batch; a BatchNorm normalising with its shard's
statistics would make K processes a different model from one. :class:`SyncBatchNorm` uses the
statistics of the whole global batch, two sums over the processes per layer in training mode:

.. math::
    \mu = \frac{\sum_r \sum_{i \in r} x_i}{N}, \qquad
    \sigma^2 = \frac{\sum_r \sum_{i \in r} (x_i - \mu)^2}{N}

(two passes, as one process computes them, rather than :math:`E[x^2] - \mu^2`, which cancels
catastrophically in float32). The sums are differentiable: their backward sums the gradients over
the processes, so with ``DistributedDataParallel`` averaging the parameter gradients the result is
the gradient of the global batch's loss. In eval mode, and outside a process group of several
processes, it is ``nn.BatchNorm*d``. ``torch.nn.SyncBatchNorm`` does the same on GPUs only.

:func:`convert_batchnorm` replaces every BatchNorm of a module by one (same parameters, buffers and
``state_dict`` keys, so checkpoints move freely between one process and several).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["SyncBatchNorm", "convert_batchnorm"]


class _SumOverProcesses(torch.autograd.Function):
    """``tensor`` summed over the processes of the group; the backward sums the gradients too
    (each process's inputs affect every process's output through the sum)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _SumOverProcesses.apply(grad)


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1-D, 2-D or 3-D: input (B, C, …)) with the statistics of the global batch in
    training mode; see the module notes."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (B, C, …); got {input.dim()}-D")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        synced = self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not synced:
            return super().forward(input)
        factor = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        # Statistics in fp32 at least (16-bit inputs under autocast), as F.batch_norm keeps them.
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        # Sums and the count travel in float64: a float32 count is inexact beyond 2**24 entries.
        local = torch.cat([x.sum(dims).double(), x.new_tensor([x.numel() // x.shape[1]], dtype=torch.float64)])
        sums = _SumOverProcesses.apply(local)
        count = sums[-1]
        mean = (sums[:-1] / count).to(x.dtype)
        centred = x - mean.view(shape)
        variance = (_SumOverProcesses.apply(centred.pow(2).sum(dims).double()) / count).to(x.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = variance * (count / (count - 1).clamp_min(1)).to(x.dtype)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        out = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm1d/2d/3d`` replaced by a :class:`SyncBatchNorm` holding
    the same parameters and buffers (in place for the containers; a BatchNorm given itself is
    returned converted). Forward hooks on a BatchNorm itself are not carried over."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        converted = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        floating = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        if floating:  # the original's device and dtype (Module.to leaves the integer batch count alone)
            converted.to(floating[0].device, floating[0].dtype)
        converted.load_state_dict(module.state_dict())
        if module.affine:  # the same Parameter objects: an optimizer built before still holds them
            converted.weight, converted.bias = module.weight, module.bias
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child))
    return module
