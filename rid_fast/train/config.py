"""Experiment configuration: typed dataclasses, loaded from short YAML with dotted overrides.

    cfg = load_config("configs/digits_nuisance.yaml", ["optim.lr=0.1", "distill.method=vid"])

YAML is read with ``yaml.safe_load`` (no code execution). Every key must be a field of the
dataclasses below, every value must have the field's type and lie in the field's range, declared
on the field itself (``epochs: int = setting(100, at_least(1))``); otherwise a ``ValueError``
names the key (with the closest valid name) and what was expected. :func:`check` runs the same
checks on a config built in code; the trainer and ``compare`` call it before any work starts.

**Per-method options.** Each distillation method's options live in a section named after it:
``distill.kd``, ``distill.fitnets``, ``distill.vid``, ``distill.crd`` and ``distill.rid``. RID's
schedule and filters are shared by its variants; what depends on the redundancy estimator (the
weight α, the critic's temperature, the variance floor) has a subsection per estimator
(``distill.rid.gaussian``, ``distill.rid.infonce``, …), so ``rid_gaussian`` and ``rid_infonce``
can be compared with their own weights. :meth:`DistillConfig.method_options` gives the chosen
method's section as the keyword options its class in :mod:`rid_fast.distill.methods` takes.

**Resuming.** A run resumes with its own ``config.yaml`` (:func:`resume_config`). Fields declared
``changeable_on_resume`` say where the run lives and how it reports (``run.out_dir``,
``run.progress``, ``run.checkpoint_every``, ``data.data_dir``, the ``compare`` section); every
other value is part of what was trained and may not change, ``optim.epochs`` included: the
learning rate's cosine and RID's rounds are laid out over the run's whole length, so a longer run
would already have taken different steps.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from rid_fast.distill.methods import METHODS, resolve_method
from rid_fast.distill.rid import REDUNDANCY_ESTIMATORS
from rid_fast.train.data import DATASETS

__all__ = [
    "ExperimentConfig",
    "DataConfig",
    "OptimConfig",
    "TeacherConfig",
    "StudentConfig",
    "DistillConfig",
    "KDOptions",
    "FitNetsOptions",
    "VIDOptions",
    "CRDOptions",
    "RIDOptions",
    "GaussianRedundancyOptions",
    "ContrastiveRedundancyOptions",
    "RunConfig",
    "CompareConfig",
    "Rule",
    "setting",
    "load_config",
    "resume_config",
    "check",
    "differences",
    "from_dict",
    "to_dict",
    "TEACHER_KINDS",
    "KNOWN_METHODS",
    "BASELINE",
]

#: Teachers a run can distil from (see :mod:`rid_fast.train.teachers`).
TEACHER_KINDS = ("trained", "untrained", "noisy")
#: Method names :func:`rid_fast.distill.methods.resolve_method` accepts.
KNOWN_METHODS = (*METHODS, *(f"rid_{estimator}" for estimator in REDUNDANCY_ESTIMATORS))
#: The method every other is compared with.
BASELINE = "nokd"


# ---- value rules ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A requirement on one config value: ``test(value)`` is true when it holds, and ``text``
    completes the sentence "KEY must be …". With ``each``, the rule applies to every entry of a
    list (and the message names the entry)."""

    test: Callable[[Any], bool]
    text: str
    each: bool = False

    def check(self, key: str, value: Any) -> None:
        for entry_key, entry in [(f"{key}[{i}]", v) for i, v in enumerate(value)] if self.each else [(key, value)]:
            if not self.test(entry):
                raise ValueError(f"{entry_key} must be {self.text}; got {entry!r}")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: float) -> Rule:
    return Rule(lambda v: _finite(v) and v >= low, f"at least {low}")


def above(low: float) -> Rule:
    return Rule(lambda v: _finite(v) and v > low, f"greater than {low}")


def within(low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> Rule:
    brackets = ("(" if low_open else "[") + f"{low}, {high}" + (")" if high_open else "]")

    def test(v):
        return _finite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return Rule(test, f"in {brackets}")


def one_of(*choices: Any) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(map(repr, choices)))


def each(rule: Rule) -> Rule:
    return dataclasses.replace(rule, each=True)


def _is_device(name: Any) -> bool:
    kind, sep, index = str(name).partition(":")
    return name == "auto" or (kind in ("cpu", "cuda") and not sep) or (kind == "cuda" and index.isdigit())


def setting(
    default: Any = MISSING,
    rule: Rule | None = None,
    *,
    factory: Callable[[], Any] | Any = MISSING,
    changeable_on_resume: bool = False,
    option: str | None = None,
):
    """A dataclass field with its range: ``rule`` (checked on every value but None), whether a
    resumed run may change it (``changeable_on_resume``: it does not change what is trained, and
    holds for the whole subtree of a section), and, in a method's section, the keyword ``option``
    of the method class it is passed as (default: the field's name)."""
    metadata = {"rule": rule, "changeable_on_resume": changeable_on_resume, "option": option}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ---- sections ---------------------------------------------------------------------------------


@dataclass
class DataConfig:
    name: str = setting("digits", one_of(*DATASETS))
    data_dir: str | None = setting(None, changeable_on_resume=True)  # cifar10: folder holding cifar-10-batches-py
    per_class: int | None = setting(20, at_least(1))  # student's training images per class (None: all)
    val_fraction: float = setting(0.2, within(0.0, 1.0, high_open=True))  # of the training set; model selection
    augment: bool = False  # random crop + horizontal flip (images)


@dataclass
class OptimConfig:
    name: str = setting("sgd", one_of("sgd", "adam", "adamw"))
    lr: float = setting(0.05, at_least(0.0))
    momentum: float = setting(0.9, within(0.0, 1.0, high_open=True))
    nesterov: bool = True
    weight_decay: float = setting(5e-4, at_least(0.0))
    epochs: int = setting(100, at_least(1))
    batch_size: int = setting(64, at_least(1))
    grad_clip: float | None = setting(100.0, at_least(0.0))  # 0 or None: no clipping
    lr_schedule: str = setting("cosine", one_of("cosine", "constant"))

    def check_together(self, prefix: str) -> None:
        if self.name == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError(f"{prefix}nesterov needs {prefix}momentum > 0 (or set {prefix}nesterov=false)")


@dataclass
class TeacherConfig:
    model: dict[str, Any] = setting(factory=lambda: {"name": "mlp", "hidden": [256, 256]})
    kind: str = setting("trained", one_of(*TEACHER_KINDS))
    noise_fraction: float = setting(0.5, within(0.0, 1.0))  # noisy: share of each distilled layer's channels
    checkpoint: str | None = None  # a trained teacher's state_dict to use instead of training one
    optim: OptimConfig = setting(factory=lambda: OptimConfig(epochs=60))


@dataclass
class StudentConfig:
    model: dict[str, Any] = setting(factory=lambda: {"name": "mlp", "hidden": [16, 16]})


class MethodOptions:
    """A method's config section: its fields are the keyword options of the method's class."""

    def options(self, **preset) -> dict[str, Any]:
        """The options to pass to the method's class (``preset``: what its name already fixes)."""
        return {
            f.metadata.get("option") or f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if not isinstance(getattr(self, f.name), MethodOptions)  # subsections give their own
        }


_WEIGHT = at_least(0.0)


@dataclass
class KDOptions(MethodOptions):
    """``kd``: Hinton's distillation on the logits."""

    weight: float = setting(1.0, _WEIGHT)
    temperature: float = setting(4.0, above(0.0), option="kd_temperature")  # softmax temperature T


@dataclass
class FitNetsOptions(MethodOptions):
    """``fitnets``: regress the teacher's features from the student's."""

    weight: float = setting(1.0, _WEIGHT)


@dataclass
class VIDOptions(MethodOptions):
    """``vid``: variational information distillation."""

    weight: float = setting(1.0, _WEIGHT)


@dataclass
class CRDOptions(MethodOptions):
    """``crd``: contrastive representation distillation (in-batch negatives)."""

    weight: float = setting(1.0, _WEIGHT)
    temperature: float = setting(0.1, above(0.0))  # critic temperature
    embed_dim: int = setting(128, at_least(1))


@dataclass
class GaussianRedundancyOptions(MethodOptions):
    """``rid_gaussian``: the paper's Gaussian redundancy term."""

    weight: float = setting(1.0, _WEIGHT)  # α
    min_variance: float = setting(1e-3, within(0.0, 5.0, low_open=True, high_open=True))  # floor of σ² (starts at 5)


@dataclass
class ContrastiveRedundancyOptions(MethodOptions):
    """``rid_<estimator>`` for a contrastive estimator (InfoNCE, NWJ, DV, SMILE, JS, MINE)."""

    weight: float = setting(1.0, _WEIGHT)  # α
    temperature: float = setting(0.1, above(0.0))  # cosine critic's temperature


def _contrastive():
    return setting(factory=ContrastiveRedundancyOptions)


@dataclass
class RIDOptions(MethodOptions):
    """``rid`` and ``rid_<estimator>``: filters and schedule shared by every variant; the
    estimator's own options in the subsection named after it."""

    filter_hidden: int | None = setting(None, at_least(1))  # hidden width of the filters (None: their output width)
    n_rounds: int = setting(5, at_least(1))  # rounds of the filter/student schedule
    filter_fraction: float = setting(0.2, within(0.0, 1.0, high_open=True))  # share of a round in the filter phase
    schedule_unit: str = setting("epoch", one_of("epoch", "step"))
    redundancy_from_round: int = setting(1, at_least(0))  # first round whose filter phase has the redundancy term
    variant: str = setting("rid_fast", one_of("rid_fast", "paper"))  # paper: the official code's system (README)
    schedule_placement: str | None = setting(None, one_of("even", "paper"))  # None: paper for variant paper, else even
    gaussian: GaussianRedundancyOptions = setting(factory=GaussianRedundancyOptions)
    infonce: ContrastiveRedundancyOptions = _contrastive()
    nwj: ContrastiveRedundancyOptions = _contrastive()
    dv: ContrastiveRedundancyOptions = _contrastive()
    smile: ContrastiveRedundancyOptions = _contrastive()
    js: ContrastiveRedundancyOptions = _contrastive()
    mine: ContrastiveRedundancyOptions = _contrastive()

    def options(self, *, estimator: str = "gaussian", **preset) -> dict[str, Any]:
        return {**super().options(), **getattr(self, estimator).options()}


@dataclass
class DistillConfig:
    method: str = setting("rid_gaussian", one_of(*KNOWN_METHODS))
    teacher_layers: list[str] = setting(factory=list)
    student_layers: list[str] = setting(factory=list)
    # standardise teacher features per channel (None: the method's choice; RID's paper variant does not)
    standardize_teacher: bool | None = None
    equal_student_steps: bool = True  # rid: filter phases come on top of optim.epochs of student updates
    # Several processes (torchrun): a contrastive RID estimator's negatives come from the whole global
    # batch, gathered from every process as `gather` says (ring: key blocks passed around; all_gather:
    # every key at once), not from the process's own shard. One process holds the whole batch anyway.
    global_negatives: bool = True
    gather: str = setting("ring", one_of("ring", "all_gather"))
    kd: KDOptions = setting(factory=KDOptions)
    fitnets: FitNetsOptions = setting(factory=FitNetsOptions)
    vid: VIDOptions = setting(factory=VIDOptions)
    crd: CRDOptions = setting(factory=CRDOptions)
    rid: RIDOptions = setting(factory=RIDOptions)

    #: Keys of earlier versions that no field's name finds, with where their values go now.
    RETIRED: ClassVar[dict[str, str]] = {
        "method_weights": "the weight of each method's own section (distill.kd.weight, distill.rid.infonce.weight, …)",
    }

    def check_together(self, prefix: str) -> None:
        if len(self.teacher_layers) != len(self.student_layers):
            raise ValueError(
                f"{prefix}teacher_layers and {prefix}student_layers must pair up; got {len(self.teacher_layers)} "
                f"and {len(self.student_layers)} names"
            )

    def method_options(self, method: str | None = None) -> dict[str, Any]:
        """The keyword options of ``method`` (default: :attr:`method`) from its section: the
        section named after its class in :data:`rid_fast.distill.methods.METHODS` (none for no-KD)."""
        method_cls, preset = resolve_method(method or self.method)
        name = next(key for key, cls in METHODS.items() if cls is method_cls)
        section = getattr(self, name, None)
        return {} if section is None else section.options(**preset)


@dataclass
class RunConfig:
    out_dir: str = setting("runs/default", changeable_on_resume=True)
    seed: int = setting(0, at_least(0))  # fixes the student's subset, its initialisation and the teacher
    device: str = setting("auto", Rule(_is_device, "'auto', 'cpu', 'cuda' or 'cuda:<index>'"))
    amp: bool = False  # bf16 autocast on CUDA
    eval_every: int = setting(1, at_least(1))  # epochs between evaluations (always at the end)
    checkpoint_every: int = setting(1, at_least(0), changeable_on_resume=True)  # epochs between writes (0: at the end)
    pid_every: int = setting(0, at_least(0))  # epochs between PID measurements on validation (0: off)
    pid_components: int = setting(5, at_least(1))  # PID measurement: principal components kept per representation
    pid_clusters: int = setting(10, at_least(2))  # PID measurement: k-means clusters per representation
    progress: bool | None = setting(None, changeable_on_resume=True)  # progress bar; None: when stderr is a terminal


@dataclass
class CompareConfig:
    methods: list[str] = setting(
        factory=lambda: ["nokd", "kd", "fitnets", "vid", "rid_gaussian", "rid_infonce"],
        rule=each(one_of(*KNOWN_METHODS)),
    )
    teachers: list[str] = setting(factory=lambda: list(TEACHER_KINDS), rule=each(one_of(*TEACHER_KINDS)))
    seeds: int = setting(5, at_least(1))
    pid: bool = True  # measure Red(Y:T,S) and Uni(Y:T\S) of every run at the end (pid.csv, report)

    def check_together(self, prefix: str) -> None:
        if BASELINE not in self.methods:
            raise ValueError(f"{prefix}methods must include {BASELINE!r}, the baseline every method is paired with")
        for key, values in (("methods", self.methods), ("teachers", self.teachers)):
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{prefix}{key} must be a non-empty list without repeats; got {values}")


@dataclass
class ExperimentConfig:
    data: DataConfig = setting(factory=DataConfig)
    teacher: TeacherConfig = setting(factory=TeacherConfig)
    student: StudentConfig = setting(factory=StudentConfig)
    distill: DistillConfig = setting(factory=DistillConfig)
    optim: OptimConfig = setting(factory=OptimConfig)
    run: RunConfig = setting(factory=RunConfig)
    compare: CompareConfig = setting(factory=CompareConfig, changeable_on_resume=True)


# ---- reading and checking -----------------------------------------------------------------------


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
        if isinstance(value, hint):
            return value
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


def _keys_named(cls, name: str, prefix: str) -> list[str]:
    """Dotted keys of the sections nested in ``cls`` whose field (or method option) is ``name``."""
    found = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            found += [f"{prefix}{f.name}.{f_name}" for f_name in _field_names(hint, name)]
            found += _keys_named(hint, name, f"{prefix}{f.name}.")
    return list(dict.fromkeys(found))


def _field_names(cls, name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if name in (f.name, f.metadata.get("option"))]


def _unknown_key(cls, key: str, prefix: str, names: list[str]) -> ValueError:
    full = prefix + str(key)
    moved = _keys_named(cls, str(key), prefix)
    if moved:
        return ValueError(f"{full!r} is not a key here; set it in the section it belongs to: {', '.join(moved)}")
    retired = getattr(cls, "RETIRED", {})
    if key in retired:
        return ValueError(f"{full!r} is no longer a key; set {retired[key]}")
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    return ValueError(f"unknown config key {full!r}{hint}; valid keys here: {', '.join(names)}")


def from_dict(cls, data: dict, prefix: str = "", base=None):
    """Dataclass ``cls`` from a mapping, starting from ``base`` (default: ``cls()``) so that a
    nested section keeps the defaults of the keys it does not set. Unknown keys and wrong types
    are errors (:func:`check` then checks the ranges)."""
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(cls, key, prefix, names)
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            values[key] = from_dict(hints[key], value, prefix + key + ".", base=getattr(base, key))
        else:
            values[key] = _coerce(value, hints[key], prefix + key)
    return dataclasses.replace(base, **values)


def check(config, prefix: str = "") -> None:
    """Every value of ``config`` (an :class:`ExperimentConfig` or one of its sections) has its
    field's type and lies in its range, and the sections' joint conditions hold; else a
    ``ValueError`` naming the key."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        key, value = prefix + f.name, getattr(config, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            if not isinstance(value, hints[f.name]):
                raise ValueError(f"{key} must be a {hints[f.name].__name__}; got {type(value).__name__}")
            check(value, key + ".")
            continue
        _coerce(value, hints[f.name], key)
        rule = f.metadata.get("rule")
        if rule is not None and value is not None:
            rule.check(key, value)
    if hasattr(config, "check_together"):
        config.check_together(prefix)


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
    try:
        node[last] = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ValueError(f"override {override!r}: the value is not valid YAML ({_yaml_problem(error)})") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what is wrong and where."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read ``path`` (YAML; optional), apply ``key=value`` overrides (values parsed as YAML) and
    :func:`check` the result."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            why = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"config file {str(path)!r} {why}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"config file {str(path)!r} is not valid YAML ({_yaml_problem(error)})") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of sections; got {type(data).__name__}")
    for override in overrides:
        _apply_override(data, override)
    config = from_dict(ExperimentConfig, data)
    check(config)
    return config


# ---- resuming ---------------------------------------------------------------------------------


def differences(old, new, prefix: str = "", *, fixed_only: bool = False) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every field that differs between two configs (or
    sections); with ``fixed_only``, only the fields a resumed run may not change."""
    found = []
    for f in dataclasses.fields(old):
        if fixed_only and f.metadata.get("changeable_on_resume"):
            continue
        key, a, b = prefix + f.name, getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(a):
            found += differences(a, b, key + ".", fixed_only=fixed_only)
        elif a != b:
            found.append((key, a, b))
    return found


def refuse_changes(old: ExperimentConfig, new: ExperimentConfig, what: str) -> None:
    """A ``ValueError`` listing every difference between ``old`` (the run as it was trained) and
    ``new`` that a resumed run may not make, if there is any."""
    changed = differences(old, new, fixed_only=True)
    if changed:
        listed = "; ".join(f"{key}: {a!r} → {b!r}" for key, a, b in changed)
        raise ValueError(
            f"{what} would change what the run was trained with ({listed}). A run resumes with the settings it "
            "started with; train the changed setting as a new run in another run.out_dir (a longer optim.epochs "
            "too: the learning-rate schedule and RID's rounds span the whole run, so the steps already taken "
            "would differ)"
        )


def resume_config(run_dir: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """The config the run in ``run_dir`` resumes with: its own ``config.yaml``, ``run.out_dir``
    set to ``run_dir``, and ``overrides`` applied — refused (``ValueError`` listing them) where
    they change what was trained."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"cannot resume {str(run_dir)!r}: it holds no config.yaml (is it a run folder?)")
    saved = load_config(run_dir / "config.yaml")
    resumed = load_config(run_dir / "config.yaml", overrides)
    refuse_changes(saved, resumed, f"resuming {str(run_dir)!r} with {' '.join(overrides)}")
    return dataclasses.replace(resumed, run=dataclasses.replace(resumed.run, out_dir=str(run_dir)))
