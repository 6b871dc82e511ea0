"""Shared driver of the CPU benchmark suites (pytest-benchmark).

Every implementation of one (estimator, shape) runs in the same session and the same group, so
the saved JSON holds ratios measured in one run. Peak memory above the inputs is measured in a
fresh subprocess per case (``rid_fast.bench.peak_memory_bytes``) and stored as ``extra_info``.
Run through ``make bench`` (or ``python benchmarks/run_cpu.py``).
"""

import sys
from pathlib import Path

import numpy
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from rid_fast import bench  # noqa: E402


def _versions() -> dict:
    import triton

    return {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "numpy": numpy.__version__,
        "threads": torch.get_num_threads(),
    }


@pytest.fixture
def run_case(benchmark):
    """``run_case(case, step_ref=None, rounds=3)``: time the estimator of ``case``, or the step
    function ``step_ref`` (``"file.py:function"``, for baselines outside the package)."""

    def run(case: bench.Case, step_ref: str | None = None, rounds: int = 3):
        x, y = bench.make_inputs(case)
        step = bench.load_step(step_ref) if step_ref else bench.make_step(case)
        direction = "fwd+bwd" if case.backward else "fwd"
        benchmark.group = f"{case.estimator} B={case.n_queries} N={case.keys} D={case.dim} {case.dtype} {direction}"
        benchmark.extra_info.update(
            {
                "impl": case.impl,
                "estimator": case.estimator,
                "B": case.n_queries,
                "N": case.keys,
                "D": case.dim,
                "dtype": case.dtype,
                "backward": case.backward,
                "gflop": case.flops / 1e9,
                **_versions(),
            }
        )
        benchmark.extra_info["peak_bytes"] = bench.peak_memory_bytes(case, step_ref)
        benchmark.pedantic(step, args=(x, y), rounds=rounds, warmup_rounds=1, iterations=1)

    return run
