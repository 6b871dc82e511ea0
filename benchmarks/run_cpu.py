"""Run the CPU benchmark suites and write ratios measured in that one run.

    python benchmarks/run_cpu.py [-k EXPR] [--out benchmarks/results]

Writes ``cpu_benchmarks.json`` (pytest-benchmark's raw data, with machine info and versions) and
``cpu_summary.csv`` / ``cpu_summary.md``: per (estimator, shape), each implementation's median
time and peak memory, and the streaming path's speed-up and memory ratio against each of them.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent


def summarize(raw: dict) -> list[dict]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for entry in raw["benchmarks"]:
        groups[entry["group"]][entry["extra_info"]["impl"]] = entry
    rows = []
    for group, by_impl in groups.items():
        streaming = by_impl.get("torch")
        for impl, entry in by_impl.items():
            info = entry["extra_info"]
            median = entry["stats"]["median"]
            row = {
                "group": group,
                "impl": impl,
                "median_s": round(median, 4),
                "gflop_per_s": round(info["gflop"] / median, 1),
                "peak_mib": round(info["peak_bytes"] / 2**20, 1),
                "streaming_speedup": "",
                "streaming_memory_fraction": "",
            }
            if streaming is not None and impl != "torch":
                row["streaming_speedup"] = round(median / streaming["stats"]["median"], 2)
                peak = info["peak_bytes"]
                row["streaming_memory_fraction"] = (
                    round(streaming["extra_info"]["peak_bytes"] / peak, 4) if peak > 0 else ""
                )
            rows.append(row)
    return rows


def write_markdown(rows: list[dict], raw: dict, path: Path) -> None:
    machine = raw["machine_info"]
    first = raw["benchmarks"][0]["extra_info"]
    lines = [
        "# CPU benchmarks",
        "",
        f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor'))}, "
        f"{first['threads']} threads; Python {machine['python_version']}, torch {first['torch']}, "
        f"triton {first['triton']}; {raw['datetime']}.",
        "",
        "Median of 3 timed steps (1 for B=65536) after one warm-up; `compile` excludes its compile time.",
        "Peak = resident-memory high-water mark above the inputs, in a fresh process.",
        "`streaming ×` = this impl's time / the streaming path's time;",
        "`streaming mem` = streaming peak / this impl's peak.",
        "",
        "| case | impl | median s | GFLOP/s | peak MiB | streaming × | streaming mem |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['group']} | {r['impl']} | {r['median_s']} | {r['gflop_per_s']} | {r['peak_mib']} | "
            f"{r['streaming_speedup']} | {r['streaming_memory_fraction']} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default=None, help="pytest -k expression to run a subset")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    raw_path = args.out / "cpu_benchmarks.json"
    command = [sys.executable, "-m", "pytest", str(HERE), "-p", "no:warnings", f"--benchmark-json={raw_path}", "-q"]
    if args.k:
        command += ["-k", args.k]
    code = subprocess.call(command)
    if code != 0:
        return code
    raw = json.loads(raw_path.read_text())
    rows = summarize(raw)
    with open(args.out / "cpu_summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(rows, raw, args.out / "cpu_summary.md")
    print((args.out / "cpu_summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
