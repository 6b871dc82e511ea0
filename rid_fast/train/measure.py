"""PID measurements of trained teacher/student pairs: what was distilled, what is left.

For each distilled layer pair, on held-out inputs, the teacher's features (as the student sees
them: standardised, nuisance channels included) and the student's features are discretised and
the label's PID with them is solved (:func:`rid_fast.pid.measure`): ``red`` = Red(Y:T,S), the
task knowledge the student shares with the teacher; ``uni_t`` = Uni(Y:T\\S), what the teacher
knows that the student does not.

``rid-fast pid RUN_DIR`` runs :func:`measure_folder` on a run folder or on every run of a
comparison folder and writes ``pid.csv`` and ``pid.png``.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import torch

from rid_fast import pid
from rid_fast.distill.distiller import Distiller
from rid_fast.train import checkpoint
from rid_fast.train.config import load_config
from rid_fast.train.data import load_dataset
from rid_fast.train.loop import Trainer, write_csv_atomic
from rid_fast.train.models import build_model
from rid_fast.train.plots import plot_pid

__all__ = [
    "layer_pids",
    "layer_rows",
    "measure_run",
    "measure_folder",
    "pid_table",
    "format_spread",
    "read_pid_csv",
    "PID_FIELDS",
]

PID_FIELDS = ("red", "uni_t", "uni_s", "syn", "mi_t", "mi_s", "gap")


@torch.no_grad()
def layer_pids(
    distiller: Distiller, x: torch.Tensor, y: torch.Tensor, *, n_components: int = 5, n_clusters: int = 10, seed=0
) -> dict[str, float]:
    """``{"pid/k/red": ..., "pid/k/uni_t": ..., ...}`` for every distilled layer pair k, measured
    on inputs ``x`` with labels ``y`` (models in eval mode; their modes are restored after)."""
    with distiller.eval_mode():
        _, teacher_feats = distiller.teacher_features(x)
        _, student_feats = distiller.student_features(x)
    values = {}
    for k, (t, s) in enumerate(zip(teacher_feats, student_feats)):
        components = min(n_components, t[0].numel(), s[0].numel(), len(x))
        result = pid.measure(t, s, y, n_components=components, n_clusters=n_clusters, seed=seed, num_classes=None)
        values.update({f"pid/{k}/{name}": getattr(result, name) for name in PID_FIELDS})
    return values


def measure_run(run_dir: str | Path, config=None, *, checkpoint_name: str = "latest.pt") -> dict[str, float]:
    """PID of every layer pair of the trained run in ``run_dir`` (its ``config.yaml``, unless
    ``config`` is given, and ``ckpt/<checkpoint_name>``), on the test set."""
    run_dir = Path(run_dir)
    config = config or load_config(run_dir / "config.yaml")
    state = checkpoint.load(run_dir / "ckpt" / checkpoint_name, map_location="cpu")
    dataset = load_dataset(config.data.name, config.data.data_dir)
    # An untrained teacher of the right architecture: every weight comes from the checkpoint.
    teacher = build_model(config.teacher.model, dataset.input_shape, dataset.num_classes)
    trainer = Trainer(config, dataset=dataset, teacher=teacher)
    trainer.distiller.load_state_dict(state["distiller"])
    return trainer.measure_pid()


def measure_folder(folder: str | Path) -> list[dict]:
    """Measure a run folder, or every run under ``folder/runs`` of a comparison; writes
    ``folder/pid.csv`` (one row per run and layer pair) and ``folder/pid.png``."""
    folder = Path(folder)
    runs = sorted(p.parent for p in folder.glob("runs/*/config.yaml")) or [folder]
    rows = []
    for run_dir in runs:
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run folder: it has no config.yaml")
        config = load_config(run_dir / "config.yaml")
        method = config.distill.method
        teacher = "none" if method == "nokd" else config.teacher.kind
        values = measure_run(run_dir, config)
        rows += layer_rows(values, run=run_dir.name, method=method, teacher=teacher, seed=config.run.seed)
    write_csv_atomic(rows, folder / "pid.csv")
    plot_pid(pid_table(rows), folder / "pid.png")
    return rows


def layer_rows(values: dict[str, float], **identity) -> list[dict]:
    """Rows, one per layer pair k, from ``{"pid/k/<field>": value}``; each starts with ``identity``."""
    layers: dict[int, dict] = {}
    for key, value in values.items():
        _, layer, name = key.split("/")
        layers.setdefault(int(layer), {**identity, "layer": int(layer)})[name] = value
    return [layers[k] for k in sorted(layers)]


def pid_table(pid_rows: list[dict]) -> list[dict]:
    """Per (method, teacher, layer), in order of first appearance: the mean of each PID field
    over seeds (bits), its standard deviation over seeds (``<field>_sd``; NaN with one seed) and
    the number of seeds."""
    cells: dict[tuple, list[dict]] = {}
    for r in pid_rows:
        cells.setdefault((r["method"], r["teacher"], r["layer"]), []).append(r)
    table = []
    for (method, teacher, layer), members in cells.items():
        row = {"method": method, "teacher": teacher, "layer": layer, "seeds": len(members)}
        for field in PID_FIELDS:
            values = [m[field] for m in members]
            row[field] = statistics.fmean(values)
            row[f"{field}_sd"] = statistics.stdev(values) if len(values) > 1 else math.nan
        table.append(row)
    return table


def format_spread(mean: float, sd: float) -> str:
    """``mean ± sd`` (bits), or the mean alone when there is no spread to show."""
    return f"{mean:.3f}" if math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def read_pid_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [
            {**r, "seed": int(r["seed"]), "layer": int(r["layer"]), **{f: float(r[f]) for f in PID_FIELDS}}
            for r in csv.DictReader(handle)
        ]
