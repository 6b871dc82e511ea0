"""Throughput of the batched BROJA solver against solving one distribution at a time with cvxpy.

    python benchmarks/pid_benchmark.py [--n 256 ...] [--cvxpy-sample 32] [--device cpu] [--out DIR]

For each shape (|Y|, |T|, |S|) and batch size n, n Dirichlet(1) distributions are solved at once by
:func:`rid_fast.pid.broja_batch`; cvxpy (the relative-entropy program, Clarabel) solves a sample
of them one by one (its per-distribution time is steady, so the sample gives its throughput).
Both run in this process, one after the other. Writes ``pid_<device>.json`` and ``.md`` (under
``benchmarks/results/`` unless ``--out``) with the throughputs, their ratio, the largest
disagreement in synergy (bits) and the largest certified duality gap. ``--cvxpy-sample 0`` (and a
machine without cvxpy, such as a bare GPU image) measures rid_fast alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from rid_fast import pid

# (10, 10, 10) is the RID protocol's own: 10 classes, 10 k-means clusters per representation.
SHAPES = [(3, 3, 3), (10, 8, 8), (10, 10, 10), (10, 20, 20)]
RESULTS = Path(__file__).parent / "results"


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_shape(shape: tuple[int, int, int], n: int, sample: int, device: str) -> dict:
    """rid_fast's throughput on ``n`` distributions of ``shape``, and cvxpy's on ``sample`` of them."""
    size = shape[0] * shape[1] * shape[2]
    # Dirichlet(1) draws from their own seeded generator (the same numbers as torch.manual_seed(0)
    # followed by torch.distributions.Dirichlet(...).sample, which takes no generator), so that
    # the inputs do not depend on, or change, the process's global random state.
    gen = torch.Generator().manual_seed(0)
    p = torch._sample_dirichlet(torch.ones(n, size, dtype=torch.float64), generator=gen).reshape(n, *shape)
    p_dev = p.to(device)
    pid.broja_batch(p_dev[:2])  # warm-up
    _synchronize(device)
    started = time.perf_counter()
    result = pid.broja_batch(p_dev)
    _synchronize(device)
    ours = time.perf_counter() - started
    row = {
        "shape": list(shape),
        "n": n,
        "rid_fast_s": ours,
        "rid_fast_per_s": n / ours,
        "newton_steps": result.iterations,
        "max_gap_bits": float(result.gap.max()),
    }
    if sample:
        from cvxpy_oracle import max_conditional_entropy

        h_y, _, _, mi_ts = pid.mutual_informations(p)
        syn = result.syn.cpu()
        started = time.perf_counter()
        worst = 0.0
        for i in range(sample):
            h_max = max_conditional_entropy(p[i])
            synergy = float(mi_ts[i] - (h_y[i] - h_max)) / pid.LN2
            worst = max(worst, abs(synergy - float(syn[i])))
        theirs = (time.perf_counter() - started) / sample
        row.update(
            cvxpy_per_distribution_s=theirs,
            cvxpy_per_s=1 / theirs,
            speedup=(n / ours) * theirs,
            max_abs_syn_diff_bits=worst,
        )
    return row


def _line(row: dict) -> str:
    text = f"{str(tuple(row['shape'])):>14} n={row['n']:<6} rid_fast {row['rid_fast_per_s']:9.1f}/s"
    if "cvxpy_per_s" in row:
        text += f"  cvxpy {row['cvxpy_per_s']:7.2f}/s  speedup {row['speedup']:7.1f}x"
        text += f"  max |Δsyn| {row['max_abs_syn_diff_bits']:.1e} bits"
    return text + f"  max gap {row['max_gap_bits']:.1e} bits  {row['newton_steps']} steps"


def _table(rows: list[dict], device: str, conditions: dict, sample: int) -> str:
    described = ", ".join(f"{k} {v}" for k, v in conditions.items())
    method = "rid_fast solves n Dirichlet(1) distributions in one batch (float64)"
    if sample:
        method += f"; cvxpy (Clarabel) solves {sample} of them one at a time, in the same process, right after"
    lines = [f"# BROJA PID throughput ({device})", "", f"Conditions: {described}.", method + ".", ""]
    if sample:
        lines += [
            "| shape (Y, T, S) | n | rid_fast (distributions/s) | cvxpy (distributions/s) | speed-up | Newton steps "
            "| max abs Δ synergy vs cvxpy (bits) | max certified gap (bits) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {tuple(r['shape'])} | {r['n']} | {r['rid_fast_per_s']:.1f} | {r['cvxpy_per_s']:.2f} | "
            f"{r['speedup']:.0f}× | {r['newton_steps']} | {r['max_abs_syn_diff_bits']:.1e} | {r['max_gap_bits']:.1e} |"
            for r in rows
        ]
    else:
        lines += [
            "| shape (Y, T, S) | n | rid_fast (distributions/s) | seconds | Newton steps | max certified gap (bits) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {tuple(r['shape'])} | {r['n']} | {r['rid_fast_per_s']:.1f} | {r['rid_fast_s']:.3f} | "
            f"{r['newton_steps']} | {r['max_gap_bits']:.1e} |"
            for r in rows
        ]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    """The processor's brand string (py-cpuinfo comes with pytest-benchmark), else what
    ``platform`` knows."""
    try:
        import cpuinfo

        return cpuinfo.get_cpu_info().get("brand_raw") or "cpu"
    except ImportError:
        return platform.processor() or platform.machine() or "cpu"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[256])
    parser.add_argument("--cvxpy-sample", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    conditions = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    sample = args.cvxpy_sample
    if sample:
        try:
            import cvxpy
        except ImportError:
            print("cvxpy is not installed: measuring rid_fast alone")
            sample = 0
        else:
            conditions["cvxpy"] = cvxpy.__version__
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    for n in args.n:
        for shape in SHAPES:
            rows.append(run_shape(shape, n, sample, args.device))
            print(_line(rows[-1]), flush=True)
            stem = args.out / f"pid_{args.device}"
            stem.with_suffix(".json").write_text(json.dumps({"conditions": conditions, "rows": rows}, indent=2))
            stem.with_suffix(".md").write_text(_table(rows, args.device, conditions, sample))


if __name__ == "__main__":
    main()
