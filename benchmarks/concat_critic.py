"""ConcatCritic on the CPU: InfoNCE forward + backward through its fused kernel, against the paths before it.

    python benchmarks/concat_critic.py                       # B = N = 2048, D = 32, H = 256, fp32: all four paths
    python benchmarks/concat_critic.py --size 16384 --paths cpp   # the large case: the C++ kernel alone
    [--dim 32] [--hidden 256] [--repeats 3] [--out benchmarks/results]

One InfoNCE step (value and gradients with respect to x, y and the critic's weights A, b1, C, w2, b2,
fp32, CPU) with :class:`rid_fast.critics.ConcatCritic`, four ways, in one run:

* ``cpp`` — ``impl="cpp"``: the C++ kernel (:mod:`rid_fast.ops.pairwise_cpp`), never holding the
  B × N scores nor the B × N × H hidden layer;
* ``torch`` — ``impl="torch"``: the blocked PyTorch path (:mod:`rid_fast.ops.pairwise_streaming`),
  the fallback without a compiler, neither held either;
* ``rows`` — what ConcatCritic did before: the (B, N) scores built a block of rows at a time
  (:class:`baselines.RowBlockPairwiseScores`, the hidden layer recomputed in the backward), then the
  reference formula;
* ``reference`` — the formula as one writes it, ``relu(A x_i + C y_j + b1) @ w2 + b2`` over a
  materialised (B, N, H) tensor (``impl="reference"``).

Reports the median of ``--repeats`` timed steps after a warm-up (ratios to ``cpp`` in the same run)
and each step's peak resident memory above its inputs in a fresh process
(:func:`rid_fast.bench.peak_memory_bytes`); writes ``concat_critic_infonce.md`` and ``.json`` with
the conditions (machine, threads, versions, how the kernel was built).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from baselines import RowBlockPairwiseScores

from rid_fast import bench
from rid_fast.critics import ConcatCritic
from rid_fast.mi import functional, reference
from rid_fast.ops import pairwise_cpp

HERE = Path(__file__).parent
# Read by the steps, which rid_fast.bench loads by name in a fresh process for the memory figure.
DIM, HIDDEN = (int(os.environ.get(k, d)) for k, d in (("CC_DIM", 32), ("CC_HIDDEN", 256)))

#: path → (what it is, step function name).
PATHS = {
    "cpp": "C++ kernel (impl='cpp')",
    "torch": "blocked PyTorch (impl='torch')",
    "rows": "B × N scores in row blocks (before)",
    "reference": "eager broadcast reference (B × N × H)",
}


def _critic() -> ConcatCritic:
    torch.manual_seed(0)
    return ConcatCritic(DIM, DIM, hidden=HIDDEN)


def _grad(value: torch.Tensor, x: torch.Tensor, y: torch.Tensor, critic: ConcatCritic) -> None:
    torch.autograd.grad(value, (x, y, *critic.parameters()))


def cpp_step(x: torch.Tensor, y: torch.Tensor) -> None:
    critic = _critic()
    _grad(functional.estimate("infonce", x, y, critic, impl="cpp"), x, y, critic)


def torch_step(x: torch.Tensor, y: torch.Tensor) -> None:
    critic = _critic()
    _grad(functional.estimate("infonce", x, y, critic, impl="torch"), x, y, critic)


def rows_step(x: torch.Tensor, y: torch.Tensor) -> None:
    critic = _critic()
    scores = RowBlockPairwiseScores.apply(*critic.pairwise_factors(x, y))
    _grad(reference.infonce_from_scores(scores), x, y, critic)


def reference_step(x: torch.Tensor, y: torch.Tensor) -> None:
    critic = _critic()
    _grad(functional.estimate("infonce", x, y, critic, impl="reference"), x, y, critic)


STEPS = {"cpp": cpp_step, "torch": torch_step, "rows": rows_step, "reference": reference_step}


def _median_seconds(step, x, y, repeats: int) -> float:
    step(x, y)  # warm-up (and, for the kernel, its build or the load of the cached build)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    global DIM, HIDDEN
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="B = N")
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    os.environ.update(CC_DIM=str(args.dim), CC_HIDDEN=str(args.hidden))
    DIM, HIDDEN = args.dim, args.hidden

    kernel_built, kernel_why = pairwise_cpp.status()
    if "cpp" in args.paths and not kernel_built:
        raise SystemExit(f"the C++ kernel is unavailable: {kernel_why}")
    case = bench.Case("infonce", n_queries=args.size, dim=args.dim, device="cpu")
    x, y = bench.make_inputs(case)
    rows = []
    for path in args.paths:
        seconds = _median_seconds(STEPS[path], x, y, args.repeats)
        peak = bench.peak_memory_bytes(case, f"{Path(__file__).resolve()}:{STEPS[path].__name__}")
        rows.append({"path": path, "what": PATHS[path], "median_s": seconds, "peak_mib": peak / 2**20})
        print(f"{PATHS[path]:40s} {seconds:8.3f} s  +{peak / 2**20:9.1f} MiB", flush=True)
    baseline = next((row["median_s"] for row in rows if row["path"] == "cpp"), None)
    for row in rows:
        row["time_vs_cpp"] = None if baseline is None else row["median_s"] / baseline

    conditions = {
        "machine": f"{platform.machine()}, {_cpu_model()}",
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kernel": kernel_why,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shape": {"B": args.size, "N": args.size, "D": args.dim, "H": args.hidden, "dtype": "float32"},
        "repeats": args.repeats,
    }
    lines = [
        "# ConcatCritic: one InfoNCE step (forward + backward), CPU",
        "",
        f"Conditions: {conditions['machine']}, {conditions['cores']} cores, {conditions['threads']} threads; "
        f"torch {conditions['torch']}, Python {conditions['python']}; kernel: {kernel_why}; {conditions['date']}. "
        f"B = N = {args.size}, D = {args.dim}, H = {args.hidden}, fp32, value and gradients (x, y, critic); "
        f"median of {args.repeats} steps after a warm-up; peak = resident-memory high-water mark above the "
        f"inputs, in a fresh process; time ratios from this one run (`python benchmarks/concat_critic.py "
        f"--size {args.size} --dim {args.dim} --hidden {args.hidden} --paths {' '.join(args.paths)}`).",
        "",
        "| path | median s | × the C++ kernel's time | peak MiB |",
        "|---|---:|---:|---:|",
        *(
            f"| {row['what']} | {row['median_s']:.3f} | "
            f"{'-' if row['time_vs_cpp'] is None else format(row['time_vs_cpp'], '.1f')} | {row['peak_mib']:.0f} |"
            for row in rows
        ),
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "concat_critic_infonce" if args.size == 2048 else f"concat_critic_infonce_{args.size}"
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    (args.out / f"{stem}.json").write_text(json.dumps({"conditions": conditions, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
