r"""Plain-PyTorch oracle of the pairwise-MLP critic's reductions: build every score, then reduce.

The concat critic scores every pair through one hidden layer,

.. math::
    s_{ij} = \sum_h w_{2,h}\, \mathrm{relu}(a_{ih} + c_{jh}) + b_2,
    \qquad a = A x + b_1 \in \mathbb{R}^{B\times H},\; c = C y \in \mathbb{R}^{N\times H},

which is not a matrix product: the fused paths compute the same reductions as the separable
critics' ops (:mod:`rid_fast.ops.streaming`: same names, same meaning, diagonal = positives
:math:`(i, i)` for :math:`i < B`) from ``a``, ``c``, ``w2`` (H,) and ``b2`` () without holding the
``B × N`` scores or the ``B × N × H`` hidden layer. These functions hold both on purpose: they are
the definitions the fast paths are tested against (values by evaluation, gradients by autograd).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "pairwise_scores",
    "positives",
    "cross_entropy_rows",
    "cross_entropy_rows_cols",
    "lse_negatives",
    "softplus_negatives",
]


def pairwise_scores(a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    r""":math:`s_{ij} = w_2 \cdot \mathrm{relu}(a_i + c_j) + b_2`. a (B, H), c (N, H), w2 (H,), b2 () → (B, N)."""
    return torch.relu(a[:, None, :] + c[None, :, :]) @ w2 + b2


def positives(a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    r""":math:`s_{ii}` for i < B, in O(B·H). (B,)"""
    return torch.relu(a + c[: a.shape[0]]) @ w2 + b2


def _diagonal_masked(scores: torch.Tensor) -> torch.Tensor:
    n_rows = scores.shape[0]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[:, :n_rows].fill_diagonal_(True)
    return scores.masked_fill(mask, -math.inf)


def cross_entropy_rows(a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    r""":math:`\log\sum_j e^{s_{ij}} - s_{ii}` (N ≥ B). (B,)"""
    scores = pairwise_scores(a, c, w2, b2)
    return torch.logsumexp(scores, 1) - scores[:, : a.shape[0]].diagonal()


def cross_entropy_rows_cols(
    a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The rows' cross-entropy and its column twin :math:`\log\sum_i e^{s_{ij}} - s_{jj}` (N = B). (B,), (N,)"""
    scores = pairwise_scores(a, c, w2, b2)
    diagonal = scores.diagonal()
    return torch.logsumexp(scores, 1) - diagonal, torch.logsumexp(scores, 0) - diagonal


def lse_negatives(
    a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, clip: float | None = None
) -> torch.Tensor:
    r""":math:`\log\sum_{j\ne i} e^{\mathrm{clamp}(s_{ij}, -\text{clip}, \text{clip})}` (no clamp when
    ``clip`` is None; N ≥ 2). (B,)"""
    scores = pairwise_scores(a, c, w2, b2)
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return torch.logsumexp(_diagonal_masked(scores), 1)


def softplus_negatives(a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_{j\ne i}\mathrm{softplus}(s_{ij})` (N ≥ 2). (B,)"""
    return F.softplus(_diagonal_masked(pairwise_scores(a, c, w2, b2))).sum(1)
