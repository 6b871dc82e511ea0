r"""What the forward and backward kernels share: the constant table, tile loads, score tiles, and
the one loop driver that sweeps a program's tiles.

The kernels tile the score matrix :math:`S = \sigma q k^\top` (q (B, D) rows, k (N, D) columns)
like FlashAttention and never store it: a program owns a block of rows (or, in the dk kernel, of
columns) and sweeps the tiles of the other dimension past it, forming one ``BLOCK_M × BLOCK_N``
tile of dot products at a time with ``tl.dot`` (fp32 accumulation, the feature dimension in
``BLOCK_K`` chunks; ``SINGLE_K`` when one chunk holds the whole feature row).

:func:`_sweep` is the loop driver of all three kernels. A tile needs masks only where it holds
entries outside the matrix (the ragged last tile) or, when the diagonal is treated apart, entries
of the diagonal (the *band* of tiles that cross the program's block). Where the ALU work per score
is what bounds a loop, the driver sweeps the other tiles first in a loop compiled without the
comparisons and selects (``MASKED=False``), then the band and the ragged tile (``MASKED=True``);
the per-tile work is the kernel's ``fold_tile`` function, passed to the driver as a compile-time
argument, so that the driver is written once and ``MASKED`` selects the code, as FlashAttention's
``EVEN_M``/``EVEN_N`` flags do.

GPU rules, checked with ``tl.static_assert`` where they can be (:func:`_assert_block`) and kept
under the interpreter too: power-of-two blocks ≥ 16, every load masked for ragged B, N, D, no
Python control flow on tensor values.

Where these kernels have run: compiled ahead of time for sm_90 and sm_80 (``kernels/aot.py``,
``tests/test_kernels_aot.py``) and run under the Triton interpreter on CPUs; never on a GPU — no
GPU number has been measured yet.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rid_fast.ops.common import LOG2E as _LOG2E

# ---------------------------------------------------------------------------------------------
# The constant table: the kernels' compile-time codes, named once for the kernels (tl.constexpr)
# and the launchers (the dicts, keyed by the launchers' strings).
# ---------------------------------------------------------------------------------------------

#: The forward's REDUCTION: a row's log-sum-exp, or its sum of softplus.
REDUCTIONS = {"lse": 0, "softplus": 1}
#: The backward's MODE: which loss's weights W = ∂L/∂S the kernels rebuild (see kernels.backward).
MODES = {"ce_rows": 0, "ce_rows_cols": 1, "lse_negatives": 2, "softplus_negatives": 3}

LSE = tl.constexpr(REDUCTIONS["lse"])
SOFTPLUS = tl.constexpr(REDUCTIONS["softplus"])

CE_ROWS = tl.constexpr(MODES["ce_rows"])
CE_ROWS_COLS = tl.constexpr(MODES["ce_rows_cols"])
LSE_NEGATIVES = tl.constexpr(MODES["lse_negatives"])
SOFTPLUS_NEGATIVES = tl.constexpr(MODES["softplus_negatives"])

#: log₂ e, the same value as the streaming path's (rid_fast.ops.common): exponentials are exp2.
LOG2E = tl.constexpr(_LOG2E)


# fmt: off
@triton.jit
def _assert_block(BLOCK: tl.constexpr):
    """A block size every kernel relies on: a power of two (tl.arange and the tiled layouts need
    it), at least 16 (tl.dot's smallest operand)."""
    tl.static_assert(BLOCK >= 16 and (BLOCK & (BLOCK - 1)) == 0, "blocks must be powers of two >= 16")


@triton.jit
def _load_block(ptr, offs_rows, offs_cols, n_rows, n_cols, row_stride):
    """A (rows, cols) block of a row-major matrix, zero outside it."""
    pointers = ptr + offs_rows.to(tl.int64)[:, None] * row_stride + offs_cols[None, :]
    mask = (offs_rows[:, None] < n_rows) & (offs_cols[None, :] < n_cols)
    return tl.load(pointers, mask=mask, other=0.0)


@triton.jit
def _load_stats(ptr, offs, n, USED: tl.constexpr):
    """A per-row or per-column fp32 statistic at ``offs`` (zero outside [0, n)); zeros if not USED."""
    if USED:
        return tl.load(ptr + offs, mask=offs < n, other=0.0)
    return tl.zeros(offs.shape, dtype=tl.float32)


@triton.jit
def _tile_scores_and_keys(q_block, k_ptr, offs_n, n_cols, dim, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(fp32 q·k of the preloaded q tile against the k rows ``offs_n``, that k tile), when one
    tile holds the whole feature row: the k tile can feed a second product."""
    k_block = _load_block(k_ptr, offs_n, tl.arange(0, BLOCK_K), n_cols, dim, dim)
    return tl.dot(q_block, tl.trans(k_block), input_precision=INPUT_PRECISION), k_block


@triton.jit
def _score_tile(
    q_ptr, k_ptr, q_block, offs_m, offs_n, n_rows, n_cols, dim,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """fp32 q·k for rows ``offs_m`` and columns ``offs_n`` (BLOCK_M, BLOCK_N); ``q_block`` is the
    preloaded q tile when SINGLE_K, else the feature dimension is summed in BLOCK_K chunks."""
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


# ---------------------------------------------------------------------------------------------
# The loop driver
# ---------------------------------------------------------------------------------------------


@triton.jit
def _sweep_range(
    block0, n_swept, OWN_BLOCK: tl.constexpr, SWEPT_BLOCK: tl.constexpr, BAND: tl.constexpr, MASKED: tl.constexpr,
):
    """The swept tiles of one of the driver's two loops, for the program that owns positions
    [block0, block0 + OWN_BLOCK) of the other dimension: those that need no masking, or (MASKED)
    those that do — with BAND the tiles holding the block's diagonal [band_lo, band_hi), then the
    ragged last tile. A loop runs over positions [start, stop) with ``gap`` added from ``gap_at``
    on; returns (start, stop, gap_at, gap). Two loops rather than one per range: less code and
    fewer registers held by pipelining (computed per loop for the same reason: fewer values live
    across the first)."""
    full = (n_swept // SWEPT_BLOCK) * SWEPT_BLOCK
    band_lo = full
    band_hi = full
    if BAND:
        band_lo = tl.minimum((block0 // SWEPT_BLOCK) * SWEPT_BLOCK, full)
        band_hi = tl.minimum(tl.cdiv(block0 + OWN_BLOCK, SWEPT_BLOCK) * SWEPT_BLOCK, full)
    if MASKED:  # the band, then (if n_swept > full) position band_hi, moved to the tile at full
        return band_lo, band_hi + n_swept - full, band_hi, full - band_hi
    return 0, full - (band_hi - band_lo), band_lo, band_hi - band_lo


@triton.jit
def _fold_range(
    fold_tile: tl.constexpr, state, held, CONSTANTS: tl.constexpr, start, stop, gap_at, gap,
    SWEPT_BLOCK: tl.constexpr, MASKED: tl.constexpr,
):
    """``state = fold_tile(state, offs, held, CONSTANTS, MASKED)`` for the tiles at positions
    [start, stop), ``gap`` added to the positions from ``gap_at`` on (see :func:`_sweep_range`)."""
    for position in range(start, stop, SWEPT_BLOCK):
        offs = position + tl.where(position >= gap_at, gap, 0) + tl.arange(0, SWEPT_BLOCK)
        state = fold_tile(state, offs, held, CONSTANTS, MASKED)
    return state


@triton.jit
def _sweep(
    fold_tile: tl.constexpr,  # @triton.jit (state, offs, held, CONSTANTS, MASKED) -> state: one tile's work
    state,  # what the sweep accumulates (a tensor or a tuple of tensors), returned updated
    held,  # a NamedTuple of what the program holds across the sweep (pointers, its own tiles, sizes)
    CONSTANTS: tl.constexpr,  # a NamedTuple of the kernel's compile-time constants, passed to fold_tile
    block0,  # first position of the program's own block (rows for dq and the forward, columns for dk)
    n_swept,  # extent of the swept dimension
    OWN_BLOCK: tl.constexpr, SWEPT_BLOCK: tl.constexpr,
    BAND: tl.constexpr,  # whether the tiles crossing the block's diagonal need the mask
    SPLIT: tl.constexpr,  # whether the tiles that need no mask get a loop without it
):
    """Fold every swept tile into ``state``. With SPLIT, two loops: the tiles that need no mask
    (``fold_tile`` compiled with MASKED=False), then the band and the ragged tile (MASKED=True);
    without it, one masked loop over every tile (smaller code, where masking is not what bounds
    the loop)."""
    if SPLIT:
        start, stop, gap_at, gap = _sweep_range(block0, n_swept, OWN_BLOCK, SWEPT_BLOCK, BAND, MASKED=False)
        state = _fold_range(fold_tile, state, held, CONSTANTS, start, stop, gap_at, gap, SWEPT_BLOCK, MASKED=False)
        start, stop, gap_at, gap = _sweep_range(block0, n_swept, OWN_BLOCK, SWEPT_BLOCK, BAND, MASKED=True)
    else:
        start, stop, gap_at, gap = 0, n_swept, n_swept, 0
    return _fold_range(fold_tile, state, held, CONSTANTS, start, stop, gap_at, gap, SWEPT_BLOCK, MASKED=True)


# fmt: on
