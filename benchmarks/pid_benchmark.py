"""Throughput of the batched BROJA solver against solving one distribution at a time with cvxpy.

    python benchmarks/pid_benchmark.py [--n 256] [--cvxpy-sample 32] [--device cpu]

For each shape (|Y|, |T|, |S|), ``n`` Dirichlet(1) distributions are solved at once by
:func:`rid_fast.pid.broja_batch`; cvxpy (the relative-entropy program, Clarabel) solves a sample
of them one by one (its per-distribution time is steady, so the sample gives its throughput).
Both run in this process, one after the other. Writes ``benchmarks/results/pid_<device>.json``
and ``.md`` with the throughputs, their ratio, the largest disagreement in synergy (bits) and the
largest certified duality gap.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from rid_fast import pid

SHAPES = [(3, 3, 3), (10, 8, 8), (10, 20, 20)]
RESULTS = Path(__file__).parent / "results"


def run(n: int, sample: int, device: str) -> list[dict]:
    rows = []
    for shape in SHAPES:
        torch.manual_seed(0)
        size = shape[0] * shape[1] * shape[2]
        p = torch.distributions.Dirichlet(torch.ones(size, dtype=torch.float64)).sample((n,)).reshape(n, *shape)
        p_dev = p.to(device)
        pid.broja_batch(p_dev[:2])  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = pid.broja_batch(p_dev)
        if device == "cuda":
            torch.cuda.synchronize()
        ours = time.perf_counter() - started

        h_y, _, _, mi_ts = pid._mutual_informations(p)
        started = time.perf_counter()
        worst = 0.0
        for i in range(sample):
            h_max = pid.reference_max_conditional_entropy(p[i])
            synergy = float(mi_ts[i] - (h_y[i] - h_max)) / pid.LN2
            worst = max(worst, abs(synergy - float(result.syn[i])))
        theirs = (time.perf_counter() - started) / sample
        row = {
            "shape": list(shape),
            "n": n,
            "rid_fast_s": ours,
            "rid_fast_per_s": n / ours,
            "cvxpy_per_distribution_s": theirs,
            "cvxpy_per_s": 1 / theirs,
            "speedup": (n / ours) * theirs,
            "newton_steps": result.iterations,
            "max_abs_syn_diff_bits": worst,
            "max_gap_bits": float(result.gap.max()),
        }
        rows.append(row)
        print(
            f"{str(shape):>14}  rid_fast {row['rid_fast_per_s']:9.1f}/s  cvxpy {row['cvxpy_per_s']:7.2f}/s  "
            f"speedup {row['speedup']:7.1f}x  max |Δsyn| {worst:.1e} bits  max gap {row['max_gap_bits']:.1e} bits"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--cvxpy-sample", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    import cvxpy

    conditions = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cvxpy": cvxpy.__version__,
        "python": platform.python_version(),
    }
    rows = run(args.n, args.cvxpy_sample, args.device)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"pid_{args.device}.json").write_text(json.dumps({"conditions": conditions, "rows": rows}, indent=2))
    lines = [
        f"# BROJA PID throughput ({args.device})",
        "",
        "Conditions: " + ", ".join(f"{k} {v}" for k, v in conditions.items()) + ".",
        f"rid_fast solves n = {args.n} Dirichlet(1) distributions in one batch (float64); cvxpy (Clarabel)",
        f"solves {args.cvxpy_sample} of them one at a time, in the same process, right after.",
        "",
        "| shape (Y, T, S) | rid_fast (distributions/s) | cvxpy (distributions/s) | speed-up | Newton steps "
        "| max abs Δ synergy vs cvxpy (bits) | max certified gap (bits) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {tuple(r['shape'])} | {r['rid_fast_per_s']:.1f} | {r['cvxpy_per_s']:.2f} | {r['speedup']:.0f}× | "
        f"{r['newton_steps']} | {r['max_abs_syn_diff_bits']:.1e} | {r['max_gap_bits']:.1e} |"
        for r in rows
    ]
    (RESULTS / f"pid_{args.device}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
