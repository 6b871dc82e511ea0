r"""The collectives behind estimates over a batch split across processes (``torch.distributed``).

Process ``p`` of a group of ``W`` holds rows :math:`q_p` (B_p, D) and keys :math:`k_p` (B_p, D) of
:math:`S = \sigma q k^\top`; the global batch is their rank-ordered concatenation, so the positives
of ``p``'s rows are the diagonal of ``p``'s own key block and a block from any other process holds
none. Everything here serves :mod:`rid_fast.mi.reductions`:

* :func:`agree` — one small all-gather of every process's *fingerprint* (estimator, critic,
  temperature, D, dtype, …) before any other collective, raising the same error on every process
  when they disagree instead of hanging in a mismatched collective; it returns every B_p;
* :func:`all_reduce_sum` — a sum over processes whose backward sums the incoming gradients (every
  process computes the same global value, so each receives W times its gradient: the DDP
  convention, see below); :func:`all_reduce_max` without gradient;
* :func:`gather_rows` — the rows of every process with autograd, this process's first (backward:
  each block's gradient summed over processes and returned to its owner): ``gather="all_gather"``,
  O(W·B·D) memory;
* :func:`ring_row_statistic` — a per-row log-sum-exp or softplus sum of this process's rows over
  every process's keys, the key blocks passed around the ring: ``gather="ring"``, O(B·D) memory
  whatever W.

**Gradients (DDP's convention).** DDP averages the parameter gradients of the W processes. Every
process computes the same global estimate G, and the backward of each collective here sums the
gradients of all processes, so the gradient reaching this process's inputs is
:math:`W\,\partial G/\partial(\text{this process's rows})`; parameters that produce the rows (and a
replicated temperature, used by every process) then hold, after DDP's average, exactly
:math:`\partial G/\partial\theta`. Every process must run the backward (the collectives in it pair up
across processes), as under DDP.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.distributed as dist

from rid_fast.ops.common import compute_dtype
from rid_fast.ops.library import _backend

__all__ = [
    "GATHERS",
    "check_group",
    "group_world",
    "fingerprint_code",
    "agree",
    "all_reduce_sum",
    "all_reduce_max",
    "gather_rows",
    "ring_row_statistic",
]

#: How the keys of the other processes reach this process's rows.
GATHERS = ("ring", "all_gather")


def check_group(group: object) -> None:
    """``group`` is None or a ``torch.distributed`` process group of an initialised default group."""
    if group is None:
        return
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group= needs torch.distributed initialised (dist.init_process_group); it is not")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            "group must be None or a torch.distributed ProcessGroup (e.g. dist.group.WORLD); "
            f"got {type(group).__name__}"
        )


def group_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(this process's rank in ``group``, the group's size); (0, 1) for ``None``."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def fingerprint_code(value: object) -> float:
    """A number that names ``value`` (its ``repr``, by CRC-32) for :func:`agree`: equal for equal
    values, different for different ones with overwhelming probability; exact in float64."""
    return float(zlib.crc32(repr(value).encode()))


def agree(
    group: dist.ProcessGroup,
    fields: dict[str, float | torch.Tensor],
    *,
    rows: int,
    device: torch.device,
    local_error: Exception | None = None,
) -> list[int]:
    """Every process's ``rows`` (B_p, rank order), after checking that all agree on ``fields``.

    One all-gather of ``len(fields) + 2`` float64 numbers per process (one host read: a device sync
    on GPUs). ``fields`` maps a name to a number or a one-element tensor (e.g. a learnable
    temperature, read on the device); ``local_error`` is this process's reason to reject its inputs,
    if any: the process still joins the gather, so that every process raises instead of the others
    waiting for it in a later collective. When the fields differ, raises the same ``ValueError`` on
    every process, naming the field and every process's value; when processes rejected their
    inputs, each of them raises its own ``local_error`` and the others a ``ValueError`` naming them.
    """
    names = list(fields)
    entries = [torch.as_tensor(fields[name], dtype=torch.float64).detach().reshape(()).to(device) for name in names]
    entries += [torch.tensor(float(rows), device=device, dtype=torch.float64)]
    entries += [torch.tensor(float(local_error is not None), device=device, dtype=torch.float64)]
    mine = torch.stack(entries)
    _, world = group_world(group)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    values = torch.stack(table).cpu().tolist()  # (W, fields + 2)
    rejected = [rank for rank, row in enumerate(values) if row[-1]]
    if rejected:
        if local_error is not None:
            raise local_error
        raise ValueError(f"process(es) {rejected} of the group rejected their inputs (see their error); none ran")
    for column, name in enumerate(names):
        seen = [row[column] for row in values]
        if any(value != seen[0] and not (math.isnan(value) and math.isnan(seen[0])) for value in seen):
            raise ValueError(
                f"the processes of the group disagree on {name}: {seen} (by rank); every process must call the "
                "estimator with the same estimator, critic, temperature, options, feature width and dtype"
            )
    return [int(row[-2]) for row in values]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        total = t.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    r""":math:`\sum_p t_p`, the same on every process; backward: the gradients of every process summed
    (so this process's ``t`` gets W times the gradient of the global value when, as here, every
    process differentiates the same value)."""
    return _AllReduceSum.apply(t, group)


def all_reduce_max(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Elementwise maximum over processes, without gradient (a shift for a log-sum-exp)."""
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


# One-tensor collectives: the *_single names of newer torch, the *_tensor ones (deprecated there) before.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _own_first(rank: int, world: int) -> list[int]:
    """The ranks from this one on, around the ring: rank, rank + 1, …, rank − 1."""
    return [(rank + step) % world for step in range(world)]


def _sum_to_owner(blocks: torch.Tensor, group: dist.ProcessGroup, rank: int) -> torch.Tensor:
    """``blocks`` (W, rows, …): block r summed over processes lands on process r. NCCL reduce-scatters;
    gloo, which has no reduce-scatter, all-reduces and keeps its own block."""
    if dist.get_backend(group) == "nccl":
        out = blocks.new_empty(blocks.shape[1:])
        _reduce_scatter_single(out, blocks, group=group)
        return out
    dist.all_reduce(blocks, group=group)
    return blocks[rank]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, sizes: Sequence[int], group: dist.ProcessGroup) -> torch.Tensor:
        rank, world = group_world(group)
        longest = max(sizes)
        padded = t.new_zeros((longest, *t.shape[1:]))  # all_gather needs one shape: pad ragged blocks
        padded[: t.shape[0]] = t
        blocks = t.new_empty((world * longest, *t.shape[1:]))
        _all_gather_single(blocks, padded, group=group)
        blocks = blocks.view(world, longest, *t.shape[1:])
        ctx.sizes, ctx.group = sizes, group
        return torch.cat([blocks[r, : sizes[r]] for r in _own_first(rank, world)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rank, world = group_world(ctx.group)
        sizes = ctx.sizes
        blocks = grad.new_zeros((world, max(sizes), *grad.shape[1:]))
        start = 0
        for r in _own_first(rank, world):
            blocks[r, : sizes[r]] = grad[start : start + sizes[r]]
            start += sizes[r]
        return _sum_to_owner(blocks, ctx.group, rank)[: sizes[rank]], None, None


def gather_rows(t: torch.Tensor, sizes: Sequence[int], group: dist.ProcessGroup) -> torch.Tensor:
    r"""Every process's rows of ``t`` (B_p, …) concatenated, this process's first and the others in
    ring order from it (rank, rank + 1, …, rank − 1): (Σ_p B_p, …). ``sizes`` are every B_p (rank
    order, from :func:`agree`); ragged sizes are padded for the transfer. Backward: the gradient of
    each block summed over processes, returned to the block's owner."""
    return _GatherRows.apply(t, list(sizes), group)


# ---- the ring ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RingSpec:
    """What a ring pass computes: per row of q, ``reduction`` ``"lse"`` (log-sum-exp, clamped to
    ±``clip`` when given) or ``"softplus"`` (sum) of the scores against every key block, leaving
    out the diagonal of this process's own block when ``own_diagonal_out``."""

    reduction: str
    clip: float | None
    own_diagonal_out: bool
    sizes: tuple[int, ...]
    group: dist.ProcessGroup
    backend: ModuleType

    def forward(self, q, k, scale, diagonal: bool) -> torch.Tensor:
        if self.reduction == "lse":
            return self.backend.lse_negatives_forward(q, k, scale, self.clip, diagonal)
        return self.backend.softplus_negatives_forward(q, k, scale, diagonal)

    def backward(self, grad, q, k, scale, statistic, diagonal: bool):
        if self.reduction == "lse":
            return self.backend.lse_negatives_backward(grad, q, k, scale, statistic, self.clip, diagonal)
        return self.backend.softplus_negatives_backward(grad, q, k, scale, diagonal)

    def fold(self, total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
        if total is None:
            return part
        return torch.logaddexp(total, part) if self.reduction == "lse" else total + part

    def empty(self, n_rows: int, like: torch.Tensor) -> torch.Tensor:
        """The statistic of no entries: log 0 = −∞ or the sum 0."""
        return like.new_full((n_rows,), -math.inf if self.reduction == "lse" else 0.0)


def _pass_on(
    send: torch.Tensor, rows: int, group: dist.ProcessGroup, *, tag: int
) -> tuple[torch.Tensor, list[dist.Work]]:
    """Start sending ``send`` to the next process of the ring and receiving the previous one's block
    of ``rows`` rows (same trailing shape and dtype); returns the receive buffer and the requests."""
    rank, world = group_world(group)
    incoming = send.new_empty((rows, *send.shape[1:]))
    requests = [
        dist.isend(send.contiguous(), dist.get_global_rank(group, (rank + 1) % world), group=group, tag=tag),
        dist.irecv(incoming, dist.get_global_rank(group, (rank - 1) % world), group=group, tag=tag),
    ]
    return incoming, requests


def _wait(requests: list[dist.Work]) -> None:
    for request in requests:
        request.wait()


_KEYS_TAG, _GRADIENTS_TAG = 1, 2


class _RingRowStatistic(torch.autograd.Function):
    r"""Forward: at step s this process holds the key block of process rank − s, folds its
    statistic into the rows' running one, and passes it on while the next block arrives (the
    transfer overlaps the block's compute). Backward: the same walk, each block travelling with the
    accumulator of its gradient, to which every process adds its rows' share; after the W-th step
    the accumulator goes one hop further and arrives home complete."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, spec: _RingSpec) -> torch.Tensor:
        rank, world = group_world(spec.group)
        total, block = None, k
        for step in range(world):
            owner = (rank - step) % world
            if step < world - 1:
                incoming, requests = _pass_on(block, spec.sizes[(owner - 1) % world], spec.group, tag=_KEYS_TAG)
            diagonal = owner == rank and spec.own_diagonal_out
            if not (diagonal and block.shape[0] == 1):  # one key, left out: no entries
                total = spec.fold(total, spec.forward(q, block, scale, diagonal))
            if step < world - 1:
                _wait(requests)
                block = incoming
        total = spec.empty(q.shape[0], scale.new_empty((), dtype=compute_dtype(q.dtype))) if total is None else total
        ctx.save_for_backward(q, k, scale, total)
        ctx.spec = spec
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, scale, total = ctx.saved_tensors
        spec: _RingSpec = ctx.spec
        rank, world = group_world(spec.group)
        dtype = compute_dtype(q.dtype)
        grad = grad.to(dtype).contiguous()
        dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
        d_scale = torch.zeros((), dtype=dtype, device=q.device)
        block, block_grad = k, torch.zeros(k.shape, dtype=dtype, device=k.device)
        for step in range(world):
            owner = (rank - step) % world
            incoming_rows = spec.sizes[(owner - 1) % world]
            if step < world - 1:
                incoming, requests = _pass_on(block, incoming_rows, spec.group, tag=_KEYS_TAG)
            diagonal = owner == rank and spec.own_diagonal_out
            if not (diagonal and block.shape[0] == 1):
                dq_part, dk_part, d_scale_part = spec.backward(grad, q, block, scale, total, diagonal)
                dq += dq_part
                block_grad += dk_part
                d_scale += d_scale_part
            # The accumulator follows its keys; after the last step it goes home (one hop on).
            incoming_grad, grad_requests = _pass_on(block_grad, incoming_rows, spec.group, tag=_GRADIENTS_TAG)
            _wait(grad_requests)
            block_grad = incoming_grad
            if step < world - 1:
                _wait(requests)
                block = incoming
        return dq.to(q.dtype), block_grad.to(k.dtype), d_scale.to(scale.dtype), None


def ring_row_statistic(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    *,
    reduction: str,
    sizes: Sequence[int],
    group: dist.ProcessGroup,
    backend: str,
    clip: float | None = None,
    own_diagonal_out: bool = True,
) -> torch.Tensor:
    r"""Per row i of this process's q (B, D), over the keys of every process
    (:math:`S = \sigma q K^\top`, K the global keys, rank order):

    * ``reduction="lse"``: :math:`\log\sum_j e^{c(S_{ij})}` (c the clamp to ±``clip`` if given);
    * ``reduction="softplus"``: :math:`\sum_j \mathrm{softplus}(S_{ij})`;

    the sum over every global key j, except this row's positive (the diagonal of this process's
    own block) when ``own_diagonal_out``. ``k`` (B, D) is this process's key block, ``sizes`` every
    process's B_p (from :func:`agree`), ``backend`` ``"torch"`` or ``"triton"``. Returns (B,) in the
    compute dtype; differentiable in q, k and scale (a ring pass in the backward).

    Memory O(B·D): at most two key blocks besides this process's own (the one in use and the one
    arriving), and in the backward their two gradient accumulators.
    """
    spec = _RingSpec(reduction, clip, own_diagonal_out, tuple(sizes), group, _backend(backend))
    return _RingRowStatistic.apply(q.contiguous(), k.contiguous(), scale, spec)
