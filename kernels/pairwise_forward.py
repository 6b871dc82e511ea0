r"""The pairwise-MLP critic's forward kernel: per-row statistics of its scores, and the launcher.

:func:`_pairwise_row_stats_fwd`, one program per block of ``BLOCK_M`` rows, sweeps the column tiles;
each tile of scores :math:`s_{ij} = w_2\cdot\mathrm{relu}(a_i + c_j) + b_2` is summed over the hidden
units (:func:`kernels.pairwise_tiles._score_tile`, 2·H instructions per score) and folded into one
fp32 number per row:

* ``REDUCTION = LSE``: :math:`\log\sum_j e^{\mathrm{clamp}(s_{ij})}`, online (running maximum and
  rescaled sum); ``MASK_DIAGONAL`` drops :math:`j = i`, ``CLIP`` clamps scores to ±clip;
* ``REDUCTION = SOFTPLUS``: :math:`\sum_j \mathrm{softplus}(s_{ij})` (``MASK_DIAGONAL`` as above).

Neither the B×N scores nor the B×N×H hidden layer is ever stored. The per-tile reduction costs a
few instructions per score against 2·H for the score itself, so every tile takes the masked path
(one loop, no unmasked copy as the dot kernels need). Column statistics are row statistics of the
critic with ``a`` and ``c`` swapped: the launcher prepares the swapped operands.

Where this kernel has run: compiled ahead of time for sm_90 (``kernels/aot.py``) and under the
Triton interpreter on CPUs; never on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import _softplus_with_exp
from .pairwise_tiles import _score_tile, prepare_scores, run
from .tiles import LOG2E, LSE, REDUCTIONS, SOFTPLUS, _assert_block

__all__ = ["pairwise_row_stats"]


# fmt: off
@triton.jit
def _pairwise_row_stats_fwd(
    own_t_ptr, other_t_ptr, sign_ptr, other_const_ptr,  # prepared operands (kernels.pairwise_tiles.ScoreOperands)
    out_ptr,  # (n_rows,) fp32 statistic per row
    n_rows, n_cols, hidden,
    clip,  # fp32 clamp bound, read when CLIP
    REDUCTION: tl.constexpr, MASK_DIAGONAL: tl.constexpr, CLIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    _assert_block(BLOCK_M)
    _assert_block(BLOCK_N)
    tl.static_assert(REDUCTION == LSE or REDUCTION == SOFTPLUS, "REDUCTION must be LSE or SOFTPLUS")
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for col0 in range(0, n_cols, BLOCK_N):
        offs_n = col0 + tl.arange(0, BLOCK_N)
        scores = _score_tile(
            own_t_ptr, other_t_ptr, sign_ptr, other_const_ptr, offs_m, offs_n, n_rows, n_cols, hidden,
            BLOCK_M, BLOCK_N,
        )
        if CLIP:
            scores = tl.minimum(tl.maximum(scores, -clip), clip)
        keep = offs_n[None, :] < n_cols
        if MASK_DIAGONAL:
            keep = keep & (offs_m[:, None] != offs_n[None, :])
        if REDUCTION == LSE:
            scores = tl.where(keep, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            # Rows with only masked entries so far keep a -inf maximum; shift them by 0, not -inf.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            terms = tl.exp2((scores - shift[:, None]) * LOG2E)
            running_sum = running_sum * tl.exp2((running_max - shift) * LOG2E) + tl.sum(terms, axis=1)
            running_max = new_max
        else:
            terms, _ = _softplus_with_exp(scores)
            running_sum += tl.sum(tl.where(keep, terms, 0.0), axis=1)
    if REDUCTION == LSE:
        result = running_max + tl.log(running_sum)
    else:
        result = running_sum
    tl.store(out_ptr + offs_m, result, mask=offs_m < n_rows)


# fmt: on


def pairwise_row_stats(
    own: torch.Tensor,
    other: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    reduction: str,
    mask_diagonal: bool,
    clip: float | None = None,
) -> torch.Tensor:
    r"""Per-row ``"lse"`` or ``"softplus"`` statistic of :math:`s_{ij} = w_2\cdot\mathrm{relu}(\text{own}_i
    + \text{other}_j) + b_2` (see the module notes). own (n_own, H), other (n_other, H) → (n_own,) fp32."""
    operands = prepare_scores(own, other, w2, b2)
    n_rows, n_cols = own.shape[0], other.shape[0]
    out = torch.empty(n_rows, device=own.device, dtype=torch.float32)
    run(
        "pairwise_row_stats_fwd",
        _pairwise_row_stats_fwd,
        grid=lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),),
        dtype=own.dtype,
        own_t_ptr=operands.own_t,
        other_t_ptr=operands.other_t,
        sign_ptr=operands.sign,
        other_const_ptr=operands.other_const,
        out_ptr=out,
        n_rows=n_rows,
        n_cols=n_cols,
        hidden=own.shape[1],
        clip=float(clip or 0.0),
        REDUCTION=REDUCTIONS[reduction],
        MASK_DIAGONAL=mask_diagonal,
        CLIP=clip is not None,
    )
    return out
