"""Plots of runs and comparisons (matplotlib, written as PNG files; no display needed).

* :func:`plot_run` — a run folder's ``metrics.csv``: accuracies and every loss part over epochs;
* :func:`plot_compare` — a comparison folder: paired differences against no-KD with their 95 %
  intervals, and mean validation accuracy over epochs per method and teacher.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

__all__ = ["plot_run", "plot_compare", "read_metrics"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.csv`` with numbers parsed (empty cells dropped)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    parsed = []
    for row in rows:
        out = {}
        for key, value in row.items():
            if value in ("", None):
                continue
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
        parsed.append(out)
    return parsed


def plot_run(run_dir: str | Path) -> list[Path]:
    """``RUN_DIR/plots/accuracy.png`` and ``RUN_DIR/plots/losses.png`` from ``RUN_DIR/metrics.csv``."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.csv (is it a run folder?)")
    rows = read_metrics(metrics_path)
    plt = _pyplot()
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train_acc", "val_acc", "test_acc"):
        points = [(r["epoch"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), label=key.replace("_", " "))
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out_dir / "accuracy.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    parts = sorted({k for r in rows for k in r if "/" in k and not k.split("/", 1)[1].startswith(("filter_acc",))})
    if parts:
        fig, axes = plt.subplots(len(parts), 1, figsize=(6, 1.8 * len(parts)), sharex=True, squeeze=False)
        for ax, key in zip(axes[:, 0], parts):
            points = [(r["epoch"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points), marker=".", linewidth=1)
            ax.set_ylabel(key, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("epoch")
        fig.tight_layout()
        written.append(out_dir / "losses.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def plot_compare(out_dir: str | Path, table: list[dict]) -> list[Path]:
    """``accuracy.png`` (Δ test accuracy vs no-KD, 95 % intervals) and ``curves.png`` (mean
    validation accuracy per epoch) in a comparison folder."""
    out_dir = Path(out_dir)
    plt = _pyplot()
    written = []
    cells = [r for r in table if not math.isnan(r["diff"])]
    teachers = sorted({r["teacher"] for r in cells})
    methods = list(dict.fromkeys(r["method"] for r in cells))
    if cells:
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(methods), 4))
        width = 0.8 / max(len(teachers), 1)
        for i, teacher in enumerate(teachers):
            xs, ys, errors = [], [], []
            for j, method in enumerate(methods):
                cell = next((r for r in cells if r["method"] == method and r["teacher"] == teacher), None)
                if cell is None:
                    continue
                xs.append(j + (i - (len(teachers) - 1) / 2) * width)
                ys.append(cell["diff"])
                half = (cell["diff_high"] - cell["diff_low"]) / 2
                errors.append(0.0 if math.isnan(half) else half)
            ax.bar(xs, ys, width, yerr=errors, capsize=3, label=f"teacher: {teacher}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set(ylabel="Δ test accuracy vs no-KD (points)", title="Paired difference against no-KD (95 % interval)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        written.append(out_dir / "accuracy.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    curves: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for metrics_path in sorted((out_dir / "runs").glob("*/metrics.csv")):
        method, teacher, _ = metrics_path.parent.name.rsplit("_", 2)
        for row in read_metrics(metrics_path):
            if "val_acc" in row:
                curves[(method, teacher)][row["epoch"]].append(row["val_acc"])
    if curves:
        panels = sorted({teacher for _, teacher in curves})
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False, sharey=True)
        for ax, teacher in zip(axes[0], panels):
            for (method, t), by_epoch in sorted(curves.items()):
                if t == teacher or t == "none":
                    epochs = sorted(by_epoch)
                    ax.plot(epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs], label=method, linewidth=1.2)
            ax.set(title=f"teacher: {teacher}", xlabel="epoch")
            ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel("validation accuracy (%), mean over seeds")
        axes[0, -1].legend(fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "curves.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def plot_pid(pid_means: list[dict], path: str | Path) -> Path:
    """Stacked bars of the PID atoms (Red, Uni_T, Uni_S, Syn; bits) per method and teacher, one
    panel per distilled layer pair; ``pid_means`` has one row per (method, teacher, layer), as
    :func:`rid_fast.train.measure.pid_table` returns."""
    path = Path(path)
    plt = _pyplot()
    atoms = [("red", "Red(Y:T,S)"), ("uni_t", "Uni(Y:T\\S)"), ("uni_s", "Uni(Y:S\\T)"), ("syn", "Syn(Y:T,S)")]
    layers = sorted({r["layer"] for r in pid_means})
    per_layer = max(sum(r["layer"] == layer for r in pid_means) for layer in layers)
    fig, axes = plt.subplots(1, len(layers), figsize=(max(5, 0.8 * per_layer + 2) * len(layers), 4),
                             squeeze=False, sharey=True)  # fmt: skip
    for ax, layer in zip(axes[0], layers):
        cells = [r for r in pid_means if r["layer"] == layer]
        bottom = [0.0] * len(cells)
        for key, name in atoms:
            heights = [r[key] for r in cells]
            ax.bar(range(len(cells)), heights, 0.7, bottom=bottom, label=name)
            bottom = [b + h for b, h in zip(bottom, heights)]
        ax.set_xticks(range(len(cells)), [f"{r['method']}\n{r['teacher']}" for r in cells], fontsize=7)
        ax.set(title=f"layer pair {layer}", ylabel="bits")
        ax.grid(axis="y", alpha=0.3)
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
