"""The training loop: one teacher, one student, one distillation method, read top to bottom.

:class:`Trainer` builds everything from an :class:`~rid_fast.train.config.ExperimentConfig`:

1. the dataset and the seeded split (student subset, validation set);
2. the teacher (:mod:`rid_fast.train.teachers`: trained and cached, untrained, or noisy);
3. the student, initialised from the run's seed (identical for every method);
4. the :class:`~rid_fast.Distiller` and one optimizer per phase;

then runs the epochs: each step asks the method which phase it is in (RID alternates filter and
student phases), steps that phase's optimizer, and each epoch ends with an evaluation, a row in
``metrics.csv`` and an atomic ``ckpt/latest.pt`` (``ckpt/best.pt`` holds the state of the best
validation accuracy so far). The learning rate follows one epoch clock (cosine by default) for
every phase's optimizer. ``train(resume=True)`` restores every state, random generators included, so the run
continues exactly as if it had not stopped.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from rid_fast.distill.distiller import Distiller
from rid_fast.distill.methods import method_options
from rid_fast.train import checkpoint
from rid_fast.train.config import ExperimentConfig, to_dict
from rid_fast.train.data import Dataset, Split, load_dataset, split
from rid_fast.train.models import build_model
from rid_fast.train.supervised import (
    accuracy,
    batch_indices,
    build_optimizer,
    learning_rate,
    random_crop_flip,
    resolve_device,
    seed_everything,
    set_learning_rate,
)
from rid_fast.train.teachers import make_teacher

__all__ = ["Trainer", "write_csv_atomic", "write_text_atomic"]


def write_text_atomic(text: str, path: Path) -> None:
    """Replace ``path`` with ``text`` atomically (write a sibling, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_csv_atomic(rows: list[dict], path: Path) -> None:
    """All rows under the union of their keys (first-seen order), replaced atomically."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(buffer.getvalue(), path)


class Trainer:
    """Distil a teacher into a student as ``config`` says. ``dataset``, ``split`` and ``teacher``
    may be given to share them between runs (``rid-fast compare`` does)."""

    def __init__(
        self,
        config: ExperimentConfig,
        *,
        dataset: Dataset | None = None,
        data_split: Split | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        self.config = config
        self.out_dir = Path(config.run.out_dir)
        self.device = resolve_device(config.run.device)
        run = config.run
        self.progress = sys.stderr.isatty() if run.progress is None else run.progress

        seed_everything(run.seed)
        self.dataset = dataset or load_dataset(config.data.name, config.data.data_dir)
        self.split = data_split or split(
            self.dataset.y_train, per_class=config.data.per_class, val_fraction=config.data.val_fraction, seed=run.seed
        )
        self.teacher = teacher if teacher is not None else make_teacher(config, self.dataset, self.split, self.device)

        torch.manual_seed(run.seed)  # the student's initialisation depends on the seed only
        student = build_model(config.student.model, self.dataset.input_shape, self.dataset.num_classes)
        torch.manual_seed(run.seed + 1)  # then the method's own modules
        distill = config.distill
        candidates = {
            "weight": distill.method_weights.get(distill.method, distill.weight),
            "kd_temperature": distill.kd_temperature,
            "temperature": distill.temperature,
            "filter_hidden": distill.filter_hidden,
            "n_rounds": distill.n_rounds,
            "filter_fraction": distill.filter_fraction,
            "schedule_unit": distill.schedule_unit,
            "schedule_placement": distill.schedule_placement,
            "variant": distill.variant,
            "redundancy_from_round": distill.redundancy_from_round,
            "min_variance": distill.min_variance,
        }
        self.distiller = Distiller(
            student.to(self.device),
            self.teacher.to(self.device),
            student_layers=distill.student_layers,
            teacher_layers=distill.teacher_layers,
            method=distill.method,
            num_classes=self.dataset.num_classes,
            input_shape=self.dataset.input_shape,
            standardize_teacher=distill.standardize_teacher,
            teacher_noise_fraction=config.teacher.noise_fraction if config.teacher.kind == "noisy" else 0.0,
            noise_seed=run.seed,
            **method_options(distill.method, candidates, strict=False),
        ).to(self.device)
        self.distiller.fit_teacher_statistics(self.dataset.x_train[self.split.teacher].to(self.device))

        self.optimizers = {
            phase: build_optimizer(config.optim, self.distiller.parameters_for(phase))
            for phase in self.distiller.method.phases
        }
        self.total_epochs()  # a schedule that cannot be honoured is refused here, before any training step
        self.history: list[dict] = []
        self.best_val = -math.inf
        self.start_epoch = 0
        self.student_progress = 0.0  # student-phase epochs done: the learning-rate clock

    # ---- data ---------------------------------------------------------------------------------

    def _tensors(self, indices: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (
            (self.dataset.x_train, self.dataset.y_train)
            if indices is not None
            else (self.dataset.x_test, self.dataset.y_test)
        )
        if indices is not None:
            x, y = x[indices], y[indices]
        return x.to(self.device), y.to(self.device)

    # ---- checkpoints --------------------------------------------------------------------------

    def _state(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "config": to_dict(self.config),
            "distiller": self.distiller.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "history": self.history,
            "best_val": self.best_val,
            "student_progress": self.student_progress,
            "rng": checkpoint.rng_state(),
        }

    def _restore(self, state: dict) -> None:
        self.distiller.load_state_dict(state["distiller"])
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        self.history = list(state["history"])
        self.best_val = state["best_val"]
        self.student_progress = state["student_progress"]
        self.start_epoch = state["epoch"] + 1
        checkpoint.set_rng_state(state["rng"])

    # ---- training -----------------------------------------------------------------------------

    def _steps_per_epoch(self) -> int:
        return math.ceil(len(self.split.student) / self.config.optim.batch_size)

    def schedule_length(self) -> int:
        """Length of the method's schedule in its unit (epochs, or steps for a per-step schedule):
        ``optim.epochs`` worth of student updates, plus — with ``distill.equal_student_steps`` —
        the positions the method spends in other phases (RID's filter phases), so every method's
        student gets exactly the same number of updates (:meth:`Distiller.total_for_student`)."""
        epochs = self.config.optim.epochs
        student = epochs * self._steps_per_epoch() if self.distiller.method.schedule_unit == "step" else epochs
        if self.config.distill.equal_student_steps:
            return self.distiller.total_for_student(student)
        self.distiller.phase(0, student)  # checks that the schedule can be honoured over that length
        return student

    def total_epochs(self) -> int:
        """Epochs to run: the schedule's length, in epochs (a per-step schedule's last epoch may
        stop part way)."""
        total = self.schedule_length()
        return math.ceil(total / self._steps_per_epoch()) if self.distiller.method.schedule_unit == "step" else total

    def _teacher_cache(self, x_train: torch.Tensor, budget_bytes: int = 2**30):
        """The frozen teacher's outputs on the (fixed, unaugmented) training set, computed once
        instead of at every step — a third of a small student's training time — when they fit in
        ``budget_bytes``; None otherwise."""
        logits, feats = self.distiller.teacher_outputs(x_train[:1])
        per_input = sum(t[0].numel() * t.element_size() for t in (logits, *feats))
        if per_input * len(x_train) > budget_bytes:
            return None
        chunks = [self.distiller.teacher_outputs(x_train[i : i + 512]) for i in range(0, len(x_train), 512)]
        return torch.cat([c[0] for c in chunks]), [torch.cat([c[1][k] for c in chunks]) for k in range(len(feats))]

    def measure_pid(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> dict[str, float]:
        """PID of every distilled layer pair on ``(x, y)``, the test set by default (see
        :mod:`rid_fast.train.measure`)."""
        from rid_fast.train.measure import layer_pids

        if (x is None) != (y is None):
            raise ValueError("measure_pid takes x and y together (or neither, for the test set)")
        if not self.config.distill.teacher_layers:
            return {}
        if x is None:
            x, y = self._tensors(None)
        run = self.config.run
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # measuring must not change what training draws next
            return layer_pids(self.distiller, x, y, n_components=run.pid_components, n_clusters=run.pid_clusters)

    def train(self, *, resume: bool = False, step_callback=None) -> dict:
        """Run the remaining epochs; returns the last metrics row. ``step_callback(epoch, step,
        out)`` sees every step's output dict (tests use it)."""
        config, run = self.config, self.config.run
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(yaml.safe_dump(to_dict(config), sort_keys=False), self.out_dir / "config.yaml")
        ckpt_dir = self.out_dir / "ckpt"
        if resume:
            self._restore(checkpoint.load(ckpt_dir / "latest.pt", map_location=self.device))
        x_train, y_train = self._tensors(self.split.student)
        x_val, y_val = self._tensors(self.split.validation)
        x_test, y_test = self._tensors(None)
        batch_size = config.optim.batch_size
        steps_per_epoch = self._steps_per_epoch()
        epochs, total = self.total_epochs(), self.schedule_length()
        per_step = self.distiller.method.schedule_unit == "step"
        augment = config.data.augment and x_train.dim() == 4
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.amp and self.device.type == "cuda")

        teacher_cache = None if augment else self._teacher_cache(x_train)
        best_state = None  # the state at a new best validation accuracy, until the next checkpoint write
        bar = tqdm(range(self.start_epoch, epochs), desc=config.distill.method, disable=not self.progress)
        for epoch in bar:
            started = time.perf_counter()
            # One clock for every phase's optimizer: the student's progress, so that its learning
            # rate follows the same schedule whatever time a method spends in other phases.
            lr = learning_rate(config.optim, self.student_progress)
            for optimizer in self.optimizers.values():
                set_learning_rate(optimizer, lr)
            self.distiller.train()
            sums: dict[str, float] = defaultdict(float)
            counts: dict[str, int] = defaultdict(int)
            phases = []
            correct = seen = 0
            for step, idx in enumerate(batch_indices(len(x_train), batch_size, seed=run.seed, epoch=epoch)):
                position = epoch * steps_per_epoch + step if per_step else epoch
                if position >= total:  # a per-step schedule may end part way through its last epoch
                    break
                phase = self.distiller.phase(position, total)
                inputs = random_crop_flip(x_train[idx]) if augment else x_train[idx]
                cached = None if teacher_cache is None else (teacher_cache[0][idx], [f[idx] for f in teacher_cache[1]])
                with autocast:
                    out = self.distiller(inputs, y_train[idx], position=position, total=total, teacher_outputs=cached)
                optimizer = self.optimizers[phase]
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                if config.optim.grad_clip:
                    nn.utils.clip_grad_norm_(
                        [p for group in optimizer.param_groups for p in group["params"]], config.optim.grad_clip
                    )
                optimizer.step()
                if step_callback is not None:
                    step_callback(epoch, step, out)
                for key, value in out.items():
                    if key != "logits":
                        sums[f"{phase}/{key}"] += float(value.detach())
                        counts[f"{phase}/{key}"] += 1
                if phase == "student":
                    correct += int((out["logits"].argmax(1) == y_train[idx]).sum())
                    seen += len(idx)
                    self.student_progress += 1.0 / steps_per_epoch
                phases.append(phase)
            row = {"epoch": epoch + 1, "phase": "/".join(dict.fromkeys(phases)), "lr": lr}
            row.update({key: sums[key] / counts[key] for key in sums})
            if seen:
                row["train_acc"] = 100.0 * correct / seen
            if (epoch + 1) % max(run.eval_every, 1) == 0 or epoch + 1 == epochs:
                row["val_acc"] = accuracy(self.distiller.student, x_val, y_val)
                row["test_acc"] = accuracy(self.distiller.student, x_test, y_test)
            if run.pid_every > 0 and ((epoch + 1) % run.pid_every == 0 or epoch + 1 == epochs):
                row.update(self.measure_pid(x_val, y_val))
            row["seconds"] = time.perf_counter() - started
            self.history.append(row)
            write_csv_atomic(self.history, self.out_dir / "metrics.csv")
            if row.get("val_acc", -math.inf) > self.best_val:
                self.best_val = row["val_acc"]
                best_state = self._state(epoch)
            if (run.checkpoint_every and (epoch + 1) % run.checkpoint_every == 0) or epoch + 1 == epochs:
                checkpoint.save_atomic(self._state(epoch), ckpt_dir / "latest.pt")
                if best_state is not None:
                    checkpoint.save_atomic(best_state, ckpt_dir / "best.pt")
                    best_state = None
            bar.set_postfix({k: f"{row[k]:.1f}" for k in ("val_acc", "test_acc") if k in row})
        return self.history[-1] if self.history else {}
