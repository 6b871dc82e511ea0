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
sweeps the column tiles: it recomputes each tile of scores over all H units
(:func:`kernels.pairwise_tiles._score_tile`), forms W, and folds, ``BLOCK_HV`` units at a time,
:math:`W_{ij}[t_{ijh} > 0]` into its rows of :math:`\sum_j W_{ij}[t_{ijh} > 0]` (da over w₂) and
:math:`W_{ij}\,\mathrm{relu}(t_{ijh})` into its partial of dw₂, :math:`t = a_{ih} + c_{jh}`, besides
the row sums of W (db₂). Without it a program owns ``BLOCK_N`` columns and sweeps the row tiles
for dc. The per-unit sums live in fp32 buffers that only their program reads and writes, in its
loop order, so no tile of scores is formed twice by one program; dw₂ and db₂ are the sums of the
per-program partials, taken by torch in a fixed order. No atomics: deterministic.

Cost, in (i, j, h) terms of B·N·H: each of the two launches recomputes the scores once (2
arithmetic instructions per term; with the loads, the sm_90 build of the 32 × 32 tiles issues 57
SASS instructions per unit for 8 scores per thread, against the forward's 96 for 32) and then
folds the units (an addition, a comparison, a select and a sum per term, one more multiply-add for
dw₂). So the backward costs several forwards; it has not been timed on a GPU.

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
def _fold_weights_into_units(
    weights,  # (SWEPT, OWN) fp32: the tile of W, swept dimension first
    own_ptr, offs_own, n_own,  # the program's input rows (a for da, c for dc)
    swept_ptr, offs_swept, n_swept,  # the swept input rows
    hidden,
    sums_ptr,  # (n_own, hidden) fp32: Σ W [t > 0], accumulated by this program only
    relu_sums_ptr,  # (hidden,) fp32: this program's partial of Σ W relu(t), when RELU_SUMS
    RELU_SUMS: tl.constexpr, BLOCK_HV: tl.constexpr,
):
    """Fold one tile of weights into every hidden unit, BLOCK_HV units at a time, with
    t = own_h + swept_h: Σ_swept W [t > 0] into the program's rows of ``sums_ptr`` and, with
    RELU_SUMS, Σ_own Σ_swept W relu(t) into ``relu_sums_ptr``. The (SWEPT, OWN, BLOCK_HV) products
    hold the swept dimension first, so that their sum over it stays within each thread. The sums
    are read, added to and written back by the one program that owns them, in its loop order:
    deterministic, and the scores are formed once per tile whatever H."""
    w = weights[:, :, None]
    for h0 in range(0, hidden, BLOCK_HV):
        offs_hv = h0 + tl.arange(0, BLOCK_HV)
        units_in = offs_hv < hidden
        own = _load_units(own_ptr, offs_own, n_own, offs_hv, hidden)  # (OWN, BLOCK_HV)
        swept = _load_units(swept_ptr, offs_swept, n_swept, offs_hv, hidden)  # (SWEPT, BLOCK_HV)
        t = own[None, :, :] + swept[:, None, :]
        active = tl.where(t > 0.0, w, 0.0)
        pointers = sums_ptr + offs_own.to(tl.int64)[:, None] * hidden + offs_hv[None, :]
        inside = (offs_own[:, None] < n_own) & units_in[None, :]
        tl.store(pointers, tl.load(pointers, mask=inside, other=0.0) + tl.sum(active, axis=0), mask=inside)
        if RELU_SUMS:
            relu_sum = tl.sum(tl.sum(active * t, axis=0), axis=0)
            previous = tl.load(relu_sums_ptr + offs_hv, mask=units_in, other=0.0)
            tl.store(relu_sums_ptr + offs_hv, previous + relu_sum, mask=units_in)


@triton.jit
def _pairwise_grad_kernel(
    a_t_ptr, neg_c_t_ptr, sign_ptr, col_const_ptr,  # the scores' prepared operands, rows a, columns c
    a_ptr, c_ptr,  # (n_rows, hidden), (n_cols, hidden): the inputs
    row_stat_ptr, row_grad_ptr,  # (n_rows,) fp32: ℓ_i and g_i
    col_stat_ptr, col_grad_ptr,  # (n_cols,) fp32: λ_j and h_j (CE_ROWS_COLS only)
    sums_ptr,  # (n_own, hidden) fp32, zeros on entry: Σ W [a + c > 0] (da / w2 with OWN_ROWS, else dc / w2)
    dw2_ptr,  # (programs, hidden) fp32, zeros on entry: per-program partials of dw₂ (OWN_ROWS)
    db2_ptr,  # (n_rows,) fp32: Σ_j W_ij (OWN_ROWS)
    n_rows, n_cols, hidden, clip,
    MODE: tl.constexpr, CLIP: tl.constexpr, COLUMN_STATS: tl.constexpr, OWN_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HV: tl.constexpr,
):
    _assert_block(BLOCK_M)
    _assert_block(BLOCK_N)
    # Units are summed on the ALUs, never fed to tl.dot: any power of two (tl.arange's rule) will do.
    tl.static_assert((BLOCK_HV & (BLOCK_HV - 1)) == 0, "BLOCK_HV must be a power of two")
    _assert_backward_constants(MODE, CLIP, COLUMN_STATS)
    if OWN_ROWS:
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_stat = _load_stats(row_stat_ptr, offs_m, n_rows, MODE != SOFTPLUS_NEGATIVES)
        row_grad = _load_stats(row_grad_ptr, offs_m, n_rows, True)
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
            _fold_weights_into_units(
                tl.trans(w), a_ptr, offs_m, n_rows, c_ptr, offs_n, n_cols, hidden,
                sums_ptr, dw2_ptr + tl.program_id(0) * hidden, RELU_SUMS=True, BLOCK_HV=BLOCK_HV,
            )
        tl.store(db2_ptr + offs_m, weight_sum, mask=offs_m < n_rows)
    else:
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_stat = _load_stats(col_stat_ptr, offs_n, n_cols, COLUMN_STATS)
        col_grad = _load_stats(col_grad_ptr, offs_n, n_cols, COLUMN_STATS)
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
            _fold_weights_into_units(
                w, c_ptr, offs_n, n_cols, a_ptr, offs_m, n_rows, hidden,
                sums_ptr, dw2_ptr, RELU_SUMS=False, BLOCK_HV=BLOCK_HV,
            )


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

    # Σ W [a + c > 0] for da and dc, and the partials of dw₂: accumulated by the kernels from zero.
    sums = {
        "rows": torch.zeros(a.shape, device=a.device, dtype=torch.float32),
        "cols": torch.zeros(c.shape, device=a.device, dtype=torch.float32),
    }
    db2_rows = torch.empty(n_rows, device=a.device, dtype=torch.float32)
    # One row of dw₂ partials per program along the rows: at most ⌈B / 16⌉ of them (BLOCK_M ≥ 16).
    dw2_rows = torch.zeros(triton.cdiv(n_rows, 16), hidden, device=a.device, dtype=torch.float32)
    arguments = dict(
        a_t_ptr=operands.own_t,
        neg_c_t_ptr=operands.other_t,
        sign_ptr=operands.sign,
        col_const_ptr=operands.other_const,
        a_ptr=a,
        c_ptr=c,
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
        BLOCK_HV=tuning.pairwise_block_hv(hidden),
    )
    grid_rows = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),)  # noqa: E731
    run("pairwise_grad_rows", _pairwise_grad_kernel, grid=grid_rows, dtype=a.dtype, sums_ptr=sums["rows"],
        OWN_ROWS=True, reset_to_zero=["sums_ptr", "dw2_ptr"], **arguments)  # fmt: skip
    grid_cols = lambda meta: (triton.cdiv(n_cols, meta["BLOCK_N"]),)  # noqa: E731
    run("pairwise_grad_cols", _pairwise_grad_kernel, grid=grid_cols, dtype=a.dtype, sums_ptr=sums["cols"],
        OWN_ROWS=False, reset_to_zero=["sums_ptr"], **arguments)  # fmt: skip
    w = w2.float()
    da = sums["rows"] * w
    dc = sums["cols"] * w
    dw2 = dw2_rows.sum(0)
    db2 = db2_rows.sum()
    return da.to(a.dtype), dc.to(c.dtype), dw2.to(w2.dtype), db2.to(b2.dtype)
