"""Throughput of the batched BROJA solver against solving one distribution at a time with cvxpy.

    python benchmarks/pid_benchmark.py [--n 256 ...] [--shapes 10x10x10 ...] [--cvxpy-sample 32]
                                       [--compete] [--largest-batch] [--device cpu] [--out DIR]

For each shape (|Y|, |T|, |S|) and batch size n, n Dirichlet(1) distributions are solved at once by
:func:`rid_fast.pid.broja_batch`; cvxpy (the relative-entropy program, Clarabel) solves a sample
of them one by one (its per-distribution time is steady, so the sample gives its throughput).
Both run in this process, one after the other. Writes ``pid_<device>.json`` and ``.md`` (under
``benchmarks/results/`` unless ``--out``) with the throughputs, their ratio, the Newton steps
(the call's, and the most and mean per distribution), the largest disagreement in synergy (bits)
and the largest certified duality gap. ``--cvxpy-sample 0`` (and a machine without cvxpy, such as
a bare GPU image) measures rid_fast alone.

``--compete`` times rid_fast a second time with one competing busy process (a Python loop in a
subprocess, started before and stopped after that timing) and records the loaded time beside the
quiet one: the solver runs beside training (``rid-fast pid``, ``run.pid_every``), so a loaded
machine is its normal case. ``--largest-batch`` (CUDA) doubles n from the largest ``--n`` until
the device runs out of memory, per shape, and records the largest n whose first Newton steps ran
(where the solver's buffers reach their full size), with its peak memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from rid_fast import pid

# (10, 10, 10) is the RID protocol's own: 10 classes, 10 k-means clusters per representation.
SHAPES = [(3, 3, 3), (10, 8, 8), (10, 10, 10), (10, 20, 20)]
RESULTS = Path(__file__).parent / "results"


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _shape(text: str) -> tuple[int, int, int]:
    """``"10x20x20"`` → (10, 20, 20)."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape is three positive sizes |Y|x|T|x|S|, such as 10x10x10; got {text!r}")
    return shape


def dirichlet_batch(n: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """n Dirichlet(1) distributions of ``shape`` (float64, CPU), seeded."""
    # Drawn from their own seeded generator (the same numbers as torch.manual_seed(0) followed by
    # torch.distributions.Dirichlet(...).sample, which takes no generator), so that the inputs do
    # not depend on, or change, the process's global random state.
    gen = torch.Generator().manual_seed(0)
    size = shape[0] * shape[1] * shape[2]
    return torch._sample_dirichlet(torch.ones(n, size, dtype=torch.float64), generator=gen).reshape(n, *shape)


def _timed_solve(p: torch.Tensor, device: str) -> tuple[float, pid.PID]:
    _synchronize(device)
    started = time.perf_counter()
    result = pid.broja_batch(p)
    _synchronize(device)
    return time.perf_counter() - started, result


class _BusyProcess:
    """One competing process that keeps a core busy (a Python loop) while the block runs."""

    def __enter__(self) -> _BusyProcess:
        self.process = subprocess.Popen([sys.executable, "-c", "print(flush=True)\nwhile True: pass"],
                                        stdout=subprocess.PIPE)  # fmt: skip
        self.process.stdout.readline()  # started: the loop is running from here on
        return self

    def __exit__(self, *exc) -> None:
        self.process.kill()
        self.process.wait()


def run_shape(shape: tuple[int, int, int], n: int, sample: int, device: str, compete: bool = False) -> dict:
    """rid_fast's throughput on ``n`` distributions of ``shape`` (quiet, and beside one busy process
    with ``compete``), and cvxpy's on ``sample`` of them."""
    p = dirichlet_batch(n, shape)
    p_dev = p.to(device)
    pid.broja_batch(p_dev[:2])  # warm-up
    ours, result = _timed_solve(p_dev, device)
    steps = result.steps.double()
    row = {
        "shape": list(shape),
        "n": n,
        "rid_fast_s": ours,
        "rid_fast_per_s": n / ours,
        "newton_steps": result.iterations,
        "max_steps_per_distribution": int(steps.max()),
        "mean_steps_per_distribution": float(steps.mean()),
        "max_gap_bits": float(result.gap.max()),
    }
    if compete:
        with _BusyProcess():
            loaded, _ = _timed_solve(p_dev, device)
        row.update(rid_fast_loaded_s=loaded, loaded_over_quiet=loaded / ours)
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


def largest_batch(shape: tuple[int, int, int], start: int, device: str, limit: int = 1 << 22) -> dict:
    """The largest n = start·2^k (≤ ``limit``) whose first Newton steps on ``device`` ran without
    running out of memory, and the peak memory they took (GiB). Dirichlet(1) inputs are drawn on
    the device (normalised exponentials), as a batch that large may not fit in host memory."""
    gen = torch.Generator(device).manual_seed(0)
    fits, peak, n = 0, 0.0, start
    while n <= limit:
        try:
            torch.cuda.reset_peak_memory_stats()
            p = -torch.rand(n, *shape, dtype=torch.float64, device=device, generator=gen).log()
            p /= p.sum((1, 2, 3), keepdim=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # stopped after 3 steps on purpose
                pid.broja_batch(p, max_iter=3)
            _synchronize(device)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            p = None
            torch.cuda.empty_cache()
        fits, peak = n, torch.cuda.max_memory_allocated() / 2**30
        print(f"{str(shape):>14} n={n:<8} fits ({peak:.1f} GiB)", flush=True)
        n *= 2
    return {"shape": list(shape), "largest_n": fits, "peak_gib": peak, "out_of_memory_at": n if n <= limit else None}


def _line(row: dict) -> str:
    text = f"{str(tuple(row['shape'])):>14} n={row['n']:<6} rid_fast {row['rid_fast_per_s']:9.1f}/s"
    if "loaded_over_quiet" in row:
        text += f"  loaded {row['rid_fast_loaded_s']:.3f} s = {row['loaded_over_quiet']:.2f}x quiet"
    if "cvxpy_per_s" in row:
        text += f"  cvxpy {row['cvxpy_per_s']:7.2f}/s  speedup {row['speedup']:7.1f}x"
        text += f"  max |Δsyn| {row['max_abs_syn_diff_bits']:.1e} bits"
    steps = f"{row['newton_steps']} steps (mean {row['mean_steps_per_distribution']:.1f} per distribution)"
    return text + f"  max gap {row['max_gap_bits']:.1e} bits  {steps}"


def _table(rows: list[dict], device: str, conditions: dict, sample: int, largest: list[dict]) -> str:
    described = ", ".join(f"{k} {v}" for k, v in conditions.items())
    method = "rid_fast solves n Dirichlet(1) distributions in one batch (float64)"
    if sample:
        method += f"; cvxpy (Clarabel) solves {sample} of them one at a time, in the same process, right after"
    columns = [  # (header, value of a row), those that every row has
        ("shape (Y, T, S)", lambda r: str(tuple(r["shape"]))),
        ("n", lambda r: str(r["n"])),
        ("rid_fast (distributions/s)", lambda r: f"{r['rid_fast_per_s']:.1f}"),
        ("seconds", lambda r: f"{r['rid_fast_s']:.3f}"),
    ]
    if all("loaded_over_quiet" in r for r in rows):
        method += "; then rid_fast again beside one busy process (a Python loop)"
        columns += [
            ("seconds beside a busy process", lambda r: f"{r['rid_fast_loaded_s']:.3f}"),
            ("loaded / quiet", lambda r: f"{r['loaded_over_quiet']:.2f}"),
        ]
    if sample:
        columns += [
            ("cvxpy (distributions/s)", lambda r: f"{r['cvxpy_per_s']:.2f}"),
            ("speed-up", lambda r: f"{r['speedup']:.0f}×"),
        ]
    columns += [("Newton steps", lambda r: str(r["newton_steps"]))]
    if all("mean_steps_per_distribution" in r for r in rows):
        columns += [("mean steps per distribution", lambda r: f"{r['mean_steps_per_distribution']:.1f}")]
    if sample:
        columns += [("max abs Δ synergy vs cvxpy (bits)", lambda r: f"{r['max_abs_syn_diff_bits']:.1e}")]
    columns += [("max certified gap (bits)", lambda r: f"{r['max_gap_bits']:.1e}")]
    lines = [f"# BROJA PID throughput ({device})", "", f"Conditions: {described}.", method + ".", ""]
    lines += ["| " + " | ".join(header for header, _ in columns) + " |"]
    lines += ["|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(value(r) for _, value in columns) + " |" for r in rows]
    if largest:
        lines += ["", "The largest batch whose first three Newton steps fit in the device's memory (n doubled):", ""]
        lines += ["| shape (Y, T, S) | largest n | peak memory (GiB) |", "|---|---:|---:|"]
        lines += [f"| {tuple(r['shape'])} | {r['largest_n']} | {r['peak_gib']:.1f} |" for r in largest]
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
    parser.add_argument("--shapes", type=_shape, nargs="+", default=SHAPES, metavar="YxTxS")
    parser.add_argument("--cvxpy-sample", type=int, default=32)
    parser.add_argument("--compete", action="store_true", help="time rid_fast again beside one busy process")
    parser.add_argument("--largest-batch", action="store_true", help="the largest n that fits (CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.largest_batch and not args.device.startswith("cuda"):
        parser.error("--largest-batch measures a CUDA device's memory; it needs --device cuda")
    conditions = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu_name(),
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
    rows, largest = [], []
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"pid_{args.device.split(':')[0]}"

    def write() -> None:  # after every row: a run cut short keeps what it measured
        record = {"conditions": conditions, "rows": rows, "largest_batch": largest}
        stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
        stem.with_suffix(".md").write_text(_table(rows, args.device, conditions, sample, largest))

    for n in args.n:
        for shape in args.shapes:
            rows.append(run_shape(shape, n, sample, args.device, args.compete))
            print(_line(rows[-1]), flush=True)
            write()
    if args.largest_batch:
        for shape in args.shapes:
            largest.append(largest_batch(shape, 2 * max(args.n), args.device))
            write()


if __name__ == "__main__":
    main()
