r"""The pairwise-MLP critic's reductions in blocked PyTorch: the ``"torch"`` backend on any device.

The concat critic scores every pair through one hidden layer,

.. math::
    s_{ij} = \sum_h w_{2,h}\,\mathrm{relu}(a_{ih} + c_{jh}) + b_2,
    \qquad a = A x + b_1 \in \mathbb{R}^{B\times H},\; c = C y \in \mathbb{R}^{N\times H}

(definitions in :mod:`rid_fast.ops.pairwise_reference`). This module streams the scores as tiles
of ``rows × cols`` pairs whose hidden layer, ``rows × cols × H``, holds at most
:data:`BLOCK_ELEMENTS` numbers, and feeds them to the same tile reductions and weight builders as
the separable critics' streaming path (:mod:`rid_fast.ops.streaming`): online log-sum-exps in the
compute dtype, weights :math:`W = \partial L/\partial s` formed from the recomputed tiles and the
saved statistics in the backward, then

.. math::
    da_i \mathrel{+}= w_2 \odot \sum_j W_{ij} [a_i + c_j > 0],\quad
    dc_j \mathrel{+}= w_2 \odot \sum_i W_{ij} [a_i + c_j > 0],\quad
    dw_2 \mathrel{+}= \sum_{ij} W_{ij}\,\mathrm{relu}(a_i + c_j),\quad db_2 \mathrel{+}= \sum_{ij} W_{ij}.

Memory O((B + N)·H + BLOCK_ELEMENTS): neither the B × N scores nor the B × N × H hidden layer.
Elementwise PyTorch over the hidden block, so memory-bound; the C++ kernel
(:mod:`rid_fast.ops.pairwise_cpp`) is the fast CPU path, this one the fallback without a compiler.

Every pairwise backend (this one, the C++ kernel, the Triton kernels ``rid_fast.kernels.pairwise``)
exposes these functions with this contract: inputs a (B, H), c (N, H), w2 (H,), b2 () of one dtype
and device; statistics (B,) or (N,) in the compute dtype (fp32, fp64 for fp64 inputs); gradients
``(da, dc, dw2, db2)`` in the inputs' dtype; the positives are the pairs (i, i), i < B ≤ N.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rid_fast.ops import streaming
from rid_fast.ops.common import compute_dtype, pairwise_diagonal_scores

__all__ = [
    "BLOCK_ELEMENTS",
    "positives",
    "cross_entropy_rows_forward",
    "cross_entropy_rows_backward",
    "cross_entropy_rows_cols_forward",
    "cross_entropy_rows_cols_backward",
    "lse_negatives_forward",
    "lse_negatives_backward",
    "softplus_negatives_forward",
    "softplus_negatives_backward",
]

#: Most elements of one ``rows × cols × H`` block of the hidden layer (16 MiB in fp32).
BLOCK_ELEMENTS = 1 << 22


#: The positives s_ii (shared with the other backends).
positives = pairwise_diagonal_scores


class _PairwiseTiles:
    """Row-major walk over tiles of the scores s (as :class:`rid_fast.ops.streaming.Tiles`), each
    computed through a reused hidden block; :meth:`backprop` turns weight tiles into gradients."""

    def __init__(self, a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> None:
        dtype = compute_dtype(a.dtype)
        self.a, self.c, self.w2, self.b2 = (t.to(dtype).contiguous() for t in (a, c, w2, b2))
        n_rows, n_cols, hidden = a.shape[0], c.shape[0], a.shape[1]
        # At least two columns per tile (when N ≥ 2): every row's first tile then holds an entry
        # off the diagonal, as the online log-sum-exps need.
        block_cols = min(n_cols, max(2, BLOCK_ELEMENTS // hidden))
        block_rows = min(n_rows, max(1, BLOCK_ELEMENTS // (block_cols * hidden)))
        self.row_blocks = [slice(i, min(i + block_rows, n_rows)) for i in range(0, n_rows, block_rows)]
        self.col_blocks = [slice(j, min(j + block_cols, n_cols)) for j in range(0, n_cols, block_cols)]
        self.hidden = self.a.new_empty(block_rows * block_cols * hidden)
        self.scores = self.a.new_empty(block_rows * block_cols)

    def tile_buffer(self) -> torch.Tensor:
        """A scratch buffer the size of the largest tile (for the reductions that need one)."""
        return torch.empty_like(self.scores)

    def _hidden(self, rows: slice, cols: slice) -> torch.Tensor:
        """relu(a_i + c_j) for the tile's pairs, (rows, cols, H), in the reused block."""
        shape = (rows.stop - rows.start, cols.stop - cols.start, self.a.shape[1])
        block = self.hidden[: shape[0] * shape[1] * shape[2]].view(shape)
        return torch.add(self.a[rows, None, :], self.c[None, cols, :], out=block).relu_()

    def __iter__(self) -> Iterator[tuple[slice, slice, torch.Tensor]]:
        for rows in self.row_blocks:
            for cols in self.col_blocks:
                hidden = self._hidden(rows, cols)
                tile = self.scores[: hidden.shape[0] * hidden.shape[1]]
                torch.mv(hidden.view(-1, hidden.shape[2]), self.w2, out=tile)
                yield rows, cols, tile.view(hidden.shape[:2]).add_(self.b2)

    def backprop(
        self, make_weights_: streaming.MakeWeights, row_scale: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients (da, dc, dw2, db2) in the compute dtype of Σ W_ij s_ij, with the tiles of W
        from ``make_weights_`` (times ``row_scale`` (B,) per row when given), recomputed tile by tile."""
        da, dc = torch.zeros_like(self.a), torch.zeros_like(self.c)
        dw2, db2 = torch.zeros_like(self.w2), torch.zeros_like(self.b2)
        scale = None if row_scale is None else row_scale.to(self.a.dtype).unsqueeze(1)
        for rows, cols, tile in self:
            make_weights_(tile, rows, cols)
            if scale is not None:
                tile.mul_(scale[rows])
            hidden = self._hidden(rows, cols)  # recomputed: the scores' pass overwrote nothing of it
            dw2.add_(hidden.view(-1, hidden.shape[2]).T @ tile.reshape(-1))
            db2.add_(tile.sum())
            # ∂s_ij/∂(a_i + c_j) = w2 ∘ [a_i + c_j > 0]; w2 is applied once at the end.
            active = hidden.sign_().mul_(tile.unsqueeze(2))  # W_ij [a_i + c_j > 0], (rows, cols, H)
            da[rows] += active.sum(1)
            dc[cols] += active.sum(0)
        return da.mul_(self.w2), dc.mul_(self.w2), dw2, db2


def _gradients(grads, a, c, w2, b2):
    return tuple(g.to(t.dtype) for g, t in zip(grads, (a, c, w2, b2)))


@torch.no_grad()
def cross_entropy_rows_forward(a, c, w2, b2) -> torch.Tensor:
    r""":math:`\log\sum_j e^{s_{ij}} - s_{ii}`. a (B, H), c (N, H), N ≥ B → (B,)"""
    tiles = _PairwiseTiles(a, c, w2, b2)
    return streaming.lse_rows(tiles, tiles.a, mask_diagonal=False, clip=None) - positives(a, c, w2, b2)


@torch.no_grad()
def cross_entropy_rows_backward(grad, a, c, w2, b2, loss):
    r"""Gradients of :math:`\sum_i g_i c_i`: W = g (P − I), P the row softmax."""
    lse = loss.to(compute_dtype(a.dtype)) + positives(a, c, w2, b2)
    tiles = _PairwiseTiles(a, c, w2, b2)
    return _gradients(tiles.backprop(streaming.cross_entropy_rows_weights(lse), row_scale=grad), a, c, w2, b2)


@torch.no_grad()
def cross_entropy_rows_cols_forward(a, c, w2, b2) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Row and column cross-entropies against the diagonal. a (B, H), c (B, H) → (B,), (B,)"""
    tiles = _PairwiseTiles(a, c, w2, b2)
    row_lse, col_lse = streaming.cross_entropy_rows_cols_statistics(tiles, tiles.a, tiles.c, tiles.tile_buffer())
    diagonal = positives(a, c, w2, b2)
    return row_lse - diagonal, col_lse - diagonal


@torch.no_grad()
def cross_entropy_rows_cols_backward(grad_rows, grad_cols, a, c, w2, b2, loss_rows, loss_cols):
    r"""Gradients of :math:`\sum_i g_i c^r_i + \sum_j g'_j c^c_j`."""
    dtype = compute_dtype(a.dtype)
    diagonal = positives(a, c, w2, b2)
    tiles = _PairwiseTiles(a, c, w2, b2)
    make_weights_ = streaming.cross_entropy_rows_cols_weights(
        grad_rows, grad_cols, loss_rows.to(dtype) + diagonal, loss_cols.to(dtype) + diagonal, tiles.tile_buffer()
    )
    return _gradients(tiles.backprop(make_weights_), a, c, w2, b2)


@torch.no_grad()
def lse_negatives_forward(a, c, w2, b2, clip: float | None = None) -> torch.Tensor:
    r""":math:`\log\sum_{j\ne i} e^{\mathrm{clamp}(s_{ij}, \pm\text{clip})}` (N ≥ 2). (B,)"""
    tiles = _PairwiseTiles(a, c, w2, b2)
    return streaming.lse_rows(tiles, tiles.a, mask_diagonal=True, clip=clip)


@torch.no_grad()
def lse_negatives_backward(grad, a, c, w2, b2, lse, clip: float | None = None):
    r"""Gradients of :math:`\sum_i g_i \ell_i`: W_ij = g_i e^{clamp(s_ij) − ℓ_i} [|s_ij| ≤ clip], j ≠ i."""
    tiles = _PairwiseTiles(a, c, w2, b2)
    make_weights_ = streaming.lse_negatives_weights(lse.to(compute_dtype(a.dtype)), clip)
    return _gradients(tiles.backprop(make_weights_, row_scale=grad), a, c, w2, b2)


@torch.no_grad()
def softplus_negatives_forward(a, c, w2, b2) -> torch.Tensor:
    r""":math:`\sum_{j\ne i}\mathrm{softplus}(s_{ij})` (N ≥ 2). (B,)"""
    tiles = _PairwiseTiles(a, c, w2, b2)
    return streaming.softplus_sums(tiles, tiles.a, tiles.tile_buffer())


@torch.no_grad()
def softplus_negatives_backward(grad, a, c, w2, b2):
    r"""Gradients of :math:`\sum_i g_i \sigma_i`: W_ij = g_i sigmoid(s_ij), j ≠ i."""
    tiles = _PairwiseTiles(a, c, w2, b2)
    return _gradients(tiles.backprop(streaming.softplus_negatives_weights(), row_scale=grad), a, c, w2, b2)
