r"""The reductions of the score matrix every estimator is written in, over this process's batch or
over the global batch of a process group.

An estimator (:mod:`rid_fast.mi.functional`) needs, per row i of :math:`S = \sigma q k^\top`, a few
statistics over the keys — the row cross-entropy against the positive, the log-sum-exp or softplus
sum over the negatives, the positive score itself — and then means and log-sum-exps of those over
the rows. :class:`ScoreReductions` computes them for one process's batch; its subclasses compute
the same quantities for the *global* batch, the rank-ordered concatenation of every process's rows
(:mod:`rid_fast.ops.distributed` for the collectives), with this process's rows only:

* :class:`GatheredReductions` (``gather="all_gather"``) — every process's keys gathered with
  autograd, this process's first, so the positives stay on the diagonal and the single-process
  ops run unchanged: this process's rows against all Σ_p B_p keys. Memory O(W·B·D).
* :class:`RingReductions` (``gather="ring"``) — the key blocks travel around the ring and each
  row's statistic is folded block by block (:func:`rid_fast.ops.distributed.ring_row_statistic`).
  Memory O(B·D) whatever W.

The means and log-sum-exps over rows (:meth:`ScoreReductions.mean`,
:meth:`ScoreReductions.logsumexp`) are sums over processes (all-reduces of one number), so every
process returns the same value, and gradients follow DDP's convention (see
:mod:`rid_fast.ops.distributed`).

Symmetric InfoNCE's column statistics (key j against every global row) are row statistics of
:math:`S^\top`: the all-gather mode gathers the rows q too; the ring makes a second pass, in which
the blocks of q travel past this process's keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rid_fast.ops import library, pairwise_streaming
from rid_fast.ops.common import diagonal_scores
from rid_fast.ops.dispatch import wants_grad, weighted_keys_in_forward
from rid_fast.ops.distributed import all_reduce_max, all_reduce_sum, gather_rows, group_world, ring_row_statistic
from rid_fast.ops.streaming import one_sweep_pays

__all__ = ["ScoreReductions", "PairwiseReductions", "GatheredReductions", "RingReductions", "score_reductions"]


def _row_statistic(op: Callable, weighted_op: Callable, q: Tensor, k: Tensor, scale: Tensor, *args) -> Tensor:
    """``op(q, k, scale, *args)`` — or, when training on the Triton backend where the forward can
    also form dq's weighted keys, the same statistic from ``weighted_op`` (whose backward then
    sweeps only for dk). ``args`` end with the backend."""
    if weighted_keys_in_forward(q, k, scale, args[-1]):
        return weighted_op(q, k, scale, *args)[0]
    return op(q, k, scale, *args)


class ScoreReductions:
    r"""Reductions of :math:`S = \sigma q k^\top` for one process: q (B, D), k (N, D), N ≥ B, the
    positives on the diagonal :math:`(i, i)`, ``backend`` ``"torch"`` or ``"triton"``.

    Per-row statistics are (B,) in the compute dtype (fp32, fp64 for fp64 inputs); ``n_rows`` and
    ``n_keys`` count the rows and keys of the batch the estimate is over.
    """

    def __init__(self, q: Tensor, k: Tensor, scale: Tensor, backend: str) -> None:
        self.q, self.k, self.scale, self.backend = q, k, scale, backend
        self.n_rows, self.n_keys = q.shape[0], k.shape[0]

    def wants_grad(self) -> bool:
        """Whether autograd will need gradients through the scores here."""
        return wants_grad(self.q, self.k, self.scale)

    # ---- per-row statistics of this process's rows ----

    def positives(self) -> Tensor:
        r""":math:`s_{ii}` (B,)."""
        return diagonal_scores(self.q, self.k, self.scale)

    def cross_entropy_rows(self) -> Tensor:
        r""":math:`c_i = \log\sum_j e^{S_{ij}} - S_{ii}` (B,)."""
        return _row_statistic(
            library.cross_entropy_rows,
            library.cross_entropy_rows_with_weighted_keys,
            self.q,
            self.k,
            self.scale,
            self.backend,
        )

    def cross_entropy_rows_cols(self) -> tuple[Tensor, Tensor]:
        r"""(:math:`c^r_i`, :math:`c^c_j = \log\sum_i e^{S_{ij}} - S_{jj}`), N = B: this process's rows
        and its keys (columns)."""
        return library.cross_entropy_rows_cols(self.q, self.k, self.scale, self.backend)

    def lse_negatives(self, clip: float | None = None) -> Tensor:
        r""":math:`\ell_i = \log\sum_{j\ne i} e^{c(S_{ij})}` (B,), c the clamp to ±clip if given."""
        return _row_statistic(
            library.lse_negatives,
            library.lse_negatives_with_weighted_keys,
            self.q,
            self.k,
            self.scale,
            clip,
            self.backend,
        )

    def softplus_negatives(self) -> Tensor:
        r""":math:`\sum_{j\ne i}\mathrm{softplus}(S_{ij})` (B,)."""
        return _row_statistic(
            library.softplus_negatives,
            library.softplus_negatives_with_weighted_keys,
            self.q,
            self.k,
            self.scale,
            self.backend,
        )

    # ---- reductions over the rows of the batch ----

    def mean(self, rows: Tensor) -> Tensor:
        """The mean over every row of the batch of a per-row statistic (B,)."""
        return rows.mean()

    def sum(self, rows: Tensor) -> Tensor:
        """The sum over every row of the batch of a per-row statistic (B,)."""
        return rows.sum()

    def logsumexp(self, rows: Tensor) -> Tensor:
        """log Σ exp over every row of the batch of a per-row statistic (B,)."""
        return torch.logsumexp(rows, dim=0)

    #: Whether :meth:`mean_cross_entropy_rows` may take the streaming path's one-sweep op, which
    #: reduces this process's own q and k (not the subclasses' pairwise factors or global batch).
    one_sweep_mean = True

    def mean_cross_entropy_rows(self) -> Tensor:
        """The mean of :meth:`cross_entropy_rows`; when training on the streaming path where it pays,
        with the gradients computed in the forward's own sweep
        (:func:`rid_fast.ops.streaming.cross_entropy_rows_mean_and_grad`)."""
        if self.one_sweep_mean and self.backend == "torch" and self.wants_grad():
            q, k, scale = self.q, self.k, self.scale
            if one_sweep_pays(q.shape[0], k.shape[0], q.dtype):
                return library.cross_entropy_rows_mean_with_grad(q, k, scale)[0]
        return self.mean(self.cross_entropy_rows())


class PairwiseReductions(ScoreReductions):
    r"""The same reductions of the pairwise-MLP critic's scores,
    :math:`s_{ij} = w_2^\top\mathrm{relu}(a_i + c_j) + b_2`, from a (B, H), c (N, H), w2 (H,), b2 ()
    through the ``rid_fast::pairwise_<op>`` ops on ``backend`` (``"torch"``, ``"cpp"`` or
    ``"triton"``); this process's batch only (the critic is not separable: no key blocks to pass
    around a group)."""

    def __init__(self, a: Tensor, c: Tensor, w2: Tensor, b2: Tensor, backend: str) -> None:
        self.factors, self.backend = (a, c, w2, b2), backend
        self.n_rows, self.n_keys = a.shape[0], c.shape[0]

    def wants_grad(self) -> bool:
        return wants_grad(*self.factors)

    def positives(self) -> Tensor:
        return pairwise_streaming.positives(*self.factors)

    def cross_entropy_rows(self) -> Tensor:
        return library.pairwise_cross_entropy_rows(*self.factors, self.backend)

    def cross_entropy_rows_cols(self) -> tuple[Tensor, Tensor]:
        return library.pairwise_cross_entropy_rows_cols(*self.factors, self.backend)

    def lse_negatives(self, clip: float | None = None) -> Tensor:
        return library.pairwise_lse_negatives(*self.factors, clip, self.backend)

    def softplus_negatives(self) -> Tensor:
        return library.pairwise_softplus_negatives(*self.factors, self.backend)

    one_sweep_mean = False


class _GroupReductions(ScoreReductions):
    """What the global reductions share: sums over the rows of every process of ``group``."""

    def __init__(self, q: Tensor, k: Tensor, scale: Tensor, backend: str, *, group, sizes: Sequence[int]) -> None:
        super().__init__(q, k, scale, backend)
        self.group, self.sizes = group, list(sizes)
        self.n_rows = self.n_keys = sum(self.sizes)

    def sum(self, rows: Tensor) -> Tensor:
        return all_reduce_sum(rows.sum(), self.group)

    def mean(self, rows: Tensor) -> Tensor:
        return self.sum(rows) / self.n_rows

    def logsumexp(self, rows: Tensor) -> Tensor:
        # Shift by the global maximum (no gradient: the result does not depend on it).
        local_max = rows.detach().max() if rows.numel() else rows.new_full((), -math.inf)
        shift = all_reduce_max(local_max, self.group)
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        return self.sum(torch.exp(rows - shift)).log() + shift

    one_sweep_mean = False


class GatheredReductions(_GroupReductions):
    """The global batch by all-gather: this process's rows q (B, D) against every process's keys,
    gathered with autograd with this process's block first (so its positives are the diagonal)."""

    def __init__(self, q: Tensor, k: Tensor, scale: Tensor, backend: str, *, group, sizes: Sequence[int]) -> None:
        super().__init__(q, k, scale, backend, group=group, sizes=sizes)
        self.local_k = k
        self.k = gather_rows(k, self.sizes, group)  # (Σ B_p, D), this process's keys first

    def cross_entropy_rows_cols(self) -> tuple[Tensor, Tensor]:
        rows = self.cross_entropy_rows()
        queries = gather_rows(self.q, self.sizes, self.group)
        columns = ScoreReductions(self.local_k, queries, self.scale, self.backend).cross_entropy_rows()  # rows of Sᵀ
        return rows, columns


class RingReductions(_GroupReductions):
    """The global batch by the ring: this process's rows against each process's key block in turn
    (:func:`rid_fast.ops.distributed.ring_row_statistic`), the blocks passed around the group."""

    def _ring(self, q: Tensor, k: Tensor, reduction: str, **options) -> Tensor:
        return ring_row_statistic(
            q, k, self.scale, reduction=reduction, sizes=self.sizes, group=self.group, backend=self.backend, **options
        )

    def cross_entropy_rows(self) -> Tensor:
        # log Σ_j e^{S_ij} over every key, the positive included, minus the positive.
        return self._ring(self.q, self.k, "lse", own_diagonal_out=False) - self.positives()

    def cross_entropy_rows_cols(self) -> tuple[Tensor, Tensor]:
        # Columns: a second ring pass over Sᵀ, this process's keys as rows, the blocks of q travelling.
        columns = self._ring(self.k, self.q, "lse", own_diagonal_out=False) - self.positives()
        return self.cross_entropy_rows(), columns

    def lse_negatives(self, clip: float | None = None) -> Tensor:
        return self._ring(self.q, self.k, "lse", clip=clip)

    def softplus_negatives(self) -> Tensor:
        return self._ring(self.q, self.k, "softplus")


def score_reductions(
    q: Tensor, k: Tensor, scale: Tensor, backend: str, *, group=None, gather: str = "ring", sizes=None
) -> ScoreReductions:
    """The reductions for this process's batch (``group`` None or of one process), or for the global
    batch of ``group`` by ``gather`` (``"ring"`` or ``"all_gather"``) with every process's B_p in
    ``sizes`` (from :func:`rid_fast.ops.distributed.agree`)."""
    if group is None or group_world(group)[1] == 1:
        return ScoreReductions(q, k, scale, backend)
    kind = RingReductions if gather == "ring" else GatheredReductions
    return kind(q, k, scale, backend, group=group, sizes=sizes)
