"""Teachers for an experiment: trained (and cached), untrained, or noisy.

* ``trained`` — trained with cross-entropy on every training image outside the validation set,
  seeded by the run's seed, and cached in ``<out_dir>/../teachers`` (or the run's own folder) so
  every method of a comparison distils the very same network;
* ``untrained`` — the same architecture at its random initialisation (the paper's nuisance
  teacher: its features carry mostly nuisance);
* ``noisy`` — the trained teacher, with a fraction of its distilled channels replaced by noise
  (done by :class:`rid_fast.distill.distiller.TeacherFeatureTransform`, ``teacher.noise_fraction``).

A user's own trained teacher can be given as ``teacher.checkpoint`` (a state_dict file, read
with ``weights_only=True``). A cached teacher is a checkpoint with a content digest
(:mod:`rid_fast.train.checkpoint`); one that is damaged is trained again, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from rid_fast.train import checkpoint
from rid_fast.train.config import TEACHER_KINDS
from rid_fast.train.data import Dataset, Split
from rid_fast.train.models import build_model
from rid_fast.train.supervised import accuracy, fit_classifier

__all__ = ["TEACHER_KINDS", "make_teacher", "teacher_cache_path"]


def teacher_cache_path(config, cache_dir: Path) -> Path:
    """Cache file of the trained teacher for this data, architecture, optimiser and seed."""
    key = json.dumps(
        {
            "data": vars(config.data),
            "model": config.teacher.model,
            "optim": vars(config.teacher.optim),
            "seed": config.run.seed,
        },
        sort_keys=True,
        default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir / f"teacher_{config.teacher.model.get('name', 'model')}_seed{config.run.seed}_{digest}.pt"


def make_teacher(
    config, dataset: Dataset, data_split: Split, device: torch.device, cache_dir: Path | None = None
) -> nn.Module:
    """The teacher network the config asks for, in eval mode, on ``device``."""
    kind = config.teacher.kind
    if kind not in TEACHER_KINDS:
        raise ValueError(f"teacher.kind must be one of {', '.join(map(repr, TEACHER_KINDS))}; got {kind!r}")
    torch.manual_seed(config.run.seed + 7919)  # teacher initialisation: seeded, distinct from the student's
    teacher = build_model(config.teacher.model, dataset.input_shape, dataset.num_classes).to(device)
    if kind == "untrained":
        return teacher.eval()
    if config.teacher.checkpoint:
        teacher.load_state_dict(_user_state_dict(config.teacher.checkpoint, device))
        return teacher.eval()
    cache = teacher_cache_path(config, Path(cache_dir or Path(config.run.out_dir) / "teachers"))
    if cache.is_file():
        try:
            teacher.load_state_dict(checkpoint.load(cache, kind=checkpoint.TEACHER)["state_dict"])
            return teacher.eval()
        except checkpoint.CheckpointError as error:
            warnings.warn(f"{error}; training the teacher again", stacklevel=2)
    x, y = dataset.x_train[data_split.teacher].to(device), dataset.y_train[data_split.teacher].to(device)
    fit_classifier(
        teacher, x, y, config.teacher.optim, seed=config.run.seed, augment=config.data.augment and x.dim() == 4
    )
    x_val, y_val = dataset.x_train[data_split.validation].to(device), dataset.y_train[data_split.validation].to(device)
    report = {
        "val_acc": accuracy(teacher, x_val, y_val),
        "test_acc": accuracy(teacher, dataset.x_test.to(device), dataset.y_test.to(device)),
    }
    checkpoint.save_atomic({"state_dict": teacher.state_dict(), **report}, cache, kind=checkpoint.TEACHER)
    return teacher.eval()


def _user_state_dict(path: str, device: torch.device) -> dict:
    """The state_dict in the user's file ``teacher.checkpoint``, read with ``weights_only=True``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"teacher.checkpoint: no file {path!r}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # damaged files fail in the zip reader or the unpickler
        raise ValueError(f"teacher.checkpoint: torch cannot read {path!r} as a state_dict ({error})") from None
    if not isinstance(state, dict):
        raise ValueError(f"teacher.checkpoint: {path!r} holds a {type(state).__name__}, not a state_dict")
    return state
