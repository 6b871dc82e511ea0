"""One-line distillation for any teacher/student pair.

:class:`Distiller` (also importable as ``RIDDistiller``) takes features by module path with
forward hooks (or from a callable that returns them), keeps the teacher frozen in eval mode,
optionally standardises the teacher's features per channel and replaces a fraction of their
channels with noise (the paper's nuisance teacher), and hands everything to a distillation method
from :data:`rid_fast.distill.methods.METHODS`.

Example::

    >>> import torch
    >>> from rid_fast import Distiller
    >>> from rid_fast.models import MLP
    >>> teacher, student = MLP(64, [128, 128], 10), MLP(64, [16, 16], 10)
    >>> distiller = Distiller(student, teacher, student_layers=["blocks.0", "blocks.1"],
    ...                       teacher_layers=["blocks.0", "blocks.1"], method="rid_gaussian",
    ...                       num_classes=10, input_shape=(64,))
    >>> distiller.fit_teacher_statistics(torch.randn(256, 64))  # the teacher's feature statistics
    >>> total = distiller.total_for_student(20)  # 20 student epochs; RID's 5 filter epochs on top
    >>> total
    25
    >>> out = distiller(torch.randn(32, 64), torch.randint(0, 10, (32,)), position=0, total=total)
    >>> sorted(k for k in out if not k.startswith(("filter_acc", "redundancy/")))
    ['filter_ce', 'logits', 'loss']
    >>> distiller.close()  # removes the forward hooks from both networks
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rid_fast.distill import methods
from rid_fast.distill._checks import check_int
from rid_fast.distill.methods import Outputs

__all__ = ["Distiller", "RIDDistiller", "FeatureHooks", "TeacherFeatureTransform", "eval_mode"]

FeatureFn = Callable[[nn.Module, Tensor], tuple[Tensor, Sequence[Tensor]]]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode for the duration (BatchNorm statistics frozen, dropout off); its
    mode, and that of every submodule, is restored afterwards, also when the body raises."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


class FeatureHooks:
    """Forward hooks that capture the outputs of the modules at ``paths`` of ``model``.

    :meth:`collect` returns them in ``paths`` order and clears the store, so features never leak
    from one step into the next.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], role: str) -> None:
        self.paths = list(paths)
        self._store: dict[str, Tensor] = {}
        names = dict(model.named_modules())
        missing = [p for p in self.paths if p not in names]
        if missing:
            options = ", ".join(n for n in names if n)
            raise ValueError(f"{role}_layers: no module named {missing} in the {role}; modules are: {options}")
        self._handles = [names[p].register_forward_hook(self._capture(p)) for p in self.paths]

    def _capture(self, path: str):
        def hook(module, inputs, output):
            self._store[path] = output

        return hook

    def collect(self) -> list[Tensor]:
        try:
            return [self._store[p] for p in self.paths]
        finally:
            self._store.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class TeacherFeatureTransform(nn.Module):
    """Per-channel standardisation of the teacher's distilled features (statistics fitted once on
    the training data, kept as buffers) and, for a nuisance teacher, a fixed random fraction of
    each layer's channels replaced by fresh standard-normal noise at every step.

    Standardising before :meth:`fit` (or before loading a state that holds fitted statistics)
    would divide by the placeholder statistics (mean 0, std 1): it warns, once.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], *, standardize: bool, noise_fraction: float, seed: int):
        super().__init__()
        if not 0.0 <= noise_fraction <= 1.0:
            raise ValueError(f"noise_fraction must be in [0, 1]; got {noise_fraction}")
        self.standardize = standardize
        self._fitted = False  # a Python flag, not a buffer: checked at every step without a device sync
        self._warned = False
        gen = torch.Generator().manual_seed(seed)
        for k, shape in enumerate(shapes):
            channels = shape[0]
            noisy = torch.zeros(channels, dtype=torch.bool)
            noisy[torch.randperm(channels, generator=gen)[: round(noise_fraction * channels)]] = True
            self.register_buffer(f"noisy_{k}", noisy)
            self.register_buffer(f"mean_{k}", torch.zeros(channels))
            self.register_buffer(f"std_{k}", torch.ones(channels))

    @staticmethod
    def _channel_view(t: Tensor, feature: Tensor) -> Tensor:
        return t.view(1, -1, *([1] * (feature.dim() - 2)))

    @torch.no_grad()
    def fit(self, batches: Sequence[Sequence[Tensor]]) -> None:
        """Channel mean and standard deviation of each layer over ``batches`` of features."""
        for k in range(len(batches[0])):
            flat = torch.cat([b[k].transpose(0, 1).reshape(b[k].shape[1], -1) for b in batches], dim=1).float()
            getattr(self, f"mean_{k}").copy_(flat.mean(1))
            getattr(self, f"std_{k}").copy_(flat.std(1).clamp_min(1e-6))
        self._fitted = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._fitted = True  # statistics saved with a distiller are the ones it was trained with

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if self.standardize and not self._fitted and not self._warned:
            self._warned = True
            warnings.warn(
                "teacher features are standardised with statistics that were never fitted (mean 0, std 1): "
                "call fit_teacher_statistics(inputs) first, or pass standardize_teacher=False",
                UserWarning,
                stacklevel=3,
            )
        out = []
        for k, feature in enumerate(features):
            if self.standardize:
                mean = self._channel_view(getattr(self, f"mean_{k}"), feature)
                std = self._channel_view(getattr(self, f"std_{k}"), feature)
                feature = (feature - mean) / std
            noisy = getattr(self, f"noisy_{k}")
            if noisy.any():
                mask = self._channel_view(noisy, feature)
                feature = torch.where(mask, torch.randn_like(feature), feature)
            out.append(feature)
        return out


class Distiller(nn.Module):
    """A student, a frozen teacher and a distillation method, for one training step at a time.

    Args:
        student, teacher: the networks; the teacher is frozen and kept in eval mode.
        student_layers, teacher_layers: module paths (``model.named_modules()`` names) whose
            outputs are distilled, paired in order.
        method: a name of :data:`rid_fast.distill.methods.METHODS` or ``rid_<estimator>``.
        num_classes: number of classes (heads of RID's teacher filters).
        input_shape: one input without the batch dimension, to infer feature shapes; inputs of
            another shape are refused.
        standardize_teacher: standardise teacher features per channel (call
            :meth:`fit_teacher_statistics` with training inputs first; a forward before that warns
            once). None: the method's choice (yes, except for RID's ``variant="paper"``).
        teacher_noise_fraction: fraction of each teacher layer's channels replaced by noise.
        noise_seed: picks the noisy channels.
        features: instead of hooks, ``features(model, x) -> (logits, [features])``.
        **options: passed to the method (e.g. ``weight``, ``estimator``, ``kd_temperature``).

    ``forward(x, y, position=..., total=...)`` runs the phase the method's schedule gives for
    ``position`` of ``total`` (epochs or steps) and returns a dict: ``loss`` (to minimise), each
    loss component, logged values (``redundancy/k`` …) and the student's ``logits`` (detached).
    :meth:`total_for_student` gives the ``total`` under which the student gets a given number of
    updates whatever the method ("equal student steps": RID's filter phases come on top).
    :meth:`eval_mode` evaluates without touching BatchNorm statistics; :meth:`close` removes the
    forward hooks from both networks when the distiller is no longer needed.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        student_layers: Sequence[str] = (),
        teacher_layers: Sequence[str] = (),
        method: str = "rid",
        num_classes: int,
        input_shape: Sequence[int],
        standardize_teacher: bool | None = None,
        teacher_noise_fraction: float = 0.0,
        noise_seed: int = 0,
        features: FeatureFn | None = None,
        **options,
    ) -> None:
        super().__init__()
        if len(student_layers) != len(teacher_layers):
            raise ValueError(
                f"student_layers and teacher_layers must pair up; got {len(student_layers)} and {len(teacher_layers)}"
            )
        self.input_shape = _checked_input_shape(input_shape)
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self._features = features
        self._student_hooks = None if features is not None else FeatureHooks(student, student_layers, "student")
        self._teacher_hooks = None if features is not None else FeatureHooks(teacher, teacher_layers, "teacher")
        teacher_shapes, student_shapes = self._feature_shapes(self.input_shape)
        method_cls, preset = methods.resolve_method(method)
        options = methods.method_options(method, {**preset, **options}, strict=True)
        self.method = method_cls(teacher_shapes, student_shapes, num_classes, **options)
        if standardize_teacher is None:
            standardize_teacher = self.method.standardizes_teacher
        self.teacher_transform = TeacherFeatureTransform(
            teacher_shapes, standardize=standardize_teacher, noise_fraction=teacher_noise_fraction, seed=noise_seed
        )

    def _run(self, model: nn.Module, hooks: FeatureHooks | None, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if self._features is not None:
            logits, feats = self._features(model, x)
            return logits, list(feats)
        logits = model(x)
        return logits, hooks.collect()

    @torch.no_grad()
    def _feature_shapes(self, input_shape: tuple[int, ...]) -> tuple[list[tuple], list[tuple]]:
        probe = torch.zeros(2, *input_shape, device=next(self.student.parameters()).device)
        feats = {}
        for role, run in (("student", self.student_features), ("teacher", self.teacher_outputs)):
            try:
                with eval_mode(self.student):
                    feats[role] = run(probe)[1]
            except (RuntimeError, ValueError) as error:  # the network's own message, e.g. a matmul's shapes
                raise ValueError(
                    f"input_shape={input_shape}: the {role} cannot run a batch of that shape ({error})"
                ) from error
            # A model that reshapes its input (a flat one to an image) may accept a wrong shape
            # and fold it into the batch: its features then no longer pair with the labels.
            batches = sorted({f.shape[0] for f in feats[role]})
            if batches != [len(probe)]:
                raise ValueError(
                    f"input_shape={input_shape}: the {role} turns a batch of {len(probe)} inputs of that shape into "
                    f"features of batch {', '.join(map(str, batches))}; input_shape must be the shape of one input"
                )
        return [tuple(f.shape[1:]) for f in feats["teacher"]], [tuple(f.shape[1:]) for f in feats["student"]]

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # the teacher is frozen, BatchNorm statistics included
        return self

    def eval_mode(self):
        """Context manager: everything in eval mode for the duration, modes restored after.

        >>> # with distiller.eval_mode(): logits, features = distiller.student_features(x)
        """
        return eval_mode(self)

    def close(self) -> None:
        """Remove the forward hooks from the student and the teacher (idempotent)."""
        for hooks in (self._student_hooks, self._teacher_hooks):
            if hooks is not None:
                hooks.remove()

    def phase(self, position: int, total: int) -> str:
        """``"student"`` or ``"filter"`` (RID) at ``position`` of ``total``."""
        check_int("total", total, 1)
        check_int("position", position, 0)
        if position >= total:
            raise ValueError(f"position must be in [0, total); got position={position}, total={total}")
        return self.method.phase(position, total)

    def total_for_student(self, student_positions: int) -> int:
        """The schedule length (``total``, in the method's unit: epochs, or steps for RID with
        ``schedule_unit="step"``) whose student-phase positions are exactly ``student_positions``:
        the same number for every method, RID's filter phases on top. ``ValueError`` (saying what
        to change) when RID's schedule cannot have that many.

        >>> # epochs = distiller.total_for_student(100)  # 100 for no-KD, 125 for RID (5 rounds, 1/5)
        """
        return self.method.total_for_student(student_positions)

    def parameters_for(self, phase: str) -> list[nn.Parameter]:
        """Parameters an optimizer updates in ``phase`` (one of ``method.phases``)."""
        if phase not in self.method.phases:
            raise ValueError(
                f"phase must be one of {', '.join(map(repr, self.method.phases))} for {type(self.method).__name__}; "
                f"got {phase!r}"
            )
        own = self.method.phase_parameters(phase)
        return (list(self.student.parameters()) + own) if phase == "student" else own

    @torch.no_grad()
    def teacher_outputs(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Teacher logits and raw features of its distilled layers. The teacher is frozen, so a
        trainer may compute these once for a fixed training set and pass them to :meth:`forward`."""
        return self._run(self.teacher, self._teacher_hooks, x)

    @torch.no_grad()
    def teacher_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Teacher logits and transformed features (standardised, noisy channels replaced)."""
        logits, feats = self.teacher_outputs(x)
        return logits, self.teacher_transform(feats)

    def student_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Student logits and the features of its distilled layers (with the student's current mode)."""
        return self._run(self.student, self._student_hooks, x)

    @torch.no_grad()
    def fit_teacher_statistics(self, inputs: Tensor, batch_size: int = 512) -> None:
        """Fit the per-channel standardisation of the teacher's features on ``inputs``."""
        batches = [self.teacher_outputs(inputs[i : i + batch_size])[1] for i in range(0, len(inputs), batch_size)]
        self.teacher_transform.fit(batches)

    def forward(
        self,
        x: Tensor,
        y: Tensor,
        *,
        position: int = 0,
        total: int = 1,
        teacher_outputs: tuple[Tensor, Sequence[Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """One step's losses. ``teacher_outputs``: this batch's :meth:`teacher_outputs`, if the
        caller has them already (the teacher is then not run)."""
        self._check_batch(x, y)
        phase = self.phase(position, total)
        if teacher_outputs is None:
            teacher_outputs = self.teacher_outputs(x)
        teacher_logits, teacher_feats = teacher_outputs[0], self.teacher_transform(teacher_outputs[1])
        if phase == "student":
            student_logits, student_feats = self.student_features(x)
        else:
            # The student is not trained in this phase: by default its BatchNorm statistics stay as
            # they are (the paper's code runs it in training mode).
            frozen = self.method.student_eval_outside_its_phase
            with eval_mode(self.student) if frozen else contextlib.nullcontext(), torch.no_grad():
                student_logits, student_feats = self.student_features(x)
        outputs = Outputs(student_logits, teacher_logits, student_feats, teacher_feats)
        losses, logs = self.method.losses(outputs, y, phase, position, total)
        if phase == "student":
            losses = {"ce": F.cross_entropy(student_logits, y), **losses}
        return {"loss": sum(losses.values()), **losses, **logs, "logits": student_logits.detach()}

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.input_shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"x: expected shape (B, {', '.join(map(str, self.input_shape))}) as input_shape says; got {got}"
            )
        if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"y: expected shape ({x.shape[0]},), one class index per input; got {got}")


def _checked_input_shape(input_shape) -> tuple[int, ...]:
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise TypeError(
            f"input_shape must be a sequence of ints (one input without the batch dimension); got {input_shape!r}"
        )
    for extent in input_shape:
        check_int("input_shape entries", extent, 1)
    return tuple(int(extent) for extent in input_shape)


#: The name under which the distiller was first published; every method runs through it.
RIDDistiller = Distiller
