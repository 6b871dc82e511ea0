r"""Triton kernels for the reductions of a score matrix :math:`S = \sigma q k^\top` that is never stored.

Tiled like FlashAttention: a program owns a block of ``BLOCK_M`` rows of ``q`` and streams
``BLOCK_N``-row blocks of ``k`` past it, forming one ``BLOCK_M × BLOCK_N`` tile of scores at a time
with ``tl.dot`` (fp32 accumulation, the feature dimension in ``BLOCK_K`` chunks), then scaled in
fp32 by the inverse temperature σ, read from a one-element tensor (no host synchronisation); the
forward folds σ·log₂e into the one FMA that forms each exponent. Where the ALU work per score is
what bounds a loop, the tiles that need no masking (off the diagonal, inside the matrix) run in
a loop of their own without the comparisons and selects.

**Forward** — :func:`_row_stats_fwd`, one program per row block, writes one fp32 number per row:

* ``REDUCTION = LSE``: :math:`\log\sum_j e^{c(S_{ij})}`, with an online running maximum and
  rescaled sum; ``MASK_DIAGONAL`` drops :math:`j = i`, ``CLIP`` clamps scores to ±clip;
* ``REDUCTION = SOFTPLUS``: :math:`\sum_j \mathrm{softplus}(S_{ij})` (``MASK_DIAGONAL`` as above).

With ``WEIGHTED_KEYS`` (16-bit inputs, D ≤ 128: the whole feature row in one tile) the forward also
writes :math:`u_i = \sum_{j\ne i} \tilde w_{ij} k_j`, the keys weighted by the row's share of the
gradient — :math:`\tilde w_{ij} = e^{c(S_{ij})-\ell_i} c'(S_{ij})` for LSE (the softmax; the
accumulator is rescaled with the running maximum, as attention's output is), :math:`\sigma(S_{ij})`
for SOFTPLUS — from the k tile it already holds for the scores. For every row loss here
:math:`W_{ij} = a_i \tilde w_{ij}` off the diagonal, so :math:`dq_i = \sigma a_i u_i` (plus, for
InfoNCE, :math:`\sigma a_i (p_{ii} - 1) k_i`, formed outside with ``expm1`` so that a confident
positive keeps its relative precision) needs no second sweep: training then costs four matrix
products and two exponentials per score (forward, and the dk kernel) instead of five and three.

Column statistics are row statistics of :math:`S^\top = k q^\top`: the launcher swaps ``q``, ``k``.

**Backward** — the gradient of any of the losses is :math:`dq = \sigma W k`, :math:`dk = \sigma W^\top q`,
:math:`d\sigma = \sum_i q_i \cdot (W k)_i` for a
weight matrix :math:`W = \partial L/\partial S` that :func:`_weights` rebuilds tile by tile from
the recomputed scores and saved per-row / per-column statistics (``MODE``):

* ``CE_ROWS``: :math:`W_{ij} = a_i(e^{S_{ij}-\ell_i} - \delta_{ij})` (InfoNCE);
* ``CE_ROWS_COLS``: :math:`W_{ij} = a_i e^{S_{ij}-\ell_i} + b_j e^{S_{ij}-\lambda_j} - (a_i + b_j)\delta_{ij}`
  (symmetric InfoNCE);
* ``LSE_NEGATIVES``: :math:`W_{ij} = a_i e^{c(S_{ij})-\ell_i} c'(S_{ij})`, :math:`j \ne i`
  (NWJ, DV, SMILE);
* ``SOFTPLUS_NEGATIVES``: :math:`W_{ij} = a_i\,\mathrm{sigmoid}(S_{ij})`, :math:`j \ne i` (JS).

:func:`_grad_q_kernel` owns a block of rows and sweeps the columns; :func:`_grad_k_kernel` owns a
block of columns and sweeps the rows. Each program writes only its own block: no atomics, so the
gradients are deterministic. A second grid axis splits the feature dimension of the output into
``BLOCK_DV`` chunks when D is large (each chunk recomputes the scores).

GPU rules kept even when developing under the interpreter: power-of-two blocks ≥ 16, every load
masked for ragged B, N, D, no Python control flow on tensor values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning

LSE = tl.constexpr(0)
SOFTPLUS = tl.constexpr(1)

CE_ROWS = tl.constexpr(0)
CE_ROWS_COLS = tl.constexpr(1)
LSE_NEGATIVES = tl.constexpr(2)
SOFTPLUS_NEGATIVES = tl.constexpr(3)

LOG2E = tl.constexpr(1.4426950408889634)


# fmt: off
@triton.jit
def _load_block(ptr, offs_rows, offs_cols, n_rows, n_cols, row_stride):
    """A (rows, cols) block of a row-major matrix, zero outside it."""
    pointers = ptr + offs_rows.to(tl.int64)[:, None] * row_stride + offs_cols[None, :]
    mask = (offs_rows[:, None] < n_rows) & (offs_cols[None, :] < n_cols)
    return tl.load(pointers, mask=mask, other=0.0)


@triton.jit
def _tile_scores_and_keys(q_block, k_ptr, offs_n, n_cols, dim, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(fp32 scores of the preloaded q tile against the k rows ``offs_n``, that k tile), when one
    tile holds the whole feature row: the k tile can feed a second product."""
    k_block = _load_block(k_ptr, offs_n, tl.arange(0, BLOCK_K), n_cols, dim, dim)
    return tl.dot(q_block, tl.trans(k_block), input_precision=INPUT_PRECISION), k_block


@triton.jit
def _score_tile(
    q_ptr, k_ptr, q_block, offs_m, offs_n, n_rows, n_cols, dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """fp32 scores S[offs_m, offs_n]; ``q_block`` is the preloaded q tile when SINGLE_K."""
    offs_k = tl.arange(0, BLOCK_K)
    if SINGLE_K:
        scores, _ = _tile_scores_and_keys(q_block, k_ptr, offs_n, n_cols, dim, BLOCK_K, INPUT_PRECISION)
    else:
        scores = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            q_chunk = _load_block(q_ptr, offs_m, k0 + offs_k, n_rows, dim, dim)
            k_chunk = _load_block(k_ptr, offs_n, k0 + offs_k, n_cols, dim, dim)
            scores = tl.dot(q_chunk, tl.trans(k_chunk), scores, input_precision=INPUT_PRECISION)
    return scores


@triton.jit
def _softplus_with_exp(x):
    """(log(1 + e^x), e^-|x|): softplus as max(x, 0) + log1p(e^-|x|), with log1p's small-argument
    series inline, and the exponential it used (σ(x) is (1 or e^-|x|) / (1 + e^-|x|))."""
    e = tl.exp2(-tl.abs(x) * LOG2E)
    log1p_e = tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e))
    return tl.maximum(x, 0.0) + log1p_e, e


# ---------------------------------------------------------------------------------------------
# Forward: per-row statistics
# ---------------------------------------------------------------------------------------------


@triton.jit
def _column_split(row0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, n_cols, BAND: tl.constexpr, MASKED: tl.constexpr):
    """The column tiles of the row block [row0, row0 + BLOCK_M) go in two loops: those that need
    no masking, then (MASKED) those that do — with BAND the tiles holding the block's diagonal
    [band_lo, band_hi), then the ragged last tile. A loop runs over positions [start, stop) with
    ``gap`` added from ``gap_at`` on; returns (start, stop, gap_at, gap). Two loops rather than one
    per range: less code and fewer registers held by pipelining (computed per loop for the same
    reason: fewer values live across the first)."""
    full = (n_cols // BLOCK_N) * BLOCK_N
    band_lo = full
    band_hi = full
    if BAND:
        band_lo = tl.minimum((row0 // BLOCK_N) * BLOCK_N, full)
        band_hi = tl.minimum(tl.cdiv(row0 + BLOCK_M, BLOCK_N) * BLOCK_N, full)
    if MASKED:  # the band, then (if n_cols > full) position band_hi, moved to the tile at full
        return band_lo, band_hi + n_cols - full, band_hi, full - band_hi
    return 0, full - (band_hi - band_lo), band_lo, band_hi - band_lo


@triton.jit
def _fold_columns(
    q_ptr, k_ptr, q_block, offs_m, start, stop, gap_at, gap, n_rows, n_cols, dim, scale, clip,
    running_max, running_sum, weighted_keys,
    REDUCTION: tl.constexpr, MASK_DIAGONAL: tl.constexpr, CLIP: tl.constexpr, MASKED: tl.constexpr,
    WEIGHTED_KEYS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Fold column tiles into the running row statistics: those at positions [start, stop), with
    ``gap`` added to the positions from ``gap_at`` on (see :func:`_column_split`).

    LSE keeps its maximum in the units of x = q·k, before σ (σ > 0 keeps the maximum's
    position), so that σ folds into the exponent, one FMA per score: e^{σx − σm} =
    2^{x·σlog₂e − m·σlog₂e}. With CLIP, x = clamp(σ q·k, ±clip) in the scores' own units. Only
    MASKED tiles (the ragged last one, those crossing the diagonal when it is dropped) pay for
    the comparisons and selects of masking. WEIGHTED_KEYS (needs SINGLE_K, and the diagonal band
    among the MASKED tiles) also accumulates Σ_{j≠i} w̃_ij k_j into ``weighted_keys``
    (BLOCK_M, BLOCK_K), unnormalised for LSE.
    """
    exp2_scale = LOG2E if CLIP else scale * LOG2E
    for position in range(start, stop, BLOCK_N):
        offs_n = position + tl.where(position >= gap_at, gap, 0) + tl.arange(0, BLOCK_N)
        if WEIGHTED_KEYS:  # the k tile serves the scores and the weighted sum
            x, k_block = _tile_scores_and_keys(q_block, k_ptr, offs_n, n_cols, dim, BLOCK_K, INPUT_PRECISION)
        else:
            x = _score_tile(
                q_ptr, k_ptr, q_block, offs_m, offs_n, n_rows, n_cols, dim,
                BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, INPUT_PRECISION,
            )  # fmt: skip
        if CLIP or REDUCTION == SOFTPLUS:
            x = scale * x
        if CLIP:
            if WEIGHTED_KEYS:
                passes = (x >= -clip) & (x <= clip)  # where the clamp passes gradient, ends included
            x = tl.minimum(tl.maximum(x, -clip), clip)
        if MASKED:
            keep = offs_n[None, :] < n_cols
            keep_keys = keep & (offs_m[:, None] != offs_n[None, :])  # u leaves the diagonal out
            if MASK_DIAGONAL:
                keep = keep_keys
        if REDUCTION == LSE:
            if MASKED:
                x = tl.where(keep, x, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(x, axis=1))
            if MASKED:
                # Rows with only masked entries so far keep a -inf maximum; shift them by 0, not -inf.
                new_max_shift = tl.where(new_max == float("-inf"), 0.0, new_max) * exp2_scale
            else:
                new_max_shift = new_max * exp2_scale
            rescale = tl.exp2(running_max * exp2_scale - new_max_shift)
            terms = tl.exp2(x * exp2_scale - new_max_shift[:, None])
            running_sum = running_sum * rescale + tl.sum(terms, axis=1)
            running_max = new_max
            if WEIGHTED_KEYS:
                if CLIP:
                    terms = tl.where(passes, terms, 0.0)
                if MASKED and not MASK_DIAGONAL:
                    terms = tl.where(keep_keys, terms, 0.0)
                weighted_keys = tl.dot(terms.to(k_block.dtype), k_block, weighted_keys * rescale[:, None])
        else:
            terms, e = _softplus_with_exp(x)
            if MASKED:
                terms = tl.where(keep, terms, 0.0)
            running_sum += tl.sum(terms, axis=1)
            if WEIGHTED_KEYS:
                weights = tl.where(x >= 0.0, 1.0, e) / (1.0 + e)  # σ(x) from softplus's exponential
                if MASKED:
                    weights = tl.where(keep_keys, weights, 0.0)
                weighted_keys = tl.dot(weights.to(k_block.dtype), k_block, weighted_keys)
    return running_max, running_sum, weighted_keys


@triton.jit
def _row_stats_fwd(
    q_ptr, k_ptr,  # (n_rows, dim), (n_cols, dim): statistics are per row of q, k streams past
    scale_ptr,  # () fp32 inverse temperature σ
    out_ptr,  # (n_rows,) fp32 statistic per row
    keys_ptr,  # (n_rows, dim) fp32 weighted keys u, written when WEIGHTED_KEYS
    n_rows, n_cols, dim,
    clip,  # fp32 clamp bound, read when CLIP
    REDUCTION: tl.constexpr, MASK_DIAGONAL: tl.constexpr, CLIP: tl.constexpr, WEIGHTED_KEYS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr)
    q_block = _load_block(q_ptr, offs_m, tl.arange(0, BLOCK_K), n_rows, dim, dim) if SINGLE_K else None
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    weighted_keys = tl.zeros((BLOCK_M, BLOCK_K) if WEIGHTED_KEYS else (BLOCK_M,), dtype=tl.float32)
    # Unmasked tiles get a loop of their own where the ALU work per score is what bounds the
    # kernel: LSE on 16-bit inputs (tensor cores at full rate). Softplus spends a logarithm per
    # score, which dwarfs masking (7 % of its loop); fp32 inputs run the dot at a fraction of that
    # rate. One masked loop keeps their code smaller (and the fp32 variants free of spills).
    if REDUCTION == LSE and q_ptr.dtype.element_ty != tl.float32:
        band = MASK_DIAGONAL or WEIGHTED_KEYS  # tiles holding the diagonal need its mask
        start, stop, gap_at, gap = _column_split(row0, BLOCK_M, BLOCK_N, n_cols, band, False)
        running_max, running_sum, weighted_keys = _fold_columns(
            q_ptr, k_ptr, q_block, offs_m, start, stop, gap_at, gap, n_rows, n_cols, dim, scale, clip, running_max,
            running_sum, weighted_keys, REDUCTION, MASK_DIAGONAL, CLIP, False, WEIGHTED_KEYS,
            BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, INPUT_PRECISION,
        )
        start, stop, gap_at, gap = _column_split(row0, BLOCK_M, BLOCK_N, n_cols, band, True)
    else:
        start, stop, gap_at, gap = 0, n_cols, n_cols, 0
    running_max, running_sum, weighted_keys = _fold_columns(
        q_ptr, k_ptr, q_block, offs_m, start, stop, gap_at, gap, n_rows, n_cols, dim, scale, clip, running_max,
        running_sum, weighted_keys, REDUCTION, MASK_DIAGONAL, CLIP, True, WEIGHTED_KEYS,
        BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, INPUT_PRECISION,
    )
    if REDUCTION == LSE:
        result = running_max * (1.0 if CLIP else scale) + tl.log(running_sum)
    else:
        result = running_sum
    tl.store(out_ptr + offs_m, result, mask=offs_m < n_rows)
    if WEIGHTED_KEYS:
        if REDUCTION == LSE:  # the softmax's normaliser (a row with no entries keeps u = 0)
            weighted_keys = weighted_keys / tl.where(running_sum > 0.0, running_sum, 1.0)[:, None]
        offs_k = tl.arange(0, BLOCK_K)
        pointers = keys_ptr + offs_m.to(tl.int64)[:, None] * dim + offs_k[None, :]
        tl.store(pointers, weighted_keys, mask=(offs_m[:, None] < n_rows) & (offs_k[None, :] < dim))


# ---------------------------------------------------------------------------------------------
# Backward: dq = W k and dk = Wᵀ q with W rebuilt per tile
# ---------------------------------------------------------------------------------------------


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
def _load_stats(ptr, offs, n, USED: tl.constexpr):
    if USED:
        return tl.load(ptr + offs, mask=offs < n, other=0.0)
    return tl.zeros(offs.shape, dtype=tl.float32)


@triton.jit
def _fold_columns_into_dq(
    q_ptr, k_ptr, q_block, scale, accumulator, offs_m, offs_dv, start, stop, gap_at, gap,
    row_stat, row_grad, col_stat_ptr, col_grad_ptr, n_rows, n_cols, dim, clip,
    MODE: tl.constexpr, CLIP: tl.constexpr, COLUMN_STATS: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
    SINGLE_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """accumulator += W k over the column tiles at positions [start, stop) (``gap`` added from
    ``gap_at`` on, see :func:`_column_split`). Where one tile holds the whole feature row
    (SINGLE_K, BLOCK_DV = BLOCK_K), the k tile of the scores is the k tile of the product."""
    for position in range(start, stop, BLOCK_N):
        offs_n = position + tl.where(position >= gap_at, gap, 0) + tl.arange(0, BLOCK_N)
        if SINGLE_K and BLOCK_DV == BLOCK_K:  # one program along D: offs_dv is the tile's columns
            dots, k_values = _tile_scores_and_keys(q_block, k_ptr, offs_n, n_cols, dim, BLOCK_K, INPUT_PRECISION)
        else:
            dots = _score_tile(
                q_ptr, k_ptr, q_block, offs_m, offs_n, n_rows, n_cols, dim,
                BLOCK_M, BLOCK_N, BLOCK_K, SINGLE_K, INPUT_PRECISION,
            )
            k_values = _load_block(k_ptr, offs_n, offs_dv, n_cols, dim, dim)
        col_stat = _load_stats(col_stat_ptr, offs_n, n_cols, COLUMN_STATS)
        col_grad = _load_stats(col_grad_ptr, offs_n, n_cols, COLUMN_STATS)
        w = _weights(
            dots, scale, offs_m, offs_n, n_rows, n_cols, row_stat, row_grad, col_stat, col_grad, clip,
            MODE, CLIP, MASKED,
        )
        accumulator = tl.dot(w.to(k_values.dtype), k_values, accumulator, input_precision=INPUT_PRECISION)
    return accumulator


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
    row0 = tl.program_id(0) * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    scale = tl.load(scale_ptr)
    q_block = _load_block(q_ptr, offs_m, tl.arange(0, BLOCK_K), n_rows, dim, dim) if SINGLE_K else None
    row_stat = _load_stats(row_stat_ptr, offs_m, n_rows, MODE != SOFTPLUS_NEGATIVES)
    row_grad = _load_stats(row_grad_ptr, offs_m, n_rows, True)
    accumulator = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    # 16-bit inputs: the tiles off the diagonal band and inside the matrix in a loop without masks
    # (as in the forward); fp32 keeps one masked loop (smaller code, no spills).
    if q_ptr.dtype.element_ty != tl.float32:
        start, stop, gap_at, gap = _column_split(row0, BLOCK_M, BLOCK_N, n_cols, True, False)
        accumulator = _fold_columns_into_dq(
            q_ptr, k_ptr, q_block, scale, accumulator, offs_m, offs_dv, start, stop, gap_at, gap,
            row_stat, row_grad, col_stat_ptr, col_grad_ptr, n_rows, n_cols, dim, clip,
            MODE, CLIP, COLUMN_STATS, False, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DV, SINGLE_K, INPUT_PRECISION,
        )
        start, stop, gap_at, gap = _column_split(row0, BLOCK_M, BLOCK_N, n_cols, True, True)
    else:
        start, stop, gap_at, gap = 0, n_cols, n_cols, 0
    accumulator = _fold_columns_into_dq(
        q_ptr, k_ptr, q_block, scale, accumulator, offs_m, offs_dv, start, stop, gap_at, gap,
        row_stat, row_grad, col_stat_ptr, col_grad_ptr, n_rows, n_cols, dim, clip,
        MODE, CLIP, COLUMN_STATS, True, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DV, SINGLE_K, INPUT_PRECISION,
    )
    pointers = dq_ptr + offs_m.to(tl.int64)[:, None] * dim + offs_dv[None, :]
    tl.store(pointers, accumulator, mask=(offs_m[:, None] < n_rows) & (offs_dv[None, :] < dim))


@triton.jit
def _fold_rows_into_dk(
    q_ptr, k_ptr, k_block, scale, accumulator, offs_n, offs_dv, start, stop, gap_at, gap,
    row_stat_ptr, row_grad_ptr, col_stat, col_grad, n_rows, n_cols, dim, clip,
    MODE: tl.constexpr, CLIP: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
    SINGLE_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """accumulator += Wᵀ q over the row tiles at positions [start, stop) (``gap`` added from
    ``gap_at`` on); the q tile of the scores serves the product too where it holds the whole
    feature row (SINGLE_K, BLOCK_DV = BLOCK_K)."""
    for position in range(start, stop, BLOCK_M):
        offs_m = position + tl.where(position >= gap_at, gap, 0) + tl.arange(0, BLOCK_M)
        if SINGLE_K:
            q_block = _load_block(q_ptr, offs_m, tl.arange(0, BLOCK_K), n_rows, dim, dim)
            dots = tl.dot(q_block, tl.trans(k_block), input_precision=INPUT_PRECISION)
        else:
            dots = _score_tile(
                q_ptr, k_ptr, None, offs_m, offs_n, n_rows, n_cols, dim,
                BLOCK_M, BLOCK_N, BLOCK_K, False, INPUT_PRECISION,
            )
        row_stat = _load_stats(row_stat_ptr, offs_m, n_rows, MODE != SOFTPLUS_NEGATIVES)
        row_grad = _load_stats(row_grad_ptr, offs_m, n_rows, True)
        w = _weights(
            dots, scale, offs_m, offs_n, n_rows, n_cols, row_stat, row_grad, col_stat, col_grad, clip,
            MODE, CLIP, MASKED,
        )
        if SINGLE_K and BLOCK_DV == BLOCK_K:
            q_values = q_block
        else:
            q_values = _load_block(q_ptr, offs_m, offs_dv, n_rows, dim, dim)
        accumulator = tl.dot(tl.trans(w.to(q_values.dtype)), q_values, accumulator, input_precision=INPUT_PRECISION)
    return accumulator


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
    col0 = tl.program_id(0) * BLOCK_N
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    scale = tl.load(scale_ptr)
    k_block = _load_block(k_ptr, offs_n, tl.arange(0, BLOCK_K), n_cols, dim, dim) if SINGLE_K else None
    col_stat = _load_stats(col_stat_ptr, offs_n, n_cols, COLUMN_STATS)
    col_grad = _load_stats(col_grad_ptr, offs_n, n_cols, COLUMN_STATS)
    accumulator = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    # As in _grad_q_kernel, with the roles of rows and columns swapped: the band is the row tiles
    # that cross this block's columns.
    if q_ptr.dtype.element_ty != tl.float32:
        start, stop, gap_at, gap = _column_split(col0, BLOCK_N, BLOCK_M, n_rows, True, False)
        accumulator = _fold_rows_into_dk(
            q_ptr, k_ptr, k_block, scale, accumulator, offs_n, offs_dv, start, stop, gap_at, gap,
            row_stat_ptr, row_grad_ptr, col_stat, col_grad, n_rows, n_cols, dim, clip,
            MODE, CLIP, False, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DV, SINGLE_K, INPUT_PRECISION,
        )
        start, stop, gap_at, gap = _column_split(col0, BLOCK_N, BLOCK_M, n_rows, True, True)
    else:
        start, stop, gap_at, gap = 0, n_rows, n_rows, 0
    accumulator = _fold_rows_into_dk(
        q_ptr, k_ptr, k_block, scale, accumulator, offs_n, offs_dv, start, stop, gap_at, gap,
        row_stat_ptr, row_grad_ptr, col_stat, col_grad, n_rows, n_cols, dim, clip,
        MODE, CLIP, True, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DV, SINGLE_K, INPUT_PRECISION,
    )
    pointers = dk_ptr + offs_n.to(tl.int64)[:, None] * dim + offs_dv[None, :]
    tl.store(
        pointers,
        (scale * accumulator).to(dk_ptr.dtype.element_ty),
        mask=(offs_n[:, None] < n_cols) & (offs_dv[None, :] < dim),
    )


# fmt: on


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

# The forward with WEIGHTED_KEYS holds a (BLOCK_M, D) accumulator more: it gets candidates of its own.
_RAW = {
    "row_stats_fwd": _row_stats_fwd,
    "row_stats_keys_fwd": _row_stats_fwd,
    "grad_q": _grad_q_kernel,
    "grad_k": _grad_k_kernel,
}


def _prune_for(kernel: str):
    """The autotuner's pruning hook: keep the candidates for this launch's input dtype."""

    def prune(configs, named_args, **kwargs):
        allowed = {tuning.config_key(c) for c in tuning.candidate_configs(kernel, named_args["q_ptr"].dtype)}
        return [c for c in configs if tuning.config_key(c) in allowed]

    return prune


# The autotuner's key: the sizes, plus the tensors' dtypes, which Triton appends itself.
_AUTOTUNED = {
    name: triton.autotune(
        configs=tuning.all_candidates(name), key=["n_rows", "n_cols", "dim"],
        prune_configs_by={"early_config_prune": _prune_for(name)},
    )(kernel)
    for name, kernel in _RAW.items()
}  # fmt: skip


def _launch(kernel: str, grid, *args, dtype: torch.dtype, **constexprs) -> None:
    if tuning.autotune_enabled():
        _AUTOTUNED[kernel][grid](*args, **constexprs)
        return
    config = tuning.default_config(kernel, dtype)
    _RAW[kernel][grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _shape_constants(q: torch.Tensor) -> dict:
    dim, dtype = q.shape[1], q.dtype
    chunk = tuning.block_k(dim, dtype)
    return {"BLOCK_K": chunk, "SINGLE_K": dim <= chunk, "INPUT_PRECISION": tuning.input_precision(dtype)}


def _scale_tensor(scale: torch.Tensor) -> torch.Tensor:
    return scale.reshape(1).float().contiguous()


def keys_fit(dtype: torch.dtype, dim: int) -> bool:
    """Whether the forward can form the weighted keys: 16-bit inputs whose feature rows fit one
    tile (D ≤ 128), where the k tile held for the scores feeds the tensor cores a second time.
    Wider rows would need a (BLOCK_M, D) accumulator past the register file; fp32 operands take
    twice the registers."""
    return dtype in (torch.float16, torch.bfloat16) and dim <= 128


def row_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    *,
    reduction: str,
    mask_diagonal: bool,
    clip: float | None = None,
    weighted_keys: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``"lse"`` or ``"softplus"`` statistic of S = σ q kᵀ (see the module notes), (B,) fp32;
    with ``weighted_keys`` (16-bit inputs, D ≤ 128) also u, (B, D) fp32."""
    q, k = q.contiguous(), k.contiguous()
    n_rows, dim = q.shape
    out = torch.empty(n_rows, device=q.device, dtype=torch.float32)
    if weighted_keys and not keys_fit(q.dtype, dim):
        raise ValueError(f"weighted keys need 16-bit inputs with D <= 128; got {q.dtype}, D = {dim}")
    keys = torch.empty((n_rows, dim) if weighted_keys else (1,), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),)  # noqa: E731
    _launch(
        "row_stats_keys_fwd" if weighted_keys else "row_stats_fwd",
        grid, q, k, _scale_tensor(scale), out, keys, n_rows, k.shape[0], dim, float(clip or 0.0),
        dtype=q.dtype,
        REDUCTION={"lse": 0, "softplus": 1}[reduction], MASK_DIAGONAL=mask_diagonal, CLIP=clip is not None,
        WEIGHTED_KEYS=weighted_keys, **_shape_constants(q),
    )  # fmt: skip
    return (out, keys) if weighted_keys else out


MODES = {"ce_rows": 0, "ce_rows_cols": 1, "lse_negatives": 2, "softplus_negatives": 3}


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

    stats = (stat(row_stat, n_rows), stat(row_grad, n_rows), stat(col_stat, n_cols), stat(col_grad, n_cols))
    dk = torch.empty_like(k)
    sigma = _scale_tensor(scale)
    dv = tuning.block_dv(dim, q.dtype)
    constants = dict(
        MODE=MODES[mode], CLIP=clip is not None, COLUMN_STATS=col_stat is not None, BLOCK_DV=dv, **_shape_constants(q)
    )
    grid_q = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(dim, dv))  # noqa: E731
    grid_k = lambda meta: (triton.cdiv(n_cols, meta["BLOCK_N"]), triton.cdiv(dim, dv))  # noqa: E731
    scalars = (n_rows, n_cols, dim, float(clip or 0.0))
    if weighted_keys is None:
        weighted_keys = torch.empty(q.shape, device=q.device, dtype=torch.float32)  # W k
        _launch("grad_q", grid_q, q, k, sigma, weighted_keys, *stats, *scalars, dtype=q.dtype, **constants)
    _launch("grad_k", grid_k, q, k, sigma, dk, *stats, *scalars, dtype=q.dtype, **constants)
    d_scale = (q.float() * weighted_keys).sum()
    return (weighted_keys * sigma).to(q.dtype), dk, d_scale
