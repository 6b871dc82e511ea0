"""Plots of runs and comparisons (matplotlib, written as PNG files; no display needed).

* :func:`plot_run` — a run folder's ``metrics.csv``: accuracies and every loss part over epochs
  (and the PID atoms when the run tracked them), RID's filter epochs shaded, layer pairs named by
  their modules (from the run's ``config.yaml``);
* :func:`plot_compare` — a comparison folder: paired differences against no-KD with their 95 %
  intervals (``accuracy.png``) and mean validation accuracy over epochs, one panel per teacher
  (``curves.png``);
* :func:`plot_pid` — the PID atoms per method, one panel per distilled layer pair, methods
  grouped by the teacher they are measured against.

Every figure is sized from what it shows (methods, teachers, layer pairs) and laid out by
matplotlib's constrained layout with its legend outside the axes, so a comparison of one method
reads like one of ten. The ``*_figure`` functions return the figure; ``plot_*`` write the PNGs.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

__all__ = [
    "plot_run",
    "plot_compare",
    "plot_pid",
    "accuracy_figure",
    "curves_figure",
    "pid_figure",
    "read_metrics",
    "filter_spans",
]

BASELINE = "nokd"
DPI = 110
ATOMS = [("red", "Red(Y:T,S)"), ("uni_t", "Uni(Y:T\\S)"), ("uni_s", "Uni(Y:S\\T)"), ("syn", "Syn(Y:T,S)")]
FILTER_SHADE = {"color": "0.55", "alpha": 0.18, "linewidth": 0}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


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


def filter_spans(rows: list[dict]) -> list[tuple[float, float]]:
    """``(start, end)`` epoch spans spent (wholly or partly) in RID's filter phase, consecutive
    epochs merged; epoch e (1-based, as in ``metrics.csv``) spans [e − 1, e]."""
    spans: list[list[float]] = []
    for row in rows:
        if "filter" in str(row.get("phase", "")).split("/"):
            epoch = row["epoch"]
            if spans and spans[-1][1] == epoch - 1:
                spans[-1][1] = epoch
            else:
                spans.append([epoch - 1, epoch])
    return [tuple(span) for span in spans]


def _shade(ax, spans: list[tuple[float, float]], label: str | None = "RID filter epochs") -> None:
    for i, (start, end) in enumerate(spans):
        ax.axvspan(start, end, label=label if i == 0 else None, **FILTER_SHADE)


def _layer_names(run_dir: Path) -> list[str]:
    """``"teacher ↔ student"`` module names of the run's layer pairs, from its config.yaml."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    distill = (yaml.safe_load(path.read_text()) or {}).get("distill", {})
    return [f"{t} ↔ {s}" for t, s in zip(distill.get("teacher_layers", []), distill.get("student_layers", []))]


def _part_title(key: str, layer_names: list[str]) -> str:
    """``"student/redundancy/1"`` → ``"student: redundancy, blocks.1 ↔ blocks.1"``."""
    phase, _, part = key.partition("/")
    name, _, layer = part.partition("/")
    if layer.isdigit():
        k = int(layer)
        name += ", " + (layer_names[k] if k < len(layer_names) else f"layer pair {k}")
    return f"{phase}: {name}"


# ---- a run --------------------------------------------------------------------------------------


def plot_run(run_dir: str | Path) -> list[Path]:
    """``RUN_DIR/plots/accuracy.png``, ``losses.png`` and (when the run tracked PID) ``pid.png``
    from ``RUN_DIR/metrics.csv``."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.csv (is it a run folder?)")
    rows = read_metrics(metrics_path)
    plt = _pyplot()
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    spans, names = filter_spans(rows), _layer_names(run_dir)
    written = []

    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    _shade(ax, spans)
    for key in ("train_acc", "val_acc", "test_acc"):
        points = [(r["epoch"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None, label=key.replace("_", " "))
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=run_dir.name)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    written.append(_save(fig, out_dir / "accuracy.png"))

    parts = [k for k in dict.fromkeys(k for r in rows for k in r) if "/" in k and not k.startswith("pid/")]
    parts = [k for k in parts if not k.split("/", 1)[1].startswith("filter_acc")]
    if parts:
        phases = list(dict.fromkeys(k.split("/")[0] for k in parts))
        columns = [[k for k in parts if k.split("/")[0] == phase] for phase in phases]
        n_rows = max(map(len, columns))
        fig, axes = plt.subplots(n_rows, len(phases), figsize=(4.2 * len(phases), 1.7 * n_rows + 0.6),
                                 sharex=True, squeeze=False, layout="constrained")  # fmt: skip
        for j, keys in enumerate(columns):
            for i in range(n_rows):
                ax = axes[i, j]
                if i >= len(keys):
                    ax.set_visible(False)
                    continue
                _shade(ax, spans, label=None)
                points = [(r["epoch"], r[keys[i]]) for r in rows if keys[i] in r]
                ax.plot(*zip(*points), marker=".", linewidth=1)
                ax.set_title(_part_title(keys[i], names), fontsize=9)
                ax.grid(alpha=0.3)
                ax.tick_params(labelsize=8)
            last = axes[len(keys) - 1, j]
            last.set_xlabel("epoch")
            last.tick_params(labelbottom=True)  # the axes below it in this column are hidden
        fig.suptitle(f"{run_dir.name}: loss parts per phase" + (" (filter epochs shaded)" if spans else ""))
        written.append(_save(fig, out_dir / "losses.png"))

    layers = sorted({int(k.split("/")[1]) for r in rows for k in r if k.startswith("pid/")})
    if layers:
        fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers) + 1.6, 3.4), squeeze=False,
                                 sharey=True, layout="constrained")  # fmt: skip
        for ax, k in zip(axes[0], layers):
            _shade(ax, spans, label=None)
            for field, label in ATOMS[:2]:
                points = [(r["epoch"], r[f"pid/{k}/{field}"]) for r in rows if f"pid/{k}/{field}" in r]
                ax.plot(*zip(*points), marker=".", label=label)
            ax.set(title=names[k] if k < len(names) else f"layer pair {k}", xlabel="epoch")
            ax.grid(alpha=0.3)
        axes[0, 0].set_ylabel("bits (validation split)")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
        written.append(_save(fig, out_dir / "pid.png"))
    return written


# ---- a comparison -------------------------------------------------------------------------------


def _method_styles(methods: list[str]) -> dict[str, dict]:
    """A colour (and, past ten methods, a line style) per method, the same in every panel."""
    plt = _pyplot()
    colors = plt.get_cmap("tab10").colors
    return {m: {"color": colors[i % 10], "linestyle": ("-", "--", ":")[i // 10 % 3]} for i, m in enumerate(methods)}


def accuracy_figure(table: list[dict]):
    """Δ test accuracy against no-KD per method (groups) and teacher (bars), 95 % intervals; None
    when no method has a paired difference. ``table``: :func:`rid_fast.train.compare.paired_differences`."""
    cells = [r for r in table if r["method"] != BASELINE and not math.isnan(r["diff"])]
    if not cells:
        return None
    plt = _pyplot()
    teachers = list(dict.fromkeys(r["teacher"] for r in cells))
    methods = list(dict.fromkeys(r["method"] for r in cells))
    fig, ax = plt.subplots(figsize=(max(6.5, 2.4 + len(methods) * (0.22 * len(teachers) + 0.4)), 4.4),
                           layout="constrained")  # fmt: skip
    width = min(0.8 / len(teachers), 0.3)
    extent = [0.0]  # every bar and interval end, and 0: the y range shows them with a margin
    for i, teacher in enumerate(teachers):
        xs, ys, errors = [], [], [[], []]
        for j, method in enumerate(methods):
            cell = next((r for r in cells if r["method"] == method and r["teacher"] == teacher), None)
            if cell is None:
                continue
            xs.append(j + (i - (len(teachers) - 1) / 2) * width)
            ys.append(cell["diff"])
            low, high = cell["diff"] - cell["diff_low"], cell["diff_high"] - cell["diff"]
            errors[0].append(0.0 if math.isnan(low) else low)
            errors[1].append(0.0 if math.isnan(high) else high)
        ax.bar(xs, ys, width, yerr=errors, capsize=3, label=teacher)
        extent += [y - low for y, low in zip(ys, errors[0])] + [y + high for y, high in zip(ys, errors[1])]
    margin = 0.08 * (max(extent) - min(extent)) or 0.5
    ax.set_ylim(min(extent) - margin, max(extent) + margin)
    ax.axhline(0, color="black", linewidth=0.8)
    rotate = len(methods) > 4
    ax.set_xticks(range(len(methods)), methods, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.set_ylabel("Δ test accuracy vs no-KD (points)")
    baseline = next((r for r in table if r["method"] == BASELINE), None)
    seeds = max(r["seeds"] for r in cells)
    subtitle = f"no-KD: {baseline['test_acc']:.2f} % test accuracy; " if baseline else ""
    subtitle += f"{seeds} seeds" if seeds > 1 else "1 seed (no interval from one seed)"
    ax.set_title(f"Paired difference against no-KD, 95 % t-interval\n{subtitle}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(title="teacher", loc="outside right upper", fontsize=8, title_fontsize=8)
    return fig


def _read_curves(out_dir: Path):
    """Per (method, teacher): {epoch: [validation accuracy of each seed]}, and the filter spans of
    the first seed's run."""
    curves: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    spans: dict[tuple[str, str], list] = {}
    for metrics_path in sorted((out_dir / "runs").glob("*/metrics.csv")):
        method, teacher, _ = metrics_path.parent.name.rsplit("_", 2)
        rows = read_metrics(metrics_path)
        spans.setdefault((method, teacher), filter_spans(rows))
        for row in rows:
            if "val_acc" in row:
                curves[(method, teacher)][row["epoch"]].append(row["val_acc"])
    return curves, spans


def curves_figure(curves: dict, spans: dict, order: list[tuple[str, str]] = ()):
    """Mean validation accuracy per epoch, one panel per teacher (no-KD, which has none, in every
    panel), the filter epochs of the panel's RID runs shaded; None without curves. ``order``:
    (method, teacher) pairs in the order to show them (the comparison's), else as ``curves`` has them."""
    if not curves:
        return None
    plt = _pyplot()
    cells = [cell for cell in order if cell in curves] + [cell for cell in curves if cell not in order]
    methods = list(dict.fromkeys(m for m, _ in cells))
    methods = [BASELINE] * (BASELINE in methods) + [m for m in methods if m != BASELINE]
    panels = list(dict.fromkeys(t for _, t in cells if t != "none")) or ["none"]
    styles = _method_styles(methods)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels) + 1.8, 3.8), squeeze=False, sharey=True,
                             layout="constrained")  # fmt: skip
    for ax, teacher in zip(axes[0], panels):
        shaded = sorted({span for (m, t), s in spans.items() if t == teacher for span in s})
        _shade(ax, shaded)
        for method in methods:
            key = (method, teacher) if (method, teacher) in curves else (method, "none")
            if key not in curves:
                continue
            by_epoch = curves[key]
            epochs = sorted(by_epoch)
            label = f"{method} (no teacher)" if key[1] == "none" else method
            ax.plot(epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs], label=label, linewidth=1.3,
                    marker="." if len(epochs) <= 30 else None, **styles[method])  # fmt: skip
        ax.set(title="no teacher" if teacher == "none" else f"{teacher} teacher", xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("validation accuracy (%), mean over seeds")
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8)
    return fig


def plot_compare(out_dir: str | Path, table: list[dict]) -> list[Path]:
    """``accuracy.png`` (Δ test accuracy vs no-KD, 95 % intervals) and ``curves.png`` (mean
    validation accuracy per epoch) in a comparison folder."""
    out_dir = Path(out_dir)
    written = []
    fig = accuracy_figure(table)
    if fig is not None:
        written.append(_save(fig, out_dir / "accuracy.png"))
    fig = curves_figure(*_read_curves(out_dir), order=[(r["method"], r["teacher"]) for r in table])
    if fig is not None:
        written.append(_save(fig, out_dir / "curves.png"))
    return written


# ---- PID ----------------------------------------------------------------------------------------


def _pid_rows_by_teacher(cells: list[dict]) -> list[tuple[str, list[dict]]]:
    """The cells of one layer pair grouped by the teacher they are measured against, groups and
    methods in order of appearance (no-KD first in its group)."""
    groups: dict[str, list[dict]] = {}
    for r in cells:
        groups.setdefault(r.get("pid_teacher") or r["teacher"], []).append(r)
    return [(t, sorted(rows, key=lambda r: r["method"] != BASELINE)) for t, rows in groups.items()]


def pid_figure(pid_means: list[dict]):
    """Stacked horizontal bars of the PID atoms (bits) per method, one panel per distilled layer
    pair, methods grouped by teacher. ``pid_means``: one row per (method, teacher, layer), as
    :func:`rid_fast.train.measure.pid_table` returns (with the layer's module names if known)."""
    plt = _pyplot()
    layers = sorted({r["layer"] for r in pid_means})
    first = {layer: [r for r in pid_means if r["layer"] == layer] for layer in layers}
    groups = _pid_rows_by_teacher(first[layers[0]])
    n_rows = sum(len(rows) + 1 for _, rows in groups)  # a header row per group
    fig, axes = plt.subplots(1, len(layers), figsize=(2.6 + 3.6 * len(layers), 1.3 + 0.24 * n_rows), squeeze=False,
                             sharey=True, layout="constrained")  # fmt: skip
    colors = _pyplot().get_cmap("tab10").colors
    for ax, layer in zip(axes[0], layers):
        by_cell = {(r["method"], r["teacher"]): r for r in first[layer]}
        positions, labels, bold = [], [], []
        y = 0
        for teacher, rows in groups:
            positions.append(y)
            labels.append(f"{teacher} teacher")
            bold.append(True)
            y += 1
            for r in rows:
                cell = by_cell.get((r["method"], r["teacher"]))
                if cell is not None:
                    left = 0.0
                    for (key, name), color in zip(ATOMS, colors):
                        ax.barh(y, cell[key], 0.72, left=left, color=color, label=name)
                        left += cell[key]
                positions.append(y)
                labels.append(f"{r['method']} (no teacher)" if r["teacher"] == "none" else r["method"])
                bold.append(False)
                y += 1
            y += 0.4
        ax.set_yticks(positions, labels, fontsize=8)
        for tick, is_header in zip(ax.get_yticklabels(), bold):
            tick.set_fontweight("bold" if is_header else "normal")
        names = first[layer][0]
        pair = (
            f"teacher {names['teacher_layer']} ↔ student {names['student_layer']}" if names.get("teacher_layer") else ""
        )
        ax.set_title(f"layer pair {layer}" + (f"\n{pair}" if pair else ""), fontsize=9)
        ax.set_xlabel("bits (mean over seeds)")
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    axes[0, 0].invert_yaxis()  # the first group on top (the axes share y)
    handles = {}
    for handle, label in zip(*axes[0, 0].get_legend_handles_labels()):
        handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="outside upper center", ncol=len(ATOMS), fontsize=8)
    return fig


def plot_pid(pid_means: list[dict], path: str | Path) -> Path:
    """Write :func:`pid_figure` to ``path``."""
    return _save(pid_figure(pid_means), Path(path))
