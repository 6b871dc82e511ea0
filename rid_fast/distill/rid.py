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
  + 10^{-3}` per channel, :math:`\rho_k` a Parameter initialised so that :math:`\sigma^2 \approx 5`,
  the mean over batch, channels and positions. (The official code writes :math:`\sigma^4` in the
  student phase where the Gaussian bound needs :math:`\log\sigma^2`; rid_fast uses :math:`\log\sigma^2`.)
* any estimator of :mod:`rid_fast.mi.estimators` (``"infonce"``, ``"nwj"``, ``"dv"``, ``"smile"``,
  ``"js"``, ``"mine"``) on the filtered features pooled to vectors, with a cosine critic (fixed
  temperature by default) — these run through the fused kernels.

Two variants (``RIDLoss(variant=...)``):

* ``"rid_fast"`` (the default): 4-D features average-pooled to at most ``grid × grid`` (4) before
  the filters, filters ending in a BatchNorm without affine parameters, one hidden width for every
  filter, a Flatten → Linear head, PyTorch's default initialisation, and the filter-phase value
  of the Gaussian term including its (constant there) :math:`\operatorname{mean}\log\sigma^2`.
* ``"paper"``: the official code's system (its CIFAR-10 ``REDStudentMultistepAlternating``), except
  :math:`\log\sigma^2` for :math:`\sigma^4`: full-resolution maps (pooled only where teacher and
  student sizes differ), filters 1×1 conv (width :math:`C_t` for the teacher's, :math:`2C_s` for
  the student's) → BatchNorm → ReLU → 1×1 conv to :math:`C_s` channels with nothing after it, a
  Flatten → ReLU → Linear head, Kaiming-uniform weights (fan-out, ReLU gain) and zero biases,
  :math:`\rho = 5` at the start, and a filter-phase term :math:`\operatorname{mean}((s-t)^2/\sigma^2)`
  without :math:`\log\sigma^2`. Only the Gaussian estimator; options that would change any of these
  are refused.

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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rid_fast.distill._checks import check_int, check_number
from rid_fast.distill.schedule import RIDSchedule
from rid_fast.mi import estimators
from rid_fast.mi.critics import CosineCritic

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "RIDLoss",
    "RIDSchedule",
    "GaussianRedundancy",
    "REDUNDANCY_ESTIMATORS",
    "CONTRASTIVE_ESTIMATORS",
    "VARIANTS",
    "make_filter",
    "make_head",
    "paper_init",
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
#: The estimators that contrast each positive pair with the batch's other pairs (negatives).
CONTRASTIVE_ESTIMATORS = tuple(_CONTRASTIVE)
#: Names accepted for ``RIDLoss(variant=...)`` (see the module notes).
VARIANTS = ("rid_fast", "paper")
#: The official code's initial variance parameter: σ² = softplus(5) + 1e-3 ≈ 5.008.
PAPER_INITIAL_RHO = 5.0


class GaussianRedundancy(nn.Module):
    r"""The paper's Gaussian variational redundancy term, a loss to minimise:
    :math:`D = \operatorname{mean}(\log\sigma^2 + (s - t)^2/\sigma^2)` with a learned per-channel
    variance :math:`\sigma^2 = \mathrm{softplus}(\rho) + \sigma^2_{\min}`. Up to the (unknown)
    entropy of T and a constant, :math:`-D/2` is a lower bound on :math:`I(T;S)`.

    Shape: student, teacher (B, C) or (B, C, H, W) → scalar (the mean over every element).
    ``forward(..., log_variance=False)`` leaves out :math:`\log\sigma^2`, a constant where σ is not
    trained (the official code's filter phase).
    """

    def __init__(self, channels: int, initial_variance: float = 5.0, min_variance: float = 1e-3) -> None:
        super().__init__()
        check_int("channels", channels, 1)
        check_number("min_variance", min_variance, minimum=0.0, inclusive=False)
        if not min_variance < initial_variance:
            raise ValueError(f"need 0 < min_variance < initial_variance; got {min_variance}, {initial_variance}")
        self.min_variance = min_variance
        # softplus(ρ) + min_variance = initial_variance
        target = initial_variance - min_variance
        self.rho = nn.Parameter(torch.full((channels,), target + math.log(-math.expm1(-target))))

    @property
    def variance(self) -> Tensor:
        return F.softplus(self.rho) + self.min_variance

    def forward(self, student: Tensor, teacher: Tensor, *, log_variance: bool = True) -> Tensor:
        variance = self.variance.view(1, -1, *([1] * (student.dim() - 2)))
        scaled = (student - teacher).pow(2) / variance
        return (variance.log() + scaled).mean() if log_variance else scaled.mean()


def make_filter(
    in_shape: Sequence[int], out_channels: int, hidden: int | None = None, *, output_norm: bool = True
) -> nn.Module:
    """1×1 conv–BN–ReLU–1×1 conv for (C, H, W) features, Linear–BN–ReLU–Linear for (C,) features
    (hidden width ``hidden``, default ``out_channels``). With ``output_norm`` (rid_fast's default)
    the filter ends in a BatchNorm without affine parameters: its outputs are standardised per
    channel, so the redundancy term compares features on a fixed scale (the filters' CE heads would
    otherwise inflate them, and with them the redundancy term's pull on the student). The paper's
    filters end at the second convolution."""
    hidden = hidden or out_channels
    conv = len(in_shape) == 3
    linear = (lambda i, o: nn.Conv2d(i, o, 1, bias=False)) if conv else (lambda i, o: nn.Linear(i, o, bias=False))
    norm = nn.BatchNorm2d if conv else nn.BatchNorm1d
    layers = [linear(in_shape[0], hidden), norm(hidden), nn.ReLU(), linear(hidden, out_channels)]
    if output_norm:
        layers.append(norm(out_channels, affine=False))
    return nn.Sequential(*layers)


def make_head(in_shape: Sequence[int], num_classes: int, *, relu: bool = False) -> nn.Module:
    """Linear classifier reading all of a filter's output, (C, g, g) maps flattened; with ``relu``
    (the paper's head) a ReLU between the flattening and the linear layer."""
    size = math.prod(in_shape)
    return nn.Sequential(nn.Flatten(), *([nn.ReLU()] if relu else []), nn.Linear(size, num_classes))


def paper_init(module: nn.Module) -> None:
    """The official code's initialisation: Kaiming-uniform weights (fan-out, ReLU gain) for every
    convolution and linear layer, zero biases (BatchNorm keeps PyTorch's: weight 1, bias 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


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
        variant,
        estimator,
        channels,
        hidden,
        temperature,
        learn_temperature,
        impl,
        grid,
        min_variance,
        group,
        gather,
    ):
        super().__init__()
        paper = variant == "paper"
        grid = None if paper else (4 if grid is None else grid)
        self.teacher_pool, self.student_pool, (t_shape, s_shape) = match_shapes(teacher_shape, student_shape, grid)
        channels = channels or s_shape[0]
        # The paper's filters: hidden width C_t on the teacher's side, 2·C_s on the student's.
        t_hidden, s_hidden = (t_shape[0], 2 * s_shape[0]) if paper else (hidden, hidden)
        self.teacher_filter = make_filter(t_shape, channels, t_hidden, output_norm=not paper)
        self.head = make_head((channels, *t_shape[1:]), num_classes, relu=paper)
        self.student_filter = make_filter(s_shape, channels, s_hidden, output_norm=not paper)
        if estimator == "gaussian":
            self.redundancy = GaussianRedundancy(channels, min_variance=min_variance)
        else:
            critic = CosineCritic(temperature, learnable=learn_temperature)
            self.redundancy = _CONTRASTIVE[estimator](critic, impl=impl, check_values=False, group=group, gather=gather)
        self.contrastive = estimator != "gaussian"
        if paper:
            for module in (self.teacher_filter, self.head, self.student_filter):
                paper_init(module)
            nn.init.constant_(self.redundancy.rho, PAPER_INITIAL_RHO)

    def teacher_side(self, teacher: Tensor) -> Tensor:
        return self.teacher_filter(self.teacher_pool(teacher))

    def student_side(self, student: Tensor) -> Tensor:
        return self.student_filter(self.student_pool(student))

    def redundancy_loss(self, student: Tensor, teacher: Tensor, *, log_variance: bool = True) -> tuple[Tensor, Tensor]:
        """(D, logged estimate): D to minimise; the estimate is Î (nats) for contrastive
        estimators and D itself for the Gaussian term (without log σ² when not ``log_variance``)."""
        if self.contrastive:
            estimate = self.redundancy(pool_to_vector(student), pool_to_vector(teacher))
            return -estimate, estimate.detach()
        loss = self.redundancy(student, teacher, log_variance=log_variance)
        return loss, loss.detach()


#: Options ``variant="paper"`` fixes, with the value it takes them at.
_PAPER_FIXED = {"estimator": "gaussian", "filter_channels": None, "filter_hidden": None, "grid": None,
                "min_variance": 1e-3}  # fmt: skip


class RIDLoss(nn.Module):
    """The RID loss for any teacher/student pair, one entry per distilled layer pair.

    Args:
        teacher_shapes, student_shapes: per-layer feature shapes without the batch dimension,
            ``(C,)`` or ``(C, H, W)``.
        num_classes: classes of the heads on the teacher filters (≥ 2).
        estimator: ``"gaussian"`` (the paper's) or a contrastive estimator name (see module notes).
        alpha: weight of the redundancy term in the student phase (≥ 0).
        filter_channels: output channels of the filters (default: the student's channels).
        filter_hidden: hidden width of the filters (default: ``filter_channels``).
        temperature: critic temperature of contrastive estimators.
        learn_temperature: train that temperature (off by default: a learned temperature tends
            to collapse, and the term's gradient grows like 1/τ until it drowns the student's CE).
        impl: implementation of contrastive estimators (see :mod:`rid_fast.mi.functional`).
        grid: 4-D features are average-pooled to at most ``grid × grid`` before filtering (None:
            4). Q, the filtered teacher representation, is then exactly what the head reads: finer
            spatial detail, unconstrained by the label, is nuisance the student should not be asked
            to copy.
        min_variance: floor of the Gaussian term's learned variance (the paper: 1e-3). The term's
            pull on the student grows like 1/σ²; a floor keeps it from locking the student onto Q.
        variant: ``"rid_fast"`` (default) or ``"paper"``, the official code's system (module notes);
            ``"paper"`` refuses ``estimator``, ``filter_channels``, ``filter_hidden``, ``grid`` and
            ``min_variance`` at anything but their defaults.
        group, gather: a contrastive estimator's process group and how keys travel (see
            :mod:`rid_fast.mi.functional`): under data parallelism its estimate is over the global
            batch, with gradients in DDP's averaging convention. The Gaussian term is a mean over
            each process's own rows (DDP's average of it is the global mean when the processes
            hold equal batches) and takes no group.

    Shape: ``teacher_feats[k]`` (B, *teacher_shapes[k]), ``student_feats[k]`` (B, *student_shapes[k]),
    ``labels`` (B,) class indices; a wrong layer count, shape or batch size is a ``ValueError``
    that names the argument.
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
        grid: int | None = None,
        min_variance: float = 1e-3,
        learn_temperature: bool = False,
        variant: str = "rid_fast",
        group: ProcessGroup | None = None,
        gather: str = "ring",
    ) -> None:
        super().__init__()
        if len(teacher_shapes) != len(student_shapes) or not teacher_shapes:
            raise ValueError(
                f"teacher_shapes and student_shapes must list the same, non-zero number of layers; "
                f"got {len(teacher_shapes)} and {len(student_shapes)}"
            )
        for name, shapes in (("teacher_shapes", teacher_shapes), ("student_shapes", student_shapes)):
            for k, shape in enumerate(shapes):
                if len(shape) not in (1, 3):
                    raise ValueError(f"{name} entries must be (C,) or (C, H, W); got {tuple(shape)}")
                for extent in shape:
                    check_int(f"{name}[{k}] extents", extent, 1)
        check_int("num_classes", num_classes, 2)
        if estimator not in REDUNDANCY_ESTIMATORS:
            raise ValueError(
                f"estimator must be one of {', '.join(map(repr, REDUNDANCY_ESTIMATORS))}; got {estimator!r}"
            )
        check_number("alpha", alpha, minimum=0.0)
        check_int("filter_channels", filter_channels, 1, optional=True)
        check_int("filter_hidden", filter_hidden, 1, optional=True)
        check_number("temperature", temperature, minimum=0.0, inclusive=False)
        check_int("grid", grid, 1, optional=True)
        check_number("min_variance", min_variance, minimum=0.0, inclusive=False)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}; got {variant!r}")
        if variant == "paper":
            given = {"estimator": estimator, "filter_channels": filter_channels, "filter_hidden": filter_hidden,
                     "grid": grid, "min_variance": min_variance}  # fmt: skip
            for name, fixed in _PAPER_FIXED.items():
                if given[name] != fixed:
                    raise ValueError(
                        f"variant='paper' fixes {name} (the paper's system; leave it at {fixed!r}, or use "
                        f"variant='rid_fast'); got {name}={given[name]!r}"
                    )
        self.teacher_shapes = [tuple(shape) for shape in teacher_shapes]
        self.student_shapes = [tuple(shape) for shape in student_shapes]
        self.num_classes = num_classes
        self.estimator = estimator
        self.variant = variant
        self.alpha = alpha
        self.pairs = nn.ModuleList(
            _LayerPair(
                t,
                s,
                num_classes,
                variant=variant,
                estimator=estimator,
                channels=filter_channels,
                hidden=filter_hidden,
                temperature=temperature,
                learn_temperature=learn_temperature,
                impl=impl,
                grid=grid,
                min_variance=min_variance,
                group=group,
                gather=gather,
            )
            for t, s in zip(self.teacher_shapes, self.student_shapes)
        )

    def _check_inputs(self, teacher_feats, student_feats, labels=None) -> None:
        """Layer counts, per-layer shapes and one batch size across features (and labels)."""
        batch = None
        for name, feats, shapes in (
            ("teacher_feats", teacher_feats, self.teacher_shapes),
            ("student_feats", student_feats, self.student_shapes),
        ):
            if len(feats) != len(shapes):
                raise ValueError(
                    f"{name}: expected {len(shapes)} layers (one per {name[:7]}_shapes entry); got {len(feats)}"
                )
            for k, (feature, shape) in enumerate(zip(feats, shapes)):
                if not isinstance(feature, Tensor):
                    raise TypeError(f"{name}[{k}] must be a Tensor; got {type(feature).__name__}")
                if feature.dim() != len(shape) + 1 or tuple(feature.shape[1:]) != shape:
                    raise ValueError(
                        f"{name}[{k}]: expected shape (B, {', '.join(map(str, shape))}) as {name[:7]}_shapes[{k}] "
                        f"= {shape} says; got {tuple(feature.shape)}"
                    )
                if batch is None:
                    batch = (feature.shape[0], f"{name}[{k}]")
                    if not batch[0]:
                        raise ValueError(f"{name}[{k}] is an empty batch (0 rows); the loss needs at least one example")
                    batch_norm = any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in self.modules())
                    if batch[0] == 1 and self.training and batch_norm:
                        raise ValueError(
                            f"{name}[{k}] has batch size 1: in training mode the filters' BatchNorm needs at least "
                            "2 examples per batch (call .eval() to evaluate single examples)"
                        )
                elif feature.shape[0] != batch[0]:
                    raise ValueError(
                        f"{name}[{k}] has batch size {feature.shape[0]} but {batch[1]} has {batch[0]}: teacher and "
                        f"student features must come from the same batch"
                    )
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != batch[0]:
                got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
                raise ValueError(f"labels: expected shape ({batch[0]},), one class index per example; got {got}")
            if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
                raise TypeError(f"labels must hold integer class indices; got {labels.dtype}")

    def _redundancy(self, teacher_sides, student_feats, *, phase: str):
        """Σ_k D_k and the per-layer estimates from the filtered teacher features ``teacher_sides``.
        In the filter phase only the teacher side carries gradients (student side and estimator
        frozen); in the student phase only the student side. The paper's filter phase leaves
        log σ² out of the Gaussian term (a constant there)."""
        total, logs = 0.0, {}
        log_variance = phase == "student" or self.variant != "paper"
        for k, (pair, t_side, s) in enumerate(zip(self.pairs, teacher_sides, student_feats)):
            if phase == "filter":
                with torch.no_grad():
                    s_side = pair.student_side(s)
                with _frozen(pair.redundancy):
                    loss, estimate = pair.redundancy_loss(s_side, t_side, log_variance=log_variance)
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
        self._check_inputs(teacher_feats, student_feats, labels)
        ce, logs = 0.0, {}
        teacher_sides = [pair.teacher_side(t.detach()) for pair, t in zip(self.pairs, teacher_feats)]
        for k, (pair, t_side) in enumerate(zip(self.pairs, teacher_sides)):
            logits = pair.head(t_side)
            # A label outside [0, num_classes) is named after cross_entropy refuses it (on the CPU), not
            # looked for beforehand: that would read a value on the host at every step.
            try:
                ce = ce + F.cross_entropy(logits, labels)
            except IndexError:
                bad = next(int(v) for v in labels.tolist() if not 0 <= v < self.num_classes)
                raise ValueError(
                    f"labels must be class indices in [0, {self.num_classes}) (num_classes); got {bad}"
                ) from None
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
        self._check_inputs(teacher_feats, student_feats)
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
