r"""Redundant Information Distillation (Dissanayake et al., AISTATS 2025).

For each distilled layer pair k (teacher features :math:`T_k`, student features :math:`S_k`) RID
learns a *teacher filter* :math:`f_{t,k}` with a classification head :math:`h_k`, and a *student
filter* :math:`f_{s,k}`. Training alternates two phases (:class:`RIDSchedule`):

* **filter phase** — over the teacher filters and heads, minimise
  :math:`\sum_k \mathrm{CE}(h_k(f_{t,k}(T_k)), Y)` (+ :math:`\sum_k D_k` after the first round):
  keep :math:`Q_k = f_{t,k}(T_k)` predictive of the label while reachable by the student;
* **student phase** — over the student, its filters and the estimator's parameters, minimise
  :math:`\mathrm{CE}(\text{student}(X), Y) + \alpha \sum_k D_k`: pull :math:`f_{s,k}(S_k)` onto
  :math:`Q_k`, making :math:`Q_k` (nearly) a function of the student too. Since
  :math:`\mathrm{Red}(Y{:}T,S) \ge I(Y;Q)` for any Q that is a function of both T and S, this
  transfers the task-relevant information the teacher holds — and not its nuisance.

The redundancy term :math:`D_k` is minus an estimate of :math:`I(f_{t,k}(T_k); f_{s,k}(S_k))`:

* ``"gaussian"`` (the paper's): :math:`D_k = \operatorname{mean}\big(\log\sigma_k^2 +
  (f_{s,k}(S_k) - f_{t,k}(T_k))^2 / \sigma_k^2\big)`, :math:`\sigma_k^2 = \mathrm{softplus}(\rho_k)
  + 10^{-3}` per channel, :math:`\rho_k` a Parameter initialised so that :math:`\sigma^2 \approx 5`.
  (The official code writes :math:`\sigma^4` in the student phase where the Gaussian bound needs
  :math:`\log\sigma^2`; rid_fast uses :math:`\log\sigma^2`.)
* any estimator of :mod:`rid_fast.mi.estimators` (``"infonce"``, ``"nwj"``, ``"dv"``, ``"smile"``,
  ``"js"``, ``"mine"``) on the filtered features pooled to vectors, with a cosine critic (fixed
  temperature by default) — these run through the fused kernels.

Example::

    >>> import torch
    >>> from rid_fast import RIDLoss
    >>> rid = RIDLoss(teacher_shapes=[(64, 8, 8)], student_shapes=[(16, 8, 8)], num_classes=10)
    >>> t, s, y = [torch.randn(4, 64, 8, 8)], [torch.randn(4, 16, 8, 8)], torch.randint(0, 10, (4,))
    >>> sorted(rid.filter_phase_loss(t, s, y, include_redundancy=True)[0])
    ['filter_ce', 'redundancy']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rid_fast.mi import estimators
from rid_fast.mi.critics import CosineCritic

__all__ = [
    "RIDLoss",
    "RIDSchedule",
    "GaussianRedundancy",
    "REDUNDANCY_ESTIMATORS",
    "make_filter",
    "make_head",
    "match_shapes",
    "pool_to_vector",
]

_CONTRASTIVE = {
    "infonce": estimators.InfoNCE,
    "nwj": estimators.NWJ,
    "dv": estimators.DV,
    "smile": estimators.SMILE,
    "js": estimators.JS,
    "mine": estimators.MINE,
}
#: Names accepted for ``RIDLoss(estimator=...)``.
REDUNDANCY_ESTIMATORS = ("gaussian", *_CONTRASTIVE)


class GaussianRedundancy(nn.Module):
    r"""The paper's Gaussian variational redundancy term, a loss to minimise:
    :math:`D = \operatorname{mean}(\log\sigma^2 + (s - t)^2/\sigma^2)` with a learned per-channel
    variance :math:`\sigma^2 = \mathrm{softplus}(\rho) + 10^{-3}`.

    Shape: student, teacher (B, C) or (B, C, H, W) → scalar. ``estimate(...)`` is the matching
    lower bound on :math:`I(T;S)` up to the (unknown) entropy of T: :math:`-D/2`.
    """

    def __init__(self, channels: int, initial_variance: float = 5.0, min_variance: float = 1e-3) -> None:
        super().__init__()
        if not 0 < min_variance < initial_variance:
            raise ValueError(f"need 0 < min_variance < initial_variance; got {min_variance}, {initial_variance}")
        self.min_variance = min_variance
        # softplus(ρ) + min_variance = initial_variance
        target = initial_variance - min_variance
        self.rho = nn.Parameter(torch.full((channels,), target + math.log(-math.expm1(-target))))

    @property
    def variance(self) -> Tensor:
        return F.softplus(self.rho) + self.min_variance

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        variance = self.variance.view(1, -1, *([1] * (student.dim() - 2)))
        return (variance.log() + (student - teacher).pow(2) / variance).mean()


def make_filter(in_shape: Sequence[int], out_channels: int, hidden: int | None = None) -> nn.Module:
    """1×1 conv–BN–ReLU–1×1 conv for (C, H, W) features, Linear–BN–ReLU–Linear for (C,) features,
    each ending in a non-affine BatchNorm: filter outputs are standardised per channel, so the
    redundancy term compares features on a fixed scale (the filters' CE heads would otherwise
    inflate it, and with it the redundancy term's pull on the student)."""
    hidden = hidden or out_channels
    if len(in_shape) == 3:
        return nn.Sequential(
            nn.Conv2d(in_shape[0], hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels, affine=False),
        )
    return nn.Sequential(
        nn.Linear(in_shape[0], hidden, bias=False),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, out_channels, bias=False),
        nn.BatchNorm1d(out_channels, affine=False),
    )


def make_head(in_shape: Sequence[int], num_classes: int) -> nn.Module:
    """Linear classifier reading all of a filter's output, (C, g, g) maps flattened."""
    size = 1
    for extent in in_shape:
        size *= extent
    return nn.Sequential(nn.Flatten(), nn.Linear(size, num_classes))


def match_shapes(
    teacher_shape: Sequence[int], student_shape: Sequence[int], grid: int | None = None
) -> tuple[nn.Module, nn.Module, tuple]:
    """Poolings that bring teacher and student features to a common layout: both 4-D →
    average-pool to the smaller spatial size (capped at ``grid × grid`` when given); otherwise
    pool 4-D features to vectors. Returns (teacher_pool, student_pool, (teacher_shape, student_shape))."""
    if len(teacher_shape) == 3 and len(student_shape) == 3:
        size = (min(teacher_shape[1], student_shape[1]), min(teacher_shape[2], student_shape[2]))
        if grid is not None:
            size = (min(size[0], grid), min(size[1], grid))
        pool = lambda shape: nn.Identity() if tuple(shape[1:]) == size else nn.AdaptiveAvgPool2d(size)  # noqa: E731
        return pool(teacher_shape), pool(student_shape), ((teacher_shape[0], *size), (student_shape[0], *size))
    to_vector = lambda shape: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if len(shape) == 3 else nn.Identity()  # noqa: E731
    return to_vector(teacher_shape), to_vector(student_shape), ((teacher_shape[0],), (student_shape[0],))


@contextmanager
def _frozen(module: nn.Module):
    """Parameters of ``module`` excluded from autograd for the duration (restored after)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def pool_to_vector(t: Tensor) -> Tensor:
    """(B, C, H, W) → (B, C) by global average pooling; (B, C) unchanged."""
    return t.mean(dim=(2, 3)) if t.dim() == 4 else t


class _LayerPair(nn.Module):
    """Filters, head and redundancy term of one distilled layer pair."""

    def __init__(
        self,
        teacher_shape,
        student_shape,
        num_classes,
        *,
        estimator,
        channels,
        hidden,
        temperature,
        learn_temperature,
        impl,
        grid,
        min_variance,
    ):
        super().__init__()
        self.teacher_pool, self.student_pool, (t_shape, s_shape) = match_shapes(teacher_shape, student_shape, grid)
        channels = channels or s_shape[0]
        self.teacher_filter = make_filter(t_shape, channels, hidden)
        self.head = make_head((channels, *t_shape[1:]), num_classes)
        self.student_filter = make_filter(s_shape, channels, hidden)
        if estimator == "gaussian":
            self.redundancy = GaussianRedundancy(channels, min_variance=min_variance)
        else:
            critic = CosineCritic(temperature, learnable=learn_temperature)
            self.redundancy = _CONTRASTIVE[estimator](critic, impl=impl, check_values=False)
        self.contrastive = estimator != "gaussian"

    def teacher_side(self, teacher: Tensor) -> Tensor:
        return self.teacher_filter(self.teacher_pool(teacher))

    def student_side(self, student: Tensor) -> Tensor:
        return self.student_filter(self.student_pool(student))

    def redundancy_loss(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """(D, logged estimate): D to minimise; the estimate is Î (nats) for contrastive
        estimators and D itself for the Gaussian term."""
        if self.contrastive:
            estimate = self.redundancy(pool_to_vector(student), pool_to_vector(teacher))
            return -estimate, estimate.detach()
        loss = self.redundancy(student, teacher)
        return loss, loss.detach()


class RIDLoss(nn.Module):
    """The RID loss for any teacher/student pair, one entry per distilled layer pair.

    Args:
        teacher_shapes, student_shapes: per-layer feature shapes without the batch dimension,
            ``(C,)`` or ``(C, H, W)``.
        num_classes: classes of the heads on the teacher filters.
        estimator: ``"gaussian"`` (the paper's) or a contrastive estimator name (see module notes).
        alpha: weight of the redundancy term in the student phase.
        filter_channels: output channels of the filters (default: the student's channels).
        filter_hidden: hidden width of the filters (default: ``filter_channels``).
        temperature: critic temperature of contrastive estimators.
        learn_temperature: train that temperature (off by default: a learned temperature tends
            to collapse, and the term's gradient grows like 1/τ until it drowns the student's CE).
        impl: implementation of contrastive estimators (see :mod:`rid_fast.mi.functional`).
        grid: 4-D features are average-pooled to at most ``grid × grid`` before filtering. Q, the
            filtered teacher representation, is then exactly what the head reads: finer spatial
            detail, unconstrained by the label, is nuisance the student should not be asked to copy.
        min_variance: floor of the Gaussian term's learned variance (the paper: 1e-3). The term's
            pull on the student grows like 1/σ²; a floor keeps it from locking the student onto Q.
    """

    def __init__(
        self,
        teacher_shapes: Sequence[Sequence[int]],
        student_shapes: Sequence[Sequence[int]],
        num_classes: int,
        *,
        estimator: str = "gaussian",
        alpha: float = 1.0,
        filter_channels: int | None = None,
        filter_hidden: int | None = None,
        temperature: float = 0.1,
        impl: str = "auto",
        grid: int = 4,
        min_variance: float = 1e-3,
        learn_temperature: bool = False,
    ) -> None:
        super().__init__()
        if len(teacher_shapes) != len(student_shapes) or not teacher_shapes:
            raise ValueError(
                f"teacher_shapes and student_shapes must list the same, non-zero number of layers; "
                f"got {len(teacher_shapes)} and {len(student_shapes)}"
            )
        if estimator not in REDUNDANCY_ESTIMATORS:
            raise ValueError(
                f"estimator must be one of {', '.join(map(repr, REDUNDANCY_ESTIMATORS))}; got {estimator!r}"
            )
        for name, shapes in (("teacher_shapes", teacher_shapes), ("student_shapes", student_shapes)):
            for shape in shapes:
                if len(shape) not in (1, 3):
                    raise ValueError(f"{name} entries must be (C,) or (C, H, W); got {tuple(shape)}")
        self.estimator = estimator
        self.alpha = alpha
        self.pairs = nn.ModuleList(
            _LayerPair(
                t,
                s,
                num_classes,
                estimator=estimator,
                channels=filter_channels,
                hidden=filter_hidden,
                temperature=temperature,
                learn_temperature=learn_temperature,
                impl=impl,
                grid=grid,
                min_variance=min_variance,
            )
            for t, s in zip(teacher_shapes, student_shapes)
        )

    def _redundancy(self, teacher_sides, student_feats, *, phase: str):
        """Σ_k D_k and the per-layer estimates from the filtered teacher features ``teacher_sides``.
        In the filter phase only the teacher side carries gradients (student side and estimator
        frozen); in the student phase only the student side."""
        total, logs = 0.0, {}
        for k, (pair, t_side, s) in enumerate(zip(self.pairs, teacher_sides, student_feats)):
            if phase == "filter":
                with torch.no_grad():
                    s_side = pair.student_side(s)
                with _frozen(pair.redundancy):
                    loss, estimate = pair.redundancy_loss(s_side, t_side)
            else:
                loss, estimate = pair.redundancy_loss(pair.student_side(s), t_side)
            total = total + loss
            logs[f"redundancy/{k}"] = estimate
        return total, logs

    def filter_phase_loss(
        self,
        teacher_feats: Sequence[Tensor],
        student_feats: Sequence[Tensor],
        labels: Tensor,
        *,
        include_redundancy: bool,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(losses, logs) of the filter phase: Σ_k CE of the heads on the teacher filters, plus
        Σ_k D_k with the student side detached when ``include_redundancy``."""
        ce, logs = 0.0, {}
        teacher_sides = [pair.teacher_side(t.detach()) for pair, t in zip(self.pairs, teacher_feats)]
        for k, (pair, t_side) in enumerate(zip(self.pairs, teacher_sides)):
            logits = pair.head(t_side)
            ce = ce + F.cross_entropy(logits, labels)
            logs[f"filter_acc/{k}"] = (logits.argmax(1) == labels).float().mean().detach()
        losses = {"filter_ce": ce}
        if include_redundancy:
            losses["redundancy"], redundancy_logs = self._redundancy(teacher_sides, student_feats, phase="filter")
            logs.update(redundancy_logs)
        return losses, logs

    def student_phase_loss(
        self, teacher_feats: Sequence[Tensor], student_feats: Sequence[Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(losses, logs) of the student phase: α Σ_k D_k with the teacher side fixed (the caller
        adds the student's own cross-entropy)."""
        with torch.no_grad():  # the teacher side is a fixed target in this phase
            teacher_sides = [pair.teacher_side(t) for pair, t in zip(self.pairs, teacher_feats)]
        total, logs = self._redundancy(teacher_sides, student_feats, phase="student")
        return {"redundancy": self.alpha * total}, logs

    def filter_parameters(self) -> list[nn.Parameter]:
        """Updated in the filter phase: teacher filters and heads."""
        return [p for pair in self.pairs for m in (pair.teacher_filter, pair.head) for p in m.parameters()]

    def student_side_parameters(self) -> list[nn.Parameter]:
        """Updated in the student phase (with the student): student filters and the estimators."""
        return [p for pair in self.pairs for m in (pair.student_filter, pair.redundancy) for p in m.parameters()]


@dataclass(frozen=True)
class RIDSchedule:
    """The paper's multi-level schedule: training is split into ``n_rounds`` equal rounds; the
    first ``filter_fraction`` of each round runs filter-phase updates, the rest student-phase
    updates. Positions count epochs or optimizer steps (``unit``); the redundancy term joins the
    filter phase from round ``redundancy_from_round`` on (the paper: the second round, 1).

    >>> schedule = RIDSchedule(n_rounds=5, filter_fraction=0.2)
    >>> [schedule.phase(epoch, total=10) for epoch in range(4)]
    ['filter', 'student', 'filter', 'student']
    """

    n_rounds: int = 5
    filter_fraction: float = 0.2
    unit: str = "epoch"
    redundancy_from_round: int = 1

    def __post_init__(self) -> None:
        if self.n_rounds < 1:
            raise ValueError(f"schedule.n_rounds must be ≥ 1; got {self.n_rounds}")
        if not 0.0 <= self.filter_fraction < 1.0:
            raise ValueError(f"schedule.filter_fraction must be in [0, 1); got {self.filter_fraction}")
        if self.unit not in ("epoch", "step"):
            raise ValueError(f"schedule.unit must be 'epoch' or 'step'; got {self.unit!r}")

    def round_index(self, position: int, total: int) -> int:
        return min(position * self.n_rounds // total, self.n_rounds - 1)

    def phase(self, position: int, total: int) -> str:
        """``"filter"`` or ``"student"`` at ``position`` (0-based) of ``total`` epochs or steps."""
        if not 0 <= position < total:
            raise ValueError(f"position {position} outside [0, {total})")
        offset = position * self.n_rounds - self.round_index(position, total) * total  # in units of total/n_rounds
        return "filter" if offset < self.filter_fraction * total else "student"

    def redundancy_in_filter_phase(self, position: int, total: int) -> bool:
        return self.round_index(position, total) >= self.redundancy_from_round
