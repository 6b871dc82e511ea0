"""Experiment configuration: typed dataclasses, loaded from short YAML with dotted overrides.

    cfg = load_config("configs/digits_nuisance.yaml", ["optim.lr=0.1", "distill.method=vid"])

YAML is read with ``yaml.safe_load`` (no code execution). Every key must be a field of the
dataclasses below and every value must have the field's type; otherwise a ``ValueError`` names the
key (with the closest valid name) and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ExperimentConfig",
    "DataConfig",
    "OptimConfig",
    "TeacherConfig",
    "StudentConfig",
    "DistillConfig",
    "RunConfig",
    "CompareConfig",
    "load_config",
    "from_dict",
    "to_dict",
]


@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist1d | cifar10
    data_dir: str | None = None  # cifar10: folder holding cifar-10-batches-py
    per_class: int | None = 20  # student's training images per class (None: all)
    val_fraction: float = 0.2  # of the training set, stratified; model selection only
    augment: bool = False  # random crop + horizontal flip (images)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    epochs: int = 100
    batch_size: int = 64
    grad_clip: float | None = 100.0
    lr_schedule: str = "cosine"  # cosine | constant


@dataclass
class TeacherConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"name": "mlp", "hidden": [256, 256]})
    kind: str = "trained"  # trained | untrained | noisy
    noise_fraction: float = 0.5  # noisy: fraction of each distilled layer's channels replaced by noise
    checkpoint: str | None = None  # a trained teacher's state_dict to use instead of training one
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(epochs=60))


@dataclass
class StudentConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"name": "mlp", "hidden": [16, 16]})


@dataclass
class DistillConfig:
    method: str = "rid_gaussian"  # nokd | kd | fitnets | vid | crd | rid_<estimator>
    teacher_layers: list[str] = field(default_factory=list)
    student_layers: list[str] = field(default_factory=list)
    weight: float = 1.0  # weight of the distillation term (RID's α)
    method_weights: dict[str, float] = field(default_factory=dict)  # per-method override of weight
    kd_temperature: float = 4.0  # kd
    temperature: float = 0.1  # critic temperature of contrastive terms (crd, rid_infonce, …)
    filter_hidden: int | None = None  # rid: hidden width of the filters
    n_rounds: int = 5  # rid: rounds of the filter/student schedule
    filter_fraction: float = 0.2  # rid: share of each round spent in the filter phase
    schedule_unit: str = "epoch"  # rid: epoch | step
    schedule_placement: str | None = None  # rid: even | paper (None: paper for variant paper, else even)
    redundancy_from_round: int = 1  # rid: first round whose filter phase includes the redundancy term
    min_variance: float = 1e-3  # rid (gaussian): floor of the learned variance
    equal_student_steps: bool = True  # rid: filter phases come on top of optim.epochs of student updates
    variant: str = "rid_fast"  # rid: rid_fast | paper (the official code's system, see README)
    standardize_teacher: bool | None = None  # standardise teacher features per channel (None: the method's choice)


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0  # fixes the student's subset, its initialisation and the teacher
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = False  # bf16 autocast on CUDA
    eval_every: int = 1  # epochs between evaluations (always at the end)
    checkpoint_every: int = 1  # epochs between ckpt/latest.pt writes (0: only at the end)
    pid_every: int = 0  # epochs between PID measurements of the distilled layers on validation (0: off)
    pid_components: int = 5  # PID measurement: principal components kept per representation
    pid_clusters: int = 10  # PID measurement: k-means clusters per representation
    progress: bool | None = None  # progress bar; None: only when stderr is a terminal


@dataclass
class CompareConfig:
    methods: list[str] = field(default_factory=lambda: ["nokd", "kd", "fitnets", "vid", "rid_gaussian", "rid_infonce"])
    teachers: list[str] = field(default_factory=lambda: ["trained", "untrained", "noisy"])
    seeds: int = 5
    pid: bool = True  # measure Red(Y:T,S) and Uni(Y:T\S) of every run at the end (pid.csv, report)


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint, key: str) -> Any:
    """``value`` checked against the type hint ``hint`` (ints accepted for floats)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError(errors[0] if errors else f"{key}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping of {hint.__name__} fields; got {value!r}")
        return from_dict(hint, value, prefix=key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list; got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping; got {type(value).__name__} {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (
        isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        return value
    raise ValueError(f"{key} must be {_type_name(hint)}; got {type(value).__name__} {value!r}")


def from_dict(cls, data: dict, prefix: str = "", base=None):
    """Dataclass ``cls`` from a mapping, starting from ``base`` (default: ``cls()``) so that a
    nested section keeps the defaults of the keys it does not set. Unknown keys and wrong types
    are errors."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {prefix + str(key)!r}{hint}; valid keys here: {', '.join(names)}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            values[key] = from_dict(hints[key], value, prefix + key + ".", base=getattr(base, key))
        else:
            values[key] = _coerce(value, hints[key], prefix + key)
    return dataclasses.replace(base, **values)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def _apply_override(data: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ValueError(f"override {override!r} must look like section.key=value")
    *path, last = key.strip().split(".")
    node = data
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part!r} is not a section")
    node[last] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read ``path`` (YAML; optional) and apply ``key=value`` overrides (values parsed as YAML)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of sections; got {type(data).__name__}")
    for override in overrides:
        _apply_override(data, override)
    return from_dict(ExperimentConfig, data)
