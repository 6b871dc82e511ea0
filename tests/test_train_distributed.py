"""Data-parallel training (torchrun, gloo on the CPU): global batches split over the processes,
the torchrun environment, when the estimator gets the process group, gradients equal to one
process's, identical weights on every process, and a two-process run killed and resumed."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from process_group import spawn

from rid_fast.cli import main
from rid_fast.train import checkpoint, distributed
from rid_fast.train.config import load_config
from rid_fast.train.distillers import estimator_options
from rid_fast.train.distributed import Processes, check_global_batch, process_seed, shard
from rid_fast.train.loop import Trainer

TINY = [
    "data.per_class=6",  # 60 student inputs: batches of 16, 16, 16 and 12, each split in two
    "teacher.model={name: mlp, hidden: [32, 32]}",
    "teacher.optim.epochs=3",
    "student.model={name: mlp, hidden: [8, 8]}",
    "distill.teacher_layers=[blocks.0, blocks.1]",
    "distill.student_layers=[blocks.0, blocks.1]",
    "optim.epochs=4",  # RID: 6 epochs, filter epochs 1 and 4
    "optim.batch_size=16",
    "run.progress=false",
    "distill.rid.n_rounds=2",
    "distill.rid.filter_fraction=0.25",
]


def tiny_config(run_dir, *overrides):
    return load_config(None, [*TINY, f"run.out_dir={run_dir}", *overrides])


# ---- the global batch -----------------------------------------------------------------------------


def test_the_global_batch_must_split_evenly():
    check_global_batch(16, 60, 2)  # batches of 16 and a last one of 12: 8 + 8 and 6 + 6
    check_global_batch(16, 64, 4)
    with pytest.raises(ValueError, match="optim.batch_size = 30 is the global batch, .* a multiple of 4"):
        check_global_batch(30, 60, 4)
    with pytest.raises(ValueError, match=r"the last batch of every epoch holds 60 mod 16 = 12 .* 8 processes"):
        check_global_batch(16, 60, 8)


def test_shards_partition_every_batch_in_order():
    batch = torch.arange(12)
    parts = [shard(batch, Processes(rank, 3)) for rank in range(3)]
    assert torch.equal(torch.cat(parts), batch) and {len(p) for p in parts} == {4}
    assert shard(batch, Processes()) is batch


def test_process_seeds_differ_by_process_and_run():
    seeds = {process_seed(seed, rank) for seed in range(3) for rank in range(4)}
    assert len(seeds) == 12 and process_seed(0, 1) == process_seed(0, 1)


def test_the_trainer_refuses_a_batch_the_processes_cannot_split(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "current", lambda: Processes(0, 8))
    with pytest.raises(ValueError, match="the last batch of every epoch holds 60 mod 16 = 12"):
        Trainer(tiny_config(tmp_path, "teacher.kind=untrained"))


# ---- the environment ---------------------------------------------------------------------------------


def test_torchrun_environment_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not: start several"):
        with distributed.data_parallel("cpu"):
            pass
    monkeypatch.setenv("RANK", "two")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ValueError, match="environment variable RANK must be a whole number ≥ 0; got 'two'"):
        with distributed.data_parallel("cpu"):
            pass
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "many")
    with pytest.raises(ValueError, match="environment variable WORLD_SIZE must be a whole number ≥ 0; got 'many'"):
        with distributed.data_parallel("cpu"):
            pass
    with pytest.raises(ValueError, match="run.device is 'cuda:1', one device, but each process"):
        distributed.process_device("cuda:1", 0)


def test_without_torchrun_there_is_one_process():
    with distributed.data_parallel("auto") as processes:
        assert processes == Processes() and processes.main and not processes.parallel


def test_the_trainer_under_torchrun_needs_the_process_group(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="started by torchrun .* outside a process group"):
        Trainer(tiny_config(tmp_path, "teacher.kind=untrained"))


def test_compare_under_torchrun_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the CLI's SIGTERM handler stays out of pytest
    config = tmp_path / "c.yaml"
    config.write_text("run: {progress: false}\n")
    assert main(["compare", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rid-fast compare: error: compare trains its runs side by side") and err.count("\n") == 1


@pytest.mark.parametrize("rank, lines", [(0, 1), (1, 0)])
def test_a_config_error_under_torchrun_is_said_once(tmp_path, capsys, monkeypatch, rank, lines):
    """Every process reads the same command line and files: process 0 alone says what is wrong."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the CLI's SIGTERM handler stays out of pytest
    config = tmp_path / "c.yaml"
    config.write_text("run: {progress: false}\n")
    assert main(["train", "--config", str(config), "optim.epochs=0", f"run.out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == lines and err.count("optim.epochs must be at least 1; got 0") == lines
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.count("missing.yaml") == lines


# ---- the estimator's process-group options ---------------------------------------------------------


def test_global_negatives_apply_to_contrastive_rid_among_several_processes(tmp_path):
    """No process group for one process, with the option off, or for a method without a contrastive
    estimator (the group itself, among two processes, in ``_trainer_worker``)."""
    two = Processes(0, 2)
    for method, world, negatives in [("rid_infonce", Processes(), "true"), ("rid_gaussian", two, "true"),
                                     ("vid", two, "true"), ("rid_infonce", two, "false")]:  # fmt: skip
        config = tiny_config(tmp_path, f"distill.method={method}", f"distill.global_negatives={negatives}")
        assert estimator_options(config, world) == {}
    with pytest.raises(ValueError, match="distill.gather must be one of 'ring', 'all_gather'; got 'tree'"):
        tiny_config(tmp_path, "distill.gather=tree")


# ---- the trainer in two processes ------------------------------------------------------------------------


def _step_gradients(trainer, x, y, positions):
    """Gradients of the phase's parameters after one step at each of ``positions`` (of 6: the
    tiny config's RID schedule opens with a filter epoch), through what the trainer steps with."""
    model = trainer._data_parallel()
    total = trainer.schedule_length()
    grads = {}
    for position in positions:
        phase = trainer.distiller.phase(position, total)
        parameters = trainer.distiller.parameters_for(phase)
        for p in parameters:
            p.grad = None
        model(x, y, position=position, total=total)["loss"].backward()
        grads[phase] = [p.grad.clone() for p in parameters if p.grad is not None]
    return grads


def _float64_inputs(trainer):
    """A float64 global batch of 16 student inputs, and the distiller in float64."""
    trainer.distiller.double()
    idx = trainer.split.student[:16]
    return trainer.dataset.x_train[idx].double(), trainer.dataset.y_train[idx]


#: Methods whose steps two processes take as one: RID's Gaussian term (a mean over rows) and RID-InfoNCE
#: with global negatives (the estimate over the whole global batch).
STEPPED_METHODS = ("rid_gaussian", "rid_infonce")


def _trainer_worker(rank, root):
    root = Path(root)
    # One step of each phase on this process's half of a global batch, in float64.
    # RID-InfoNCE draws its negatives from both halves (distill.global_negatives, on by default).
    for method in STEPPED_METHODS:
        trainer = Trainer(tiny_config(root / method, "teacher.kind=untrained", f"distill.method={method}"))
        groups = {getattr(pair.redundancy, "group", None) is not None for pair in trainer.distiller.method.loss.pairs}
        assert groups == {method == "rid_infonce"}
        x, y = _float64_inputs(trainer)
        mine = shard(torch.arange(len(x)), trainer.processes)
        torch.save(_step_gradients(trainer, x[mine], y[mine], (0, 2)), root / f"grads{rank}-{method}.pt")
    # A whole run with a trained, noisy teacher: process 0 trains the teacher and writes the files.
    trainer = Trainer(tiny_config(root / "run", "teacher.kind=noisy", "distill.method=rid_gaussian"))
    trainer.train()
    state = {"distiller": trainer.distiller.state_dict(),
             "optimizers": {k: o.state_dict() for k, o in trainer.optimizers.items()}}  # fmt: skip
    digests = distributed.gather(checkpoint.content_digest("state", state))
    generators = distributed.gather(checkpoint.content_digest("rng", checkpoint.rng_state()))
    if rank == 0:
        torch.save({"digests": digests, "generators": generators, "history": trainer.history}, root / "run.pt")


def test_two_processes_step_as_one_and_stay_identical(tmp_path):
    """Two processes on halves of each global batch: the same gradients as one process on the
    whole batch (float64, up to the order of the sums; RID-InfoNCE's negatives from both halves),
    and after a whole run every process holds
    the same weights and optimizer states, while their random generators differ."""
    spawn(_trainer_worker, str(tmp_path))
    for method in STEPPED_METHODS:
        config = tiny_config(tmp_path / f"one-{method}", "teacher.kind=untrained", f"distill.method={method}")
        reference = Trainer(config)
        x, y = _float64_inputs(reference)
        expected = _step_gradients(reference, x, y, (0, 2))
        assert set(expected) == {"filter", "student"}
        for rank in range(2):
            grads = torch.load(tmp_path / f"grads{rank}-{method}.pt")
            for phase in expected:
                assert len(grads[phase]) == len(expected[phase]) > 0
                for got, want in zip(grads[phase], expected[phase]):
                    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{method} {phase}")
    run = torch.load(tmp_path / "run.pt")
    assert run["digests"][0] == run["digests"][1]
    assert run["generators"][0] != run["generators"][1]
    assert [row["epoch"] for row in run["history"]] == [1, 2, 3, 4, 5, 6]
    with open(tmp_path / "run" / "metrics.csv") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "run" / "ckpt" / "latest.pt").is_file()


# ---- torchrun: a run killed and resumed ---------------------------------------------------------------

TORCHRUN_YAML = """
data: {per_class: 6}
teacher:
  model: {name: mlp, hidden: [32, 32]}
  optim: {epochs: 3}
student:
  model: {name: mlp, hidden: [8, 8]}
distill:
  method: rid_gaussian
  teacher_layers: [blocks.0, blocks.1]
  student_layers: [blocks.0, blocks.1]
  rid: {n_rounds: 2, filter_fraction: 0.25}
optim: {epochs: 10, batch_size: 16}  # 13 epochs with the filter epochs: time to kill it after the second
run: {progress: false}
"""


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux: from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (name)": state, ppid
        except (OSError, IndexError, ValueError):  # a process that ended meanwhile
            continue
        if parent == pid:
            found.append(int(stat.parent.name))
    return found


def test_torchrun_run_killed_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    """``torchrun --nproc_per_node 2 -m rid_fast.cli train`` (gloo): a run whose processes (torchrun
    and its two workers) are killed with SIGKILL after its second checkpoint, resumed with
    ``--resume`` under torchrun, ends with the metrics (but the timings) and weights of an
    uninterrupted two-process run; the noisy teacher makes every process draw from its own
    generators. One process cannot resume it."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TORCHRUN_YAML)
    overrides = ["teacher.kind=noisy"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    train = [*torchrun, "-m", "rid_fast.cli", "train", "--config", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, run = tmp_path / "reference", tmp_path / "run"
    done = subprocess.run([*train, f"run.out_dir={reference}"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("final:") == 1  # process 0 alone prints
    process = subprocess.Popen([*train, f"run.out_dir={run}"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 600
    while not (run / "ckpt" / "previous.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = _children(process.pid)  # torchrun starts each in a session of its own
    for pid in (process.pid, *workers):  # torchrun first: it must not see its processes die
        os.kill(pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(workers) == 2
    while any(Path(f"/proc/{pid}").exists() for pid in workers):  # gone once reaped by their new parent
        time.sleep(0.01)
    total = len(_metrics(reference))
    assert 2 <= len(_metrics(run)) < total
    resumed = subprocess.run([*torchrun, "-m", "rid_fast.cli", "train", f"run.out_dir={run}", "--resume"], env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("resuming") == 1
    assert _metrics(run) == _metrics(reference)
    weights = [checkpoint.load(folder / "ckpt" / "latest.pt")["distiller"] for folder in (reference, run)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    one_process = subprocess.run([sys.executable, "-m", "rid_fast.cli", "train", "--resume", f"run.out_dir={run}"],
                                 env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one_process.returncode == 2
    assert "was written by a run of 2 process(es) and this is a run of 1" in one_process.stderr
    assert len(one_process.stderr.splitlines()) == 1


def test_ctrl_c_under_torchrun_is_one_line_from_process_0(tmp_path):
    """Ctrl-C reaches torchrun (its workers run in sessions of their own), which passes it on:
    process 0 says once that the run was interrupted and how to resume it, and no process prints
    a traceback."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TORCHRUN_YAML)
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "rid_fast.cli", "train", "--config", str(config), "teacher.kind=untrained",
               "optim.epochs=400", f"run.out_dir={run}"]  # fmt: skip
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                   stderr=stderr)  # fmt: skip
        deadline = time.monotonic() + 600
        while not (run / "ckpt" / "latest.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    ours = [line for line in log.read_text().splitlines() if line.startswith("rid-fast")]
    assert ours == ["rid-fast train: interrupted (resume it with --resume)"]
    assert "rid_fast/" not in log.read_text()  # no traceback through rid_fast (torchrun prints its own)
