"""The training loop: one teacher, one student, one distillation method, read top to bottom.

:class:`Trainer` builds everything from an :class:`~rid_fast.train.config.ExperimentConfig`:

1. the dataset and the seeded split (student subset, validation set);
2. the teacher (:mod:`rid_fast.train.teachers`: trained and cached, untrained, or noisy);
3. the student, initialised from the run's seed (identical for every method);
4. the :class:`~rid_fast.Distiller` and one optimizer per phase;

then runs the epochs: each step asks the method which phase it is in (RID alternates filter and
student phases), steps that phase's optimizer, and each epoch ends with an evaluation, a row in
``metrics.csv`` and checkpoints in ``ckpt/`` (:mod:`rid_fast.train.checkpoint`: atomic, with a
content digest): ``latest.pt``, the one before it as ``previous.pt``, and ``best.pt``, the state
at the best validation accuracy so far. The learning rate follows one epoch clock (cosine by
default) for every phase's optimizer. Logged values stay on the device until the epoch ends.

:meth:`Trainer.resume` (and ``train(resume=True)``) restores every state, random generators
included, from the newest intact checkpoint, so the run continues exactly as if it had not
stopped; a checkpoint trained with other settings is refused.

**Several processes.** Inside a process group (``torchrun``, :mod:`rid_fast.train.distributed`)
the same loop runs data-parallel: every process takes its equal shard of each global batch of
``optim.batch_size``, ``DistributedDataParallel`` averages the gradients of the distiller's
trainable parameters (student, filters, heads, estimators), BatchNorms normalise over the global
batch, logged values and accuracies are summed over the processes, and process 0 makes the
teacher, writes every file and measures PID. Each process draws from generators seeded for it;
checkpoints hold every process's generator states, so a run resumes exactly with as many processes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from rid_fast.train import checkpoint, distributed
from rid_fast.train.atomic import write_csv_atomic, write_text_atomic
from rid_fast.train.config import ExperimentConfig, check, from_dict, refuse_changes, to_dict
from rid_fast.train.data import Dataset, Split, load_dataset, split
from rid_fast.train.distillers import (
    build_distiller,
    check_models,
    schedule_length,
    steps_per_epoch,
)
from rid_fast.train.measure import layer_pids
from rid_fast.train.models import build_model
from rid_fast.train.supervised import (
    accuracy,
    batch_indices,
    build_optimizer,
    correct_predictions,
    learning_rate,
    random_crop_flip,
    resolve_device,
    seed_everything,
    set_learning_rate,
)
from rid_fast.train.teachers import make_teacher

__all__ = ["Trainer", "ResumeWarning", "CHECKPOINT_NAMES"]

#: A run's checkpoints in ``RUN_DIR/ckpt``: the newest state, the one before it, and the state at
#: the best validation accuracy. Resuming takes the newest intact one of them.
CHECKPOINT_NAMES = ("latest.pt", "previous.pt", "best.pt")


class ResumeWarning(UserWarning):
    """A checkpoint of the resumed run could not be used (the run resumed from the newest intact one)."""


class _EpochLog:
    """Sums of one epoch's logged values, kept on the device. Reading a GPU value on the host
    waits for the GPU to finish (a sync), so the values are read once, at the end of the epoch,
    in one transfer, not once per key per step."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, key: str, value: torch.Tensor, count: int = 1) -> None:
        """Add ``value`` (a 0-dim tensor, the sum over ``count`` items) to ``key``'s sum."""
        value = value.detach().to(torch.float64)
        self.sums[key] = value if key not in self.sums else self.sums[key] + value
        self.counts[key] += count

    def means(self) -> dict[str, float]:
        """Every key's mean over its items, summed over the processes of a data-parallel run
        (every process logs the same keys in the same order); one device-to-host transfer."""
        if not self.sums:
            return {}
        totals = torch.stack(list(self.sums.values()))
        counts = torch.tensor([self.counts[key] for key in self.sums], dtype=torch.float64, device=totals.device)
        both = distributed.all_reduce_sum(torch.stack([totals, counts])).tolist()
        return {key: total / count for key, total, count in zip(self.sums, *both)}


class Trainer:
    """Distil a teacher into a student as ``config`` says. ``dataset``, ``split`` and ``teacher``
    may be given to share them between runs (``rid-fast compare`` does). Every config value is
    checked, and the models built once on the side, before a teacher trains. Inside a process
    group of several processes (:func:`rid_fast.train.distributed.data_parallel`) it trains
    data-parallel (module notes)."""

    def __init__(
        self,
        config: ExperimentConfig,
        *,
        dataset: Dataset | None = None,
        data_split: Split | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        check(config)
        self.config = config
        self.out_dir = Path(config.run.out_dir)
        self.processes = distributed.current()
        if distributed.launched_by_torchrun() and not self.processes.parallel:
            raise ValueError(
                "started by torchrun (WORLD_SIZE > 1) outside a process group: train with rid-fast train / "
                "python -m rid_fast.cli train, or inside rid_fast.train.distributed.data_parallel(run.device)"
            )
        self.device = (
            distributed.process_device(config.run.device, int(os.environ.get("LOCAL_RANK", "0")))
            if self.processes.parallel
            else resolve_device(config.run.device)
        )
        run = config.run
        self.progress = (sys.stderr.isatty() if run.progress is None else run.progress) and self.processes.main

        seed_everything(run.seed)
        self.dataset = dataset or load_dataset(config.data.name, config.data.data_dir)
        self.split = data_split or split(
            self.dataset.y_train, per_class=config.data.per_class, val_fraction=config.data.val_fraction, seed=run.seed
        )
        distributed.check_global_batch(config.optim.batch_size, len(self.split.student), self.processes.world_size)
        if teacher is None:
            check_models(config, self.dataset, self._steps_per_epoch())
            teacher = self._make_teacher()
        self.teacher = teacher
        self.distiller = build_distiller(config, self.dataset, self.teacher, self.device, self.processes)
        self.distiller.fit_teacher_statistics(self.dataset.x_train[self.split.teacher].to(self.device))
        self._parallel_distiller: DistributedDataParallel | None = None

        self.optimizers = {
            phase: build_optimizer(config.optim, self.distiller.parameters_for(phase))
            for phase in self.distiller.method.phases
        }
        self.total_epochs()  # a schedule that cannot be honoured is refused here, before any training step
        self.history: list[dict] = []
        self.best_val = -math.inf
        self.start_epoch = 0
        self.student_progress = 0.0  # student-phase epochs done: the learning-rate clock
        if self.processes.parallel:  # each process its own draws (noise, augmentation) from here on
            seed_everything(distributed.process_seed(run.seed, self.processes.rank))

    def _make_teacher(self) -> nn.Module:
        """The config's teacher; among several processes, made (trained, or read from the cache) by
        process 0 alone and sent to the others, which wait: no two processes write the cache file."""
        config = self.config
        if self.processes.main:
            teacher = make_teacher(config, self.dataset, self.split, self.device)
        else:
            teacher = build_model(config.teacher.model, self.dataset.input_shape, self.dataset.num_classes)
            teacher = teacher.to(self.device).eval()
        distributed.broadcast_module(teacher)
        return teacher

    @classmethod
    def resume(cls, config: ExperimentConfig) -> Trainer:
        """The run in ``config.run.out_dir``, restored from its newest intact checkpoint, ready to
        :meth:`train` on. Nothing is trained before: the teacher, like every other weight, comes
        from the checkpoint. The checkpoint must have been trained with ``config`` (up to the
        values a resumed run may change, see :func:`rid_fast.train.config.resume_config`)."""
        check(config)
        state = cls._newest_state(Path(config.run.out_dir), config, distributed.current().world_size)
        dataset = load_dataset(config.data.name, config.data.data_dir)
        architecture = build_model(config.teacher.model, dataset.input_shape, dataset.num_classes)
        trainer = cls(config, dataset=dataset, teacher=architecture)
        trainer._restore(state)
        return trainer

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

    def _state(self, epoch: int) -> dict | None:
        """The run's state after ``epoch``, on process 0 (None on the others). Every process must
        call it: it gathers their random generator states."""
        rng = distributed.gather(checkpoint.rng_state())
        if not self.processes.main:
            return None
        return {
            "epoch": epoch,
            "config": to_dict(self.config),
            "distiller": self.distiller.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            # One JSON string rather than a list of per-epoch dicts: the history grows with every
            # epoch, and pickling and digesting its thousands of numbers one object at a time
            # took most of a checkpoint's time. JSON writes floats exactly (shortest repr).
            "history": json.dumps(self.history),
            "best_val": self.best_val,
            "student_progress": self.student_progress,
            "rng": rng[0],
            # Among several processes, each one's generators (one process: the states of "rng").
            **({"process_rngs": rng} if self.processes.parallel else {}),
        }

    def _restore(self, state: dict) -> None:
        self.distiller.load_state_dict(state["distiller"])
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        self.history = json.loads(state["history"])
        self.best_val = state["best_val"]
        self.student_progress = state["student_progress"]
        self.start_epoch = state["epoch"] + 1
        rngs = state["process_rngs"][self.processes.rank] if self.processes.parallel else state["rng"]
        checkpoint.set_rng_state(rngs)

    @staticmethod
    def _newest_state(out_dir: Path, config: ExperimentConfig, world_size: int = 1) -> dict:
        """The newest intact checkpoint of the run in ``out_dir`` (a :class:`ResumeWarning` names
        every checkpoint that could not be used, and the one taken), after checking it was trained
        with ``config``.
        Raises :class:`~rid_fast.train.checkpoint.CheckpointError` naming every file when none is intact."""
        ckpt_dir = out_dir / "ckpt"
        try:
            state, path, problems = checkpoint.load_newest([ckpt_dir / name for name in CHECKPOINT_NAMES])
        except checkpoint.CheckpointError as error:
            raise checkpoint.CheckpointError(f"cannot resume {str(out_dir)!r}: {error}") from None
        for key in ("epoch", "config", "distiller", "optimizers", "history", "rng"):
            if key not in state:
                raise checkpoint.CheckpointError(f"{path} holds no complete training state (no {key!r})")
        saved_world = len(state.get("process_rngs", [None]))
        if saved_world != world_size:
            how = f"torchrun --nproc_per_node {saved_world} ..." if saved_world > 1 else "without torchrun"
            raise ValueError(
                f"{path} was written by a run of {saved_world} process(es) and this is a run of {world_size}: every "
                f"process's random generators are part of the state, so resume it with {saved_world} ({how})"
            )
        if path.name != CHECKPOINT_NAMES[0] and not problems:
            problems = [f"{ckpt_dir / CHECKPOINT_NAMES[0]} is missing"]
        if problems:
            warnings.warn(f"{'; '.join(problems)}; resuming from {path} (after epoch {state['epoch'] + 1})",
                          ResumeWarning, stacklevel=3)  # fmt: skip
        refuse_changes(from_dict(ExperimentConfig, state["config"]), config, f"resuming from {path} with this config")
        return state

    def _write_checkpoints(self, state: dict | None, best_state: dict | None) -> None:
        if not self.processes.main:
            return
        ckpt_dir = self.out_dir / "ckpt"
        latest, previous, best = (ckpt_dir / name for name in CHECKPOINT_NAMES)
        checkpoint.save_atomic(state, latest, keep_previous=previous)
        if best_state is not None:
            checkpoint.save_atomic(best_state, best)

    # ---- training -----------------------------------------------------------------------------

    def _steps_per_epoch(self) -> int:
        return steps_per_epoch(self.config, self.split)

    def schedule_length(self) -> int:
        """Length of the method's schedule in its unit (:func:`~rid_fast.train.distillers.schedule_length`)."""
        return schedule_length(self.config, self.distiller, self._steps_per_epoch())

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
        """Run the remaining epochs; returns the last metrics row. ``resume``: first restore the
        newest intact checkpoint of ``run.out_dir`` (see :meth:`resume`, which also skips building
        the teacher). ``step_callback(epoch, step, out)`` sees every step's output dict (tests use it)."""
        config, run = self.config, self.config.run
        main = self.processes.main
        if resume:
            self._restore(self._newest_state(self.out_dir, config, self.processes.world_size))
        if self.start_epoch == 0 and main:  # a fresh run: an earlier run's checkpoints must not pass for its own
            for name in CHECKPOINT_NAMES:
                (self.out_dir / "ckpt" / name).unlink(missing_ok=True)
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(yaml.safe_dump(to_dict(config), sort_keys=False), self.out_dir / "config.yaml")
        model = self._data_parallel()
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
        best_state = None  # a copy of the state at a new best validation accuracy, until the next checkpoint write
        bar = tqdm(range(self.start_epoch, epochs), desc=config.distill.method, disable=not self.progress)
        for epoch in bar:
            started = time.perf_counter()
            # One clock for every phase's optimizer: the student's progress, so that its learning
            # rate follows the same schedule whatever time a method spends in other phases.
            lr = learning_rate(config.optim, self.student_progress)
            for optimizer in self.optimizers.values():
                set_learning_rate(optimizer, lr)
            self.distiller.train()
            log = _EpochLog()
            phases = []
            for step, batch in enumerate(batch_indices(len(x_train), batch_size, seed=run.seed, epoch=epoch)):
                position = epoch * steps_per_epoch + step if per_step else epoch
                if position >= total:  # a per-step schedule may end part way through its last epoch
                    break
                idx = distributed.shard(batch, self.processes)  # this process's share of the global batch
                phase = self.distiller.phase(position, total)
                inputs = random_crop_flip(x_train[idx]) if augment else x_train[idx]
                cached = None if teacher_cache is None else (teacher_cache[0][idx], [f[idx] for f in teacher_cache[1]])
                with autocast:
                    out = model(inputs, y_train[idx], position=position, total=total, teacher_outputs=cached)
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
                        log.add(f"{phase}/{key}", value)
                if phase == "student":
                    log.add("train_acc", 100.0 * (out["logits"].argmax(1) == y_train[idx]).sum(), count=len(idx))
                    self.student_progress += 1.0 / steps_per_epoch
                phases.append(phase)
            row = {"epoch": epoch + 1, "phase": "/".join(dict.fromkeys(phases)), "lr": lr}
            means = log.means()
            train_acc = means.pop("train_acc", None)
            row.update(means)
            if train_acc is not None:
                row["train_acc"] = train_acc
            if (epoch + 1) % run.eval_every == 0 or epoch + 1 == epochs:
                row["val_acc"] = self._accuracy(x_val, y_val)
                row["test_acc"] = self._accuracy(x_test, y_test)
            if run.pid_every > 0 and ((epoch + 1) % run.pid_every == 0 or epoch + 1 == epochs) and main:
                row.update(self.measure_pid(x_val, y_val))  # process 0's rows are the ones written
            row["seconds"] = time.perf_counter() - started
            self.history.append(row)
            if main:
                write_csv_atomic(self.history, self.out_dir / "metrics.csv")
            checkpoint_now = (run.checkpoint_every and (epoch + 1) % run.checkpoint_every == 0) or epoch + 1 == epochs
            if row.get("val_acc", -math.inf) > self.best_val:
                self.best_val = row["val_acc"]
                # A copy: the live state changes in the epochs until the next checkpoint write.
                best_state = self._state(epoch) if checkpoint_now else copy.deepcopy(self._state(epoch))
            if checkpoint_now:
                self._write_checkpoints(self._state(epoch), best_state)
                best_state = None
            bar.set_postfix({k: f"{row[k]:.1f}" for k in ("val_acc", "test_acc") if k in row})
        return self.history[-1] if self.history else {}

    def _data_parallel(self) -> nn.Module:
        """What a training step calls: the distiller, or among several processes the distiller in
        ``DistributedDataParallel`` (made once, after any restore: it starts every process from
        process 0's weights). RID's phases train disjoint parameters, and parts of a step run
        without gradients, so some parameters are unused in any step (``find_unused_parameters``)."""
        if not self.processes.parallel:
            return self.distiller
        if self._parallel_distiller is None:
            self._parallel_distiller = DistributedDataParallel(
                self.distiller,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        return self._parallel_distiller

    def _accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The student's top-1 accuracy (percent) on ``(x, y)``; among several processes each
        counts its shard and the counts are summed, exactly."""
        if not self.processes.parallel:
            return accuracy(self.distiller.student, x, y)
        mine = distributed.shard(torch.arange(len(x)), self.processes).to(x.device)
        correct = torch.tensor(correct_predictions(self.distiller.student, x[mine], y[mine]), dtype=torch.float64)
        return 100.0 * distributed.all_reduce_sum(correct.to(self.device)).item() / max(len(x), 1)
