r"""The backward kernels: dq and dk of the score-matrix reductions, and their launcher.

The gradient of any of the losses is :math:`dq = \sigma W k`, :math:`dk = \sigma W^\top q`,
:math:`d\sigma = \sum_i q_i \cdot (W k)_i` for a weight matrix :math:`W = \partial L/\partial S`
that :func:`_weights` rebuilds tile by tile from the recomputed scores and saved per-row /
per-column statistics (``MODE``):

* ``CE_ROWS``: :math:`W_{ij} = a_i(e^{S_{ij}-\ell_i} - \delta_{ij})` (InfoNCE);
* ``CE_ROWS_COLS``: :math:`W_{ij} = a_i e^{S_{ij}-\ell_i} + b_j e^{S_{ij}-\lambda_j} - (a_i + b_j)\delta_{ij}`
  (symmetric InfoNCE);
* ``LSE_NEGATIVES``: :math:`W_{ij} = a_i e^{c(S_{ij})-\ell_i} c'(S_{ij})`, :math:`j \ne i`
  (NWJ, DV, SMILE);
* ``SOFTPLUS_NEGATIVES``: :math:`W_{ij} = a_i\,\mathrm{sigmoid}(S_{ij})`, :math:`j \ne i` (JS).

:func:`_grad_q_kernel` owns a block of rows and sweeps the column tiles; :func:`_grad_k_kernel`
owns a block of columns and sweeps the row tiles (both with :func:`kernels.tiles._sweep`; on
16-bit inputs the tiles off the diagonal band and inside the matrix run without masks). Each
program writes only its own block: no atomics, so the gradients are deterministic. A second grid
axis splits the feature dimension of the output into ``BLOCK_DV`` chunks when D is large (each
chunk recomputes the scores). Where one tile holds the whole feature row, the tile of the scores
also feeds the product. When the forward formed the weighted keys (:mod:`kernels.forward`), W k is
known and only the dk kernel runs.

Where these kernels have run: compiled ahead of time for sm_90 and sm_80 (``kernels/aot.py``) and
run under the Triton interpreter on CPUs; never on a GPU — no GPU number has been measured yet.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import launch, tuning
from .tiles import (
    CE_ROWS,
    CE_ROWS_COLS,
    LOG2E,
    LSE_NEGATIVES,
    MODES,
    SOFTPLUS_NEGATIVES,
    _assert_block,
    _load_block,
    _load_stats,
    _score_tile,
    _sweep,
    _tile_scores_and_keys,
)


class _BackwardConstants(NamedTuple):
    """The backward kernels' compile-time constants, as both take them."""

    MODE: tl.constexpr
    CLIP: tl.constexpr
    COLUMN_STATS: tl.constexpr
    BLOCK_M: tl.constexpr
    BLOCK_N: tl.constexpr
    BLOCK_K: tl.constexpr
    BLOCK_DV: tl.constexpr
    SINGLE_K: tl.constexpr
    INPUT_PRECISION: tl.constexpr


class _GradQBlock(NamedTuple):
    """What a dq program holds across its sweep of the column tiles."""

    q_ptr: tl.tensor
    k_ptr: tl.tensor
    q_block: tl.tensor | None  # its (BLOCK_M, BLOCK_K) q tile when SINGLE_K, else None
    scale: tl.tensor
    offs_m: tl.tensor  # its rows (BLOCK_M,)
    offs_dv: tl.tensor  # its columns of dq (BLOCK_DV,)
    row_stat: tl.tensor  # ℓ_i and a_i of its rows (BLOCK_M,)
    row_grad: tl.tensor
    col_stat_ptr: tl.tensor  # λ_j and b_j, (n_cols,), read with COLUMN_STATS
    col_grad_ptr: tl.tensor
    n_rows: tl.tensor
    n_cols: tl.tensor
    dim: tl.tensor
    clip: tl.tensor


class _GradKBlock(NamedTuple):
    """What a dk program holds across its sweep of the row tiles."""

    q_ptr: tl.tensor
    k_ptr: tl.tensor
    k_block: tl.tensor | None  # its (BLOCK_N, BLOCK_K) k tile when SINGLE_K, else None
    scale: tl.tensor
    offs_n: tl.tensor  # its columns of S (BLOCK_N,)
    offs_dv: tl.tensor  # its columns of dk (BLOCK_DV,)
    row_stat_ptr: tl.tensor  # ℓ_i and a_i, (n_rows,)
    row_grad_ptr: tl.tensor
    col_stat: tl.tensor  # λ_j and b_j of its columns (BLOCK_N,), zero without COLUMN_STATS
    col_grad: tl.tensor
    n_rows: tl.tensor
    n_cols: tl.tensor
    dim: tl.tensor
    clip: tl.tensor


# fmt: off
@triton.jit
def _assert_backward_constants(MODE: tl.constexpr, CLIP: tl.constexpr, COLUMN_STATS: tl.constexpr):
    """The combinations :func:`_weights` implements: column statistics belong to CE_ROWS_COLS, the
    clamp to LSE_NEGATIVES (elsewhere either would be ignored, giving a silently wrong W)."""
    tl.static_assert(
        MODE == CE_ROWS or MODE == CE_ROWS_COLS or MODE == LSE_NEGATIVES or MODE == SOFTPLUS_NEGATIVES,
        "MODE must be CE_ROWS, CE_ROWS_COLS, LSE_NEGATIVES or SOFTPLUS_NEGATIVES",
    )
    tl.static_assert(COLUMN_STATS == (MODE == CE_ROWS_COLS), "column statistics are read for CE_ROWS_COLS only")
    tl.static_assert(not CLIP or MODE == LSE_NEGATIVES, "CLIP applies to LSE_NEGATIVES only")


@triton.jit
def _weights(
    dots, scale, offs_m, offs_n, n_rows, n_cols, row_stat, row_grad, col_stat, col_grad, clip,
    MODE: tl.constexpr, CLIP: tl.constexpr, MASKED: tl.constexpr,
):
    """The tile of W = ∂L/∂S (fp32) from the tile of q·k (S = σ·dots), zero outside the matrix;
    see the module notes per MODE. The exponent is S − ℓ, rounded once from S: folding σ·log₂e
    into one FMA, as the forward does, would add error of the order of ulp(S·log₂e) to every
    weight — in e^{S_ii − ℓ_i} − 1 of a confident positive, most of its value. Only MASKED tiles
    (the diagonal band, the ragged edge) pay for the diagonal's terms and the bounds: outside the
    matrix a weight formed from the zero-filled entries could overflow, and inf × 0 is NaN in the
    product with the zero rows."""
    if MASKED:
        inside = (offs_m[:, None] < n_rows) & (offs_n[None, :] < n_cols)
        diagonal = offs_m[:, None] == offs_n[None, :]
    scores = scale * dots
    if MODE == CE_ROWS:
        w = tl.exp2((scores - row_stat[:, None]) * LOG2E)
        if MASKED:
            w -= tl.where(diagonal, 1.0, 0.0)
        w = row_grad[:, None] * w
    elif MODE == CE_ROWS_COLS:
        w = row_grad[:, None] * tl.exp2((scores - row_stat[:, None]) * LOG2E)
        w += col_grad[None, :] * tl.exp2((scores - col_stat[None, :]) * LOG2E)
        if MASKED:
            w -= tl.where(diagonal, row_grad[:, None] + col_grad[None, :], 0.0)
    elif MODE == LSE_NEGATIVES:
        if CLIP:
            passes = (scores >= -clip) & (scores <= clip)  # where the clamp passes gradient, ends included
            scores = tl.minimum(tl.maximum(scores, -clip), clip)
        w = row_grad[:, None] * tl.exp2((scores - row_stat[:, None]) * LOG2E)
        if CLIP:
            w = tl.where(passes, w, 0.0)
        if MASKED:
            w = tl.where(diagonal, 0.0, w)
    else:  # SOFTPLUS_NEGATIVES
        w = row_grad[:, None] * tl.sigmoid(scores)
        if MASKED:
            w = tl.where(diagonal, 0.0, w)
    if MASKED:
        w = tl.where(inside, w, 0.0)
    return w


@triton.jit
def _fold_column_tile_into_dq(accumulator, offs_n, rows, C: tl.constexpr, MASKED: tl.constexpr):
    """accumulator += W k over the column tile ``offs_n``; ``rows`` is the program's
    :class:`_GradQBlock`, ``C`` its :class:`_BackwardConstants`. Where one tile holds the whole
    feature row (SINGLE_K, BLOCK_DV = BLOCK_K), the k tile of the scores is the k tile of the product."""
    if C.SINGLE_K and C.BLOCK_DV == C.BLOCK_K:  # one program along D: offs_dv is the tile's columns
        dots, k_values = _tile_scores_and_keys(
            rows.q_block, rows.k_ptr, offs_n, rows.n_cols, rows.dim, C.BLOCK_K, C.INPUT_PRECISION
        )
    else:
        dots = _score_tile(
            q_ptr=rows.q_ptr, k_ptr=rows.k_ptr, q_block=rows.q_block, offs_m=rows.offs_m, offs_n=offs_n,
            n_rows=rows.n_rows, n_cols=rows.n_cols, dim=rows.dim, BLOCK_M=C.BLOCK_M, BLOCK_N=C.BLOCK_N,
            BLOCK_K=C.BLOCK_K, SINGLE_K=C.SINGLE_K, INPUT_PRECISION=C.INPUT_PRECISION,
        )
        k_values = _load_block(rows.k_ptr, offs_n, rows.offs_dv, rows.n_cols, rows.dim, rows.dim)
    col_stat = _load_stats(rows.col_stat_ptr, offs_n, rows.n_cols, C.COLUMN_STATS)
    col_grad = _load_stats(rows.col_grad_ptr, offs_n, rows.n_cols, C.COLUMN_STATS)
    w = _weights(
        dots=dots, scale=rows.scale, offs_m=rows.offs_m, offs_n=offs_n, n_rows=rows.n_rows, n_cols=rows.n_cols,
        row_stat=rows.row_stat, row_grad=rows.row_grad, col_stat=col_stat, col_grad=col_grad, clip=rows.clip,
        MODE=C.MODE, CLIP=C.CLIP, MASKED=MASKED,
    )
    return tl.dot(w.to(k_values.dtype), k_values, accumulator, input_precision=C.INPUT_PRECISION)


@triton.jit
def _fold_row_tile_into_dk(accumulator, offs_m, cols, C: tl.constexpr, MASKED: tl.constexpr):
    """accumulator += Wᵀ q over the row tile ``offs_m``; ``cols`` is the program's
    :class:`_GradKBlock`. The q tile of the scores serves the product too where it holds the whole
    feature row (SINGLE_K, BLOCK_DV = BLOCK_K)."""
    if C.SINGLE_K:
        q_block = _load_block(cols.q_ptr, offs_m, tl.arange(0, C.BLOCK_K), cols.n_rows, cols.dim, cols.dim)
        dots = tl.dot(q_block, tl.trans(cols.k_block), input_precision=C.INPUT_PRECISION)
    else:
        dots = _score_tile(
            q_ptr=cols.q_ptr, k_ptr=cols.k_ptr, q_block=None, offs_m=offs_m, offs_n=cols.offs_n,
            n_rows=cols.n_rows, n_cols=cols.n_cols, dim=cols.dim, BLOCK_M=C.BLOCK_M, BLOCK_N=C.BLOCK_N,
            BLOCK_K=C.BLOCK_K, SINGLE_K=False, INPUT_PRECISION=C.INPUT_PRECISION,
        )
    row_stat = _load_stats(cols.row_stat_ptr, offs_m, cols.n_rows, C.MODE != SOFTPLUS_NEGATIVES)
    row_grad = _load_stats(cols.row_grad_ptr, offs_m, cols.n_rows, True)
    w = _weights(
        dots=dots, scale=cols.scale, offs_m=offs_m, offs_n=cols.offs_n, n_rows=cols.n_rows, n_cols=cols.n_cols,
        row_stat=row_stat, row_grad=row_grad, col_stat=cols.col_stat, col_grad=cols.col_grad, clip=cols.clip,
        MODE=C.MODE, CLIP=C.CLIP, MASKED=MASKED,
    )
    if C.SINGLE_K and C.BLOCK_DV == C.BLOCK_K:
        q_values = q_block
    else:
        q_values = _load_block(cols.q_ptr, offs_m, cols.offs_dv, cols.n_rows, cols.dim, cols.dim)
    return tl.dot(tl.trans(w.to(q_values.dtype)), q_values, accumulator, input_precision=C.INPUT_PRECISION)


@triton.jit
def _grad_q_kernel(
    q_ptr, k_ptr,  # (n_rows, dim), (n_cols, dim)
    scale_ptr,  # () fp32 σ
    dq_ptr,  # (n_rows, dim) fp32 output: W k, before the factor σ
    row_stat_ptr, row_grad_ptr,  # (n_rows,) fp32: ℓ_i and a_i
    col_stat_ptr, col_grad_ptr,  # (n_cols,) fp32: λ_j and b_j (CE_ROWS_COLS only)
    n_rows, n_cols, dim, clip,
    MODE: tl.constexpr, CLIP: tl.constexpr, COLUMN_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
    SINGLE_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    _assert_block(BLOCK_M)
    _assert_block(BLOCK_N)
    _assert_block(BLOCK_K)
    _assert_block(BLOCK_DV)
    _assert_backward_constants(MODE, CLIP, COLUMN_STATS)
    row0 = tl.program_id(0) * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    scale = tl.load(scale_ptr)
    q_block = _load_block(q_ptr, offs_m, tl.arange(0, BLOCK_K), n_rows, dim, dim) if SINGLE_K else None
    row_stat = _load_stats(row_stat_ptr, offs_m, n_rows, MODE != SOFTPLUS_NEGATIVES)
    row_grad = _load_stats(row_grad_ptr, offs_m, n_rows, True)
    accumulator = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    rows = _GradQBlock(
        q_ptr=q_ptr, k_ptr=k_ptr, q_block=q_block, scale=scale, offs_m=offs_m, offs_dv=offs_dv,
        row_stat=row_stat, row_grad=row_grad, col_stat_ptr=col_stat_ptr, col_grad_ptr=col_grad_ptr,
        n_rows=n_rows, n_cols=n_cols, dim=dim, clip=clip,
    )
    # 16-bit inputs: the tiles off the diagonal band and inside the matrix in a loop without masks
    # (as in the forward); fp32 keeps one masked loop (smaller code, no spills).
    accumulator = _sweep(
        fold_tile=_fold_column_tile_into_dq, state=accumulator, held=rows,
        CONSTANTS=_BackwardConstants(  # built in the call (see kernels.forward)
            MODE=MODE, CLIP=CLIP, COLUMN_STATS=COLUMN_STATS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            BLOCK_DV=BLOCK_DV, SINGLE_K=SINGLE_K, INPUT_PRECISION=INPUT_PRECISION,
        ),
        block0=row0, n_swept=n_cols, OWN_BLOCK=BLOCK_M, SWEPT_BLOCK=BLOCK_N,
        BAND=True, SPLIT=q_ptr.dtype.element_ty != tl.float32,
    )
    pointers = dq_ptr + offs_m.to(tl.int64)[:, None] * dim + offs_dv[None, :]
    tl.store(pointers, accumulator, mask=(offs_m[:, None] < n_rows) & (offs_dv[None, :] < dim))


@triton.jit
def _grad_k_kernel(
    q_ptr, k_ptr,  # (n_rows, dim), (n_cols, dim)
    scale_ptr,  # () fp32 σ
    dk_ptr,  # (n_cols, dim) output σ Wᵀ q, dtype of k
    row_stat_ptr, row_grad_ptr, col_stat_ptr, col_grad_ptr,  # as in _grad_q_kernel
    n_rows, n_cols, dim, clip,
    MODE: tl.constexpr, CLIP: tl.constexpr, COLUMN_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
    SINGLE_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    _assert_block(BLOCK_M)
    _assert_block(BLOCK_N)
    _assert_block(BLOCK_K)
    _assert_block(BLOCK_DV)
    _assert_backward_constants(MODE, CLIP, COLUMN_STATS)
    col0 = tl.program_id(0) * BLOCK_N
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    scale = tl.load(scale_ptr)
    k_block = _load_block(k_ptr, offs_n, tl.arange(0, BLOCK_K), n_cols, dim, dim) if SINGLE_K else None
    col_stat = _load_stats(col_stat_ptr, offs_n, n_cols, COLUMN_STATS)
    col_grad = _load_stats(col_grad_ptr, offs_n, n_cols, COLUMN_STATS)
    accumulator = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    cols = _GradKBlock(
        q_ptr=q_ptr, k_ptr=k_ptr, k_block=k_block, scale=scale, offs_n=offs_n, offs_dv=offs_dv,
        row_stat_ptr=row_stat_ptr, row_grad_ptr=row_grad_ptr, col_stat=col_stat, col_grad=col_grad,
        n_rows=n_rows, n_cols=n_cols, dim=dim, clip=clip,
    )
    # As in _grad_q_kernel, with the roles of rows and columns swapped: the band is the row tiles
    # that cross this block's columns.
    accumulator = _sweep(
        fold_tile=_fold_row_tile_into_dk, state=accumulator, held=cols,
        CONSTANTS=_BackwardConstants(  # built in the call (see kernels.forward)
            MODE=MODE, CLIP=CLIP, COLUMN_STATS=COLUMN_STATS, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
            BLOCK_DV=BLOCK_DV, SINGLE_K=SINGLE_K, INPUT_PRECISION=INPUT_PRECISION,
        ),
        block0=col0, n_swept=n_rows, OWN_BLOCK=BLOCK_N, SWEPT_BLOCK=BLOCK_M,
        BAND=True, SPLIT=q_ptr.dtype.element_ty != tl.float32,
    )
    pointers = dk_ptr + offs_n.to(tl.int64)[:, None] * dim + offs_dv[None, :]
    tl.store(
        pointers,
        (scale * accumulator).to(dk_ptr.dtype.element_ty),
        mask=(offs_n[:, None] < n_cols) & (offs_dv[None, :] < dim),
    )


# fmt: on


def weighted_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    *,
    mode: str,
    row_grad: torch.Tensor,
    row_stat: torch.Tensor | None = None,
    col_grad: torch.Tensor | None = None,
    col_stat: torch.Tensor | None = None,
    clip: float | None = None,
    weighted_keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dσ)`` for the ``mode``'s weights W: σ W k, σ Wᵀ q and Σ_i q_i·(W k)_i.
    ``weighted_keys``, W k (B, D) fp32 when the forward already formed it, spares the dq sweep."""
    q, k = q.contiguous(), k.contiguous()
    (n_rows, dim), n_cols = q.shape, k.shape[0]

    def stat(t: torch.Tensor | None, n: int) -> torch.Tensor:
        return (t if t is not None else torch.zeros(n, device=q.device)).float().contiguous()

    dk = torch.empty_like(k)
    sigma = launch.scale_tensor(scale)
    dv = tuning.block_dv(dim, q.dtype)
    # What the two kernels take alike (each adds its output).
    arguments = dict(
        q_ptr=q,
        k_ptr=k,
        scale_ptr=sigma,
        row_stat_ptr=stat(row_stat, n_rows),
        row_grad_ptr=stat(row_grad, n_rows),
        col_stat_ptr=stat(col_stat, n_cols),
        col_grad_ptr=stat(col_grad, n_cols),
        n_rows=n_rows,
        n_cols=n_cols,
        dim=dim,
        clip=float(clip or 0.0),
        MODE=MODES[mode],
        CLIP=clip is not None,
        COLUMN_STATS=col_stat is not None,
        BLOCK_DV=dv,
        **tuning.shape_constants(dim, q.dtype),
    )
    if weighted_keys is None:
        weighted_keys = torch.empty(q.shape, device=q.device, dtype=torch.float32)  # W k
        grid_q = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(dim, dv))  # noqa: E731
        launch.run("grad_q", _grad_q_kernel, grid=grid_q, dtype=q.dtype, dq_ptr=weighted_keys, **arguments)
    grid_k = lambda meta: (triton.cdiv(n_cols, meta["BLOCK_N"]), triton.cdiv(dim, dv))  # noqa: E731
    launch.run("grad_k", _grad_k_kernel, grid=grid_k, dtype=q.dtype, dk_ptr=dk, **arguments)
    d_scale = (q.float() * weighted_keys).sum()
    return (weighted_keys * sigma).to(q.dtype), dk, d_scale
