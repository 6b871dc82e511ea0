r"""What the streaming path and the Triton kernels share: constants and O(B·D) helpers.

The kernels (:mod:`rid_fast.kernels`) import nothing else from rid_fast.
"""

from __future__ import annotations

import torch

__all__ = ["LOG2E", "compute_dtype", "diagonal_scores", "pairwise_diagonal_scores"]

#: log₂ e: exponentials are evaluated as exp2(t · log₂ e), the faster instruction on CPUs and GPUs.
LOG2E = 1.4426950408889634


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of every backend: fp64 stays fp64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def diagonal_scores(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r"""The positives :math:`s_{ii} = \sigma\, q_i \cdot k_i` for i < B, in O(B·D), in the compute dtype. (B,)"""
    dtype = compute_dtype(q.dtype)
    return (q.to(dtype) * k[: q.shape[0]].to(dtype)).sum(-1) * scale.to(dtype)


def pairwise_diagonal_scores(a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    r"""The pairwise-MLP critic's positives :math:`s_{ii} = w_2 \cdot \mathrm{relu}(a_i + c_i) + b_2` for
    i < B, in O(B·H), in the compute dtype, differentiable. (B,)"""
    dtype = compute_dtype(a.dtype)
    return torch.relu(a.to(dtype) + c[: a.shape[0]].to(dtype)) @ w2.to(dtype) + b2.to(dtype)
