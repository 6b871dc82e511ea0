from pathlib import Path

import pytest

from rid_fast import bench
from rid_fast.cli import main
from rid_fast.train.config import load_config


def test_env(capsys, monkeypatch):
    monkeypatch.delenv("RID_FAST_AUTOTUNE", raising=False)
    monkeypatch.setenv("RID_FAST_FORWARD_KEYS", "0")
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("rid_fast", "torch", "triton", "device", 'impl="auto"'):
        assert key in out
    assert "RID_FAST_AUTOTUNE=1" in out and "RID_FAST_FORWARD_KEYS=0" in out


def test_bench_small(capsys):
    assert main(["bench", "--batch", "64", "--dim", "16", "--impl", "torch", "reference", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "reference" in out and "median ms" in out


def test_bench_compares_critics(capsys):
    args = ["bench", "--batch", "48", "--dim", "8", "--impl", "torch", "--critic", "dot", "cosine", "--repeats", "2"]
    assert main(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[:2] for row in rows] == [["torch", "dot"], ["torch", "cosine"]]


def test_timed_steps_take_turns_across_cases(monkeypatch):
    """Each case's timed steps alternate with the others', after every case's warm-up."""
    calls = []

    def make_step(case):
        return lambda x, y: calls.append(case.critic)

    monkeypatch.setattr(bench, "make_step", make_step)
    cases = [bench.Case(n_queries=4, dim=2, critic=critic, device="cpu") for critic in ("dot", "cosine")]
    timings = bench.time_cases(cases, repeats=3, warmup=2)
    assert calls == ["dot", "dot", "cosine", "cosine"] + ["dot", "cosine"] * 3
    assert len(timings) == 2 and all(t["min_s"] <= t["median_s"] and t["first_s"] >= 0 for t in timings)


def test_train_and_plot(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", "configs/digits_nuisance.yaml", "optim.epochs=2", "teacher.optim.epochs=1",
            "data.per_class=5", f"run.out_dir={run}", "run.progress=false", "distill.method=rid_gaussian",
            "distill.n_rounds=1"]  # fmt: skip
    assert main(args) == 0
    assert "final:" in capsys.readouterr().out
    assert main(["plot", str(run)]) == 0
    assert (run / "plots" / "accuracy.png").is_file() and (run / "plots" / "losses.png").is_file()
    capsys.readouterr()
    assert main(["pid", str(run)]) == 0  # rebuilt from config.yaml and the checkpoint alone
    assert "rid_gaussian" in capsys.readouterr().out
    assert (run / "pid.csv").is_file() and (run / "pid.png").is_file()


def test_train_cifar10_wrn_from_data_dir(tmp_path, cifar_archive, capsys):
    """The paper's CIFAR-10 config runs on a user's archive given by --data-dir (shrunk: WRN-10-1)."""
    wrn = "{name: wrn, depth: 10, widen: 1}"
    args = ["train", "--config", "configs/cifar10_wrn.yaml", "--data-dir", str(tmp_path), f"teacher.model={wrn}",
            f"student.model={wrn}", "optim.epochs=1", "teacher.optim.epochs=1", "optim.batch_size=8",
            "data.val_fraction=0.2", f"run.out_dir={tmp_path / 'run'}", "run.progress=false", "distill.n_rounds=1",
            "distill.filter_fraction=0.5"]  # fmt: skip
    assert main(args) == 0
    assert "final:" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.distill.teacher_layers and len(config.distill.teacher_layers) == len(config.distill.student_layers)


def test_train_mnist1d(tmp_path, capsys):
    pytest.importorskip("mnist1d")
    args = ["train", "--config", "configs/mnist1d_nuisance.yaml", "optim.epochs=2", "teacher.optim.epochs=1",
            "data.per_class=5", f"run.out_dir={tmp_path / 'run'}", "run.progress=false",
            "distill.n_rounds=1"]  # fmt: skip
    assert main(args) == 0
    assert "final:" in capsys.readouterr().out


def test_config_errors_are_messages_not_tracebacks(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--config", "configs/digits_nuisance.yaml", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err


def test_unknown_command():
    with pytest.raises(SystemExit):
        main(["fly"])
