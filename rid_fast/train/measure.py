"""PID measurements of trained teacher/student pairs: what was distilled, what is left.

For each distilled layer pair, on held-out inputs, the teacher's features (as the student sees
them: standardised, nuisance channels included) and the student's features are discretised and
the label's PID with them is solved (:func:`rid_fast.pid.measure`): ``red`` = Red(Y:T,S), the
task knowledge the student shares with the teacher; ``uni_t`` = Uni(Y:T\\S), what the teacher
knows that the student does not.

A no-KD run holds a teacher it does not learn from (the first of ``compare.teachers``); its rows
are measured against that teacher, and say so (``pid_teacher``). Rows also carry the module names
of their layer pair (``teacher_layer``, ``student_layer``).

``rid-fast pid RUN_DIR`` runs :func:`measure_folder` on a run folder or on every run of a
comparison folder and writes ``pid.csv`` and ``pid.png``. A run is measured from its
``config.yaml`` and its verified checkpoint alone: nothing is trained, no trainer is built.
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
from rid_fast.train.atomic import write_csv_atomic
from rid_fast.train.config import BASELINE, ExperimentConfig, load_config
from rid_fast.train.data import load_dataset
from rid_fast.train.distillers import build_distiller
from rid_fast.train.models import build_model
from rid_fast.train.plots import plot_pid
from rid_fast.train.supervised import resolve_device

__all__ = [
    "layer_pids",
    "layer_rows",
    "layer_label",
    "run_identity",
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


def measure_run(run_dir: str | Path, config: ExperimentConfig | None = None, *,
                checkpoint_name: str = "latest.pt") -> dict[str, float]:  # fmt: skip
    """PID of every layer pair of the trained run in ``run_dir`` (its ``config.yaml``, unless
    ``config`` is given, and ``ckpt/<checkpoint_name>``, verified), on the test set."""
    run_dir = Path(run_dir)
    config = config or load_config(run_dir / "config.yaml")
    path = run_dir / "ckpt" / checkpoint_name
    state = checkpoint.load(path)
    if "distiller" not in state:
        raise checkpoint.CheckpointError(f"{path} holds no trained distiller")
    if not config.distill.teacher_layers:
        return {}
    dataset = load_dataset(config.data.name, config.data.data_dir)
    device = resolve_device(config.run.device)
    # An untrained teacher of the right architecture: every weight comes from the checkpoint.
    teacher = build_model(config.teacher.model, dataset.input_shape, dataset.num_classes)
    distiller = build_distiller(config, dataset, teacher, device)
    try:
        distiller.load_state_dict(state["distiller"])
        x, y = dataset.x_test.to(device), dataset.y_test.to(device)
        return layer_pids(distiller, x, y, n_components=config.run.pid_components, n_clusters=config.run.pid_clusters)
    finally:
        distiller.close()


def run_identity(config: ExperimentConfig, run: str) -> dict:
    """What a PID row of a run says about it: the run's name, its method and teacher (``none`` for
    no-KD), the teacher whose features the PID is measured against (no-KD's run holds one without
    learning from it), the seed, and the names of the distilled layer pairs (``layer_names``)."""
    method = config.distill.method
    return {
        "run": run,
        "method": method,
        "teacher": "none" if method == BASELINE else config.teacher.kind,
        "pid_teacher": config.teacher.kind,
        "seed": config.run.seed,
        "layer_names": list(zip(config.distill.teacher_layers, config.distill.student_layers)),
    }


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
        rows += layer_rows(measure_run(run_dir, config), **run_identity(config, run_dir.name))
    write_csv_atomic(rows, folder / "pid.csv")
    plot_pid(pid_table(rows), folder / "pid.png")
    return rows


def layer_rows(values: dict[str, float], *, layer_names: list[tuple[str, str]] = (), **identity) -> list[dict]:
    """Rows, one per layer pair k, from ``{"pid/k/<field>": value}``; each starts with ``identity``,
    then ``layer`` (k) and, from ``layer_names[k]``, ``teacher_layer`` and ``student_layer``."""
    layers: dict[int, dict] = {}
    for key, value in values.items():
        _, layer, name = key.split("/")
        k = int(layer)
        if k not in layers:
            names = dict(zip(("teacher_layer", "student_layer"), layer_names[k])) if k < len(layer_names) else {}
            layers[k] = {**identity, "layer": k, **names}
        layers[k][name] = value
    return [layers[k] for k in sorted(layers)]


def pid_table(pid_rows: list[dict]) -> list[dict]:
    """Per (method, teacher, layer), in order of first appearance: the mean of each PID field
    over seeds (bits), its standard deviation over seeds (``<field>_sd``; NaN with one seed), the
    number of seeds, and the layer pair's names and the teacher measured against (of its first run)."""
    cells: dict[tuple, list[dict]] = {}
    for r in pid_rows:
        cells.setdefault((r["method"], r["teacher"], r["layer"]), []).append(r)
    table = []
    for (method, teacher, layer), members in cells.items():
        first = members[0]
        row = {"method": method, "teacher": teacher, "layer": layer, "seeds": len(members),
               "pid_teacher": first.get("pid_teacher") or teacher, "teacher_layer": first.get("teacher_layer", ""),
               "student_layer": first.get("student_layer", "")}  # fmt: skip
        for field in PID_FIELDS:
            values = [m[field] for m in members]
            row[field] = statistics.fmean(values)
            row[f"{field}_sd"] = statistics.stdev(values) if len(values) > 1 else math.nan
        table.append(row)
    return table


def layer_label(row: dict) -> str:
    """``"blocks.0 ↔ blocks.1"`` (teacher ↔ student module), or ``"pair k"`` without names."""
    if row.get("teacher_layer") or row.get("student_layer"):
        return f"{row.get('teacher_layer', '?')} ↔ {row.get('student_layer', '?')}"
    return f"pair {row['layer']}"


def format_spread(mean: float, sd: float) -> str:
    """``mean ± sd`` (bits), or the mean alone when there is no spread to show."""
    return f"{mean:.3f}" if math.isnan(sd) else f"{mean:.3f} ± {sd:.3f}"


def read_pid_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [
            {**r, "seed": int(r["seed"]), "layer": int(r["layer"]), **{f: float(r[f]) for f in PID_FIELDS}}
            for r in csv.DictReader(handle)
        ]
