"""``rid-fast compare``: methods × teachers × seeds, reported as paired differences against no-KD.

One seed fixes the student's training subset, the student's initialisation and the teacher for
every method, so each method is compared with no-KD *on the same seed*: the report gives, per
(method, teacher), the mean paired difference in test accuracy with a 95 % t-interval over seeds.
No-KD does not use the teacher; it runs once per seed (teacher ``none``).

Writes ``DIR/summary.csv`` (``method,teacher,seed,test_acc``, accuracy in percent),
``DIR/report.md``, ``DIR/accuracy.png`` and ``DIR/curves.png``; each run keeps its own folder under
``DIR/runs/`` (metrics.csv, checkpoints) and trained teachers are cached in ``DIR/teachers/``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import math
import multiprocessing
import os
import platform
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import rid_fast
from rid_fast.train.atomic import write_csv_atomic, write_text_atomic
from rid_fast.train.config import BASELINE, ExperimentConfig, check
from rid_fast.train.data import Dataset, load_dataset, split
from rid_fast.train.distillers import check_models, steps_per_epoch
from rid_fast.train.loop import CHECKPOINT_NAMES, Trainer
from rid_fast.train.measure import format_spread, layer_label, layer_rows, pid_table, run_identity
from rid_fast.train.supervised import resolve_device
from rid_fast.train.teachers import make_teacher

__all__ = ["run_compare", "paired_differences", "write_report", "read_summary", "SUMMARY_COLUMNS"]

SUMMARY_COLUMNS = ["method", "teacher", "seed", "test_acc"]


def _with(config: ExperimentConfig, **sections) -> ExperimentConfig:
    """A copy of ``config`` with fields of its sections replaced: ``_with(c, run={"seed": 3})``."""
    return dataclasses.replace(
        config, **{name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    )


def run_compare(
    config: ExperimentConfig,
    out_dir: str | Path,
    *,
    seeds: int | None = None,
    progress: bool = False,
    workers: int | None = None,
) -> list[dict]:
    """Train every method with every teacher for each seed; returns the summary rows. Runs that
    ``out_dir`` already holds (an earlier comparison into it, stopped or finished) go on from their
    newest checkpoints, so the same call again finishes a stopped comparison (``ValueError`` if
    the config would change what such a run was trained with).

    Runs are independent, so ``workers`` processes train them side by side (default: one per CPU
    core on the CPU — small students gain more from this than from threads — and one on a GPU),
    each with ``cores // workers`` threads. Teachers are trained first, once per seed, and cached
    in ``out_dir/teachers`` where every run reads them.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    seeds = config.compare.seeds if seeds is None else seeds
    check(config)
    methods, kinds = config.compare.methods, config.compare.teachers
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1; got {seeds}")
    device = resolve_device(config.run.device)
    dataset = load_dataset(config.data.name, config.data.data_dir)  # fail early on a missing dataset
    # Every method's models, options and schedule, before any teacher trains (a split's size
    # does not depend on its seed).
    data_split = split(
        dataset.y_train, per_class=config.data.per_class, val_fraction=config.data.val_fraction, seed=config.run.seed
    )
    for method in methods:
        check_models(_with(config, distill={"method": method}), dataset, steps_per_epoch(config, data_split))
    jobs = [
        (seed, method, kind)
        for seed in range(seeds)
        for method in methods
        for kind in (["none"] if method == BASELINE else kinds)
    ]
    cores = os.cpu_count() or 1
    if workers is None:
        workers = 1 if device.type == "cuda" else cores
    if workers < 1:
        raise ValueError(f"workers must be at least 1; got {workers}")
    workers = min(workers, len(jobs))
    threads = max(1, cores // workers)
    # Trained and noisy runs share the seed's trained teacher, trained once; runs that need none
    # (no-KD, untrained teachers) train beside the teachers, so that no worker waits for them.
    needs_training = any(kind != "untrained" for kind in kinds)
    teacher_tasks = [(_prepare_teacher, (config, out_dir, seed)) for seed in range(seeds)] if needs_training else []
    runs = {False: [], True: []}  # by whether the run needs its seed's trained teacher
    for seed, method, kind in jobs:
        runs[kind not in ("none", "untrained")].append((_run_one, (config, out_dir, seed, method, kind)))
    phases = [teacher_tasks + runs[False], runs[True]]
    rows: dict[tuple, dict] = {}
    bar = tqdm(total=len(teacher_tasks) + len(jobs), desc="compare (teachers, runs)", disable=not progress)
    with _pool(workers, threads) as pool, bar:
        for tasks in phases:
            for row in pool(_call, [(task,) for task in tasks]):
                bar.update()
                if row is not None:  # a run's row (a teacher returns None)
                    rows[(row["seed"], row["method"], row["teacher"])] = row
                    _write_summary([rows[job] for job in jobs if job in rows], out_dir / "summary.csv")
    ordered = [rows[job] for job in jobs]
    pid_rows = [
        row
        for r in ordered
        for row in layer_rows(
            r.get("pid", {}),
            **run_identity(_seed_config(config, out_dir, r["seed"], r["method"], r["teacher"]),
                           _run_name(r["method"], r["teacher"], r["seed"])),
        )
    ]  # fmt: skip
    if pid_rows:
        write_csv_atomic(pid_rows, out_dir / "pid.csv")
    conditions = _conditions(device, workers, threads, time.perf_counter() - started)
    write_report(ordered, out_dir, pid_rows, conditions=conditions)
    return ordered


def _conditions(device: torch.device, workers: int, threads: int, seconds: float) -> str:
    """One line saying what produced a report: the code (its commit, when run from a git
    checkout), the machine, the parallelism and the wall time (teachers included)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(rid_fast.__file__).parent, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = ""
    code = f"rid_fast {rid_fast.__version__}" + (f" (commit {commit})" if commit else "")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores" if device.type == "cpu" else torch.cuda.get_device_name(device)
    )
    return (f"{code}, torch {torch.__version__}, {machine}; {workers} worker(s) × {threads} thread(s); "
            f"{seconds / 60:.1f} min wall time, teachers included.")  # fmt: skip


@contextlib.contextmanager
def _pool(workers: int, threads: int):
    """``map(fn, tasks)`` yielding ``fn(*task)`` as tasks finish, each run with ``threads`` torch
    threads: in this process for one worker (its thread count restored after), else in
    ``workers`` spawned processes (spawn, not fork: safe with threads and CUDA)."""
    if workers == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield lambda fn, tasks: (fn(*task) for task in tasks)
        finally:
            torch.set_num_threads(previous)
        return
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=torch.set_num_threads, initargs=(threads,)) as pool:

        def unordered_map(fn, tasks):
            futures = [pool.submit(fn, *task) for task in tasks]
            for future in as_completed(futures):
                yield future.result()

        yield unordered_map


@functools.lru_cache(maxsize=2)
def _dataset(name: str, data_dir: str | None) -> Dataset:
    return load_dataset(name, data_dir)


def _seed_config(config: ExperimentConfig, out_dir: Path, seed: int, method: str, kind: str) -> ExperimentConfig:
    """The config of one run: no-KD (teacher ``none``) is given the first teacher, which it ignores."""
    return _with(
        config,
        distill={"method": method},
        teacher={"kind": config.compare.teachers[0] if kind == "none" else kind},
        run={"seed": seed, "out_dir": str(out_dir / "runs" / _run_name(method, kind, seed)), "progress": False},
    )


def _run_name(method: str, kind: str, seed: int) -> str:
    return f"{method}_{kind}_seed{seed}"


def _teacher(config: ExperimentConfig, out_dir: Path):
    dataset = _dataset(config.data.name, config.data.data_dir)
    data_split = split(
        dataset.y_train, per_class=config.data.per_class, val_fraction=config.data.val_fraction, seed=config.run.seed
    )
    teacher = make_teacher(config, dataset, data_split, resolve_device(config.run.device), out_dir / "teachers")
    return dataset, data_split, teacher


def _call(task: tuple) -> Any:
    """``fn(*args)`` of a ``(fn, args)`` task: one pool runs teachers and runs side by side."""
    fn, args = task
    return fn(*args)


def _prepare_teacher(config: ExperimentConfig, out_dir: Path, seed: int) -> None:
    """Train (and cache) the seed's teacher, before any run needs it."""
    _teacher(_seed_config(config, out_dir, seed, "teacher", "trained"), out_dir)


def _run_one(config: ExperimentConfig, out_dir: Path, seed: int, method: str, kind: str) -> dict:
    run_config = _seed_config(config, out_dir, seed, method, kind)
    dataset, data_split, teacher = _teacher(run_config, out_dir)
    trainer = Trainer(run_config, dataset=dataset, data_split=data_split, teacher=teacher)
    # A run the folder already holds (an earlier comparison into it, stopped or finished) goes on
    # from its newest checkpoint instead of starting again: a stopped comparison loses nothing.
    run_dir = Path(run_config.run.out_dir)
    earlier = any((run_dir / "ckpt" / name).exists() for name in CHECKPOINT_NAMES)
    try:
        final = trainer.train(resume=earlier)
    except ValueError as error:
        if not earlier:
            raise
        raise ValueError(
            f"{str(out_dir)!r} holds an earlier comparison, which goes on from its runs' checkpoints; its run "
            f"{run_dir.name} cannot: {error}. Compare into another --out"
        ) from None
    row = {"method": method, "teacher": kind, "seed": seed, "test_acc": round(final["test_acc"], 4)}
    if config.compare.pid:  # on the test set, like the accuracy
        row["pid"] = trainer.measure_pid()
    return row


def _write_summary(rows: list[dict], path: Path) -> None:
    write_csv_atomic(rows, path, columns=SUMMARY_COLUMNS)


def read_summary(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [{**r, "seed": int(r["seed"]), "test_acc": float(r["test_acc"])} for r in csv.DictReader(handle)]


def _t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t-interval of ``values``."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_differences(rows: list[dict]) -> list[dict]:
    """Per (method, teacher): mean test accuracy and the paired difference against no-KD on the
    same seeds (mean, 95 % interval, number of seeds)."""
    baseline = {r["seed"]: r["test_acc"] for r in rows if r["method"] == BASELINE}
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["teacher"]), []).append(r)
    out = []
    for (method, teacher), members in cells.items():
        accuracy, _, _ = _t_interval([m["test_acc"] for m in members])
        diffs = [m["test_acc"] - baseline[m["seed"]] for m in members if m["seed"] in baseline]
        mean, low, high = _t_interval(diffs) if diffs and method != BASELINE else (math.nan,) * 3
        out.append({"method": method, "teacher": teacher, "seeds": len(members), "test_acc": accuracy,
                    "diff": mean, "diff_low": low, "diff_high": high})  # fmt: skip
    return out


def _signed_percent(value: float) -> str:
    """``+1.23`` / ``-0.45``; ``0.00`` for what rounds to zero (no ``-0.00``); ``—`` for NaN.

    >>> [_signed_percent(v) for v in (1.234, -0.004, 0.0, -0.456, math.nan)]
    ['+1.23', '0.00', '0.00', '-0.46', '—']
    """
    if math.isnan(value):
        return "—"
    rounded = round(value, 2)
    return "0.00" if rounded == 0 else f"{rounded:+.2f}"


def write_report(
    rows: list[dict], out_dir: Path, pid_rows: list[dict] | None = None, *, conditions: str | None = None
) -> None:
    """``report.md`` (the paired-difference table, the PID table when measured, and ``conditions``:
    what produced it) and the plots."""
    table = paired_differences(rows)
    fmt = _signed_percent
    lines = [
        "# Comparison against no-KD (paired by seed)",
        "",
        "Test accuracy (%) averaged over seeds, and the paired difference to no-KD on the same seed with",
        "its 95 % t-interval. An interval that excludes 0 is marked *.",
        "",
        "| method | teacher | seeds | test acc | Δ vs no-KD | 95 % interval |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in table:
        excludes_zero = not math.isnan(r["diff_low"]) and (r["diff_low"] > 0 or r["diff_high"] < 0)
        interval = (
            "—"
            if math.isnan(r["diff_low"])
            else f"[{fmt(r['diff_low'])}, {fmt(r['diff_high'])}]" + (" *" if excludes_zero else "")
        )
        lines.append(
            f"| {r['method']} | {r['teacher']} | {r['seeds']} | {r['test_acc']:.2f} | {fmt(r['diff'])} | {interval} |"
        )
    if pid_rows:
        pid_means = pid_table(pid_rows)
        lines += [
            "",
            "## What was distilled (PID on the test set, bits)",
            "",
            "Red = Red(Y:T,S), the label information the student shares with the teacher; Uni_T = Uni(Y:T\\S),",
            "what the teacher knows that the student does not; I(Y;S) = all the student's layer holds.",
            "Representations are discretised (PCA, k-means) before BROJA; mean ± standard deviation over seeds",
            "(a difference between methods smaller than the spread is not one the measurement shows).",
            *_baseline_note(pid_means),
            "",
            "| method | teacher | layer (teacher ↔ student) | Red | Uni_T | I(Y;S) |",
            "|---|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {r['method']} | {_teacher_cell(r)} | {layer_label(r)} | "
            + " | ".join(format_spread(r[f], r[f"{f}_sd"]) for f in ("red", "uni_t", "mi_s"))
            + " |"
            for r in pid_means
        ]
    if conditions:
        lines += ["", f"Conditions: {conditions}"]
    write_text_atomic("\n".join(lines) + "\n", out_dir / "report.md")
    from rid_fast.train.plots import plot_compare, plot_pid

    plot_compare(out_dir, table)
    if pid_rows:
        plot_pid(pid_table(pid_rows), out_dir / "pid.png")


def _teacher_cell(row: dict) -> str:
    """The teacher column of a PID row: no-KD's says which teacher it is measured against."""
    return f"none (vs {row['pid_teacher']})" if row["teacher"] == "none" else row["teacher"]


def _baseline_note(pid_means: list[dict]) -> list[str]:
    kinds = sorted({r["pid_teacher"] for r in pid_means if r["teacher"] == "none"})
    if not kinds:
        return []
    return [
        f"No-KD learns from no teacher; its rows are measured against the {' and '.join(kinds)} teacher of the",
        "same seed (what the student holds of that teacher's knowledge without being taught it).",
    ]
