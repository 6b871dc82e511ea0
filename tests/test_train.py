"""The trainer: config loading and errors, checkpoints and exact resume, compare end to end."""

import ast
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import stat
import struct
import typing
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from rid_fast.distill.methods import METHODS, method_options, resolve_method
from rid_fast.distill.rid import REDUNDANCY_ESTIMATORS
from rid_fast.ops import streaming
from rid_fast.train import checkpoint, compare, teachers
from rid_fast.train.atomic import write_csv_atomic, write_text_atomic
from rid_fast.train.compare import paired_differences, run_compare
from rid_fast.train.config import KNOWN_METHODS, ExperimentConfig, check, load_config, resume_config
from rid_fast.train.loop import ResumeWarning, Trainer
from rid_fast.train.measure import PID_FIELDS, format_spread, measure_run, pid_table, read_pid_csv

TINY = [
    "data.per_class=6",
    "teacher.model={name: mlp, hidden: [32, 32]}",
    "teacher.optim.epochs=3",
    "student.model={name: mlp, hidden: [8, 8]}",
    "distill.teacher_layers=[blocks.0, blocks.1]",
    "distill.student_layers=[blocks.0, blocks.1]",
    "optim.epochs=5",
    "optim.batch_size=16",
    "run.progress=false",
    "distill.rid.n_rounds=2",  # RID: two rounds of a quarter filter epochs fit short runs (7 epochs for 5 student ones)
    "distill.rid.filter_fraction=0.25",
]


def tiny_config(tmp_path, *overrides):
    return load_config(None, [*TINY, f"run.out_dir={tmp_path / 'run'}", *overrides])


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.2\n  epochs: 7\nteacher:\n  optim: {lr: 0.01}\n")
    config = load_config(path, ["optim.lr=0.3", "distill.method=vid"])
    assert (config.optim.lr, config.optim.epochs, config.distill.method) == (0.3, 7, "vid")
    assert config.teacher.optim.lr == 0.01 and config.teacher.optim.epochs == 60  # section defaults kept


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (["optim.lrr=0.1"], ValueError, r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"),
        (["optim.lr=fast"], ValueError, "optim.lr must be float; got str 'fast'"),
        (["optim.epochs=2.5"], ValueError, "optim.epochs must be int; got float 2.5"),
        (["distill.teacher_layers=blocks.0"], ValueError, "distill.teacher_layers must be a list"),
        (["run=3"], ValueError, "run must be a mapping"),
        (["optim.lr"], ValueError, "must look like section.key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, error, match):
    with pytest.raises(error, match=match):
        load_config(None, overrides)


# ---- every value checked before work starts -----------------------------------------------------

BAD_VALUES = [
    ("optim.epochs=0", "optim.epochs must be at least 1; got 0"),
    ("optim.epochs=-3", "optim.epochs must be at least 1; got -3"),
    ("teacher.optim.epochs=0", "teacher.optim.epochs must be at least 1; got 0"),
    ("optim.batch_size=0", "optim.batch_size must be at least 1; got 0"),
    ("data.per_class=0", "data.per_class must be at least 1; got 0"),
    ("run.device=gpu", "run.device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>'; got 'gpu'"),
    ("optim.lr=-0.1", r"optim.lr must be at least 0.0; got -0.1"),
    ("optim.lr=.nan", r"optim.lr must be at least 0.0; got nan"),
    ("distill.kd.weight=-1", r"distill.kd.weight must be at least 0.0; got -1.0"),
    ("distill.rid.infonce.weight=-0.5", r"distill.rid.infonce.weight must be at least 0.0; got -0.5"),
    ("distill.method=rid_gauss", "distill.method must be one of 'nokd', 'kd', .*; got 'rid_gauss'"),
    ("distill.rid.n_rounds=0", "distill.rid.n_rounds must be at least 1; got 0"),
    ("distill.rid.filter_fraction=1.0", r"distill.rid.filter_fraction must be in \[0.0, 1.0\); got 1.0"),
    ("distill.rid.gaussian.min_variance=0", r"distill.rid.gaussian.min_variance must be in \(0.0, 5.0\); got 0"),
    ("distill.kd.temperature=0", "distill.kd.temperature must be greater than 0.0; got 0"),
    ("data.val_fraction=1", r"data.val_fraction must be in \[0.0, 1.0\); got 1"),
    ("teacher.kind=random", "teacher.kind must be one of 'trained', 'untrained', 'noisy'; got 'random'"),
    ("compare.teachers=[trained, good]", "compare.teachers\\[1\\] must be one of .*; got 'good'"),
    ("compare.methods=[kd, vid]", "compare.methods must include 'nokd'"),
    ("distill.teacher_layers=[blocks.0]", "distill.teacher_layers and distill.student_layers must pair up"),
    ("optim.momentum=0", "optim.nesterov needs optim.momentum > 0"),
]


@pytest.mark.parametrize("override,match", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_refused_naming_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [*TINY, override])


def test_a_config_built_in_code_is_checked_before_any_work(tmp_path, monkeypatch):
    """The trainer checks every value (and builds the models on the side) before a teacher trains."""
    monkeypatch.setattr(teachers, "fit_classifier", _no_teacher_training)
    config = tiny_config(tmp_path)
    bad = dataclasses.replace(config, optim=dataclasses.replace(config.optim, batch_size=0))
    with pytest.raises(ValueError, match="optim.batch_size must be at least 1; got 0"):
        Trainer(bad)
    bad = dataclasses.replace(config, distill=dataclasses.replace(config.distill, teacher_layers=["blocks.9", "x"]))
    with pytest.raises(ValueError, match=r"teacher_layers: no module named \['blocks.9', 'x'\]"):
        Trainer(bad)
    with pytest.raises(ValueError, match="student.model: model name must be one of"):
        Trainer(tiny_config(tmp_path, "student.model={name: mlpp}"))


def _no_teacher_training(*args, **kwargs):
    raise AssertionError("a teacher was trained")


def test_every_number_has_its_range_beside_its_field():
    """Each int or float field of every section declares its range with the field (``setting``)."""

    def sections(cls):
        yield cls
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from sections(hint)

    unchecked = [
        f"{cls.__name__}.{f.name}"
        for cls in sections(ExperimentConfig)
        for f in dataclasses.fields(cls)
        if {int, float} & {typing.get_type_hints(cls)[f.name], *typing.get_args(typing.get_type_hints(cls)[f.name])}
        and f.metadata.get("rule") is None
    ]
    assert unchecked == []
    check(ExperimentConfig())  # the defaults are in range


# ---- per-method options from per-method sections --------------------------------------------------


@pytest.mark.parametrize("method", KNOWN_METHODS)
def test_every_method_takes_its_section(method):
    """Every method name has options in its section that its class accepts (strictly)."""
    options = ExperimentConfig().distill.method_options(method)
    assert method_options(method, options, strict=True) == options
    method_cls, _ = resolve_method(method)
    name = next(key for key, cls in METHODS.items() if cls is method_cls)
    assert name == "nokd" or options, f"method {name!r} has no config section"


def test_rid_has_a_subsection_per_estimator():
    rid = ExperimentConfig().distill.rid
    assert all(dataclasses.is_dataclass(getattr(rid, estimator)) for estimator in REDUNDANCY_ESTIMATORS)


def test_the_trainer_passes_the_chosen_methods_section(tmp_path):
    sections = ["distill.kd.temperature=2.5", "distill.rid.n_rounds=1", "distill.rid.infonce.weight=0.05",
                "distill.rid.gaussian.weight=0.7", "distill.rid.gaussian.min_variance=0.2",
                "teacher.kind=untrained"]  # fmt: skip
    kd = Trainer(tiny_config(tmp_path, *sections, "distill.method=kd")).distiller.method
    assert kd.kd_temperature == 2.5
    infonce = Trainer(tiny_config(tmp_path, *sections, "distill.method=rid_infonce")).distiller.method
    gaussian = Trainer(tiny_config(tmp_path, *sections, "distill.method=rid_gaussian")).distiller.method
    assert infonce.schedule.n_rounds == gaussian.schedule.n_rounds == 1
    assert (infonce.loss.alpha, gaussian.loss.alpha) == (0.05, 0.7)
    assert gaussian.loss.pairs[0].redundancy.min_variance == 0.2


FLAT_KEYS = [
    ("distill.weight=2.0", "distill.kd.weight, distill.fitnets.weight, distill.vid.weight, distill.crd.weight, "
     "distill.rid.gaussian.weight, distill.rid.infonce.weight"),
    ("distill.kd_temperature=3", "distill.kd.temperature"),
    ("distill.n_rounds=0", "distill.rid.n_rounds"),
    ("distill.filter_hidden=64", "distill.rid.filter_hidden"),
    ("distill.min_variance=0.1", "distill.rid.gaussian.min_variance"),
    ("distill.temperature=0.2", "distill.crd.temperature"),
    ("distill.method_weights={rid_infonce: 0.05}", r"distill.rid.infonce.weight"),
]  # fmt: skip


@pytest.mark.parametrize("override,new_key", FLAT_KEYS, ids=[f[0] for f in FLAT_KEYS])
def test_flat_method_keys_name_their_new_place(override, new_key):
    with pytest.raises(ValueError, match=f"'{override.split('=')[0]}' is .*{new_key}"):
        load_config(None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="is a folder, not a YAML file"):
        load_config(tmp_path)


def test_atomic_checkpoint_round_trip(tmp_path):
    state = {"weights": torch.randn(3, 3), "rng": checkpoint.rng_state()}
    checkpoint.save_atomic(state, tmp_path / "ckpt" / "latest.pt")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["latest.pt"]  # no temporary file left
    loaded = checkpoint.load(tmp_path / "ckpt" / "latest.pt")
    assert torch.equal(loaded["weights"], state["weights"])
    # What is saved loads with weights_only=True: tensors and plain values, NumPy's state included.
    envelope = torch.load(tmp_path / "ckpt" / "latest.pt", weights_only=True)
    assert envelope["sha256"] == checkpoint.content_digest(checkpoint.RUN_STATE, envelope["content"])


def test_atomic_writers_keep_the_previous_file(tmp_path):
    write_text_atomic("one", tmp_path / "a.txt")
    write_csv_atomic([{"x": 1}, {"y": 2}], tmp_path / "b.csv")
    checkpoint.save_atomic({"epoch": 0}, tmp_path / "latest.pt")
    checkpoint.save_atomic({"epoch": 1}, tmp_path / "latest.pt", keep_previous=tmp_path / "previous.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.csv", "latest.pt", "previous.pt"]
    assert (tmp_path / "b.csv").read_text().splitlines() == ["x,y", "1,", ",2"]
    assert checkpoint.load(tmp_path / "previous.pt") == {"epoch": 0}
    assert checkpoint.load(tmp_path / "latest.pt") == {"epoch": 1}
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("a.txt", "b.csv", "latest.pt", "previous.pt"):  # the mode any new file gets, not mkstemp's 0600
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name


def _data_record(path: Path) -> tuple[int, int]:
    """Offset and size of the largest tensor storage inside a torch zip file."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
    return info.header_offset + 30 + name_length + extra_length, info.file_size


def _flip_tensor_bytes(path: Path, count: int = 256) -> None:
    start, size = _data_record(path)
    assert size >= 2 * count
    data = bytearray(path.read_bytes())
    middle = start + size // 2 - count // 2
    data[middle : middle + count] = bytes(b ^ 0xFF for b in data[middle : middle + count])
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "random": lambda p: p.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()),
    "foreign torch file": lambda p: torch.save({"model": torch.zeros(3)}, p),
    "a teacher": lambda p: checkpoint.save_atomic({"state_dict": {}}, p, kind=checkpoint.TEACHER),
    "flipped tensor bytes": _flip_tensor_bytes,
}
DAMAGE_MESSAGES = {
    "truncated": "is damaged: torch cannot read it",
    "empty": "is damaged: torch cannot read it",
    "random": "is damaged: torch cannot read it",
    "foreign torch file": "is not a rid_fast checkpoint",
    "a teacher": "holds a teacher, not a run state",
    "flipped tensor bytes": "is damaged: its content does not match the digest stored with it",
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_checkpoint_is_an_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "latest.pt"
    checkpoint.save_atomic({"epoch": 3, "weights": torch.randn(64, 64)}, path)
    DAMAGES[damage](path)
    if damage == "flipped tensor bytes":
        torch.load(path, weights_only=True)  # torch itself reads the changed tensor without complaint
    with pytest.raises(checkpoint.CheckpointError, match=f"{path}.*{DAMAGE_MESSAGES[damage]}"):
        checkpoint.load(path)


def test_rng_state_restores_the_same_draws():
    state = checkpoint.rng_state()
    a = (torch.rand(3), torch.randn(2))
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), torch.randn(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def _losses(trainer, **kwargs):
    losses = {}

    def record(epoch, step, out):
        losses[(epoch, step)] = float(out["loss"].detach())

    trainer.train(step_callback=record, **kwargs)
    return losses


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("method,teacher", [("rid_gaussian", "noisy"), ("crd", "trained")])
def test_resume_continues_exactly(tmp_path, method, teacher):
    overrides = [f"distill.method={method}", f"teacher.kind={teacher}"]
    reference = _losses(Trainer(tiny_config(tmp_path / "a", *overrides)))

    interrupted = Trainer(tiny_config(tmp_path / "b", *overrides))
    seen = {}

    def stop(epoch, step, out):
        seen[(epoch, step)] = float(out["loss"].detach())
        if epoch == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        interrupted.train(step_callback=stop)
    resumed = _losses(Trainer(tiny_config(tmp_path / "b", *overrides)), resume=True)
    assert min(resumed)[0] == 3  # picks up after the last completed epoch
    assert resumed == {key: value for key, value in reference.items() if key[0] >= 3}


def _metrics(run_dir: Path) -> list[dict]:
    """metrics.csv without the timing column."""
    with open(run_dir / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished five-epoch RID run with a checkpoint after every epoch."""
    root = tmp_path_factory.mktemp("finished")
    config = tiny_config(root, "distill.method=rid_gaussian", "teacher.kind=noisy", "optim.epochs=4")
    trainer = Trainer(config)
    trainer.train()
    return root / "run", trainer.total_epochs()


def _copy_run(finished_run, tmp_path) -> Path:
    run_dir = tmp_path / "copy"
    shutil.copytree(finished_run[0], run_dir)
    return run_dir


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_skips_a_damaged_latest_checkpoint_and_says_so(tmp_path, finished_run, damage, monkeypatch):
    """The newest intact checkpoint (previous.pt, one epoch back) is used, with a warning naming
    the damaged file; the run then ends exactly as the uninterrupted one did."""
    run_dir = _copy_run(finished_run, tmp_path)
    (run_dir / "ckpt" / "best.pt").unlink()
    DAMAGES[damage](run_dir / "ckpt" / "latest.pt")
    monkeypatch.setattr(teachers, "fit_classifier", _no_teacher_training)
    with pytest.warns(ResumeWarning, match=f"latest.pt.*{DAMAGE_MESSAGES[damage]}.*resuming from .*previous.pt"):
        trainer = Trainer.resume(resume_config(run_dir))
    assert trainer.start_epoch == finished_run[1] - 1
    trainer.train()
    assert _metrics(run_dir) == _metrics(finished_run[0])


def test_resume_takes_the_newest_intact_checkpoint(tmp_path, finished_run):
    run_dir = _copy_run(finished_run, tmp_path)
    best_epoch = checkpoint.load(run_dir / "ckpt" / "best.pt")["epoch"]
    for name in ("latest.pt", "previous.pt"):
        DAMAGES["truncated"](run_dir / "ckpt" / name)
    with pytest.warns(ResumeWarning, match="resuming from .*best.pt"):
        assert Trainer.resume(resume_config(run_dir)).start_epoch == best_epoch + 1
    DAMAGES["empty"](run_dir / "ckpt" / "best.pt")
    with pytest.raises(checkpoint.CheckpointError, match="cannot resume .*latest.pt is damaged.*previous.pt is dam"):
        Trainer.resume(resume_config(run_dir))


def test_a_fresh_run_removes_an_earlier_runs_checkpoints(tmp_path, finished_run):
    """Started afresh in a run folder, a run cannot later resume from the earlier run's states."""
    run_dir = _copy_run(finished_run, tmp_path)
    config = load_config(run_dir / "config.yaml", [f"run.out_dir={run_dir}", "optim.lr=0.01"])
    with pytest.raises(_Interrupt):
        Trainer(config).train(step_callback=lambda epoch, step, out: epoch < 1 or _raise(_Interrupt))
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["best.pt", "latest.pt"]
    assert checkpoint.load(run_dir / "ckpt" / "best.pt")["epoch"] == 0
    DAMAGES["truncated"](run_dir / "ckpt" / "latest.pt")
    with pytest.warns(ResumeWarning, match="resuming from .*best.pt"):
        assert Trainer.resume(config).start_epoch == 1


def _raise(error):
    raise error


def test_best_checkpoint_holds_its_own_epoch(tmp_path):
    """Written only at the end (checkpoint_every=0), best.pt still holds the state of its epoch."""
    trainer = Trainer(tiny_config(tmp_path, "distill.method=vid", "teacher.kind=untrained", "run.checkpoint_every=0"))
    trainer.train()
    best = checkpoint.load(tmp_path / "run" / "ckpt" / "best.pt")
    history = json.loads(best["history"])  # the metrics rows up to its epoch, as JSON
    assert len(history) == best["epoch"] + 1
    assert best["best_val"] == max(r["val_acc"] for r in history)


def test_resume_refuses_another_config(tmp_path, finished_run, monkeypatch):
    """A checkpoint trained with other settings is refused before anything is built or written."""
    run_dir = _copy_run(finished_run, tmp_path)
    before = (run_dir / "config.yaml").read_text()
    monkeypatch.setattr(teachers, "fit_classifier", _no_teacher_training)
    with pytest.raises(ValueError, match=r"distill.method: 'rid_gaussian' → 'vid'; optim.lr: 0.05 → 0.1"):
        Trainer.resume(resume_config(run_dir, ["optim.lr=0.1", "distill.method=vid"]))
    with pytest.raises(ValueError, match=r"optim.epochs: 4 → 8.*a longer optim.epochs too"):
        resume_config(run_dir, ["optim.epochs=8"])
    changed = dataclasses.replace(resume_config(run_dir), run=dataclasses.replace(resume_config(run_dir).run, seed=1))
    with pytest.raises(ValueError, match=r"resuming from .*latest.pt with this config would change .*run.seed: 0 → 1"):
        Trainer.resume(changed)
    assert (run_dir / "config.yaml").read_text() == before
    # Where the run lives and how it reports may change.
    resumed = resume_config(run_dir, ["run.progress=true", "run.checkpoint_every=2", "optim.lr=0.05"])
    assert resumed.run.out_dir == str(run_dir) and resumed.run.progress


def test_train_resume_refuses_another_config_and_keeps_config_yaml(tmp_path, finished_run):
    """The Python API too: train(resume=True) with another config leaves the run untouched."""
    run_dir = _copy_run(finished_run, tmp_path)
    before = (run_dir / "config.yaml").read_text()
    trainer = Trainer(load_config(run_dir / "config.yaml", ["distill.method=vid", f"run.out_dir={run_dir}"]))
    with pytest.raises(ValueError, match="distill.method: 'rid_gaussian' → 'vid'"):
        trainer.train(resume=True)
    assert (run_dir / "config.yaml").read_text() == before


def test_run_writes_metrics_and_checkpoints(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "distill.method=rid_gaussian"))
    final = trainer.train()
    run = tmp_path / "run"
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == trainer.total_epochs() and {"val_acc", "test_acc", "lr", "seconds"} <= set(rows[0])
    assert any(r["phase"] == "filter" for r in rows) and "student/redundancy/1" in rows[-1]
    assert (run / "ckpt" / "latest.pt").is_file() and (run / "ckpt" / "best.pt").is_file()
    assert 0 <= final["test_acc"] <= 100
    assert load_config(run / "config.yaml") == trainer.config  # the run folder describes itself


def test_pid_is_tracked_during_training(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "distill.method=vid", "optim.epochs=4", "run.pid_every=2",
                                  "run.pid_clusters=4"))  # fmt: skip
    trainer.train()
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    measured = [int(r["epoch"]) for r in rows if r.get("pid/1/red")]
    assert measured == [2, 4]
    for r in rows:
        if r.get("pid/0/red"):
            red, uni_t, mi_t = (float(r[f"pid/0/{k}"]) for k in ("red", "uni_t", "mi_t"))
            assert red + uni_t == pytest.approx(mi_t, abs=1e-6) and min(red, uni_t) >= -1e-6


def test_rid_student_gets_as_many_updates_as_the_others(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "distill.method=rid_gaussian", "optim.epochs=20"))
    trainer.train()
    assert trainer.total_epochs() == 27  # 27 − round(27 / 4) = 20
    assert trainer.student_progress == pytest.approx(20.0)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["phase"] for r in rows].count("student") == 20


def test_a_schedule_that_would_starve_the_student_is_refused_before_training(tmp_path, monkeypatch):
    """Five rounds of a fifth in the filter phase over 4 student epochs: five filter epochs and no
    student training used to run to the end and exit 0. Now refused before the teacher trains."""
    monkeypatch.setattr(teachers, "fit_classifier", lambda *a, **k: pytest.fail("a teacher trained"))
    config = tiny_config(tmp_path, "distill.method=rid_gaussian", "distill.rid.n_rounds=5",
                         "distill.rid.filter_fraction=0.2", "optim.epochs=4", "teacher.optim.epochs=1")  # fmt: skip
    with pytest.raises(
        ValueError, match=r"needs at least 18 student epochs \(23 epochs in all\); asked for 4"
    ) as error:
        Trainer(config)
    assert "(set by optim.epochs = 4 and distill.rid: n_rounds, filter_fraction" in str(error.value)
    no_equal = tiny_config(tmp_path, "distill.method=rid_gaussian", "distill.rid.n_rounds=5", "optim.epochs=6",
                           "distill.equal_student_steps=false", "teacher.optim.epochs=1")  # fmt: skip
    with pytest.raises(ValueError, match="cannot give each of its 5 rounds a filter epoch and a student epoch in 6"):
        Trainer(no_equal)
    with pytest.raises(ValueError, match="needs at least 18 student epochs"):
        compare_config = dataclasses.replace(config.compare, methods=["nokd", "rid_gaussian"])
        run_compare(dataclasses.replace(config, compare=compare_config), tmp_path / "compare", seeds=1, workers=1)


def test_compare_end_to_end(tmp_path, monkeypatch):
    config = load_config(
        None,
        [*TINY, "optim.epochs=2", "distill.rid.n_rounds=1", "compare.methods=[nokd, vid, rid_gaussian]",
         "compare.teachers=[trained, untrained]"],
    )  # fmt: skip
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 2)  # two worker processes of one thread each
    rows = run_compare(config, tmp_path / "cmp", seeds=2, workers=2)
    assert len(rows) == 2 * (1 + 2 * 2)
    with open(tmp_path / "cmp" / "summary.csv") as handle:
        summary = list(csv.DictReader(handle))
    assert list(summary[0]) == ["method", "teacher", "seed", "test_acc"]
    assert {(r["method"], r["teacher"]) for r in summary} == {
        ("nokd", "none"),
        ("vid", "trained"),
        ("vid", "untrained"),
        ("rid_gaussian", "trained"),
        ("rid_gaussian", "untrained"),
    }
    table = {(r["method"], r["teacher"]): r for r in paired_differences(rows)}
    by_seed = {(r["method"], r["teacher"], r["seed"]): r["test_acc"] for r in rows}
    expected = sum(by_seed[("vid", "trained", s)] - by_seed[("nokd", "none", s)] for s in range(2)) / 2
    assert table[("vid", "trained")]["diff"] == pytest.approx(expected)
    for name in ("report.md", "accuracy.png", "curves.png", "pid.csv", "pid.png"):
        assert (tmp_path / "cmp" / name).is_file()
    pid_rows = read_pid_csv(tmp_path / "cmp" / "pid.csv")
    assert len(pid_rows) == len(rows) * 2  # every run, both layer pairs
    measure_tol = 1e-6 / math.log(2)  # bits: pid.measure's solver tolerance, 1e-6 nats
    assert all(r["red"] >= -1e-6 and r["uni_t"] >= -1e-6 and r["gap"] <= measure_tol for r in pid_rows)
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "What was distilled" in report
    assert re.search(r"Conditions: rid_fast \S+ .*torch .*worker.* min wall time", report), report
    assert len(list((tmp_path / "cmp" / "teachers").glob("*.pt"))) == 2  # one trained teacher per seed


class _CountingTrainer(Trainer):
    """Counts the steps each run's student optimizer takes."""

    student_steps: dict[str, int] = {}

    def train(self, **kwargs):
        name = f"{self.config.distill.method}_{self.config.teacher.kind}"
        self.student_steps[name] = 0

        def count(optimizer, args, kwargs):
            self.student_steps[name] += 1

        handle = self.optimizers["student"].register_step_post_hook(count)
        try:
            return super().train(**kwargs)
        finally:
            handle.remove()


def test_compare_again_goes_on_from_the_runs_checkpoints(tmp_path, monkeypatch):
    """The same comparison into the same folder trains nothing twice: a finished run is read back
    from its checkpoint, a run stopped part way goes on from its newest one and ends as it would
    have; a config that would change what a run was trained with is refused, naming --out."""
    config = load_config(None, [*TINY, "optim.epochs=3", "compare.pid=false", "compare.methods=[nokd, vid]",
                                "compare.teachers=[trained]"])  # fmt: skip
    out = tmp_path / "cmp"
    rows = run_compare(config, out, seeds=1, workers=1)
    vid = out / "runs" / "vid_trained_seed0"

    def metrics():  # but the timings
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(vid / "metrics.csv"))]

    before = metrics()
    for name in ("latest.pt", "best.pt"):  # vid stopped after its second epoch (of three)
        (vid / "ckpt" / name).unlink()
    monkeypatch.setattr(compare, "Trainer", _CountingTrainer)
    _CountingTrainer.student_steps = {}
    with pytest.warns(ResumeWarning, match="latest.pt is missing; resuming from .*previous.pt"):
        assert run_compare(config, out, seeds=1, workers=1) == rows
    assert _CountingTrainer.student_steps == {"nokd_trained": 0, "vid_trained": 4}  # vid's third epoch only
    assert metrics() == before
    changed = dataclasses.replace(config, optim=dataclasses.replace(config.optim, lr=0.1))
    with pytest.raises(ValueError, match=r"holds an earlier comparison.*optim.lr: 0.05 → 0.1.*another --out"):
        run_compare(changed, out, seeds=1, workers=1)


@pytest.mark.parametrize("unit,epochs,rid_epochs", [("epoch", 7, 9), ("step", 7, 10)])
def test_compare_gives_every_student_the_same_number_of_optimizer_steps(
    tmp_path, monkeypatch, unit, epochs, rid_epochs
):
    """Equal student steps in a comparison: no-KD, VID and both RIDs each take optim.epochs × 4
    student steps (60 images in batches of 16); RID's filter epochs (or steps) come on top."""
    methods = "compare.methods=[nokd, vid, rid_gaussian, rid_infonce]"
    overrides = [f"optim.epochs={epochs}", f"distill.rid.schedule_unit={unit}", "compare.pid=false", methods]
    config = load_config(None, [*TINY, *overrides, "compare.teachers=[trained]"])
    monkeypatch.setattr(compare, "Trainer", _CountingTrainer)
    _CountingTrainer.student_steps = {}
    run_compare(config, tmp_path / "cmp", seeds=1, workers=1)
    steps = epochs * 4
    # (no-KD is given the first teacher, which it ignores)
    assert _CountingTrainer.student_steps == {
        "nokd_trained": steps,
        "vid_trained": steps,
        "rid_gaussian_trained": steps,
        "rid_infonce_trained": steps,
    }
    runs = tmp_path / "cmp" / "runs"
    rid_rows = list(csv.DictReader(open(runs / "rid_gaussian_trained_seed0" / "metrics.csv")))
    nokd_rows = list(csv.DictReader(open(runs / "nokd_none_seed0" / "metrics.csv")))
    # epochs: 9 = 7 student + 2 filter; steps: 37 = 28 student + 9 filter steps, the last epoch 1 step long
    assert len(nokd_rows) == epochs and len(rid_rows) == rid_epochs
    assert any("filter" in r["phase"] for r in rid_rows)


def test_compare_in_parallel_matches_one_process(tmp_path, monkeypatch):
    """Worker processes change nothing: same runs, same order, same accuracies (one thread each)."""
    config = load_config(None, [*TINY, "optim.epochs=1", "compare.methods=[nokd, fitnets]", "compare.teachers=[noisy]"])
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 2)
    parallel = run_compare(config, tmp_path / "parallel", seeds=2, workers=2)
    monkeypatch.setattr(compare.os, "cpu_count", lambda: 1)
    threads = torch.get_num_threads()
    assert run_compare(config, tmp_path / "inline", seeds=2, workers=1) == parallel
    assert torch.get_num_threads() == threads  # the caller's thread count is left as it was


def test_pid_table_means_and_spreads_over_seeds():
    def row(method, seed, red, layer=0):
        return {"method": method, "teacher": "trained", "seed": seed, "layer": layer,
                **{field: 0.0 for field in PID_FIELDS}, "red": red}  # fmt: skip

    table = pid_table([row("rid", 0, 1.0), row("vid", 0, 2.0), row("rid", 1, 3.0), row("rid", 0, 5.0, layer=1)])
    assert [(r["method"], r["layer"], r["seeds"]) for r in table] == [("rid", 0, 2), ("vid", 0, 1), ("rid", 1, 1)]
    assert table[0]["red"] == 2.0 and table[0]["red_sd"] == pytest.approx(math.sqrt(2.0))
    assert math.isnan(table[1]["red_sd"])  # one seed: no spread
    assert format_spread(table[0]["red"], table[0]["red_sd"]) == "2.000 ± 1.414"
    assert format_spread(table[1]["red"], table[1]["red_sd"]) == "2.000"


def test_measure_pid_defaults_to_the_test_set(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "distill.method=vid", "run.pid_clusters=4"))
    x_test, y_test = trainer._tensors(None)
    values = trainer.measure_pid()
    assert values and values == trainer.measure_pid(x_test, y_test)
    assert values != trainer.measure_pid(*trainer._tensors(torch.arange(60)))  # not the training set
    with pytest.raises(ValueError, match="x and y together"):
        trainer.measure_pid(x_test)


# ---- logged values: read on the host once per epoch ---------------------------------------------


def _host_reads(monkeypatch) -> list[str]:
    """Every tensor value read into Python from now on (a host–device sync on a GPU)."""
    reads = []
    for name in ("__float__", "__int__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name: reads.append(_n) or _f(self, *a))
    return reads


@pytest.mark.parametrize("method", ["rid_gaussian", "crd"])
def test_logged_values_are_read_once_per_epoch(tmp_path, monkeypatch, method):
    """The loop reads no tensor value per step: as many host reads with 15 steps an epoch as
    with 4 — and the logged means are those of the steps' values. (The streaming path runs as
    off the CPU, where it reads no value either; on the CPU its per-tile read costs nothing.)"""
    counts, steps = {}, {}
    for batch_size in (4, 16):
        config = tiny_config(tmp_path / str(batch_size), f"distill.method={method}", "teacher.kind=untrained",
                             f"optim.batch_size={batch_size}", "optim.epochs=2", "distill.rid.n_rounds=1")  # fmt: skip
        trainer = Trainer(config)
        seen = steps[batch_size] = []
        monkeypatch.setattr(streaming, "_may_share_exponentials", lambda device: False)
        reads = _host_reads(monkeypatch)
        trainer.train(step_callback=lambda epoch, step, out, seen=seen: seen.append((epoch, step, out)))
        counts[batch_size] = len(reads)
        monkeypatch.undo()
    assert counts[4] == counts[16] and len(steps[4]) > 2 * len(steps[16])
    rows = list(csv.DictReader(open(tmp_path / "4" / "run" / "metrics.csv")))
    first_epoch = [(step, out) for epoch, step, out in steps[4] if epoch == 0]
    phase = rows[0]["phase"]
    mean_loss = sum(float(out["loss"].detach()) for _, out in first_epoch) / len(first_epoch)
    assert float(rows[0][f"{phase}/loss"]) == pytest.approx(mean_loss, rel=1e-12)


# ---- measure and loop: no cycle; measure needs no Trainer -----------------------------------------


def test_train_modules_import_no_cycle():
    """The modules of rid_fast.train import each other without a cycle (imports inside functions
    included), and measure does not import the loop."""
    package = Path(__file__).parents[1] / "rid_fast" / "train"
    graph = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "rid_fast.train":
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rid_fast.train."):
                names.add(node.module.split(".")[2])
        graph[path.stem] = names
    assert "loop" not in graph["measure"]

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, (*seen, n))) for n in graph.get(start, ()))

    assert [module for module in graph if reaches(module, module)] == []


def test_measure_reads_a_checkpoint_without_training(tmp_path, finished_run, monkeypatch):
    run_dir = _copy_run(finished_run, tmp_path)
    monkeypatch.setattr(Trainer, "__init__", lambda *a, **k: pytest.fail("measure built a Trainer"))
    monkeypatch.setattr(teachers, "fit_classifier", _no_teacher_training)
    values = measure_run(run_dir)
    assert set(values) == {f"pid/{k}/{f}" for k in (0, 1) for f in PID_FIELDS}
    _flip_tensor_bytes(run_dir / "ckpt" / "latest.pt")
    with pytest.raises(checkpoint.CheckpointError, match="latest.pt is damaged: its content does not match"):
        measure_run(run_dir)


def test_a_damaged_cached_teacher_is_trained_again(tmp_path):
    """The teacher cache verifies its digest: a damaged file is said and replaced, never loaded."""
    config = tiny_config(tmp_path, "distill.method=vid")
    first = Trainer(config).teacher.state_dict()
    (cache,) = (tmp_path / "run" / "teachers").glob("*.pt")
    _flip_tensor_bytes(cache)
    with pytest.warns(UserWarning, match=f"{cache} is damaged.*training the teacher again"):
        again = Trainer(config).teacher.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)  # seeded: the same teacher
    checkpoint.load(cache, kind=checkpoint.TEACHER)  # and the cache is intact again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(config)  # read from the cache, silently


# ---- plots a user reads ------------------------------------------------------------------------

OTHER_METHODS = [m for m in KNOWN_METHODS if m not in ("nokd", "rid")]
TEACHER_ORDER = ["trained", "untrained", "noisy"]


def _paired_table(n_methods: int) -> list[dict]:
    rows = [{"method": "nokd", "teacher": "none", "seeds": 3, "test_acc": 90.0, "diff": math.nan,
             "diff_low": math.nan, "diff_high": math.nan}]  # fmt: skip
    for i, method in enumerate(OTHER_METHODS[:n_methods]):
        rows += [{"method": method, "teacher": t, "seeds": 3, "test_acc": 90.0 + i, "diff": i - 2.0,
                  "diff_low": i - 3.5, "diff_high": i - 0.5} for t in TEACHER_ORDER]  # fmt: skip
    return rows


def _drawn(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox

    def inside(artist) -> bool:
        extent = artist.get_window_extent(renderer)
        return (
            extent.x0 >= box.x0 - 1 and extent.x1 <= box.x1 + 1 and extent.y0 >= box.y0 - 1 and extent.y1 <= box.y1 + 1
        )

    return renderer, inside


@pytest.mark.parametrize("n_methods", [1, 6, 10])
def test_accuracy_plot_shows_its_title_and_keeps_the_legend_off_the_bars(n_methods):
    from rid_fast.train import plots

    fig = plots.accuracy_figure(_paired_table(n_methods))
    renderer, inside = _drawn(fig)
    (ax,) = fig.axes
    assert inside(ax.title) and "no-KD: 90.00 %" in ax.get_title()
    (legend,) = fig.legends
    assert inside(legend) and not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    labels = ax.get_xticklabels()
    assert [t.get_text() for t in labels] == OTHER_METHODS[:n_methods] and all(map(inside, labels))
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
    plots._pyplot().close(fig)


@pytest.mark.parametrize("n_methods", [1, 6, 10])
def test_pid_figure_has_a_panel_per_layer_pair_and_groups_by_teacher(n_methods):
    from rid_fast.train import plots

    def row(method, teacher, layer, pid_teacher=None):
        return {"method": method, "teacher": teacher, "pid_teacher": pid_teacher or teacher, "layer": layer,
                "teacher_layer": f"blocks.{layer}", "student_layer": f"features.{layer}", "seeds": 2,
                **{f: 0.5 for f in PID_FIELDS}}  # fmt: skip

    means = [row("nokd", "none", k, "trained") for k in (0, 1)]
    means += [row(m, t, k) for m in OTHER_METHODS[:n_methods] for t in TEACHER_ORDER for k in (0, 1)]
    fig = plots.pid_figure(means)
    renderer, inside = _drawn(fig)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [
        f"layer pair {k}\nteacher blocks.{k} ↔ student features.{k}" for k in (0, 1)
    ]
    labels = [t.get_text() for t in panels[0].get_yticklabels()]
    assert [label for label in labels if label.endswith("teacher")] == [f"{t} teacher" for t in TEACHER_ORDER]
    assert labels[1] == "nokd (no teacher)" and labels.count("kd") == 3
    width, height = fig.get_size_inches()
    assert width / height < 4  # not a strip
    boxes = [t.get_window_extent(renderer) for t in panels[0].get_yticklabels()]
    assert (
        all(inside(t) for t in panels[0].get_yticklabels())
        and min(t.get_fontsize() for t in panels[0].get_yticklabels()) >= 8
    )
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
    plots._pyplot().close(fig)


def test_curves_shade_the_filter_epochs_and_follow_the_comparisons_order():
    from rid_fast.train import plots

    rid_rows = [{"epoch": 1.0, "phase": "filter"}, {"epoch": 2.0, "phase": "student"},
                {"epoch": 3.0, "phase": "filter/student"}, {"epoch": 4.0, "phase": "filter"}]  # fmt: skip
    assert plots.filter_spans(rid_rows) == [(0.0, 1.0), (2.0, 4.0)]
    curves = {(m, t): {1.0: [50.0], 2.0: [60.0]} for m in ("rid_gaussian", "vid") for t in ("noisy", "trained")}
    curves[("nokd", "none")] = {1.0: [55.0], 2.0: [58.0]}
    spans = {cell: plots.filter_spans(rid_rows) if cell[0].startswith("rid") else [] for cell in curves}
    order = [("nokd", "none"), ("vid", "trained"), ("rid_gaussian", "trained"), ("vid", "noisy")]
    fig = plots.curves_figure(curves, spans, order)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["trained teacher", "noisy teacher"]
    for ax in panels:
        assert [line.get_label() for line in ax.get_lines()] == ["nokd (no teacher)", "vid", "rid_gaussian"]
        assert len(ax.patches) == 2  # the two filter spans
    assert [t.get_text() for t in fig.legends[0].get_texts()][0] == "RID filter epochs"
    plots._pyplot().close(fig)
