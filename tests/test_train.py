"""The trainer: config loading and errors, checkpoints and exact resume, compare end to end."""

import csv
import math

import pytest
import torch

from rid_fast.train import checkpoint, compare
from rid_fast.train.compare import paired_differences, run_compare
from rid_fast.train.config import load_config
from rid_fast.train.loop import Trainer
from rid_fast.train.measure import PID_FIELDS, format_spread, pid_table, read_pid_csv

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
    "distill.n_rounds=2",  # RID: two rounds of a quarter filter epochs fit short runs (7 epochs for 5 student ones)
    "distill.filter_fraction=0.25",
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


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_atomic_checkpoint_round_trip(tmp_path):
    state = {"weights": torch.randn(3, 3), "rng": checkpoint.rng_state()}
    checkpoint.save_atomic(state, tmp_path / "ckpt" / "latest.pt")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["latest.pt"]  # no temporary file left
    loaded = checkpoint.load(tmp_path / "ckpt" / "latest.pt")
    assert torch.equal(loaded["weights"], state["weights"])


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


def test_a_schedule_that_would_starve_the_student_is_refused_before_training(tmp_path):
    """Five rounds of a fifth in the filter phase over 4 student epochs: five filter epochs and no
    student training used to run to the end and exit 0."""
    config = tiny_config(tmp_path, "distill.method=rid_gaussian", "distill.n_rounds=5", "distill.filter_fraction=0.2",
                         "optim.epochs=4", "teacher.optim.epochs=1")  # fmt: skip
    with pytest.raises(ValueError, match=r"needs at least 18 student epochs \(23 epochs in all\); asked for 4"):
        Trainer(config)
    no_equal = tiny_config(tmp_path, "distill.method=rid_gaussian", "distill.n_rounds=5", "optim.epochs=6",
                           "distill.equal_student_steps=false", "teacher.optim.epochs=1")  # fmt: skip
    with pytest.raises(ValueError, match="cannot give each of its 5 rounds a filter epoch and a student epoch in 6"):
        Trainer(no_equal)


def test_compare_end_to_end(tmp_path, monkeypatch):
    config = load_config(
        None,
        [*TINY, "optim.epochs=2", "distill.n_rounds=1", "compare.methods=[nokd, vid, rid_gaussian]",
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
    assert all(r["red"] >= -1e-6 and r["uni_t"] >= -1e-6 and r["gap"] <= 1e-6 for r in pid_rows)
    assert "What was distilled" in (tmp_path / "cmp" / "report.md").read_text()
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


@pytest.mark.parametrize("unit,epochs,rid_epochs", [("epoch", 7, 9), ("step", 7, 10)])
def test_compare_gives_every_student_the_same_number_of_optimizer_steps(
    tmp_path, monkeypatch, unit, epochs, rid_epochs
):
    """Equal student steps in a comparison: no-KD, VID and both RIDs each take optim.epochs × 4
    student steps (60 images in batches of 16); RID's filter epochs (or steps) come on top."""
    methods = "compare.methods=[nokd, vid, rid_gaussian, rid_infonce]"
    overrides = [f"optim.epochs={epochs}", f"distill.schedule_unit={unit}", "compare.pid=false", methods]
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
    assert run_compare(config, tmp_path / "inline", seeds=2, workers=1) == parallel


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
