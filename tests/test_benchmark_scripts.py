"""The GPU and PID benchmark scripts run end to end here (dry runs on CPU), so that a session with a
scarce GPU does not find their bugs."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_benchmark = _load("gpu_benchmark")
pid_benchmark = _load("pid_benchmark")


def test_headline_plan_measures_the_targets_first():
    Case = gpu_benchmark.PlannedCase
    cases = list(gpu_benchmark.plan_cases("all", gpu_benchmark.IMPLS))
    assert cases[0] == Case("infonce", 65536, 128, "bfloat16", "triton", True)
    assert len(cases) == len(set(cases))
    headline = list(gpu_benchmark.plan_cases("headline", gpu_benchmark.IMPLS))
    assert cases[: len(headline)] == headline
    assert Case("infonce", 1048576, 128, "bfloat16", "triton", True) in headline
    for estimator in ("infonce_symmetric", "nwj", "dv", "smile", "js"):
        assert Case(estimator, 65536, 128, "bfloat16", "triton", True) in headline
    own = [case for case in headline if case.impl.startswith("triton")][: 2 * len(gpu_benchmark.ESTIMATORS) + 5]
    assert headline[: len(own)] == own  # rid_fast's own cases before any baseline
    # the cosine critic next to the dot critic at the headline shape: the cost of normalising apart
    assert Case("infonce", 65536, 128, "bfloat16", "triton", True, "cosine") in own
    # training with and without the forward's weighted keys
    assert Case("infonce", 65536, 128, "bfloat16", "triton_dq_sweep", True) in own
    dq_sweeps = [case for case in cases if case.impl == "triton_dq_sweep"]
    assert all(case.backward and case.dim <= 128 and case.estimator != "infonce_symmetric" for case in dq_sweeps)
    at_headline_shape = {
        case.impl for case in headline if case[:4] == ("infonce", 65536, 128, "bfloat16") and case.backward
    }
    assert at_headline_shape == set(gpu_benchmark.IMPLS)
    baselines = [case.impl for case in headline if case.impl != "triton" and case.dtype == "bfloat16" and case.backward]
    assert baselines[-1] == "compile"  # the slowest to start comes last
    for case in cases:
        assert gpu_benchmark.applies(case.impl, case.estimator, case.batch, case.dim, case.critic)
    outside = [case for case in cases if case.impl in ("sdpa", "infcl")]
    assert {(case.estimator, case.critic) for case in outside} == {("infonce", "dot")}
    assert {case.batch for case in cases if case.critic == "cosine"} == {4096, 16384, 65536, 262144, 1048576}
    materialising = [case.batch for case in cases if case.impl in ("reference", "compile")]
    assert max(materialising) <= gpu_benchmark.MATERIALISED_MAX_B


def test_unknown_plan_is_refused():
    with pytest.raises(ValueError, match="plan must be"):
        list(gpu_benchmark.plan_cases("everything", gpu_benchmark.IMPLS))


def test_gpu_benchmark_dry_run_writes_every_case(tmp_path):
    code = gpu_benchmark.main(
        [
            "--device",
            "cpu",
            "--scale",
            "4096",
            "--plan",
            "headline",
            "--impl",
            "reference",
            "sdpa",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    rows = json.loads((tmp_path / "gpu_cpu.json").read_text())["rows"]
    expected = list(gpu_benchmark.plan_cases("headline", ["reference", "sdpa"]))
    assert [(r["estimator"], r["critic"], r["dtype"], r["impl"], r["direction"] == "fwd+bwd") for r in rows] == [
        (case.estimator, case.critic, case.dtype, case.impl, case.backward) for case in expected
    ]
    assert all(isinstance(r["ms"], float) and r["ms"] > 0 for r in rows), rows
    table = (tmp_path / "gpu_cpu.md").read_text()
    assert table.count("\n| infonce |") == len(rows)
    (tmp_path / "gpu_cpu.md").unlink()
    assert gpu_benchmark.main(["--replot", str(tmp_path / "gpu_cpu.json")]) == 0
    assert (tmp_path / "gpu_cpu.md").read_text() == table


def test_gpu_benchmark_budget_stops_before_the_next_case(tmp_path, capsys):
    code = gpu_benchmark.main(["--device", "cpu", "--scale", "4096", "--impl", "reference", "--budget-s", "0",
                               "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    assert "budget of 0 s spent" in capsys.readouterr().err
    assert not (tmp_path / "gpu_cpu.json").exists()


def test_a_failing_case_is_recorded_not_raised():
    case = gpu_benchmark.PlannedCase("infonce", 16, 8, "float32", "no_such_impl", True)
    row = gpu_benchmark.run_case(case, device="cpu")
    assert row["ms"] == "error" and "impl must be one of" in row["error"]


def test_pid_benchmark_without_cvxpy(tmp_path):
    pid_benchmark.main(["--n", "2", "--cvxpy-sample", "0", "--device", "cpu", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "pid_cpu.json").read_text())["rows"]
    assert [tuple(r["shape"]) for r in rows] == pid_benchmark.SHAPES
    assert all(r["max_gap_bits"] <= 1e-6 and "speedup" not in r for r in rows)
    assert "cvxpy" not in (tmp_path / "pid_cpu.md").read_text()


def test_pid_benchmark_beside_a_busy_process(tmp_path):
    """--compete times the solve a second time beside one busy process, and stops that process."""
    children = set(_child_pids())
    pid_benchmark.main(["--n", "2", "--shapes", "3x3x3", "4x2x5", "--cvxpy-sample", "0", "--compete", "--device", "cpu",
                        "--out", str(tmp_path)])  # fmt: skip
    rows = json.loads((tmp_path / "pid_cpu.json").read_text())["rows"]
    assert [tuple(r["shape"]) for r in rows] == [(3, 3, 3), (4, 2, 5)]
    for r in rows:
        assert r["rid_fast_loaded_s"] > 0 and r["loaded_over_quiet"] == r["rid_fast_loaded_s"] / r["rid_fast_s"]
        assert 1 <= r["mean_steps_per_distribution"] <= r["max_steps_per_distribution"] == r["newton_steps"]
    assert "beside one busy process" in (tmp_path / "pid_cpu.md").read_text()
    assert set(_child_pids()) <= children  # the busy process is gone


def _child_pids() -> list[int]:
    """This process's children (Linux), to check that a benchmark stops what it started."""
    path = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    return [int(pid) for pid in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize(
    "argv, message",
    [(["--shapes", "3x3"], "three positive sizes"), (["--largest-batch", "--device", "cpu"], "needs --device cuda")],
)
def test_pid_benchmark_refuses_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        pid_benchmark.main(argv)
    assert message in capsys.readouterr().err


def test_concat_critic_benchmark_runs_end_to_end(tmp_path):
    """benchmarks/concat_critic.py at a tiny size: the four paths run (timed, and measured in a fresh
    process) and the record is written with its conditions; the large-size file name too."""
    import concat_critic

    concat_critic.main(["--size", "32", "--dim", "4", "--hidden", "8", "--repeats", "1", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "concat_critic_infonce_32.json").read_text())
    assert [row["path"] for row in record["rows"]] == list(concat_critic.PATHS)
    assert record["rows"][0]["time_vs_cpp"] == 1.0 and record["conditions"]["shape"]["H"] == 8
    table = (tmp_path / "concat_critic_infonce_32.md").read_text()
    assert all(f"| {what} |" in table for what in concat_critic.PATHS.values())
