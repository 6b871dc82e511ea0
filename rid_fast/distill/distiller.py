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
    >>> out = distiller(torch.randn(32, 64), torch.randint(0, 10, (32,)), position=0, total=10)
    >>> sorted(k for k in out if not k.startswith(("filter_acc", "redundancy/")))
    ['filter_ce', 'logits', 'loss']
    >>> distiller.close()  # removes the forward hooks from both networks
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rid_fast.distill import methods
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
    each layer's channels replaced by fresh standard-normal noise at every step."""

    def __init__(self, shapes: Sequence[Sequence[int]], *, standardize: bool, noise_fraction: float, seed: int):
        super().__init__()
        if not 0.0 <= noise_fraction <= 1.0:
            raise ValueError(f"noise_fraction must be in [0, 1]; got {noise_fraction}")
        self.standardize = standardize
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

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
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
        input_shape: one input without the batch dimension, to infer feature shapes.
        standardize_teacher: standardise teacher features per channel (call
            :meth:`fit_teacher_statistics` with training inputs first).
        teacher_noise_fraction: fraction of each teacher layer's channels replaced by noise.
        noise_seed: picks the noisy channels.
        features: instead of hooks, ``features(model, x) -> (logits, [features])``.
        **options: passed to the method (e.g. ``weight``, ``estimator``, ``kd_temperature``).

    ``forward(x, y, position=..., total=...)`` runs the phase the method's schedule gives for
    ``position`` of ``total`` (epochs or steps) and returns a dict: ``loss`` (to minimise), each
    loss component, logged values (``redundancy/k`` …) and the student's ``logits`` (detached).
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
        standardize_teacher: bool = True,
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
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self._features = features
        self._student_hooks = None if features is not None else FeatureHooks(student, student_layers, "student")
        self._teacher_hooks = None if features is not None else FeatureHooks(teacher, teacher_layers, "teacher")
        teacher_shapes, student_shapes = self._feature_shapes(input_shape)
        method_cls, preset = methods.resolve_method(method)
        options = methods.method_options(method, {**preset, **options}, strict=True)
        self.method = method_cls(teacher_shapes, student_shapes, num_classes, **options)
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
    def _feature_shapes(self, input_shape: Sequence[int]) -> tuple[list[tuple], list[tuple]]:
        probe = torch.zeros(2, *input_shape, device=next(self.student.parameters()).device)
        with eval_mode(self.student):
            _, s_feats = self.student_features(probe)
            _, t_feats = self.teacher_outputs(probe)
        return [tuple(f.shape[1:]) for f in t_feats], [tuple(f.shape[1:]) for f in s_feats]

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
        return self.method.phase(position, total)

    def parameters_for(self, phase: str) -> list[nn.Parameter]:
        """Parameters an optimizer updates in ``phase``."""
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
        phase = self.phase(position, total)
        if teacher_outputs is None:
            teacher_outputs = self.teacher_outputs(x)
        teacher_logits, teacher_feats = teacher_outputs[0], self.teacher_transform(teacher_outputs[1])
        if phase == "student":
            student_logits, student_feats = self.student_features(x)
        else:  # the student is not trained in this phase: its BatchNorm statistics stay as they are
            with eval_mode(self.student), torch.no_grad():
                student_logits, student_feats = self.student_features(x)
        outputs = Outputs(student_logits, teacher_logits, student_feats, teacher_feats)
        losses, logs = self.method.losses(outputs, y, phase, position, total)
        if phase == "student":
            losses = {"ce": F.cross_entropy(student_logits, y), **losses}
        return {"loss": sum(losses.values()), **losses, **logs, "logits": student_logits.detach()}


#: The name under which the distiller was first published; every method runs through it.
RIDDistiller = Distiller
