"""A run's distiller, built from its config: the student (initialised from the run's seed), the
given teacher, and the chosen method with the options of its config section.

The trainer builds it around its teacher; :mod:`rid_fast.train.measure` and a resumed run build
it around an untrained teacher of the right architecture, since every weight then comes from a
checkpoint. :func:`check_models` builds it once on the side, so that a wrong model, layer name
or method option — or a schedule that cannot be honoured over the run — is reported before any
teacher trains. :func:`schedule_length` is the run's length in the method's schedule unit.

In a data-parallel run (several processes, :mod:`rid_fast.train.distributed`) the student's and
the method's BatchNorms normalise over the global batch (:mod:`rid_fast.train.sync_batchnorm`),
and :func:`estimator_options` says what a contrastive RID estimator is called with.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rid_fast.distill.distiller import Distiller
from rid_fast.distill.methods import resolve_method
from rid_fast.distill.rid import CONTRASTIVE_ESTIMATORS
from rid_fast.train.config import ExperimentConfig
from rid_fast.train.data import Dataset, Split
from rid_fast.train.distributed import Processes
from rid_fast.train.models import build_model
from rid_fast.train.sync_batchnorm import convert_batchnorm

__all__ = ["build_distiller", "check_models", "estimator_options", "schedule_length", "steps_per_epoch"]


def estimator_options(config: ExperimentConfig, processes: Processes) -> dict:
    """The process group of the run's contrastive RID estimator and how its keys travel
    (``RID(group=..., gather=...)``): none in one process, with ``distill.global_negatives`` off, or
    for a method without a contrastive estimator. Otherwise a group of every process, made for the
    estimator alone (every process calls this, in the same order): its ring or all-gather then never
    shares a communicator with DDP's gradient all-reduces, which run during the same backward."""
    _, preset = resolve_method(config.distill.method)
    contrastive = preset.get("estimator") in CONTRASTIVE_ESTIMATORS
    if not (processes.parallel and config.distill.global_negatives and contrastive):
        return {}
    return {"group": torch.distributed.new_group(), "gather": config.distill.gather}


def build_distiller(
    config: ExperimentConfig,
    dataset: Dataset,
    teacher: nn.Module,
    device: torch.device,
    processes: Processes | None = None,
) -> Distiller:
    """The distiller of ``config``'s run around ``teacher``, on ``device``. Seeds torch's generator:
    the student's initialisation depends on ``run.seed`` alone, the method's modules on it too.
    Among several ``processes``, every BatchNorm but the (frozen) teacher's normalises over the
    global batch, and a contrastive RID estimator gets :func:`estimator_options`."""
    run, distill = config.run, config.distill
    processes = processes or Processes()
    options = distill.method_options()
    options.update(estimator_options(config, processes))
    torch.manual_seed(run.seed)
    student = build_model(config.student.model, dataset.input_shape, dataset.num_classes)
    if processes.parallel:  # before the distiller hooks the student's layers, so that hooks see the new modules
        student = convert_batchnorm(student)
    torch.manual_seed(run.seed + 1)
    distiller = Distiller(
        student.to(device),
        teacher.to(device),
        student_layers=distill.student_layers,
        teacher_layers=distill.teacher_layers,
        method=distill.method,
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        standardize_teacher=distill.standardize_teacher,
        teacher_noise_fraction=config.teacher.noise_fraction if config.teacher.kind == "noisy" else 0.0,
        noise_seed=run.seed,
        **options,
    ).to(device)
    if processes.parallel:
        convert_batchnorm(distiller.method)
    return distiller


def steps_per_epoch(config: ExperimentConfig, data_split: Split) -> int:
    """Optimizer steps in one student epoch: the student's subset in batches of ``optim.batch_size``."""
    return math.ceil(len(data_split.student) / config.optim.batch_size)


def schedule_length(config: ExperimentConfig, distiller: Distiller, steps_per_epoch: int) -> int:
    """Length of the method's schedule in its unit (epochs, or steps for a per-step schedule):
    ``optim.epochs`` worth of student updates, plus — with ``distill.equal_student_steps`` — the
    positions the method spends in other phases (RID's filter phases), so every method's student
    gets exactly the same number of updates (:meth:`Distiller.total_for_student`).
    Raises ``ValueError`` (saying what would do) when the schedule cannot be honoured."""
    epochs = config.optim.epochs
    student = epochs * steps_per_epoch if distiller.method.schedule_unit == "step" else epochs
    try:
        if config.distill.equal_student_steps:
            return distiller.total_for_student(student)
        distiller.phase(0, student)  # checks that the schedule can be honoured over that length
    except ValueError as error:  # the schedule speaks of its own arguments: name the config keys that set them
        raise ValueError(
            f"{error} (set by optim.epochs = {epochs} and distill.rid: n_rounds, filter_fraction, "
            "schedule_placement, schedule_unit)"
        ) from None
    return student


def check_models(config: ExperimentConfig, dataset: Dataset, steps_per_epoch: int | None = None) -> None:
    """Build the run's distiller around an untrained teacher on the CPU and throw it away: the
    models, the distilled layers and the method's options are checked (``ValueError`` naming what
    is wrong) in milliseconds instead of after a teacher has trained. Torch's CPU generator is
    left as it was."""
    with torch.random.fork_rng(devices=[]):
        try:
            teacher = build_model(config.teacher.model, dataset.input_shape, dataset.num_classes)
        except ValueError as error:
            raise ValueError(f"teacher.model: {error}") from None
        try:
            build_model(config.student.model, dataset.input_shape, dataset.num_classes)
        except ValueError as error:
            raise ValueError(f"student.model: {error}") from None
        distiller = build_distiller(config, dataset, teacher, torch.device("cpu"))
        try:
            if steps_per_epoch is not None:
                schedule_length(config, distiller, steps_per_epoch)
        finally:
            distiller.close()
