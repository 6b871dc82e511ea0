r"""Distillation methods behind one interface: the baselines and RID itself.

A :class:`DistillationMethod` is a module holding a method's own trainable parts (regressors,
filters, heads, estimators). Given the student's and teacher's logits and features it returns
``(losses, logs)``: the loss terms it adds to the student's cross-entropy, and values to log. The
distiller adds the student's cross-entropy in the student phase. Methods:

* ``nokd`` — cross-entropy only;
* ``kd`` (Hinton et al. 2015) — :math:`w\,T^2\,\mathrm{KL}(\mathrm{softmax}(z_t/T)\,\|\,\mathrm{softmax}(z_s/T))`;
* ``fitnets`` (Romero et al. 2015) — :math:`w \sum_k \lVert r_k(S_k) - T_k \rVert^2` (mean) with a
  regressor :math:`r_k` per layer;
* ``vid`` (Ahn et al. 2019) — :math:`w \sum_k \operatorname{mean}(\log\sigma_k^2 + (T_k -
  \mu_k(S_k))^2/\sigma_k^2)`, Gaussian with per-channel learned variance (a registered Parameter);
* ``crd`` (Tian et al. 2020), memory-free — :math:`-w \sum_k \hat I_{\mathrm{InfoNCE}}(e_s(S_k); e_t(T_k))`
  symmetric, in-batch negatives, cosine critic; runs through the fused kernels;
* ``rid`` — :class:`rid_fast.RIDLoss` with its two-phase schedule; ``rid_<estimator>`` names pick
  the redundancy estimator (``rid_gaussian``, ``rid_infonce``, …).

All methods are registered in :data:`METHODS`; :func:`resolve_method` maps a name to a class and
options. No if/elif chains over method names anywhere else.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from rid_fast.distill._checks import check_int, check_number
from rid_fast.distill.rid import (
    REDUNDANCY_ESTIMATORS,
    GaussianRedundancy,
    RIDLoss,
    RIDSchedule,
    match_shapes,
    pool_to_vector,
)
from rid_fast.mi import functional

__all__ = [
    "Outputs",
    "DistillationMethod",
    "NoKD",
    "KD",
    "FitNets",
    "VID",
    "CRD",
    "RID",
    "METHODS",
    "resolve_method",
    "method_options",
]

Losses = dict[str, Tensor]


@dataclass
class Outputs:
    """What a method sees of one batch. Features are per distilled layer, in config order."""

    student_logits: Tensor
    teacher_logits: Tensor
    student_features: list[Tensor]
    teacher_features: list[Tensor]


class DistillationMethod(nn.Module):
    """Base class. Subclasses set ``phases`` if they have more than the student phase."""

    #: Training phases, in the order a schedule visits them.
    phases: ClassVar[tuple[str, ...]] = ("student",)

    def phase(self, position: int, total: int) -> str:
        """The phase at ``position`` of ``total`` (epochs or steps, see :meth:`schedule_unit`)."""
        return "student"

    @property
    def schedule_unit(self) -> str:
        return "epoch"

    def total_for_student(self, student_positions: int) -> int:
        """Length of a schedule (in :attr:`schedule_unit`) with exactly ``student_positions``
        student-phase positions: the identity for methods that have no other phase."""
        check_int("student_positions", student_positions, 1)
        return student_positions

    @property
    def standardizes_teacher(self) -> bool:
        """Whether the distiller standardises teacher features unless told otherwise."""
        return True

    @property
    def student_eval_outside_its_phase(self) -> bool:
        """Whether the student runs in eval mode (BatchNorm statistics frozen) in other phases."""
        return True

    def losses(self, outputs: Outputs, labels: Tensor, phase: str, position: int, total: int) -> tuple[Losses, Losses]:
        raise NotImplementedError

    def phase_parameters(self, phase: str) -> list[nn.Parameter]:
        """This method's own parameters updated in ``phase`` (the student's are added by the caller)."""
        return list(self.parameters()) if phase == "student" else []


class NoKD(DistillationMethod):
    """No distillation: the student's cross-entropy alone."""

    def __init__(self, teacher_shapes, student_shapes, num_classes) -> None:
        super().__init__()

    def losses(self, outputs, labels, phase, position, total):
        return {}, {}


class KD(DistillationMethod):
    """Hinton's knowledge distillation on the logits."""

    def __init__(
        self, teacher_shapes, student_shapes, num_classes, *, weight: float = 1.0, kd_temperature: float = 4.0
    ):
        super().__init__()
        check_number("weight", weight, minimum=0.0)
        check_number("kd_temperature", kd_temperature, minimum=0.0, inclusive=False)
        self.weight, self.kd_temperature = weight, kd_temperature

    def losses(self, outputs, labels, phase, position, total):
        t = self.kd_temperature
        log_student = F.log_softmax(outputs.student_logits / t, dim=1)
        log_teacher = F.log_softmax(outputs.teacher_logits / t, dim=1)
        kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        return {"kd": self.weight * t * t * kl}, {}


def _regressor(student_shape: Sequence[int], teacher_shape: Sequence[int], depth: int) -> nn.Module:
    """Student features → teacher features (after pooling to a common layout)."""
    student_pool, teacher_pool, (s_shape, t_shape) = match_shapes(student_shape, teacher_shape)
    layers: list[nn.Module] = [student_pool]
    conv = len(s_shape) == 3
    dims = [s_shape[0]] + [t_shape[0]] * depth
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Conv2d(d_in, d_out, 1) if conv else nn.Linear(d_in, d_out))
        if i < depth - 1:
            layers.append(nn.ReLU())
    return _PairedRegressor(nn.Sequential(*layers), teacher_pool)


class _PairedRegressor(nn.Module):
    def __init__(self, student_side: nn.Module, teacher_pool: nn.Module) -> None:
        super().__init__()
        self.student_side, self.teacher_pool = student_side, teacher_pool

    def forward(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        return self.student_side(student), self.teacher_pool(teacher)


class FitNets(DistillationMethod):
    """Hint learning: regress every distilled teacher layer from the student's."""

    def __init__(self, teacher_shapes, student_shapes, num_classes, *, weight: float = 1.0):
        super().__init__()
        check_number("weight", weight, minimum=0.0)
        self.weight = weight
        self.regressors = nn.ModuleList(_regressor(s, t, depth=1) for t, s in zip(teacher_shapes, student_shapes))

    def losses(self, outputs, labels, phase, position, total):
        hint = sum(
            F.mse_loss(*regressor(s, t.detach()))
            for regressor, s, t in zip(self.regressors, outputs.student_features, outputs.teacher_features)
        )
        return {"hint": self.weight * hint}, {}


class VID(DistillationMethod):
    """Variational information distillation: a Gaussian q(T | S) with a learned mean network and
    per-channel variance, maximising a lower bound on I(T; S) for every distilled layer."""

    def __init__(self, teacher_shapes, student_shapes, num_classes, *, weight: float = 1.0):
        super().__init__()
        check_number("weight", weight, minimum=0.0)
        self.weight = weight
        self.means = nn.ModuleList(_regressor(s, t, depth=3) for t, s in zip(teacher_shapes, student_shapes))
        self.variances = nn.ModuleList(GaussianRedundancy(t[0]) for t in teacher_shapes)

    def losses(self, outputs, labels, phase, position, total):
        total_loss, logs = 0.0, {}
        for k, (mean, gaussian, s, t) in enumerate(
            zip(self.means, self.variances, outputs.student_features, outputs.teacher_features)
        ):
            prediction, target = mean(s, t.detach())
            loss = gaussian(prediction, target)
            total_loss = total_loss + loss
            logs[f"vid/{k}"] = loss.detach()
        return {"vid": self.weight * total_loss}, logs


class CRD(DistillationMethod):
    """Contrastive representation distillation without the memory bank: symmetric InfoNCE between
    linear embeddings of pooled student and teacher features, negatives from the batch."""

    def __init__(
        self,
        teacher_shapes,
        student_shapes,
        num_classes,
        *,
        weight: float = 1.0,
        temperature: float = 0.07,
        embed_dim: int = 128,
    ):
        super().__init__()
        check_number("weight", weight, minimum=0.0)
        check_number("temperature", temperature, minimum=0.0, inclusive=False)
        check_int("embed_dim", embed_dim, 1)
        self.weight, self.temperature = weight, temperature
        self.student_embed = nn.ModuleList(nn.Linear(s[0], embed_dim) for s in student_shapes)
        self.teacher_embed = nn.ModuleList(nn.Linear(t[0], embed_dim) for t in teacher_shapes)

    def losses(self, outputs, labels, phase, position, total):
        total_loss, logs = 0.0, {}
        for k, (e_s, e_t, s, t) in enumerate(
            zip(self.student_embed, self.teacher_embed, outputs.student_features, outputs.teacher_features)
        ):
            estimate = functional.infonce(
                e_s(pool_to_vector(s)),
                e_t(pool_to_vector(t.detach())),
                temperature=self.temperature,
                critic="cosine",
                symmetric=True,
                check_values=False,
            )
            total_loss = total_loss - estimate
            logs[f"crd/{k}"] = estimate.detach()
        return {"crd": self.weight * total_loss}, logs


class RID(DistillationMethod):
    """Redundant information distillation (see :mod:`rid_fast.distill.rid`): alternating filter and
    student phases; ``weight`` is α. ``variant="paper"`` is the official code's system: its loss
    (:class:`~rid_fast.distill.rid.RIDLoss`), its schedule placement (unless ``schedule_placement``
    says otherwise), unstandardised teacher features (unless the distiller is told otherwise) and
    the student in training mode during the filter phase, as there. ``group`` and ``gather`` go to
    a contrastive redundancy estimator (:class:`~rid_fast.distill.rid.RIDLoss`): its negatives from
    every process of the group."""

    phases = ("filter", "student")

    def __init__(
        self,
        teacher_shapes,
        student_shapes,
        num_classes,
        *,
        weight: float = 1.0,
        estimator: str = "gaussian",
        temperature: float = 0.1,
        filter_hidden: int | None = None,
        n_rounds: int = 5,
        filter_fraction: float = 0.2,
        schedule_unit: str = "epoch",
        redundancy_from_round: int = 1,
        min_variance: float = 1e-3,
        variant: str = "rid_fast",
        schedule_placement: str | None = None,
        group=None,
        gather: str = "ring",
    ):
        super().__init__()
        check_number("weight", weight, minimum=0.0)
        self.loss = RIDLoss(
            teacher_shapes,
            student_shapes,
            num_classes,
            estimator=estimator,
            alpha=weight,
            filter_hidden=filter_hidden,
            temperature=temperature,
            min_variance=min_variance,
            variant=variant,
            group=group,
            gather=gather,
        )
        if schedule_placement is None:
            schedule_placement = "paper" if variant == "paper" else "even"
        self.schedule = RIDSchedule(n_rounds, filter_fraction, schedule_unit, redundancy_from_round, schedule_placement)

    @property
    def schedule_unit(self) -> str:
        return self.schedule.unit

    def total_for_student(self, student_positions: int) -> int:
        return self.schedule.total_for_student(student_positions)

    @property
    def standardizes_teacher(self) -> bool:
        return self.loss.variant != "paper"

    @property
    def student_eval_outside_its_phase(self) -> bool:
        # The official code runs the student in training mode in both phases (batch statistics in
        # its BatchNorm layers, running averages updated).
        return self.loss.variant != "paper"

    def phase(self, position: int, total: int) -> str:
        return self.schedule.phase(position, total)

    def losses(self, outputs, labels, phase, position, total):
        if phase == "filter":
            return self.loss.filter_phase_loss(
                outputs.teacher_features,
                outputs.student_features,
                labels,
                include_redundancy=self.schedule.redundancy_in_filter_phase(position, total),
            )
        return self.loss.student_phase_loss(outputs.teacher_features, outputs.student_features)

    def phase_parameters(self, phase: str) -> list[nn.Parameter]:
        return self.loss.filter_parameters() if phase == "filter" else self.loss.student_side_parameters()


#: Method name → class.
METHODS: dict[str, type[DistillationMethod]] = {
    "nokd": NoKD,
    "kd": KD,
    "fitnets": FitNets,
    "vid": VID,
    "crd": CRD,
    "rid": RID,
}


def resolve_method(name: str) -> tuple[type[DistillationMethod], dict]:
    """Class and preset options for a method name: a key of :data:`METHODS`, or
    ``rid_<estimator>`` with an estimator of :data:`rid_fast.distill.rid.REDUNDANCY_ESTIMATORS`."""
    if name in METHODS:
        return METHODS[name], {}
    prefix, _, estimator = name.partition("_")
    if prefix == "rid" and estimator in REDUNDANCY_ESTIMATORS:
        return RID, {"estimator": estimator}
    known = [*METHODS, *(f"rid_{e}" for e in REDUNDANCY_ESTIMATORS)]
    raise ValueError(f"unknown distillation method {name!r}; expected one of {', '.join(known)}")


def method_options(name: str, options: dict, *, strict: bool) -> dict:
    """The subset of ``options`` that method ``name`` takes (keyword-only ``__init__`` arguments).
    With ``strict``, an option it does not take is an error that names it."""
    method_cls, _ = resolve_method(name)
    parameters = inspect.signature(method_cls.__init__).parameters
    accepted = {p for p, spec in parameters.items() if spec.kind == inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(options) - accepted)
    if strict and unknown:
        raise ValueError(f"method {name!r} does not take option(s) {unknown}; it takes {sorted(accepted)}")
    return {key: value for key, value in options.items() if key in accepted}
