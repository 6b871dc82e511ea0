import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rid_fast import bench
from rid_fast.cli import main
from rid_fast.train import teachers
from rid_fast.train.config import load_config
from rid_fast.train.loop import Trainer

TINY_YAML = """
data: {per_class: 6}
teacher:
  model: {name: mlp, hidden: [32, 32]}
  optim: {epochs: 3}
student:
  model: {name: mlp, hidden: [8, 8]}
distill:
  teacher_layers: [blocks.0, blocks.1]
  student_layers: [blocks.0, blocks.1]
optim: {epochs: 5, batch_size: 16}
run: {progress: false}
"""

#: The overrides of the run the README's resume line follows.
RUN_OVERRIDES = ["distill.method=vid", "teacher.kind=untrained", "optim.epochs=3"]


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML)
    return path


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def _no_teacher_training(*args, **kwargs):
    raise AssertionError("a teacher was trained")


class _Stop(Exception):
    pass


def test_resume_as_the_readme_writes_it_follows_the_run(tmp_path, tiny_yaml, capsys, monkeypatch):
    """``train --config C run.out_dir=R --resume`` after a run made with overrides resumes that run:
    its own config.yaml (kept as it was), no teacher trained, the same result as without a stop."""
    from rid_fast.train import loop

    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["train", "--config", str(tiny_yaml), *RUN_OVERRIDES, f"run.out_dir={reference}"]) == 0
    evaluations = []
    accuracy = loop.accuracy

    def stop_in_the_third_epoch(*args):  # two evaluations (validation, test) per epoch
        evaluations.append(1)
        if len(evaluations) == 5:
            raise _Stop
        return accuracy(*args)

    monkeypatch.setattr(loop, "accuracy", stop_in_the_third_epoch)
    with pytest.raises(_Stop):  # two epochs checkpointed
        main(["train", "--config", str(tiny_yaml), *RUN_OVERRIDES, f"run.out_dir={run}"])
    monkeypatch.setattr(loop, "accuracy", accuracy)
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    monkeypatch.setattr(teachers, "fit_classifier", _no_teacher_training)
    assert main(["train", "--config", str(tiny_yaml), f"run.out_dir={run}", "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert (run / "config.yaml").read_text() == before
    assert _metrics(run) == _metrics(reference)


def test_kill_and_resume(tmp_path, tiny_yaml):
    """A run killed with SIGKILL mid-training and resumed as the README writes it ends exactly as
    an uninterrupted run: every metrics.csv row equal but the timings. (Every run in a process of
    its own, so that all run with the same number of threads.)"""
    overrides = ["distill.method=vid", "teacher.kind=untrained", "optim.epochs=60"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    train = [sys.executable, "-m", "rid_fast.cli", "train", "--config", str(tiny_yaml)]
    subprocess.run([*train, *overrides, f"run.out_dir={reference}"], check=True, capture_output=True)
    process = subprocess.Popen([*train, *overrides, f"run.out_dir={run}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (run / "ckpt" / "previous.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(_metrics(run)) < 60
    resumed = subprocess.run([*train, f"run.out_dir={run}", "--resume"], check=True, capture_output=True, text=True)
    assert "resuming" in resumed.stdout
    assert _metrics(run) == _metrics(reference)
    assert load_config(run / "config.yaml").distill.method == "vid"


def test_resume_refuses_overrides_that_change_the_run(tmp_path, tiny_yaml, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", "--config", str(tiny_yaml), *RUN_OVERRIDES, f"run.out_dir={run}"]) == 0
    before = (run / "config.yaml").read_text()
    capsys.readouterr()
    monkeypatch.setattr(teachers, "fit_classifier", _no_teacher_training)
    args = ["train", "--resume", f"run.out_dir={run}", "distill.method=rid_gaussian", "optim.lr=0.1", "optim.epochs=9"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    for change in ("distill.method: 'vid' → 'rid_gaussian'", "optim.lr: 0.05 → 0.1", "optim.epochs: 3 → 9"):
        assert change in err
    assert (run / "config.yaml").read_text() == before
    # Repeating the run's own overrides, or changing only how it reports, is fine.
    assert main(["train", "--resume", *RUN_OVERRIDES, f"run.out_dir={run}", "run.progress=false"]) == 0
    assert main(["train", "--resume", f"run.out_dir={tmp_path / 'nothing'}"]) == 2
    assert "holds no config.yaml" in capsys.readouterr().err


def test_training_again_into_a_run_folder_needs_overwrite(tmp_path, tiny_yaml, capsys, monkeypatch):
    """Forgetting --resume must not delete a run: a new run into a folder holding checkpoints stops
    (before a teacher trains), and names both ways on; --overwrite trains the new run."""
    run = tmp_path / "run"
    train = ["train", "--config", str(tiny_yaml), *RUN_OVERRIDES, f"run.out_dir={run}"]
    assert main(train) == 0
    files = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    capsys.readouterr()
    with monkeypatch.context() as patch:
        patch.setattr(teachers, "fit_classifier", _no_teacher_training)
        assert main(train) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert f"rid-fast train --resume run.out_dir={run}" in err and "--overwrite" in err
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == files
    assert main([*train, "--overwrite"]) == 0
    assert len(_metrics(run)) == 3


CLI_BAD_VALUES = [
    ("optim.epochs=0", "optim.epochs must be at least 1; got 0"),
    ("optim.batch_size=0", "optim.batch_size must be at least 1; got 0"),
    ("data.per_class=0", "data.per_class must be at least 1; got 0"),
    ("data.per_class=500", "data.per_class = 500 but class 0 has only"),
    ("run.device=gpu", "run.device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>'; got 'gpu'"),
    ("optim.lr=-1", "optim.lr must be at least 0.0; got -1"),
    ("distill.vid.weight=-2", "distill.vid.weight must be at least 0.0; got -2"),
    ("distill.weight=-2", "'distill.weight' is not a key here; set it in the section it belongs to: distill.kd.weight"),
    ("distill.method=rid_gauss", "distill.method must be one of"),
    ("distill.rid.n_rounds=0", "distill.rid.n_rounds must be at least 1; got 0"),
    ("distill.n_rounds=0", "'distill.n_rounds' is not a key here; set it in the section it belongs to: distill.rid"),
    ("distill.student_layers=[blocks.0, nope]", "student_layers: no module named ['nope'] in the student"),
    ("distill.teacher_layers=[blocks.0,", "override 'distill.teacher_layers=[blocks.0,': the value is not valid YAML"),
]


@pytest.mark.parametrize("override,message", CLI_BAD_VALUES, ids=[b[0] for b in CLI_BAD_VALUES])
def test_bad_values_stop_before_a_teacher_trains(tmp_path, tiny_yaml, capsys, monkeypatch, override, message):
    monkeypatch.setattr(teachers, "fit_classifier", _no_teacher_training)
    assert main(["train", "--config", str(tiny_yaml), f"run.out_dir={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_stops_before_a_teacher_trains(tmp_path, tiny_yaml, capsys, monkeypatch):
    monkeypatch.setattr(teachers, "fit_classifier", _no_teacher_training)
    assert main(["train", "--config", str(tiny_yaml), "run.device=cuda", f"run.out_dir={tmp_path}"]) == 2
    assert "run.device is 'cuda' but no CUDA device is available" in capsys.readouterr().err


def test_a_config_file_that_is_not_yaml_is_named(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: {lr: 0.1\n")
    assert main(["train", "--config", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"config file {str(broken)!r} is not valid YAML" in err and len(err.splitlines()) == 1


def test_ctrl_c_is_one_line_that_says_how_to_resume(tmp_path, tiny_yaml, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train", interrupted)
    assert main(["train", "--config", str(tiny_yaml), f"run.out_dir={tmp_path / 'run'}", "distill.method=vid"]) == 130
    assert capsys.readouterr().err == "rid-fast train: interrupted (resume it with --resume)\n"


BENCH_ERRORS = [
    (["--batch", "-5"], "--batch must be at least 1; got -5"),
    (["--batch", "8", "--keys", "4"], "--keys must be at least --batch"),
    (["--device", "tpu"], "--device must be 'cpu', 'cuda' or 'cuda:<index>'; got 'tpu'"),
    (["--repeats", "0"], "--repeats must be at least 1; got 0"),
    (["--dim", "0"], "--dim must be at least 1; got 0"),
    (["--device", "cuda:99"], "--device cuda:99"),
]


@pytest.mark.parametrize("args,message", BENCH_ERRORS, ids=[" ".join(a) for a, _ in BENCH_ERRORS])
def test_bench_argument_errors_are_one_line(capsys, args, message):
    assert main(["bench", "--impl", "torch", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_on_cuda_without_cuda_is_one_line(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device is available here" in err and len(err.splitlines()) == 1


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
            "distill.rid.n_rounds=1"]  # fmt: skip
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
            "data.val_fraction=0.2", f"run.out_dir={tmp_path / 'run'}", "run.progress=false", "distill.rid.n_rounds=1",
            "distill.rid.filter_fraction=0.5"]  # fmt: skip
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
            "distill.rid.n_rounds=1"]  # fmt: skip
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
