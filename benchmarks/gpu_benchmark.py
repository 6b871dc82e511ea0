"""GPU benchmark: rid_fast's Triton kernels against what users would otherwise use.

    python benchmarks/gpu_benchmark.py [--plan headline|sweep|all] [--budget-s S] [--out DIR]

For each (estimator, B = N, D, dtype, direction) it times and measures peak memory of:

* ``triton``   — rid_fast fused kernels (``impl="triton"``);
* ``triton_dq_sweep`` — the same with ``RID_FAST_FORWARD_KEYS=0``: training's backward sweeps for dq
  too, instead of taking it from the weighted keys the forward forms (16-bit, D ≤ 128);
* ``reference``— eager PyTorch that materialises the B×N scores;
* ``compile``  — ``torch.compile`` of the reference (compile time excluded, reported separately);
* ``sdpa``     — InfoNCE through PyTorch's flash-attention log-sum-exp (head dim ≤ 256);
* ``infcl``    — Inf-CL's single-device kernel, when ``inf_cl`` is importable (it computes in
  fp32 whatever the input dtype).

Plans, most important first, so that a short session with a GPU measures what matters:

* ``headline`` — the targets: every estimator through Triton at B = N = 65536, D = 128, bf16
  (forward + backward, and forward), the B = N = 1,048,576 memory case, InfoNCE with the cosine
  critic, then one-sided InfoNCE there through every baseline, then fp16 and fp32 inputs at 65536;
* ``sweep``    — B from 4096 to 1,048,576, D = 128 and 512, every estimator and impl (the
  materialising baselines only up to 131072), and the cosine critic for InfoNCE through Triton;
* ``all``      — headline, then the sweep's other cases.

Cases run in that order until ``--budget-s`` has elapsed (the case under way finishes). Results are
rewritten after every case — ``gpu_<device>.json``, ``.csv``, ``.md`` and, with matplotlib, a
``.png`` — so a run cut short keeps what it measured. Timings are medians of
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs); peak memory is
``torch.cuda.max_memory_allocated`` above the inputs; a case that runs out of memory is recorded
as ``oom``, one that fails as ``error`` with its message. The Triton kernels are autotuned up to
the headline size and run their default configs beyond it (the autotuner benchmarks every
candidate at the launch's size: minutes at B = 1,048,576). ``--device cpu --scale 512`` is a dry
run of the same plan at small sizes (wall-clock medians, no memory), which the tests use to check
this script without a GPU.

The cosine critic normalises the rows in a separate op before the kernels (O((B + N)·D) work next
to their O(B·N·D)); its time minus the dot critic's at the same shape bounds what fusing the
normalisation into the kernels could save.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import torch
import triton
import triton.testing

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import baselines  # noqa: E402

from rid_fast import bench  # noqa: E402
from rid_fast.kernels import tuning  # noqa: E402

ESTIMATORS = ["infonce", "infonce_symmetric", "nwj", "dv", "smile", "js"]
IMPLS = ["triton", "triton_dq_sweep", "reference", "compile", "sdpa", "infcl"]
HEADLINE_B, HUGE_B = 65536, 1048576
MATERIALISED_MAX_B = 131072  # the B×N baselines need B² scores: not beyond this
COLUMNS = ("estimator", "critic", "B", "D", "dtype", "direction", "impl", "configs", "ms", "tflops", "peak_gb",
           "first_call_s")  # fmt: skip


class PlannedCase(NamedTuple):
    """One case of a plan: an estimator at B = N = ``batch``, through ``impl``."""

    estimator: str
    batch: int
    dim: int
    dtype: str
    impl: str
    backward: bool
    critic: str = "dot"


def _baseline(impl: str):
    """The estimate of an impl outside rid_fast (one-sided InfoNCE at τ = 0.1), else None."""
    functions = {"sdpa": baselines.sdpa_infonce, "infcl": baselines.infcl_infonce}
    return (lambda x, y: functions[impl](x, y, temperature=0.1)) if impl in functions else None


def applies(impl: str, estimator: str, batch: int, dim: int, critic: str = "dot") -> bool:
    """Whether ``impl`` computes ``estimator`` at this size (SDPA and Inf-CL: InfoNCE with the dot
    critic only; SDPA: head dim ≤ 256; the materialising baselines: B ≤ 131072; turning the
    weighted keys off: D ≤ 128, one-sided estimators)."""
    if impl in ("sdpa", "infcl") and (estimator != "infonce" or critic != "dot" or (impl == "sdpa" and dim > 256)):
        return False
    if impl == "triton_dq_sweep" and (dim > 128 or estimator == "infonce_symmetric"):
        return False  # no weighted keys to turn off
    return not (impl in ("reference", "compile") and batch > MATERIALISED_MAX_B)


def _median_ms(step, device: str, slow: bool) -> float:
    """Median of do_bench on CUDA; of three timed runs on CPU and for ``slow`` steps (do_bench
    runs a step at least eight times: half a minute at B = 1,048,576)."""
    if device == "cuda" and not slow:
        return triton.testing.do_bench(step, warmup=5, rep=50, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run_case(planned: PlannedCase, device: str = "cuda") -> dict:
    """One case's timing and peak memory (and, for Triton, whether its configs were autotuned)."""
    if planned.impl == "triton_dq_sweep":
        with mock.patch.dict(os.environ, RID_FAST_FORWARD_KEYS="0"):
            return run_case(planned._replace(impl="triton"), device) | {"impl": planned.impl}
    estimator, batch, dim, dtype, impl, backward, critic = planned
    row = {"estimator": estimator, "critic": critic, "B": batch, "D": dim, "dtype": dtype, "impl": impl,
           "direction": "fwd+bwd" if backward else "fwd"}  # fmt: skip
    case = bench.Case(
        estimator, n_queries=batch, dim=dim, dtype=dtype, impl=impl, backward=backward, critic=critic, device=device
    )
    cuda = device == "cuda"
    if impl == "triton":
        row["configs"] = "autotuned" if tuning.autotune_enabled() else "default"
    try:
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
        x, y = bench.make_inputs(case)
        step = functools.partial(bench.make_step(case, _baseline(impl)), x, y)
        start = time.perf_counter()
        step()  # first call: compilation, autotuning
        if cuda:
            torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - start, 3)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row["peak_gb"] = round((torch.cuda.max_memory_allocated() - base) / 1e9, 3)
        row["ms"] = round(_median_ms(step, device, slow=row["first_call_s"] > 1.0 and batch > HEADLINE_B), 3)
        row["tflops"] = round(case.flops / (row["ms"] * 1e-3) / 1e12, 1)
    except torch.cuda.OutOfMemoryError:
        row["ms"] = "oom"
    except Exception as error:  # one broken case must not cost the rest of a scarce GPU session
        row["ms"] = "error"
        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    finally:
        if cuda:
            torch.cuda.empty_cache()
    return row


def headline_cases(impls: list[str]):
    """The issue's targets. rid_fast's own cases first (seconds each, so a slow baseline compile
    cannot crowd them out of a short session): every estimator at the headline shape, then the
    memory case, then the cosine critic; then the baselines at the headline shape,
    ``torch.compile`` last; then other input dtypes."""
    b = HEADLINE_B
    if "triton" in impls:
        for estimator in ESTIMATORS:
            for backward in (True, False):
                yield PlannedCase(estimator, b, 128, "bfloat16", "triton", backward)
        yield PlannedCase("infonce", HUGE_B, 128, "bfloat16", "triton", True)
        yield PlannedCase("infonce", b, 128, "bfloat16", "triton", True, critic="cosine")
    if "triton_dq_sweep" in impls:  # training without the forward's weighted keys, for comparison
        for estimator in ("infonce", "smile", "js"):
            yield PlannedCase(estimator, b, 128, "bfloat16", "triton_dq_sweep", True)
    baselines = sorted((i for i in impls if not i.startswith("triton")), key=lambda impl: impl == "compile")
    for backward in (True, False):
        for impl in baselines:
            # forward alone: compiling a second graph costs more than it tells
            if applies(impl, "infonce", b, 128) and (backward or impl != "compile"):
                yield PlannedCase("infonce", b, 128, "bfloat16", impl, backward)
    for dtype in ("float16", "float32"):  # Inf-CL computes in fp32 whatever its inputs: compare there too
        for impl in ("triton", "reference", "infcl"):
            if impl in impls:
                yield PlannedCase("infonce", b, 128, dtype, impl, True)


def sweep_cases(impls: list[str]):
    for estimator in ESTIMATORS:
        for dim in (128, 512):
            for batch in (4096, 16384, 65536, 262144, HUGE_B):
                # Beyond the headline size, only one-sided InfoNCE sweeps every B.
                if estimator != "infonce" and batch > HEADLINE_B:
                    continue
                for backward in (True, False):
                    for impl in impls:
                        # the forward alone is the same with and without the keys
                        if applies(impl, estimator, batch, dim) and (backward or impl != "triton_dq_sweep"):
                            yield PlannedCase(estimator, batch, dim, "bfloat16", impl, backward)
    if "triton" in impls:  # what normalising the rows in a separate op costs, across sizes
        for batch in (4096, 16384, 65536, 262144, HUGE_B):
            yield PlannedCase("infonce", batch, 128, "bfloat16", "triton", True, critic="cosine")


def plan_cases(plan: str, impls: list[str]):
    """The cases of ``plan`` in run order, each once."""
    plans = {"headline": [headline_cases], "sweep": [sweep_cases], "all": [headline_cases, sweep_cases]}
    if plan not in plans:
        raise ValueError(f"plan must be one of {', '.join(map(repr, plans))}; got {plan!r}")
    seen = set()
    for part in plans[plan]:
        for case in part(impls):
            if case not in seen:
                seen.add(case)
                yield case


def _plot(rows: list[dict], path: Path, device_name: str) -> None:
    try:
        import matplotlib
    except ImportError:  # the GPU image may lack it: the JSON has everything to plot later
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl, critic in sorted({(r["impl"], r.get("critic", "dot")) for r in rows}):
        points = sorted(
            (r["B"], r["ms"]) for r in rows
            if (r["impl"], r.get("critic", "dot"), r["estimator"], r["D"], r["dtype"], r["direction"])
            == (impl, critic, "infonce", 128, "bfloat16", "fwd+bwd") and isinstance(r["ms"], float)
        )  # fmt: skip
        if points:
            ax.plot(*zip(*points), marker="o", label=impl if critic == "dot" else f"{impl}, {critic} critic")
    ax.set(xscale="log", yscale="log", xlabel="B = N", ylabel="ms (forward + backward)",
           title=f"InfoNCE, D = 128, bf16 — {device_name}")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: list[dict], meta: dict, out: Path, stem: str) -> None:
    """JSON, CSV and a Markdown table of ``rows`` (and a PNG where matplotlib is installed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    fields = [*COLUMNS, "error"]
    with open(out / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    header = ("estimator", "critic", "B", "D", "dtype", "direction", "impl", "configs", "ms", "TFLOP/s", "peak GB",
              "first call s")  # fmt: skip
    lines = [f"# GPU benchmark — {meta['device']}", "", ", ".join(f"{k} {v}" for k, v in meta.items()), "",
             "TFLOP/s count 2·B·N·D (forward) and 8·B·N·D (forward + backward); peak GB above the inputs.", "",
             "| " + " | ".join(header) + " |", "|---|---|---:|---:|---|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / f"{stem}.png", meta["device"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default="all", choices=["headline", "sweep", "all"])
    parser.add_argument("--impl", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no case after this many seconds")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the plan")
    parser.add_argument("--scale", type=int, default=1, help="divide every B by this (dry runs)")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="rewrite the tables and plot of a saved run")
    args = parser.parse_args(argv)
    if args.replot:  # e.g. where matplotlib is installed, for a run from a GPU image without it
        saved = json.loads(args.replot.read_text())
        write_results(saved["rows"], saved["meta"], args.replot.parent, args.replot.stem)
        return 0
    started = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark (--device cpu for a dry run)", file=sys.stderr)
        return 1
    impls = list(args.impl)
    if "infcl" in impls:
        try:
            import inf_cl  # noqa: F401
        except ImportError:
            impls.remove("infcl")
            print("inf_cl is not installed: Inf-CL left out", file=sys.stderr)
    if args.device == "cpu":  # the Triton kernels run on CPU tensors only under the interpreter
        if not tuning.interpreting():
            impls = [i for i in impls if i != "triton"]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = {"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "plan": args.plan}  # fmt: skip
    if args.scale != 1:
        meta["scale"] = f"B divided by {args.scale}"
    stem = "gpu_" + "".join(c if c.isalnum() else "_" for c in device_name).strip("_").lower()

    rows = []
    for case in plan_cases(args.plan, impls):
        if time.perf_counter() - started > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: stopping before {case.estimator} B={case.batch}",
                  file=sys.stderr)  # fmt: skip
            break
        # Autotuning benchmarks every candidate at the launch's own size: seconds per config beyond
        # the headline size, so there the default configs run.
        defaults = mock.patch.dict(os.environ, RID_FAST_AUTOTUNE="0")
        with contextlib.nullcontext() if case.batch <= HEADLINE_B else defaults:
            row = run_case(case._replace(batch=max(case.batch // args.scale, 2)), args.device)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_results(rows, meta, args.out, stem)
    print(f"wrote {args.out / stem}.* ({len(rows)} cases, {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
