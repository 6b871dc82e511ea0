"""Fused Triton kernels for the score-matrix reductions (installed as ``rid_fast.kernels``).

This module is the ``"triton"`` backend of :mod:`rid_fast.ops.library`: the same forward/backward
functions as :mod:`rid_fast.ops.streaming`, with the same shapes and meaning, computed by the kernels
of this package. CUDA tensors, or CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before Python starts).

The package, by role:

* :mod:`~rid_fast.kernels.tiles` — the constant table, tile loads and score tiles, and the one
  loop driver that sweeps a program's tiles (unmasked interior tiles, then the masked band and edge);
* :mod:`~rid_fast.kernels.forward` — the forward kernel (row log-sum-exp or softplus sums, and the
  weighted keys) and its launcher, :func:`row_stats`;
* :mod:`~rid_fast.kernels.backward` — the dq and dk kernels and their launcher, :func:`weighted_grads`;
* :mod:`~rid_fast.kernels.launch` — every launch: autotuned, or in the default config;
* :mod:`~rid_fast.kernels.tuning` — the autotuner's candidates, the defaults, the per-shape constants;
* :mod:`~rid_fast.kernels.aot` — ahead-of-time compilation for NVIDIA GPUs, on any machine;
* :mod:`~rid_fast.kernels.pairwise` — the same reductions for the pairwise-MLP (concat) critic,
  whose scores are not a matrix product (with ``pairwise_tiles``, ``pairwise_forward``,
  ``pairwise_backward``).

Where these kernels have run: compiled ahead of time for sm_90 and sm_80 (every autotuner candidate:
registers, spills, shared memory, SASS per loop; ``benchmarks/results/aot_report.md``) and run under
the Triton interpreter on CPUs against the reference; never on a GPU — no GPU number has been
measured yet.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
except ImportError as error:  # pragma: no cover - triton is a Linux dependency
    AVAILABLE = False
    UNAVAILABLE_REASON = f"triton is not installed ({error})"
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = ""

if AVAILABLE:
    import torch

    from rid_fast.ops.common import diagonal_scores

    from .backward import weighted_grads
    from .forward import keys_fit as keys_fit  # where the weighted keys fit (rid_fast.ops.dispatch)
    from .forward import row_stats

    # Same functions, argument order and meaning as rid_fast.ops.streaming (see rid_fast.ops.library).

    def cross_entropy_rows_forward(q, k, scale):
        return row_stats(q, k, scale, reduction="lse", mask_diagonal=False) - diagonal_scores(q, k, scale)

    def cross_entropy_rows_backward(grad, q, k, scale, loss):
        lse = loss + diagonal_scores(q, k, scale)
        return weighted_grads(q, k, scale, mode="ce_rows", row_stat=lse, row_grad=grad)

    def cross_entropy_rows_cols_forward(q, k, scale):
        positives = diagonal_scores(q, k, scale)
        row_lse = row_stats(q, k, scale, reduction="lse", mask_diagonal=False)
        col_lse = row_stats(k, q, scale, reduction="lse", mask_diagonal=False)  # rows of Sᵀ
        return row_lse - positives, col_lse - positives

    def cross_entropy_rows_cols_backward(grad_rows, grad_cols, q, k, scale, loss_rows, loss_cols):
        positives = diagonal_scores(q, k, scale)
        return weighted_grads(
            q, k, scale, mode="ce_rows_cols",
            row_stat=loss_rows + positives, row_grad=grad_rows,
            col_stat=loss_cols + positives, col_grad=grad_cols,
        )  # fmt: skip

    # A block of keys holding no positive (diagonal=False: another process's, rid_fast.ops.distributed)
    # counts every key. The kernels as compiled leave out (i, i); its terms are added back here in
    # O(B·D), so the same compiled kernels serve both (a variant without the diagonal's select
    # spilled registers in the fp32 dq kernel on sm_90).

    def _block_diagonal(q, k, scale, clip):
        """(S_ii, c(S_ii)) for i < min(B, N), fp32: the entries a masked statistic leaves out."""
        rows = min(q.shape[0], k.shape[0])
        scores = diagonal_scores(q[:rows], k, scale).float()
        return scores, scores if clip is None else scores.clamp(-clip, clip)

    def _with_block_diagonal(grads, q, k, scale, weights):
        """(dq, dk, dσ) plus the diagonal's weights ``weights`` (min(B, N),): σ w_i k_i, σ w_i q_i,
        Σ w_i q_i·k_i, added in fp32."""
        dq, dk, d_scale = grads
        rows = weights.shape[0]
        sigma = scale.float()
        q_rows, k_rows = q[:rows].float(), k[:rows].float()
        dq, dk = dq.float(), dk.float()
        dq[:rows] += sigma * weights[:, None] * k_rows
        dk[:rows] += sigma * weights[:, None] * q_rows
        d_scale = d_scale + (weights * (q_rows * k_rows).sum(1)).sum()
        return dq.to(q.dtype), dk.to(k.dtype), d_scale

    def lse_negatives_forward(q, k, scale, clip=None, diagonal=True):
        lse = row_stats(q, k, scale, reduction="lse", mask_diagonal=True, clip=clip)
        if diagonal:
            return lse
        _, clipped = _block_diagonal(q, k, scale, clip)
        rows = clipped.shape[0]
        return torch.cat([torch.logaddexp(lse[:rows], clipped), lse[rows:]])

    def lse_negatives_backward(grad, q, k, scale, lse, clip=None, diagonal=True):
        grads = weighted_grads(q, k, scale, mode="lse_negatives", row_stat=lse, row_grad=grad, clip=clip)
        if diagonal:
            return grads
        scores, clipped = _block_diagonal(q, k, scale, clip)
        rows = scores.shape[0]
        weights = grad[:rows].float() * torch.exp(clipped - lse[:rows].float())
        if clip is not None:
            weights = weights * (scores.abs() <= clip)  # where the clamp passes gradient, ends included
        return _with_block_diagonal(grads, q, k, scale, weights)

    def softplus_negatives_forward(q, k, scale, diagonal=True):
        sums = row_stats(q, k, scale, reduction="softplus", mask_diagonal=True)
        if diagonal:
            return sums
        scores, _ = _block_diagonal(q, k, scale, None)
        rows = scores.shape[0]
        return torch.cat([sums[:rows] + torch.nn.functional.softplus(scores), sums[rows:]])

    def softplus_negatives_backward(grad, q, k, scale, diagonal=True):
        grads = weighted_grads(q, k, scale, mode="softplus_negatives", row_grad=grad)
        if diagonal:
            return grads
        scores, _ = _block_diagonal(q, k, scale, None)
        weights = grad[: scores.shape[0]].float() * torch.sigmoid(scores)
        return _with_block_diagonal(grads, q, k, scale, weights)

    # The row ops with the weighted keys u from the forward (rid_fast.ops.library): W k = a ⊙ u, so the
    # backward sweeps only for dk.

    def _keys_times(grad, keys):
        return grad.float()[:, None] * keys

    def cross_entropy_rows_with_weighted_keys_forward(q, k, scale):
        lse, keys = row_stats(q, k, scale, reduction="lse", mask_diagonal=False, weighted_keys=True)
        positives = diagonal_scores(q, k, scale)
        # W_ii = a_i (p_ii − 1) = a_i expm1(S_ii − ℓ_i): precise also where p_ii is within an
        # ulp of 1, which u (weights rounded to the inputs' dtype for the MMA) could not carry.
        return lse - positives, keys + torch.expm1(positives - lse)[:, None] * k[: q.shape[0]].float()

    def cross_entropy_rows_with_weighted_keys_backward(grad, q, k, scale, loss, keys):
        lse = loss + diagonal_scores(q, k, scale)
        return weighted_grads(
            q, k, scale, mode="ce_rows", row_stat=lse, row_grad=grad, weighted_keys=_keys_times(grad, keys)
        )

    def lse_negatives_with_weighted_keys_forward(q, k, scale, clip=None):
        return row_stats(q, k, scale, reduction="lse", mask_diagonal=True, clip=clip, weighted_keys=True)

    def lse_negatives_with_weighted_keys_backward(grad, q, k, scale, lse, keys, clip=None):
        return weighted_grads(
            q, k, scale, mode="lse_negatives", row_stat=lse, row_grad=grad, clip=clip,
            weighted_keys=_keys_times(grad, keys),
        )  # fmt: skip

    def softplus_negatives_with_weighted_keys_forward(q, k, scale):
        return row_stats(q, k, scale, reduction="softplus", mask_diagonal=True, weighted_keys=True)

    def softplus_negatives_with_weighted_keys_backward(grad, q, k, scale, keys):
        return weighted_grads(
            q, k, scale, mode="softplus_negatives", row_grad=grad, weighted_keys=_keys_times(grad, keys)
        )
