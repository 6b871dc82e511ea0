"""Timing and peak-memory measurement of the estimators, shared by ``rid-fast bench`` and ``benchmarks/``.

Implementations compared (``impl``):

* ``"torch"``, ``"triton"``, ``"reference"`` — :mod:`rid_fast.mi.functional` with that ``impl``;
* ``"compile"`` — ``torch.compile`` of the reference (the fastest thing a user gets without
  rid_fast); compile time is excluded from its timings and reported separately.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the inputs; on CPU, the process's
resident-set high-water mark above the inputs, measured in a fresh subprocess (Linux: the mark is
reset through ``/proc/self/clear_refs`` after the inputs exist, so imports do not count).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from rid_fast.mi import functional, reference

__all__ = [
    "Case",
    "IMPLS",
    "ESTIMATOR_OPTIONS",
    "make_inputs",
    "make_step",
    "time_case",
    "time_cases",
    "peak_memory_bytes",
]

IMPLS = ("torch", "triton", "reference", "compile")

#: Estimator names for benchmarks → (functional name, options).
ESTIMATOR_OPTIONS: dict[str, tuple[str, dict]] = {
    "infonce": ("infonce", {}),
    "infonce_symmetric": ("infonce", {"symmetric": True}),
    "nwj": ("nwj", {}),
    "dv": ("dv", {}),
    "smile": ("smile", {"clip": 5.0}),
    "js": ("js", {}),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class Case:
    """One benchmark configuration. ``n_keys`` defaults to ``n_queries``."""

    estimator: str = "infonce"
    n_queries: int = 4096
    dim: int = 128
    impl: str = "torch"
    dtype: str = "float32"
    backward: bool = True
    temperature: float = 0.1
    critic: str = "dot"
    n_keys: int | None = None
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")

    @property
    def keys(self) -> int:
        return self.n_keys or self.n_queries

    @property
    def flops(self) -> float:
        """Matrix-multiply flops: 2·B·N·D forward, 8·B·N·D forward + backward (one recompute)."""
        return (8 if self.backward else 2) * self.n_queries * self.keys * self.dim


def make_inputs(case: Case, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm-ish rows with y correlated to x (scores of a few nats at τ = 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n_queries, case.dim, generator=gen) / math.sqrt(case.dim)
    y = torch.randn(case.keys, case.dim, generator=gen) / math.sqrt(case.dim)
    y[: case.n_queries] = 0.8 * x + 0.6 * y[: case.n_queries]
    dtype = _DTYPES[case.dtype]
    return (
        x.to(case.device, dtype).requires_grad_(case.backward),
        y.to(case.device, dtype).requires_grad_(case.backward),
    )


def _estimator_fn(case: Case) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    name, options = ESTIMATOR_OPTIONS[case.estimator]
    if case.impl == "compile":
        oracle = getattr(reference, name)
        return torch.compile(lambda x, y: oracle(x, y, temperature=case.temperature, critic=case.critic, **options))
    return lambda x, y: functional.mi_bound(
        x, y, name, temperature=case.temperature, critic=case.critic, impl=case.impl, check_values=False, **options
    )


def make_step(
    case: Case, estimate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One timed step: the estimate (``case``'s estimator, or ``estimate(x, y)`` — a baseline
    outside the package), and its backward when ``case.backward``."""
    estimate = estimate or _estimator_fn(case)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        value = estimate(x, y)
        if case.backward:
            torch.autograd.grad(value, (x, y))

    return step


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_step(step: Callable[[Tensor, Tensor], None], x: Tensor, y: Tensor, device: str) -> float:
    """Seconds one step takes, to its end on the device."""
    start = time.perf_counter()
    step(x, y)
    _synchronize(device)
    return time.perf_counter() - start


def time_cases(cases: list[Case], *, repeats: int = 3, warmup: int = 1) -> list[dict]:
    """Median wall time of each case over ``repeats`` steps after ``warmup`` (the first warm-up
    step, which includes any compilation, is reported as ``first_s``). The timed steps take turns
    across the cases — one step of each, ``repeats`` times — so that a machine whose speed drifts
    over seconds (a shared VM, a GPU's clocks) biases their ratios less than timing them one after
    the other would."""
    steps = []
    for case in cases:
        x, y = make_inputs(case)
        step = make_step(case)
        first = _timed_step(step, x, y, case.device)
        for _ in range(max(warmup, 1) - 1):
            _timed_step(step, x, y, case.device)
        steps.append((case, step, x, y, first))
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for (case, step, x, y, _), case_times in zip(steps, times):
            case_times.append(_timed_step(step, x, y, case.device))
    results = []
    for (case, *_, first), case_times in zip(steps, times):
        median = statistics.median(case_times)
        results.append(
            {"median_s": median, "min_s": min(case_times), "first_s": first, "tflops": case.flops / median / 1e12}
        )
    return results


def time_case(case: Case, *, repeats: int = 3, warmup: int = 1) -> dict:
    """:func:`time_cases` of one case."""
    return time_cases([case], repeats=repeats, warmup=warmup)[0]


def _proc_status(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def load_step(step_ref: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A step function named ``"path/to/file.py:function"`` (a baseline outside the package)."""
    path, _, name = step_ref.rpartition(":")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path).parent))
    spec.loader.exec_module(module)
    return getattr(module, name)


def _measure_here(case: Case, step_ref: str | None = None) -> int:
    """Peak bytes above the inputs for one step, in this process (CPU: needs a fresh process)."""
    x, y = make_inputs(case)
    step = load_step(step_ref) if step_ref else make_step(case)
    step(x, y)  # warm up outside the measurement: lazy imports, compilation, allocator pools
    if case.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(x, y)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _proc_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the high-water mark to the current resident set
    step(x, y)
    return _proc_status("VmHWM") - base


def peak_memory_bytes(case: Case, step_ref: str | None = None) -> int:
    """Peak memory of one step above its inputs (see the module notes). ``step_ref``
    (``"file.py:function"``) replaces the estimator of ``case`` by another step function."""
    if case.device.startswith("cuda"):
        return _measure_here(case, step_ref)
    command = [sys.executable, "-m", "rid_fast.bench", "--peak-memory", json.dumps(asdict(case))]
    if step_ref:
        command += ["--step", step_ref]
    # A fixed mmap threshold turns off glibc's adaptive one, which would otherwise keep the
    # warm-up step's freed blocks resident and hide the measured step's own peak.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {case} failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.strip().splitlines()[-1])


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peak-memory", metavar="CASE_JSON", required=True)
    parser.add_argument("--step", metavar="FILE:FUNCTION", default=None)
    args = parser.parse_args()
    print(_measure_here(Case(**json.loads(args.peak_memory)), args.step))


if __name__ == "__main__":
    _main()
