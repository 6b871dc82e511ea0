"""ConcatCritic: its pairwise hidden layer built a block of rows at a time against built at once.

    python benchmarks/concat_critic.py [--batch 2048] [--dim 32] [--hidden 64] [--out benchmarks/results]

One DV step (value and gradients with respect to x, y and the critic's weights, fp32, CPU) with
:class:`rid_fast.critics.ConcatCritic`, whose (B, N, H) hidden layer is never held whole, and
with the same weights applied the way one writes it by hand, ``relu(A x_i + C y_j + b) @ w + b₂``
over a materialised (B, N, H) tensor, feeding the same reference formula. Reports the median of
``--repeats`` timed steps after a warm-up, and each step's peak resident memory above its inputs
in a fresh process (:func:`rid_fast.bench.peak_memory_bytes`). Writes ``concat_critic.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from rid_fast import bench
from rid_fast.critics import ConcatCritic
from rid_fast.mi import functional, reference

HERE = Path(__file__).parent
# Read by the steps, which rid_fast.bench loads by name in a fresh process for the memory figure.
BATCH, DIM, HIDDEN = (int(os.environ.get(k, d)) for k, d in (("CC_BATCH", 2048), ("CC_DIM", 32), ("CC_HIDDEN", 64)))


def _critic() -> ConcatCritic:
    torch.manual_seed(0)
    return ConcatCritic(DIM, DIM, hidden=HIDDEN)


def blockwise_step(x: torch.Tensor, y: torch.Tensor) -> None:
    """DV through rid_fast: the critic's scores a block of rows at a time, then the DV formula."""
    critic = _critic()
    value = functional.estimate("dv", x, y, critic=critic)
    torch.autograd.grad(value, (x, y, *critic.parameters()))


def built_at_once_step(x: torch.Tensor, y: torch.Tensor) -> None:
    """The same scores with the (B, N, H) hidden layer materialised, then the same formula."""
    critic = _critic()
    hidden = torch.relu(critic.x_in(x)[:, None, :] + critic.y_in(y)[None, :, :])  # (B, N, H)
    scores = critic.out(hidden).squeeze(-1)  # (B, N)
    value = reference.dv_from_scores(scores)
    torch.autograd.grad(value, (x, y, *critic.parameters()))


def _median_seconds(step, x, y, repeats: int) -> float:
    step(x, y)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    global BATCH, DIM, HIDDEN
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    os.environ.update(CC_BATCH=str(args.batch), CC_DIM=str(args.dim), CC_HIDDEN=str(args.hidden))
    BATCH, DIM, HIDDEN = args.batch, args.dim, args.hidden

    case = bench.Case("dv", n_queries=args.batch, dim=args.dim, device="cpu")
    x, y = bench.make_inputs(case)
    rows = []
    for name, step in (("blockwise (ConcatCritic)", blockwise_step), ("built at once", built_at_once_step)):
        seconds = _median_seconds(step, x, y, args.repeats)
        peak = bench.peak_memory_bytes(case, f"{Path(__file__).resolve()}:{step.__name__}")
        rows.append((name, seconds, peak / 2**20))
        print(f"{name:26s} {seconds:7.3f} s  +{peak / 2**20:8.1f} MiB")

    lines = [
        "# ConcatCritic: one DV step, the pairwise layer blockwise against built at once",
        "",
        f"Conditions: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
        f"torch {torch.__version__}; {datetime.now(timezone.utc).isoformat(timespec='seconds')}. "
        f"B = N = {args.batch}, D = {args.dim}, H = {args.hidden}, fp32, value and gradients (x, y, critic); "
        f"median of {args.repeats} steps after a warm-up; peak = resident-memory high-water mark above the "
        "inputs, in a fresh process (`python benchmarks/concat_critic.py`).",
        "",
        "| pairwise layer | median s | peak MiB |",
        "|---|---:|---:|",
        *(f"| {name} | {seconds:.2f} | {mib:.0f} |" for name, seconds, mib in rows),
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "concat_critic.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
