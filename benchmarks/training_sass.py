"""Static cost of one training step's kernels per score, with and without the weighted keys.

    python benchmarks/training_sass.py [--out benchmarks/results/training_sass.md]

Compiles, for sm_90 on this machine (no GPU), the kernels one forward + backward launches for each
estimator with 16-bit inputs at D = 128, in their default configs — the forward that also forms
the weighted keys and the dk kernel (what training runs), against the plain forward, the dq
kernel and the dk kernel (what it ran before, and still runs for fp32 or D > 128) — and counts the
SASS instructions of each loop that issues MMAs. Reported per score: instructions per loop
iteration × warps / (BLOCK_M × BLOCK_N), i.e. warp instructions per score, for the loop that runs
on all but the diagonal band and ragged edge. Counts, not timings.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton

from rid_fast.kernels import aot, tuning
from rid_fast.kernels.tiles import MODES, REDUCTIONS


def _constexprs(reduction: str, *, mask_diagonal: bool, clip: bool, mode: str) -> tuple[dict, dict]:
    """An estimator's (forward constexprs, backward MODE and CLIP), from the kernels' constant table."""
    forward = {"REDUCTION": REDUCTIONS[reduction], "MASK_DIAGONAL": mask_diagonal, "CLIP": clip}
    return forward, {"MODE": MODES[mode], "CLIP": clip}


ESTIMATORS = {
    "InfoNCE": _constexprs("lse", mask_diagonal=False, clip=False, mode="ce_rows"),
    "NWJ / DV": _constexprs("lse", mask_diagonal=True, clip=False, mode="lse_negatives"),
    "SMILE, clipped DV's gradient": _constexprs("lse", mask_diagonal=True, clip=True, mode="lse_negatives"),
    "JS": _constexprs("softplus", mask_diagonal=True, clip=False, mode="softplus_negatives"),
}
#: SMILE's training step with its default gradient="js": the clipped DV's row statistics, without
#: autograd (the plain forward, no keys: no gradient flows through them), then JS's forward and
#: backward — the value is SMILE's, the gradient JS's.
SMILE_JS = ("SMILE, JS's gradient (the default)", "SMILE, clipped DV's gradient", "JS")


def per_score(kernel: str, constexprs: dict) -> tuple[float, int]:
    """(warp instructions per score in the kernel's first MMA loop, registers per thread)."""
    config = tuning.default_config(kernel, torch.bfloat16)
    report = aot.compile_kernel(kernel, arch=90, dtype="bfloat16", dim=128, config=config, constexprs=constexprs)
    loop = int(report.loop_instructions.split("/")[0])
    return loop * config.num_warps / (config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"]), report.registers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training_sass.md")
    args = parser.parse_args()
    lines = [
        "# One training step's kernels: SASS per score, with and without the weighted keys",
        "",
        f"Static counts from `benchmarks/training_sass.py` (sm_90, bf16, D = 128, default configs; triton "
        f"{triton.__version__}, no GPU): warp instructions per score in each kernel's main MMA loop "
        "(registers per thread in brackets). Counts, not timings.",
        "",
        "| estimator | forward | dq | dk | total, 5 matrix products | forward + keys | dk | total, 4 matrix products "
        "| change |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    counts = {}
    for name, (forward, backward) in ESTIMATORS.items():
        grads = {**backward, "COLUMN_STATS": False}
        fwd, fwd_regs = counts[name, "fwd"] = per_score("row_stats_fwd", {**forward, "WEIGHTED_KEYS": False})
        keys, keys_regs = counts[name, "keys"] = per_score("row_stats_keys_fwd", {**forward, "WEIGHTED_KEYS": True})
        dq, dq_regs = counts[name, "dq"] = per_score("grad_q", grads)
        dk, dk_regs = counts[name, "dk"] = per_score("grad_k", grads)
        before, after = fwd + dq + dk, keys + dk
        lines.append(
            f"| {name} | {fwd:.3f} ({fwd_regs}) | {dq:.3f} ({dq_regs}) | {dk:.3f} ({dk_regs}) | {before:.3f} "
            f"| {keys:.3f} ({keys_regs}) | {dk:.3f} | {after:.3f} | {after / before - 1:+.0%} |"
        )
    name, statistics, gradient = SMILE_JS
    clipped = counts[statistics, "fwd"][0]
    fwd, keys, dq, dk = (counts[gradient, part][0] for part in ("fwd", "keys", "dq", "dk"))
    before, after = clipped + fwd + dq + dk, clipped + keys + dk
    lines.append(
        f"| {name} | {clipped:.3f} + {fwd:.3f} | {dq:.3f} | {dk:.3f} | {before:.3f} | {clipped:.3f} + {keys:.3f} "
        f"| {dk:.3f} | {after:.3f} | {after / before - 1:+.0%} |"
    )
    lines += [
        "",
        "What the counts leave out: memory traffic, latency and occupancy. The forward with the keys holds",
        "a (BLOCK_M, D) fp32 accumulator: 2–3× the plain forward's registers, one 8-warp block per SM",
        "instead of several. Whether the step is faster on a GPU, and by how much, only a GPU run can tell",
        "(`benchmarks/gpu_benchmark.py`).",
        "",
        "SMILE trains with JS's gradient by default: its step runs the clipped DV's plain forward (the",
        "value; no gradient flows through it) and JS's forward and backward — one matrix product more",
        "than the counts' column heads say.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
