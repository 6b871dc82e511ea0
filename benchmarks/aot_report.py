"""Compile every kernel config for sm_90 and sm_80 on this machine (no GPU) and record, per
kernel, registers, local memory (spills), shared memory, the tensor-core instruction used and the
SASS instructions per iteration of its MMA loops.

    python benchmarks/aot_report.py [--out benchmarks/results] [--workers 2]

Writes ``aot_report.json`` and ``aot_report.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import triton

from rid_fast.kernels import aot


def _compile(job: dict) -> dict:
    return aot.compile_kernel(**job).as_dict()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    jobs = aot.sweep(90) + aot.sweep(80) + aot.pairwise_sweep(90)
    with ProcessPoolExecutor(args.workers) as pool:
        reports = list(pool.map(_compile, jobs, chunksize=4))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "aot_report.json").write_text(json.dumps({"triton": triton.__version__, "reports": reports}, indent=1))
    lines = [
        f"# Ahead-of-time compile report (triton {triton.__version__}, no GPU)",
        "",
        "Every kernel × variant × dtype × D × autotuner candidate; registers per thread, local memory",
        "(spills + stack) per thread, dynamic shared memory per block, tensor-core instruction, and SASS",
        "instructions per iteration of each loop that issues MMAs (per tile: the work besides the MMAs);",
        "for the pairwise-MLP kernels (no MMA), of each loop over hidden units (D is then H).",
        "",
        "| arch | kernel | variant | dtype | D | config | regs | local B | smem KiB | MMA | SASS per loop |",
        "|---|---|---|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for r in reports:
        lines.append(
            f"| sm_{r['arch']} | {r['kernel']} | {r['variant']} | {r['dtype']} | {r['dim']} | {r['config']} | "
            f"{r['registers']} | {r['local_bytes']} | {r['shared_bytes'] / 1024:.0f} | {r['mma']} | "
            f"{r['loop_instructions'] or '—'} |"
        )
    (args.out / "aot_report.md").write_text("\n".join(lines) + "\n")
    bad = [r for r in reports if r["local_bytes"] or r["shared_bytes"] > aot.SHARED_MEMORY_LIMIT[r["arch"]]]
    print(f"{len(reports)} compiles, {len(bad)} with spills or too much shared memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
