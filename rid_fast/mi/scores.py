r"""A critic's score matrix held as its factors, with the reductions every estimator is made of.

The estimators of :mod:`rid_fast.mi.functional` reduce a B × N score matrix to a few per-row or
per-column statistics — the positives :math:`s_{ii}`, row cross-entropies against the diagonal
(and their column twins), off-diagonal log-sum-exps (optionally of clipped scores), off-diagonal
softplus sums. Each formula is written once, against :class:`FactoredScores`, and runs for

* :class:`SeparableScores` — :math:`S = \sigma q k^\top` (dot, cosine, bilinear critics) through
  the ``rid_fast::<op>`` ops;
* :class:`PairwiseScores` — :math:`s_{ij} = w_2^\top \mathrm{relu}(a_i + c_j) + b_2` (the concat
  critic) through the ``rid_fast::pairwise_<op>`` ops;

neither ever holding the score matrix. Statistics are in the compute dtype (fp32, fp64 for fp64).
"""

from __future__ import annotations

from torch import Tensor

from rid_fast.ops import library, pairwise_streaming
from rid_fast.ops.common import diagonal_scores
from rid_fast.ops.dispatch import wants_grad, weighted_keys_in_forward
from rid_fast.ops.streaming import one_sweep_pays

__all__ = ["FactoredScores", "SeparableScores", "PairwiseScores"]


class FactoredScores:
    """The reductions of a B × N score matrix the estimators need, computed by ``backend``."""

    n_queries: int
    n_keys: int
    backend: str

    def wants_grad(self) -> bool:
        """Whether autograd will need gradients through the scores here."""
        raise NotImplementedError

    def positives(self) -> Tensor:
        r""":math:`s_{ii}`, i < B, differentiable. (B,)"""
        raise NotImplementedError

    def mean_cross_entropy_rows(self) -> Tensor:
        r""":math:`\operatorname{mean}_i [\log\sum_j e^{s_{ij}} - s_{ii}]`. ()"""
        raise NotImplementedError

    def cross_entropy_rows_cols(self) -> tuple[Tensor, Tensor]:
        """The row cross-entropies and their column twins (N = B). (B,), (N,)"""
        raise NotImplementedError

    def lse_negatives(self, clip: float | None = None) -> Tensor:
        r""":math:`\log\sum_{j\ne i} e^{\mathrm{clamp}(s_{ij}, \pm\text{clip})}` (no clamp for None). (B,)"""
        raise NotImplementedError

    def softplus_negatives(self) -> Tensor:
        r""":math:`\sum_{j\ne i}\mathrm{softplus}(s_{ij})`. (B,)"""
        raise NotImplementedError


class SeparableScores(FactoredScores):
    """:math:`S = \\sigma q k^\\top` from q (B, D), k (N, D), σ (): the ``rid_fast::<op>`` ops on
    ``backend`` (``"torch"`` or ``"triton"``)."""

    def __init__(self, q: Tensor, k: Tensor, scale: Tensor, backend: str) -> None:
        self.q, self.k, self.scale, self.backend = q, k, scale, backend
        self.n_queries, self.n_keys = q.shape[0], k.shape[0]

    def wants_grad(self) -> bool:
        return wants_grad(self.q, self.k, self.scale)

    def positives(self) -> Tensor:
        return diagonal_scores(self.q, self.k, self.scale)

    def _row_statistic(self, op, weighted_op, *options) -> Tensor:
        """``op`` — or, when training on the Triton backend where the forward can also form dq's
        weighted keys, the same statistic from ``weighted_op`` (whose backward then sweeps only for dk)."""
        args = (self.q, self.k, self.scale, *options, self.backend)
        if weighted_keys_in_forward(self.q, self.k, self.scale, self.backend):
            return weighted_op(*args)[0]
        return op(*args)

    def mean_cross_entropy_rows(self) -> Tensor:
        if self.backend == "torch" and self.wants_grad() and one_sweep_pays(self.n_queries, self.n_keys, self.q.dtype):
            # Training on the streaming path: the gradients come from the forward's own sweep.
            return library.cross_entropy_rows_mean_with_grad(self.q, self.k, self.scale)[0]
        return self._row_statistic(library.cross_entropy_rows, library.cross_entropy_rows_with_weighted_keys).mean()

    def cross_entropy_rows_cols(self) -> tuple[Tensor, Tensor]:
        return library.cross_entropy_rows_cols(self.q, self.k, self.scale, self.backend)

    def lse_negatives(self, clip: float | None = None) -> Tensor:
        return self._row_statistic(library.lse_negatives, library.lse_negatives_with_weighted_keys, clip)

    def softplus_negatives(self) -> Tensor:
        return self._row_statistic(library.softplus_negatives, library.softplus_negatives_with_weighted_keys)


class PairwiseScores(FactoredScores):
    r""":math:`s_{ij} = w_2^\top\mathrm{relu}(a_i + c_j) + b_2` from a (B, H), c (N, H), w2 (H,), b2 ():
    the ``rid_fast::pairwise_<op>`` ops on ``backend`` (``"torch"``, ``"cpp"`` or ``"triton"``)."""

    def __init__(self, a: Tensor, c: Tensor, w2: Tensor, b2: Tensor, backend: str) -> None:
        self.factors, self.backend = (a, c, w2, b2), backend
        self.n_queries, self.n_keys = a.shape[0], c.shape[0]

    def wants_grad(self) -> bool:
        return wants_grad(*self.factors)

    def positives(self) -> Tensor:
        return pairwise_streaming.positives(*self.factors)

    def mean_cross_entropy_rows(self) -> Tensor:
        return library.pairwise_cross_entropy_rows(*self.factors, self.backend).mean()

    def cross_entropy_rows_cols(self) -> tuple[Tensor, Tensor]:
        return library.pairwise_cross_entropy_rows_cols(*self.factors, self.backend)

    def lse_negatives(self, clip: float | None = None) -> Tensor:
        return library.pairwise_lse_negatives(*self.factors, clip, self.backend)

    def softplus_negatives(self) -> Tensor:
        return library.pairwise_softplus_negatives(*self.factors, self.backend)
