"""GPU benchmark: rid_fast's Triton kernels against what users would otherwise use.

    python benchmarks/gpu_benchmark.py [--quick] [--out benchmarks/results]

For each (estimator, B = N, D, dtype, direction) it times and measures peak memory of:

* ``triton``   — rid_fast fused kernels (``impl="triton"``);
* ``reference``— eager PyTorch that materialises the B×N scores;
* ``compile``  — ``torch.compile`` of the reference (compile time excluded, reported separately);
* ``sdpa``     — InfoNCE through PyTorch's flash-attention log-sum-exp (head dim ≤ 256);
* ``infcl``    — the Inf-CL kernel, when ``inf_cl`` is importable.

Timings are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); peak
memory is ``torch.cuda.max_memory_allocated`` above the inputs. A case that runs out of memory is
recorded as ``oom``. Writes ``gpu_<device>.json``, ``.csv``, ``.md`` and a ``.png`` plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

import torch
import triton
import triton.testing

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import baselines  # noqa: E402

from rid_fast import bench, functional, reference  # noqa: E402

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _estimate_fn(impl: str, estimator: str):
    name, options = bench.ESTIMATOR_OPTIONS[estimator]
    if impl == "triton":
        return lambda x, y: functional.mi_bound(
            x, y, name, temperature=0.1, impl="triton", check_values=False, **options
        )
    if impl == "reference":
        return lambda x, y: getattr(reference, name)(x, y, temperature=0.1, **options)
    if impl == "compile":
        oracle = getattr(reference, name)
        return torch.compile(lambda x, y: oracle(x, y, temperature=0.1, **options))
    if impl == "sdpa":
        return lambda x, y: baselines.sdpa_infonce(x, y, temperature=0.1)
    if impl == "infcl":
        return lambda x, y: baselines.infcl_infonce(x, y, temperature=0.1)
    raise ValueError(impl)


def _applies(impl: str, estimator: str, dim: int) -> bool:
    if impl in ("sdpa", "infcl"):
        return estimator == "infonce" and (impl != "sdpa" or dim <= 256)
    return True


def run_case(estimator: str, batch: int, dim: int, dtype: str, impl: str, backward: bool) -> dict:
    row = {"estimator": estimator, "B": batch, "D": dim, "dtype": dtype, "impl": impl,
           "direction": "fwd+bwd" if backward else "fwd"}  # fmt: skip
    case = bench.Case(estimator, n_queries=batch, dim=dim, dtype=dtype, backward=backward, device="cuda")
    try:
        x, y = bench.make_inputs(case)
        estimate = _estimate_fn(impl, estimator)

        def step():
            value = estimate(x, y)
            if backward:
                torch.autograd.grad(value, (x, y))

        start = time.perf_counter()
        step()  # first call: compilation, autotuning
        torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - start, 3)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["peak_gb"] = round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)
        row["ms"] = round(triton.testing.do_bench(step, warmup=5, rep=50, return_mode="median"), 3)
        row["tflops"] = round(case.flops / (row["ms"] * 1e-3) / 1e12, 1)
    except torch.cuda.OutOfMemoryError:
        row["ms"] = "oom"
    finally:
        torch.cuda.empty_cache()
    return row


def _cases(quick: bool, impls: list[str]):
    estimators = ["infonce", "infonce_symmetric", "nwj", "dv", "smile", "js"]
    batches = [4096, 16384, 65536] if quick else [4096, 16384, 65536, 262144, 1048576]
    for estimator in estimators:
        for dim in (128, 512):
            for batch in batches:
                for backward in (False, True):
                    for impl in impls:
                        if not _applies(impl, estimator, dim):
                            continue
                        # The materialising baselines need B² scores: skip them where they cannot fit.
                        if impl in ("reference", "compile") and batch > 131072:
                            continue
                        # Beyond the headline sizes, only one-sided InfoNCE sweeps every B.
                        if estimator != "infonce" and batch > 65536:
                            continue
                        yield estimator, batch, dim, "bfloat16", impl, backward
    for dtype in ("float16", "float32"):  # other input dtypes at the headline shape
        for impl in impls:
            if _applies(impl, "infonce", 128):
                yield "infonce", 65536, 128, dtype, impl, True


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl in sorted({r["impl"] for r in rows}):
        points = sorted(
            (r["B"], r["ms"]) for r in rows
            if r["impl"] == impl and r["estimator"] == "infonce" and r["D"] == 128 and r["dtype"] == "bfloat16"
            and r["direction"] == "fwd+bwd" and isinstance(r["ms"], float)
        )  # fmt: skip
        if points:
            ax.plot(*zip(*points), marker="o", label=impl)
    ax.set(xscale="log", yscale="log", xlabel="B = N", ylabel="ms (forward + backward)",
           title=f"InfoNCE, D = 128, bf16 — {torch.cuda.get_device_name()}")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="B up to 65536 only")
    parser.add_argument("--impl", nargs="+", default=["triton", "reference", "compile", "sdpa", "infcl"])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark", file=sys.stderr)
        return 1
    impls = list(args.impl)
    try:
        import inf_cl  # noqa: F401
    except ImportError:
        impls = [i for i in impls if i != "infcl"]
        print("inf_cl is not installed: Inf-CL left out", file=sys.stderr)
    else:
        if not torch.distributed.is_initialized():  # cal_inf_loss reads the process group
            torch.distributed.init_process_group("nccl", init_method="tcp://127.0.0.1:29512", rank=0, world_size=1)

    rows = []
    for case in _cases(args.quick, impls):
        row = run_case(*case)
        rows.append(row)
        print(json.dumps(row), flush=True)

    device = torch.cuda.get_device_name()
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    stem = "gpu_" + "".join(c if c.isalnum() else "_" for c in device).strip("_").lower()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    fields = ["estimator", "B", "D", "dtype", "direction", "impl", "ms", "tflops", "peak_gb", "first_call_s"]
    with open(args.out / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# GPU benchmark — {device}", "", ", ".join(f"{k} {v}" for k, v in meta.items()), "",
             "| estimator | B | D | dtype | direction | impl | ms | TFLOP/s | peak GB |",
             "|---|---:|---:|---|---|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['estimator']} | {r['B']} | {r['D']} | {r['dtype']} | {r['direction']} | {r['impl']} | "
                     f"{r['ms']} | {r.get('tflops', '')} | {r.get('peak_gb', '')} |")  # fmt: skip
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    _plot(rows, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.* (TFLOP/s count 2·B·N·D forward, 8·B·N·D forward + backward)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
