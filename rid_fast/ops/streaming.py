r"""Streaming reductions of a score matrix, in plain PyTorch: the fast CPU path.

Every estimator in :mod:`rid_fast.mi.functional` reduces the score matrix

.. math::
    S = \sigma\, q k^\top,\qquad q \in \mathbb{R}^{B\times D},\; k \in \mathbb{R}^{N\times D},

to per-row or per-column statistics: ``q``, ``k`` are the critic's features (normalised for the
cosine critic) and :math:`\sigma = 1/\tau` the inverse temperature, a 0-dim tensor applied in the
accumulation dtype — never rounded into low-precision inputs. This module computes those
statistics tile by tile, never holding more than one ``block_rows × block_cols`` tile of ``S``:

* forward: each tile is one GEMM into a preallocated buffer followed by a few in-place passes
  while it is still in cache; log-sum-exps are accumulated online (running max and rescaled sum),
  in fp32 (fp64 for fp64 inputs);
* backward: tiles are *recomputed* from ``q``, ``k`` and the saved per-row/column statistics, turned
  in place into the weight tile :math:`W = \partial L / \partial S`, and accumulated as
  :math:`dq \mathrel{+}= \sigma W k_j`, :math:`dk \mathrel{+}= \sigma W^\top q_i` — deterministic, no
  atomics — and :math:`d\sigma = \sum_{ij} W_{ij} (q k^\top)_{ij} = \sum_i q_i \cdot dq_i / \sigma`.

Memory is :math:`O((B+N)\,D + \text{block}^2)`; the matrix multiplications dominate the time.

Training InfoNCE needs the loss and its gradient together, and for its row cross-entropy the two can
share one sweep (:func:`cross_entropy_rows_mean_and_grad`): strips of complete rows of ``S`` (at
most :data:`STRIP_BYTES`) give exact log-sum-exps before the weights are needed, so three matrix
products per tile replace the four of a forward followed by a recomputing backward — where the
strips hold enough rows for that to pay (:func:`one_sweep_pays`).

Two details matter for speed on CPUs, both in :func:`_exp_shifted_`:

* ``exp(t)`` is evaluated as ``exp2(t · log2 e)``: PyTorch's vectorised ``exp2`` is about twice as
  fast as its ``exp``. The shift ``t = s − m`` is formed first, in natural units, so the extra
  rounding touches only the small exponent ``t`` (relative error ``|t|·eps`` on a term of size
  ``e^t``), never the scores themselves;
* exponents are floored at the smallest normal exponent (``2^-126`` in fp32) before ``exp2``:
  results that underflow take a path several times slower, and floored entries contribute at most
  ``1e-38`` against the row maximum's ``e^0 = 1``, far below the resolution of the sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch

from rid_fast.ops.common import LOG2E, compute_dtype, diagonal_scores

__all__ = [
    "DEFAULT_BLOCK",
    "cross_entropy_rows_forward",
    "cross_entropy_rows_backward",
    "cross_entropy_rows_mean_and_grad",
    "one_sweep_pays",
    "cross_entropy_rows_cols_forward",
    "cross_entropy_rows_cols_backward",
    "lse_negatives_forward",
    "lse_negatives_backward",
    "softplus_negatives_forward",
    "softplus_negatives_backward",
    "Tiles",
    "MakeWeights",
    "lse_rows",
    "cross_entropy_rows_cols_statistics",
    "softplus_sums",
    "cross_entropy_rows_weights",
    "cross_entropy_rows_cols_weights",
    "lse_negatives_weights",
    "softplus_negatives_weights",
]

#: A stream of score tiles ``(rows, cols, tile)``, ``tile = S[rows, cols]`` freshly computed (its
#: consumer may overwrite it). The reductions and weight builders below take any such stream, so
#: the pairwise-MLP critic's blocked path (:mod:`rid_fast.ops.pairwise_streaming`) shares them.
Tiles = Iterable[tuple[slice, slice, torch.Tensor]]
#: ``make_weights_(tile, rows, cols)``: turns a tile of S into the tile of W = ∂L/∂S in place.
MakeWeights = Callable[[torch.Tensor, slice, slice], None]


#: Tile shape ``(block_rows, block_cols)`` for 4-byte compute; 8-byte compute halves the columns
#: so a tile keeps the same footprint (1 MiB, about one core's L2). Chosen by
#: ``benchmarks/bench_infonce.py`` on a 2-core Zen 4 machine.
DEFAULT_BLOCK = (1024, 512)


def _block_shape(n_rows: int, n_cols: int, dtype: torch.dtype) -> tuple[int, int]:
    block_rows, block_cols = DEFAULT_BLOCK
    if dtype.itemsize > 4:
        block_cols //= 2
    # At least two columns per tile: with N ≥ 2, every row's first tile then holds an entry that
    # is not the (masked) diagonal, so running maxima are finite after the first tile.
    return min(block_rows, n_rows), min(max(block_cols, 2), n_cols)


def _blocks(n: int, block: int) -> list[slice]:
    return [slice(start, min(start + block, n)) for start in range(0, n, block)]


class _Tiles:
    """Row-major walk over the tiles of ``S = q kᵀ``, each tile computed into one reused buffer.

    Column blocks of ``kᵀ`` and ragged buffer views are built once, not per tile: with ~10
    PyTorch calls per tile, per-call overhead is a visible part of the time.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """``q`` already multiplied by the inverse temperature, both in the compute dtype."""
        self.q = q
        self.buffer = q.new_empty(_block_shape(q.shape[0], k.shape[0], q.dtype))
        block_rows, block_cols = self.buffer.shape
        self.row_blocks = _blocks(q.shape[0], block_rows)
        self.col_blocks = _blocks(k.shape[0], block_cols)
        self.keys_t = [k[cols].T for cols in self.col_blocks]
        self._views: dict[tuple[int, int], torch.Tensor] = {}

    def _view(self, rows: slice, cols: slice) -> torch.Tensor:
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        if shape not in self._views:
            self._views[shape] = self.buffer[: shape[0], : shape[1]]
        return self._views[shape]

    def __iter__(self) -> Iterator[tuple[slice, slice, torch.Tensor]]:
        """Yields ``(rows, cols, tile)`` with ``tile = S[rows, cols]`` freshly computed."""
        for rows in self.row_blocks:
            q_rows = self.q[rows]
            for cols, key_t in zip(self.col_blocks, self.keys_t):
                yield rows, cols, torch.mm(q_rows, key_t, out=self._view(rows, cols))


def _diagonal_of_tile(tile: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor | None:
    """View of the entries ``(i, i)`` of the full matrix that fall in this tile, or None."""
    if rows.start >= cols.stop or cols.start >= rows.stop:
        return None
    return tile.diagonal(offset=rows.start - cols.start)


def _prepare(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(σ·q, k)`` contiguous in the compute dtype: the scale is applied after upcasting."""
    dtype = compute_dtype(q.dtype)
    return (q.to(dtype) * scale.to(dtype)).contiguous(), k.to(dtype).contiguous()


def _exp_shifted_(tile: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """In place: ``tile ← exp(tile − shift)`` (``shift`` broadcasts), see the module notes."""
    floor = math.log2(torch.finfo(tile.dtype).tiny)
    return tile.sub_(shift).mul_(LOG2E).clamp_(min=floor).exp2_()


def _online_lse_update_(tile: torch.Tensor, running_max: torch.Tensor, running_sum: torch.Tensor, dim: int) -> None:
    r"""Fold one tile into a running log-sum-exp along ``dim`` (consumes ``tile``).

    With :math:`m' = \max(m, \max_{\text{dim}} \text{tile})`:
    :math:`l \leftarrow l\,e^{m - m'} + \sum_{\text{dim}} e^{\text{tile} - m'}`, :math:`m \leftarrow m'`.
    ``m'`` is finite: every row's first tile has an unmasked entry (see :func:`_block_shape`).
    """
    tile_max = tile.amax(dim)
    shift = torch.maximum(running_max, tile_max)
    _online_lse_fold_(running_max, running_sum, tile_max, _exp_shifted_(tile, shift.unsqueeze(dim)).sum(dim), shift)


def _finish_lse(running_max: torch.Tensor, running_sum: torch.Tensor) -> torch.Tensor:
    return running_max + running_sum.log()


def _may_share_exponentials(device: torch.device) -> bool:
    """Whether tiles on ``device`` may take the one-exponential branch of the symmetric ops. The
    branch is chosen per tile from a value of the tile, read on the host: free for a CPU tensor,
    but a host–device sync per tile on a GPU. There the per-side branch, exact in every case at
    the cost of one more exponential of the tile, runs unconditionally and no value is read."""
    return device.type == "cpu"


def _one_shift_range(dtype: torch.dtype) -> float:
    r"""How far below a tile's maximum every row's and column's reference may lie for one shared
    exponential of the tile to serve both its rows and its columns. Entries more than
    :math:`|\log \text{tiny}|` below the shared shift are floored (see :func:`_exp_shifted_`); within
    this range (0.7 of that) such entries are below :math:`e^{-0.3|\log\text{tiny}|}` relative to their
    row's or column's reference — under the dtype's resolution."""
    return 0.7 * -math.log(torch.finfo(dtype).tiny)


def _online_lse_fold_(
    running_max: torch.Tensor, running_sum: torch.Tensor, tile_max: torch.Tensor, tile_sum: torch.Tensor, shift
) -> None:
    r"""Fold :math:`\sum e^{t - \text{shift}}` = ``tile_sum`` (with the tile's own maxima
    ``tile_max``) into a running log-sum-exp (running max m, rescaled sum l)."""
    new_max = torch.maximum(running_max, tile_max)
    running_sum.mul_(torch.exp(running_max - new_max)).add_(tile_sum * torch.exp(shift - new_max))
    running_max.copy_(new_max)


def _backprop_tiles(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    make_weights_: Callable[[torch.Tensor, slice, slice], None],
    *,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Gradients of a loss through :math:`S = \sigma q k^\top`, one recomputed tile at a time.

    ``make_weights_(tile, rows, cols)`` turns the tile of ``S`` into the tile of
    :math:`W = \partial L/\partial S` in place. With ``row_scale`` :math:`g` (shape ``(B,)``) the
    weights it builds are divided by :math:`g_i`; the scaling is applied to ``q`` and ``dq`` once
    instead of to every tile.

    Returns :math:`dq = \sigma W k` (B, D) and :math:`dk = \sigma W^\top q` (N, D) in the dtypes of
    ``q``, ``k``, and :math:`d\sigma` (0-dim, compute dtype).
    """
    q_s, k_c = _prepare(q, k, scale)
    q_weighted = q_s if row_scale is None else q_s * row_scale.to(q_s.dtype).unsqueeze(1)
    dq = torch.zeros_like(q_s)  # accumulates W k (unscaled)
    dk = torch.zeros_like(k_c)  # accumulates Wᵀ (σ q)
    tiles = _Tiles(q_s, k_c)
    dk_blocks = {cols.start: (dk[cols], k_c[cols]) for cols in tiles.col_blocks}
    for rows, cols, tile in tiles:
        make_weights_(tile, rows, cols)
        dk_cols, k_cols = dk_blocks[cols.start]
        dq[rows].addmm_(tile, k_cols)
        dk_cols.addmm_(tile.T, q_weighted[rows])
    if row_scale is not None:
        dq.mul_(row_scale.to(dq.dtype).unsqueeze(1))
    # dσ = Σ_ij W_ij (q kᵀ)_ij = Σ_i (σ q_i)·(W k)_i / σ
    d_scale = (q_s * dq).sum() / scale.to(dq.dtype)
    dq.mul_(scale.to(dq.dtype))
    return dq.to(q.dtype), dk.to(k.dtype), d_scale


def lse_rows(tiles: Tiles, like: torch.Tensor, *, mask_diagonal: bool, clip: float | None) -> torch.Tensor:
    """Online row log-sum-exp of the (clamped, diagonal-masked) scores streamed as ``tiles``, one
    per row of ``like`` (B, ·) in its dtype and device. Every row's first tile must hold an entry
    that is not masked (two columns at least, see :func:`_block_shape`)."""
    running_max = like.new_full((like.shape[0],), -math.inf)
    running_sum = like.new_zeros(like.shape[0])
    for rows, cols, tile in tiles:
        if clip is not None:
            tile.clamp_(-clip, clip)
        if mask_diagonal and (diagonal := _diagonal_of_tile(tile, rows, cols)) is not None:
            diagonal.fill_(-math.inf)
        _online_lse_update_(tile, running_max[rows], running_sum[rows], dim=1)
    return _finish_lse(running_max, running_sum)


# --------------------------------------------------------------------------------------------
# Row cross-entropy against the diagonal (InfoNCE)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def cross_entropy_rows_forward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r"""Per-row InfoNCE loss, the cross-entropy of row i against target i:
    :math:`c_i = \log\sum_{j<N} e^{S_{ij}} - S_{ii}`.

    Shapes: q (B, D), k (N, D), N ≥ B, scale () → (B,) in the compute dtype.
    """
    q_s, k_c = _prepare(q, k, scale)
    return lse_rows(_Tiles(q_s, k_c), q_s, mask_diagonal=False, clip=None) - diagonal_scores(q, k, scale)


@torch.no_grad()
def cross_entropy_rows_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, loss: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Gradients of :math:`\sum_i g_i c_i`: :math:`W_{ij} = g_i (P_{ij} - \delta_{ij})` with
    :math:`P = \mathrm{softmax}_j S`. The :math:`-\delta_{ij}` is applied inside the tile, as in a
    cross-entropy backward, so the near-cancellation :math:`P_{ii} - 1` of a confident row happens
    on one number rather than between two accumulated matrix products.
    """
    lse = loss.to(compute_dtype(q.dtype)) + diagonal_scores(q, k, scale)
    return _backprop_tiles(q, k, scale, cross_entropy_rows_weights(lse), row_scale=grad)


def cross_entropy_rows_weights(lse: torch.Tensor) -> MakeWeights:
    r"""The weights of :math:`\sum_i g_i c_i` divided by :math:`g_i`, :math:`P - I`, from the row
    log-sum-exps ``lse`` (B,)."""
    lse = lse.unsqueeze(1)

    def make_weights_(tile: torch.Tensor, rows: slice, cols: slice) -> None:
        _exp_shifted_(tile, lse[rows])
        if (diagonal := _diagonal_of_tile(tile, rows, cols)) is not None:
            diagonal.sub_(1.0)

    return make_weights_


#: Largest score strip (bytes) of :func:`cross_entropy_rows_mean_and_grad`.
STRIP_BYTES = 32 * 2**20


#: Fewest rows per strip for which the one-sweep gradient pays (see :func:`one_sweep_pays`).
MIN_STRIP_ROWS = 256


def _strip_rows(n_rows: int, n_cols: int, dtype: torch.dtype) -> int:
    return max(1, min(n_rows, STRIP_BYTES // (n_cols * dtype.itemsize)))


def one_sweep_pays(n_rows: int, n_cols: int, dtype: torch.dtype) -> bool:
    """Whether :func:`cross_entropy_rows_mean_and_grad` beats a forward plus a recomputing backward
    for q (n_rows, D), k (n_cols, D) of ``dtype``: when a strip holds all rows or at least
    :data:`MIN_STRIP_ROWS` of them. Thinner strips (a few queries against a very long key list)
    make every score product re-read all of k: measured 1.3× slower at 32 rows × 262144 keys, on
    par at 128 rows, 1.1–1.3× faster from 256 rows up (2 cores, fp32, D = 128)."""
    dtype = compute_dtype(dtype)
    return _strip_rows(n_rows, n_cols, dtype) >= min(n_rows, MIN_STRIP_ROWS)


@torch.no_grad()
def cross_entropy_rows_mean_and_grad(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The mean row cross-entropy :math:`L = \frac1B\sum_i c_i` and its gradients, in one sweep.

    Training needs both, and a forward pass followed by a recomputing backward costs four matrix
    products per tile (scores, scores again, :math:`dq`, :math:`dk`). Here each strip of rows
    holds its complete scores (at most :data:`STRIP_BYTES`), so its log-sum-exps are exact before
    the weights :math:`W = (P - I)/B` are needed, and three products suffice: the scores,
    :math:`dq \mathrel{+}= \sigma W k`, :math:`dk \mathrel{+}= \sigma W^\top q`. The softmax
    normaliser :math:`1/Z_i` is folded into the two products' operands rather than written over the
    strip: the strip holds :math:`E_{ij} = e^{S_{ij} - m_i}` with :math:`E_{ii} - Z_i` on the
    diagonal, :math:`= Z_i\,(P - I)_{ij}`.

    Memory :math:`O((B+N)\,D + \text{strip})` with the strip at most ``STRIP_BYTES``.

    Shapes: q (B, D), k (N, D), N ≥ B, scale () → (L (), dq (B, D), dk (N, D), dσ ()), all in the
    compute dtype (the caller scales the gradients by the incoming one before rounding them to the
    inputs' dtypes).
    """
    q_s, k_c = _prepare(q, k, scale)
    n_rows, n_cols = q.shape[0], k.shape[0]
    strip_rows = _strip_rows(n_rows, n_cols, q_s.dtype)
    strip = q_s.new_empty(strip_rows, n_cols)
    dq = torch.empty_like(q_s)  # accumulates W k (unscaled)
    dk = torch.zeros_like(k_c)  # accumulates Wᵀ (σ q)
    lse = q_s.new_empty(n_rows)
    for rows in _blocks(n_rows, strip_rows):
        scores = torch.mm(q_s[rows], k_c.T, out=strip[: rows.stop - rows.start])
        row_max = scores.amax(1, keepdim=True)
        exp = _exp_shifted_(scores, row_max)
        total = exp.sum(1, keepdim=True)  # Z_i
        lse[rows] = (row_max + total.log()).squeeze(1)
        exp[:, rows].diagonal().sub_(total.squeeze(1))  # E − Z·I = Z (P − I)
        inverse_total = total.reciprocal()
        torch.mm(exp, k_c, out=dq[rows]).mul_(inverse_total)
        dk.addmm_(exp.T, q_s[rows] * inverse_total)
    # dσ = Σ_ij W_ij (q kᵀ)_ij = Σ_i (σ q_i)·(W k)_i / σ; everything over B (the mean).
    scale_c = scale.to(dq.dtype)
    d_scale = (q_s * dq).sum() / (scale_c * n_rows)
    dq.mul_(scale_c / n_rows)
    dk.div_(n_rows)
    loss = (lse - diagonal_scores(q, k, scale)).mean()
    return loss, dq, dk, d_scale


# --------------------------------------------------------------------------------------------
# Row and column cross-entropy in one pass (symmetric InfoNCE)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def cross_entropy_rows_cols_forward(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Row and column cross-entropies against the diagonal, sharing each tile's GEMM:
    :math:`c^{r}_i = \log\sum_j e^{S_{ij}} - S_{ii}` and :math:`c^{c}_j = \log\sum_i e^{S_{ij}} - S_{jj}`.

    Shapes: q (B, D), k (B, D), scale () → ((B,), (B,)) in the compute dtype.
    """
    q_s, k_c = _prepare(q, k, scale)
    tiles = _Tiles(q_s, k_c)
    row_lse, col_lse = cross_entropy_rows_cols_statistics(tiles, q_s, k_c, torch.empty_like(tiles.buffer))
    positives = diagonal_scores(q, k, scale)
    return row_lse - positives, col_lse - positives


def cross_entropy_rows_cols_statistics(
    tiles: Tiles, rows_like: torch.Tensor, cols_like: torch.Tensor, spare: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exps of the scores streamed as ``tiles``, one per row of
    ``rows_like`` and per row of ``cols_like``; ``spare`` is a scratch buffer at least as large
    as a tile."""
    n_rows, n_cols = rows_like.shape[0], cols_like.shape[0]
    row_max, row_sum = rows_like.new_full((n_rows,), -math.inf), rows_like.new_zeros(n_rows)
    col_max, col_sum = rows_like.new_full((n_cols,), -math.inf), rows_like.new_zeros(n_cols)
    one_shift_range = _one_shift_range(rows_like.dtype)
    share = _may_share_exponentials(rows_like.device)
    spare = spare.view(-1)
    for rows, cols, tile in tiles:
        tile_row_max, tile_col_max = tile.amax(1), tile.amax(0)
        shift = tile_row_max.max()
        if share and float(shift - torch.minimum(tile_row_max.min(), tile_col_max.min())) <= one_shift_range:
            # One exponential for rows and columns: e^{S − shift}, summed both ways.
            exp = _exp_shifted_(tile, shift)
            _online_lse_fold_(row_max[rows], row_sum[rows], tile_row_max, exp.sum(1), shift)
            _online_lse_fold_(col_max[cols], col_sum[cols], tile_col_max, exp.sum(0), shift)
        else:  # rows or columns far below the tile's maximum: each side its own shift
            tile_copy = spare[: tile.numel()].view(tile.shape).copy_(tile)
            _online_lse_update_(tile, row_max[rows], row_sum[rows], dim=1)
            _online_lse_update_(tile_copy, col_max[cols], col_sum[cols], dim=0)
    return _finish_lse(row_max, row_sum), _finish_lse(col_max, col_sum)


@torch.no_grad()
def cross_entropy_rows_cols_backward(
    grad_rows: torch.Tensor,
    grad_cols: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    loss_rows: torch.Tensor,
    loss_cols: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Gradients of :math:`\sum_i a_i c^r_i + \sum_j b_j c^c_j`:
    :math:`W_{ij} = a_i P_{ij} + b_j Q_{ij} - (a_i + b_i)\delta_{ij}` with :math:`P` the row softmax
    and :math:`Q` the column softmax of :math:`S`.
    """
    dtype = compute_dtype(q.dtype)
    positives = diagonal_scores(q, k, scale)
    spare = q.new_empty(_block_shape(q.shape[0], k.shape[0], dtype), dtype=dtype)
    make_weights_ = cross_entropy_rows_cols_weights(
        grad_rows, grad_cols, loss_rows.to(dtype) + positives, loss_cols.to(dtype) + positives, spare
    )
    return _backprop_tiles(q, k, scale, make_weights_)


def cross_entropy_rows_cols_weights(
    grad_rows: torch.Tensor, grad_cols: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor, spare: torch.Tensor
) -> MakeWeights:
    r"""The weights of :math:`\sum_i a_i c^r_i + \sum_j b_j c^c_j` from the row and column
    log-sum-exps (B,), (N,); ``spare`` is a scratch buffer at least as large as a tile."""
    dtype = row_lse.dtype
    row_shift, col_shift = row_lse.unsqueeze(1), col_lse.unsqueeze(0)
    row_weight = grad_rows.to(dtype).unsqueeze(1)
    col_weight = grad_cols.to(dtype).unsqueeze(0)
    diagonal_weight = row_weight.squeeze(1) + col_weight.squeeze(0)[: row_weight.shape[0]]

    one_shift_range = _one_shift_range(dtype)
    share = _may_share_exponentials(row_lse.device)
    spare = spare.view(-1)

    def make_weights_(tile: torch.Tensor, rows: slice, cols: slice) -> None:
        spare_tile = spare[: tile.numel()].view(tile.shape)
        shift = tile.max() if share else None  # only the one-exponential branch needs it
        if (
            shift is not None
            and float(shift - torch.minimum(row_shift[rows].min(), col_shift[:, cols].min())) <= one_shift_range
        ):
            # W = e^{S − shift} ∘ (a_i e^{shift − lse_i} + b_j e^{shift − lse_j}): one exponential.
            row_factor = row_weight[rows] * torch.exp(shift - row_shift[rows])
            col_factor = col_weight[:, cols] * torch.exp(shift - col_shift[:, cols])
            _exp_shifted_(tile, shift).mul_(torch.add(row_factor, col_factor, out=spare_tile))
        else:  # rows or columns far below the tile's maximum: each side its own shift
            spare_tile.copy_(tile)
            _exp_shifted_(tile, row_shift[rows]).mul_(row_weight[rows])
            _exp_shifted_(spare_tile, col_shift[:, cols]).mul_(col_weight[:, cols])
            tile.add_(spare_tile)
        if (diagonal := _diagonal_of_tile(tile, rows, cols)) is not None:
            first = max(rows.start, cols.start)
            diagonal.sub_(diagonal_weight[first : first + diagonal.numel()])

    return make_weights_


# --------------------------------------------------------------------------------------------
# Log-sum-exp over the negatives j ≠ i, optionally of clipped scores (NWJ, DV, SMILE, MINE)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def lse_negatives_forward(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, clip: float | None = None, diagonal: bool = True
) -> torch.Tensor:
    r"""Row log-sum-exp over the negatives, :math:`\ell_i = \log \sum_{j \ne i} e^{c(S_{ij})}`, with
    :math:`c` the clamp to :math:`[-\text{clip}, \text{clip}]` when ``clip`` is given.

    ``diagonal=False`` says that this block of keys holds no positive (a block of another process's
    keys, :mod:`rid_fast.ops.distributed`): every j is a negative, :math:`\log\sum_j e^{c(S_{ij})}`.

    Shapes: q (B, D), k (N, D), N ≥ 2 (N ≥ 1 without the diagonal), scale () → (B,) in the compute dtype.
    """
    q_s, k_c = _prepare(q, k, scale)
    return lse_rows(_Tiles(q_s, k_c), q_s, mask_diagonal=diagonal, clip=clip)


@torch.no_grad()
def lse_negatives_backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    lse: torch.Tensor,
    clip: float | None = None,
    diagonal: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Gradients of :math:`\sum_i g_i \ell_i`: :math:`W_{ij} = g_i\, e^{c(S_{ij}) - \ell_i}\, c'(S_{ij})`
    for :math:`j \ne i`, zero on the diagonal (every j with ``diagonal=False``). ``lse`` need not be
    this block's own: with the log-sum-exp over every block of keys, W is this block's share of it."""
    make_weights_ = lse_negatives_weights(lse.to(compute_dtype(q.dtype)), clip, diagonal=diagonal)
    return _backprop_tiles(q, k, scale, make_weights_, row_scale=grad)


def lse_negatives_weights(lse: torch.Tensor, clip: float | None, *, diagonal: bool = True) -> MakeWeights:
    r"""The weights of :math:`\sum_i g_i \ell_i` divided by :math:`g_i`, from ``lse`` = ℓ (B,); zero on
    the diagonal unless ``diagonal=False`` (a block of keys without positives)."""
    shift = lse.unsqueeze(1)

    def make_weights_(tile: torch.Tensor, rows: slice, cols: slice) -> None:
        inside = None
        if clip is not None:
            inside = tile.abs() <= clip  # where the clamp passes gradient (ends included, as torch.clamp)
            tile.clamp_(-clip, clip)
        _exp_shifted_(tile, shift[rows])
        if inside is not None:
            tile.mul_(inside)
        if diagonal and (tile_diagonal := _diagonal_of_tile(tile, rows, cols)) is not None:
            tile_diagonal.zero_()

    return make_weights_


# --------------------------------------------------------------------------------------------
# Row sums of softplus over the negatives (JS)
# --------------------------------------------------------------------------------------------


def _softplus_threshold(dtype: torch.dtype) -> float:
    # Above the threshold softplus(x) is returned as x; the error e^-x must stay below resolution.
    return 40.0 if dtype == torch.float64 else 20.0


@torch.no_grad()
def softplus_negatives_forward(
    q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, diagonal: bool = True
) -> torch.Tensor:
    r""":math:`\sigma_i = \sum_{j \ne i} \mathrm{softplus}(S_{ij})` (every j with ``diagonal=False``,
    as :func:`lse_negatives_forward`).

    Shapes: q (B, D), k (N, D), N ≥ 2, scale () → (B,) in the compute dtype.
    """
    q_s, k_c = _prepare(q, k, scale)
    tiles = _Tiles(q_s, k_c)
    return softplus_sums(tiles, q_s, torch.empty_like(tiles.buffer), diagonal=diagonal)


def softplus_sums(tiles: Tiles, like: torch.Tensor, spare: torch.Tensor, *, diagonal: bool = True) -> torch.Tensor:
    """Off-diagonal row sums of softplus of the scores streamed as ``tiles`` (every entry with
    ``diagonal=False``), one per row of ``like``; ``spare`` is a scratch buffer at least as large as
    a tile."""
    sums = like.new_zeros(like.shape[0])
    spare = spare.view(-1)
    for rows, cols, tile in tiles:
        if diagonal and (tile_diagonal := _diagonal_of_tile(tile, rows, cols)) is not None:
            tile_diagonal.fill_(-math.inf)  # softplus(-inf) = 0
        softplus = spare[: tile.numel()].view(tile.shape)
        torch.ops.aten.softplus.out(tile, 1.0, _softplus_threshold(tile.dtype), out=softplus)
        sums[rows] += softplus.sum(1)
    return sums


@torch.no_grad()
def softplus_negatives_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, diagonal: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Gradients of :math:`\sum_i g_i \sigma_i`: :math:`W_{ij} = g_i\,\mathrm{sigmoid}(S_{ij})`, j ≠ i
    (every j with ``diagonal=False``)."""
    return _backprop_tiles(q, k, scale, softplus_negatives_weights(diagonal=diagonal), row_scale=grad)


def softplus_negatives_weights(*, diagonal: bool = True) -> MakeWeights:
    """The weights of the softplus sums divided by the rows' incoming gradients: sigmoid, zero on the
    diagonal unless ``diagonal=False``."""

    def make_weights_(tile: torch.Tensor, rows: slice, cols: slice) -> None:
        tile.sigmoid_()
        if diagonal and (tile_diagonal := _diagonal_of_tile(tile, rows, cols)) is not None:
            tile_diagonal.zero_()

    return make_weights_
