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

import copy
import csv
import dataclasses
import math
from pathlib import Path

from tqdm.auto import tqdm

from rid_fast.data import load_dataset, split
from rid_fast.train.config import ExperimentConfig
from rid_fast.train.loop import Trainer
from rid_fast.train.supervised import resolve_device
from rid_fast.train.teachers import TEACHER_KINDS, make_teacher

__all__ = ["run_compare", "paired_differences", "write_report", "read_summary"]

BASELINE = "nokd"


def _with(config: ExperimentConfig, **sections) -> ExperimentConfig:
    """A copy of ``config`` with fields of its sections replaced: ``_with(c, run={"seed": 3})``."""
    return dataclasses.replace(
        config, **{name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    )


def run_compare(
    config: ExperimentConfig, out_dir: str | Path, *, seeds: int | None = None, progress: bool = False
) -> list[dict]:
    """Train every method with every teacher for each seed; returns the summary rows."""
    out_dir = Path(out_dir)
    seeds = config.compare.seeds if seeds is None else seeds
    methods, kinds = config.compare.methods, config.compare.teachers
    for kind in kinds:
        if kind not in TEACHER_KINDS:
            raise ValueError(f"compare.teachers entries must be among {', '.join(TEACHER_KINDS)}; got {kind!r}")
    device = resolve_device(config.run.device)
    dataset = load_dataset(config.data.name, config.data.data_dir)
    jobs = [
        (seed, method, kind)
        for seed in range(seeds)
        for method in methods
        for kind in (["none"] if method == BASELINE else kinds)
    ]
    rows, teachers = [], {}
    for seed, method, kind in tqdm(jobs, desc="compare", disable=not progress):
        data_split = split(
            dataset.y_train, per_class=config.data.per_class, val_fraction=config.data.val_fraction, seed=seed
        )
        teacher_kind = kinds[0] if kind == "none" else kind  # no-KD ignores its teacher
        run_config = _with(
            config,
            distill={"method": method},
            teacher={"kind": teacher_kind},
            run={"seed": seed, "out_dir": str(out_dir / "runs" / f"{method}_{kind}_seed{seed}"), "progress": False},
        )
        key = (seed, "untrained" if teacher_kind == "untrained" else "trained")  # noisy = trained + noise
        if key not in teachers:
            teachers[key] = make_teacher(run_config, dataset, data_split, device, cache_dir=out_dir / "teachers")
        trainer = Trainer(run_config, dataset=dataset, data_split=data_split, teacher=copy.deepcopy(teachers[key]))
        final = trainer.train()
        rows.append({"method": method, "teacher": kind, "seed": seed, "test_acc": round(final["test_acc"], 4)})
        _write_summary(rows, out_dir / "summary.csv")
    write_report(rows, out_dir)
    return rows


def _write_summary(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "teacher", "seed", "test_acc"])
        writer.writeheader()
        writer.writerows(rows)


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


def write_report(rows: list[dict], out_dir: Path) -> None:
    """``report.md`` (the paired-difference table) and the plots."""
    table = paired_differences(rows)
    fmt = lambda v: "—" if isinstance(v, float) and math.isnan(v) else f"{v:+.2f}"  # noqa: E731
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
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    from rid_fast.plots import plot_compare

    plot_compare(out_dir, table)
