r"""Fused Triton kernels for the pairwise-MLP (concat) critic's score reductions.

The critic scores every pair through one hidden layer,
:math:`s_{ij} = w_2\cdot\mathrm{relu}(a_i + c_j) + b_2` with :math:`a = A x + b_1` (B, H) and
:math:`c = C y` (N, H). These functions are the ``"triton"`` backend of its ops: the same names,
argument order and meaning as :mod:`rid_fast.ops.streaming`'s functions for the separable critics,
with ``(q, k, scale)`` replaced by ``(a, c, w2, b2)`` — diagonal :math:`(i, i)`, i < B, the
positives; the "negatives" ops leave it out — computed without holding the B×N scores or the
B×N×H hidden layer (the oracle: :mod:`rid_fast.ops.pairwise_reference`).

Inputs: ``a`` (B, H), ``c`` (N, H), ``w2`` (H,), ``b2`` (), one dtype (fp32, fp16, bf16), contiguous,
on one CUDA device (or the CPU under the Triton interpreter). Statistics are fp32; gradients come
back in the inputs' dtype, as ``(da, dc, dw2, db2)``.

The package, by role:

* :mod:`~rid_fast.kernels.pairwise_tiles` — prepared operands (two instructions per hidden unit
  and score), the score tile, the positives, input checks, launches;
* :mod:`~rid_fast.kernels.pairwise_forward` — the forward kernel: row log-sum-exp (optionally
  clamped, optionally without the diagonal) or softplus sums; columns by swapping ``a`` and ``c``;
* :mod:`~rid_fast.kernels.pairwise_backward` — da, dc, dw₂, db₂ from recomputed tiles.

Where these kernels have run: compiled ahead of time for sm_90 (``kernels/aot.py``) and under the
Triton interpreter on CPUs against the reference; never on a GPU — no GPU number has been measured.
"""

from __future__ import annotations

import torch

from .pairwise_backward import pairwise_grads
from .pairwise_forward import pairwise_row_stats
from .pairwise_tiles import check_inputs, positives

__all__ = [
    "cross_entropy_rows_forward",
    "cross_entropy_rows_backward",
    "cross_entropy_rows_cols_forward",
    "cross_entropy_rows_cols_backward",
    "lse_negatives_forward",
    "lse_negatives_backward",
    "softplus_negatives_forward",
    "softplus_negatives_backward",
]

Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def cross_entropy_rows_forward(a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    r""":math:`\log\sum_j e^{s_{ij}} - s_{ii}` (N ≥ B). (B,) fp32"""
    check_inputs(a, c, w2, b2)
    return pairwise_row_stats(a, c, w2, b2, reduction="lse", mask_diagonal=False) - positives(a, c, w2, b2)


def cross_entropy_rows_backward(
    grad: torch.Tensor, a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, loss: torch.Tensor
) -> Grads:
    r"""Gradients of :math:`\sum_i g_i c_i`: :math:`W_{ij} = g_i (P_{ij} - \delta_{ij})`, P the row softmax."""
    check_inputs(a, c, w2, b2)
    lse = loss.float() + positives(a, c, w2, b2)
    return pairwise_grads(a, c, w2, b2, mode="ce_rows", row_stat=lse, row_grad=grad)


def cross_entropy_rows_cols_forward(
    a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Row and column cross-entropies against the diagonal (N = B): the columns are the rows of the
    critic with ``a`` and ``c`` swapped. (B,), (N,) fp32"""
    check_inputs(a, c, w2, b2)
    if c.shape[0] != a.shape[0]:
        raise ValueError(
            f"c must have as many rows as a (N = B) for the symmetric op; got {c.shape[0]} != {a.shape[0]}"
        )
    diagonal = positives(a, c, w2, b2)
    row_lse = pairwise_row_stats(a, c, w2, b2, reduction="lse", mask_diagonal=False)
    col_lse = pairwise_row_stats(c, a, w2, b2, reduction="lse", mask_diagonal=False)
    return row_lse - diagonal, col_lse - diagonal


def cross_entropy_rows_cols_backward(
    grad_rows: torch.Tensor,
    grad_cols: torch.Tensor,
    a: torch.Tensor,
    c: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    loss_rows: torch.Tensor,
    loss_cols: torch.Tensor,
) -> Grads:
    r""":math:`W_{ij} = g_i P_{ij} + h_j Q_{ij} - (g_i + h_i)\delta_{ij}`, P and Q the row and column softmax."""
    check_inputs(a, c, w2, b2)
    diagonal = positives(a, c, w2, b2)
    return pairwise_grads(
        a, c, w2, b2, mode="ce_rows_cols",
        row_stat=loss_rows.float() + diagonal, row_grad=grad_rows,
        col_stat=loss_cols.float() + diagonal, col_grad=grad_cols,
    )  # fmt: skip


def lse_negatives_forward(
    a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, clip: float | None = None
) -> torch.Tensor:
    r""":math:`\log\sum_{j\ne i} e^{\mathrm{clamp}(s_{ij}, \pm\text{clip})}` (no clamp when ``clip`` is None;
    N ≥ 2). (B,) fp32"""
    check_inputs(a, c, w2, b2, min_keys=2)
    return pairwise_row_stats(a, c, w2, b2, reduction="lse", mask_diagonal=True, clip=clip)


def lse_negatives_backward(
    grad: torch.Tensor,
    a: torch.Tensor,
    c: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    lse: torch.Tensor,
    clip: float | None = None,
) -> Grads:
    r""":math:`W_{ij} = g_i\, e^{c(s_{ij}) - \ell_i}\, c'(s_{ij})` for j ≠ i, the clamp passing gradient where
    :math:`|s_{ij}| \le` clip (ends included, as torch.clamp)."""
    check_inputs(a, c, w2, b2, min_keys=2)
    return pairwise_grads(a, c, w2, b2, mode="lse_negatives", row_stat=lse, row_grad=grad, clip=clip)


def softplus_negatives_forward(a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_{j\ne i}\mathrm{softplus}(s_{ij})` (N ≥ 2). (B,) fp32"""
    check_inputs(a, c, w2, b2, min_keys=2)
    return pairwise_row_stats(a, c, w2, b2, reduction="softplus", mask_diagonal=True)


def softplus_negatives_backward(
    grad: torch.Tensor, a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> Grads:
    r""":math:`W_{ij} = g_i\,\mathrm{sigmoid}(s_{ij})`, j ≠ i."""
    check_inputs(a, c, w2, b2, min_keys=2)
    return pairwise_grads(a, c, w2, b2, mode="softplus_negatives", row_grad=grad)
