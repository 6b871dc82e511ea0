r"""The pairwise-MLP critic's backward kernel: da, dc, dw₂ and db₂ of the score reductions, and
its launcher.

For a loss with weights :math:`W = \partial L/\partial s` (rebuilt tile by tile from recomputed
scores and the saved statistics by :func:`kernels.backward._weights`, the dot kernels' function,
per ``MODE``), with :math:`s_{ij} = \sum_h w_{2,h}\,\mathrm{relu}(a_{ih} + c_{jh}) + b_2`:

.. math::
    da_{ih} = w_{2,h} \sum_j W_{ij}\,[a_{ih} + c_{jh} > 0],\qquad
    dc_{jh} = w_{2,h} \sum_i W_{ij}\,[a_{ih} + c_{jh} > 0],

.. math::
    dw_{2,h} = \sum_{ij} W_{ij}\,\mathrm{relu}(a_{ih} + c_{jh}),\qquad db_2 = \sum_{ij} W_{ij}.

:func:`_pairwise_grad_kernel` runs twice. With ``OWN_ROWS`` a program owns ``BLOCK_M`` rows and
``BLOCK_HV`` hidden units and sweeps the column tiles: it recomputes the tile of scores over all H
units (:func:`kernels.pairwise_tiles._score_tile`), forms W, and folds
:math:`W_{ij}[t_{ijh} > 0]` and :math:`W_{ij}\,\mathrm{relu}(t_{ijh})`, :math:`t = a_{ih} + c_{jh}`,
over its units into da and a per-program partial of dw₂ (and the row sums of W, for db₂);
without it a program owns ``BLOCK_N`` columns and sweeps the row tiles for dc. The
``(swept, own, unit)`` products are laid out swept dimension first so that the sums over it stay
within each thread. Each program writes only its own block; dw₂ and db₂ are the sums of the
per-program partials, taken by torch in a fixed order: no atomics, deterministic.

Cost, in (i, j, h) terms of B·N·H: the scores are recomputed once per program along H, so the two
launches take 2·⌈H / BLOCK_HV⌉ score passes (2 instructions per term each) plus one pass each
for the gradient terms (about 6 instructions per term for da and dw₂, 4 for dc).

Where this kernel has run: compiled ahead of time for sm_90 (``kernels/aot.py``) and under the
Triton interpreter on CPUs; never on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .backward import _assert_backward_constants, _weights
from .pairwise_tiles import _score_tile, prepare_scores, run
from .tiles import MODES, SOFTPLUS_NEGATIVES, _assert_block, _load_stats

__all__ = ["pairwise_grads"]


# fmt: off
@triton.jit
def _load_units(ptr, offs, n, offs_hv, hidden):
    """The (len(offs), BLOCK_HV) block of a row-major (n, hidden) matrix as fp32, zero outside."""
    pointers = ptr + offs.to(tl.int64)[:, None] * hidden + offs_hv[None, :]
    return tl.load(pointers, mask=(offs[:, None] < n) & (offs_hv[None, :] < hidden), other=0.0).to(tl.float32)


@triton.jit
def _pairwise_grad_kernel(
    a_t_ptr, neg_c_t_ptr, sign_ptr, col_const_ptr,  # the scores' prepared operands, rows a, columns c
    a_ptr, c_ptr, w2_ptr,  # (n_rows, hidden), (n_cols, hidden), (hidden,): the inputs
    row_stat_ptr, row_grad_ptr,  # (n_rows,) fp32: ℓ_i and g_i
    col_stat_ptr, col_grad_ptr,  # (n_cols,) fp32: λ_j and b_j (CE_ROWS_COLS only)
    grad_ptr,  # (n_own, hidden) fp32 output: da (OWN_ROWS) or dc
    dw2_ptr,  # (programs along the rows, hidden) fp32 output: partial sums of dw₂ (OWN_ROWS)
    db2_ptr,  # (n_rows,) fp32 output: Σ_j W_ij (OWN_ROWS)
    n_rows, n_cols, hidden, clip,
    MODE: tl.constexpr, CLIP: tl.constexpr, COLUMN_STATS: tl.constexpr, OWN_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HV: tl.constexpr,
):
    _assert_block(BLOCK_M)
    _assert_block(BLOCK_N)
    _assert_block(BLOCK_HV)
    _assert_backward_constants(MODE, CLIP, COLUMN_STATS)
    offs_hv = tl.program_id(1) * BLOCK_HV + tl.arange(0, BLOCK_HV)
    if OWN_ROWS:
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_stat = _load_stats(row_stat_ptr, offs_m, n_rows, MODE != SOFTPLUS_NEGATIVES)
        row_grad = _load_stats(row_grad_ptr, offs_m, n_rows, True)
        own = _load_units(a_ptr, offs_m, n_rows, offs_hv, hidden)  # (BLOCK_M, BLOCK_HV)
        active_sum = tl.zeros((BLOCK_M, BLOCK_HV), dtype=tl.float32)  # Σ_j W_ij [t > 0]
        relu_sum = tl.zeros((BLOCK_M, BLOCK_HV), dtype=tl.float32)  # Σ_j W_ij relu(t)
        weight_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ_j W_ij
        for col0 in range(0, n_cols, BLOCK_N):
            offs_n = col0 + tl.arange(0, BLOCK_N)
            scores = _score_tile(
                a_t_ptr, neg_c_t_ptr, sign_ptr, col_const_ptr, offs_m, offs_n, n_rows, n_cols, hidden,
                BLOCK_M, BLOCK_N,
            )
            w = _weights(
                dots=scores, scale=1.0, offs_m=offs_m, offs_n=offs_n, n_rows=n_rows, n_cols=n_cols,
                row_stat=row_stat, row_grad=row_grad,
                col_stat=_load_stats(col_stat_ptr, offs_n, n_cols, COLUMN_STATS),
                col_grad=_load_stats(col_grad_ptr, offs_n, n_cols, COLUMN_STATS),
                clip=clip, MODE=MODE, CLIP=CLIP, MASKED=True,
            )
            weight_sum += tl.sum(w, axis=1)
            swept = _load_units(c_ptr, offs_n, n_cols, offs_hv, hidden)  # (BLOCK_N, BLOCK_HV)
            t = own[None, :, :] + swept[:, None, :]  # (BLOCK_N, BLOCK_M, BLOCK_HV): swept first
            active = tl.where(t > 0.0, tl.trans(w)[:, :, None], 0.0)
            active_sum += tl.sum(active, axis=0)
            relu_sum += tl.sum(active * t, axis=0)
        offs_own = offs_m
        n_own = n_rows
        tl.store(dw2_ptr + tl.program_id(0) * hidden + offs_hv, tl.sum(relu_sum, axis=0), mask=offs_hv < hidden)
        if tl.program_id(1) == 0:  # every chunk of units forms the same row sums: one stores them
            tl.store(db2_ptr + offs_m, weight_sum, mask=offs_m < n_rows)
    else:
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_stat = _load_stats(col_stat_ptr, offs_n, n_cols, COLUMN_STATS)
        col_grad = _load_stats(col_grad_ptr, offs_n, n_cols, COLUMN_STATS)
        own = _load_units(c_ptr, offs_n, n_cols, offs_hv, hidden)  # (BLOCK_N, BLOCK_HV)
        active_sum = tl.zeros((BLOCK_N, BLOCK_HV), dtype=tl.float32)  # Σ_i W_ij [t > 0]
        for row0 in range(0, n_rows, BLOCK_M):
            offs_m = row0 + tl.arange(0, BLOCK_M)
            scores = _score_tile(
                a_t_ptr, neg_c_t_ptr, sign_ptr, col_const_ptr, offs_m, offs_n, n_rows, n_cols, hidden,
                BLOCK_M, BLOCK_N,
            )
            w = _weights(
                dots=scores, scale=1.0, offs_m=offs_m, offs_n=offs_n, n_rows=n_rows, n_cols=n_cols,
                row_stat=_load_stats(row_stat_ptr, offs_m, n_rows, MODE != SOFTPLUS_NEGATIVES),
                row_grad=_load_stats(row_grad_ptr, offs_m, n_rows, True),
                col_stat=col_stat, col_grad=col_grad, clip=clip, MODE=MODE, CLIP=CLIP, MASKED=True,
            )
            swept = _load_units(a_ptr, offs_m, n_rows, offs_hv, hidden)  # (BLOCK_M, BLOCK_HV)
            t = own[None, :, :] + swept[:, None, :]  # (BLOCK_M, BLOCK_N, BLOCK_HV): swept first
            active_sum += tl.sum(tl.where(t > 0.0, w[:, :, None], 0.0), axis=0)
        offs_own = offs_n
        n_own = n_cols
    w2 = tl.load(w2_ptr + offs_hv, mask=offs_hv < hidden, other=0.0).to(tl.float32)
    pointers = grad_ptr + offs_own.to(tl.int64)[:, None] * hidden + offs_hv[None, :]
    tl.store(pointers, w2[None, :] * active_sum, mask=(offs_own[:, None] < n_own) & (offs_hv[None, :] < hidden))


# fmt: on


def pairwise_grads(
    a: torch.Tensor,
    c: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    *,
    mode: str,
    row_grad: torch.Tensor,
    row_stat: torch.Tensor | None = None,
    col_grad: torch.Tensor | None = None,
    col_stat: torch.Tensor | None = None,
    clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(da, dc, dw2, db2)`` for the ``mode``'s weights W (see the module notes), in the inputs' dtype."""
    (n_rows, hidden), n_cols = a.shape, c.shape[0]
    operands = prepare_scores(a, c, w2, b2)

    def stat(t: torch.Tensor | None, n: int) -> torch.Tensor:
        return (t if t is not None else torch.zeros(n, device=a.device)).float().contiguous()

    block_hv = tuning.pairwise_block_hv(hidden)
    units = triton.cdiv(hidden, block_hv)
    da = torch.empty(a.shape, device=a.device, dtype=torch.float32)
    dc = torch.empty(c.shape, device=a.device, dtype=torch.float32)
    db2_rows = torch.empty(n_rows, device=a.device, dtype=torch.float32)
    # One row of dw₂ partials per program along the rows; the smallest candidate BLOCK_M bounds their number.
    dw2_rows = torch.zeros(triton.cdiv(n_rows, 16), hidden, device=a.device, dtype=torch.float32)
    arguments = dict(
        a_t_ptr=operands.own_t,
        neg_c_t_ptr=operands.other_t,
        sign_ptr=operands.sign,
        col_const_ptr=operands.other_const,
        a_ptr=a,
        c_ptr=c,
        w2_ptr=w2,
        row_stat_ptr=stat(row_stat, n_rows),
        row_grad_ptr=stat(row_grad, n_rows),
        col_stat_ptr=stat(col_stat, n_cols),
        col_grad_ptr=stat(col_grad, n_cols),
        dw2_ptr=dw2_rows,
        db2_ptr=db2_rows,
        n_rows=n_rows,
        n_cols=n_cols,
        hidden=hidden,
        clip=float(clip or 0.0),
        MODE=MODES[mode],
        CLIP=clip is not None,
        COLUMN_STATS=col_stat is not None,
        BLOCK_HV=block_hv,
    )
    grid_rows = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), units)  # noqa: E731
    run("pairwise_grad_rows", _pairwise_grad_kernel, grid=grid_rows, dtype=a.dtype, grad_ptr=da, OWN_ROWS=True,
        **arguments)  # fmt: skip
    grid_cols = lambda meta: (triton.cdiv(n_cols, meta["BLOCK_N"]), units)  # noqa: E731
    run("pairwise_grad_cols", _pairwise_grad_kernel, grid=grid_cols, dtype=a.dtype, grad_ptr=dc, OWN_ROWS=False,
        **arguments)  # fmt: skip
    dw2 = dw2_rows.sum(0)
    db2 = db2_rows.sum()
    return da.to(a.dtype), dc.to(c.dtype), dw2.to(w2.dtype), db2.to(b2.dtype)
