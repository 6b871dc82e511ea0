"""Data-parallel training under ``torchrun``: the processes, their devices and what they share.

``torchrun --nproc_per_node K -m rid_fast.cli train --config FILE`` starts K processes; each finds
its place in the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). :func:`data_parallel` joins them in one process group — gloo
when the run is on the CPU, NCCL on CUDA (process ``LOCAL_RANK`` on ``cuda:LOCAL_RANK``) — for
the duration of a ``with`` block, and leaves it on the way out, also on an error or Ctrl-C.

The trainer reads :func:`current` and then:

* splits every global batch of ``optim.batch_size`` inputs into K equal, contiguous shards
  (:func:`shard`): the same batches as one process, so the same config is the same optimisation
  problem whatever K; :func:`check_global_batch` refuses a batch (or an epoch's last batch) that
  K processes cannot split evenly;
* averages the gradients of every trainable module (``DistributedDataParallel``), normalises with
  the statistics of the global batch (:mod:`rid_fast.train.sync_batchnorm`), and sums logged
  values and accuracy counts over the processes (:func:`all_reduce_sum`);
* seeds each process's random generators with its own seed (:func:`process_seed`), so that the
  shards do not draw the same noise, and saves every process's generator states
  (:func:`gather`);
* lets process 0 make the teacher and sends it to the others (:func:`broadcast_module`), and
  lets process 0 alone write files.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "Processes",
    "TORCHRUN_VARIABLES",
    "launched_by_torchrun",
    "data_parallel",
    "current",
    "process_device",
    "check_global_batch",
    "shard",
    "process_seed",
    "all_reduce_sum",
    "gather",
    "broadcast_module",
]

#: What torchrun sets in each process's environment; a process with ``WORLD_SIZE`` set was
#: started by it (or by a launcher that follows the same convention).
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: Process 0 trains the teacher while the others wait in a collective; a default timeout (30
#: minutes for gloo, 10 for NCCL) would end a run whose teacher takes longer to train.
_TIMEOUT = datetime.timedelta(hours=24)


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes: ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        """Process 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun with more than one process (a ``WORLD_SIZE``
    that is not a number counts: :func:`data_parallel` then says what is wrong with it)."""
    raw = os.environ.get("WORLD_SIZE", "")
    return raw != "" and (not raw.isdigit() or int(raw) > 1)


def _environment() -> dict[str, int | str]:
    """torchrun's variables, checked: every one present, the numbers whole and consistent."""
    missing = [name for name in TORCHRUN_VARIABLES if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: start several "
            "processes with torchrun (torchrun --nproc_per_node K -m rid_fast.cli train ...)"
        )
    values: dict[str, int | str] = {"MASTER_ADDR": os.environ["MASTER_ADDR"]}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        raw = os.environ[name]
        if not raw.isdigit():
            raise ValueError(f"environment variable {name} must be a whole number ≥ 0; got {raw!r}")
        values[name] = int(raw)
    if not values["RANK"] < values["WORLD_SIZE"]:
        raise ValueError(
            f"environment variable RANK must be below WORLD_SIZE ({values['WORLD_SIZE']}); got {values['RANK']}"
        )
    return values


def process_device(name: str, local_rank: int) -> torch.device:
    """The device of process ``local_rank`` on its machine, for ``run.device`` = ``name``: the CPU,
    or ``cuda:LOCAL_RANK`` (one GPU per process) for ``cuda`` and, where CUDA is available, ``auto``."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ValueError(
            f"run.device is {name!r}, one device, but each process of a torchrun launch takes its own "
            "(cuda:LOCAL_RANK): set run.device=cuda, auto or cpu"
        )
    if not torch.cuda.is_available():
        raise ValueError(f"run.device is {name!r} but no CUDA device is available")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"run.device: process LOCAL_RANK={local_rank} needs cuda:{local_rank} but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s): start at most that many processes per machine"
        )
    return torch.device("cuda", local_rank)


@contextmanager
def data_parallel(device_name: str) -> Iterator[Processes]:
    """Inside, this process is one of torchrun's (``run.device`` = ``device_name`` picks gloo or
    NCCL); without torchrun, a single process and nothing to set up. The process group is left on
    the way out, whatever ends the block."""
    if not launched_by_torchrun():
        yield Processes()
        return
    env = _environment()
    device = process_device(device_name, int(env["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives and all_gather_object use the current device
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        timeout=_TIMEOUT,
        **({"device_id": device} if device.type == "cuda" else {}),
    )
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def current() -> Processes:
    """This process's place in the process group, or a single process when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return Processes()
    return Processes(dist.get_rank(), dist.get_world_size())


def check_global_batch(batch_size: int, n_inputs: int, world_size: int) -> None:
    """``optim.batch_size`` is the global batch: every batch of an epoch over ``n_inputs`` inputs,
    its last (possibly smaller) one included, must split into ``world_size`` equal shards, so that
    averaging the processes' gradients gives the gradient of the global batch's mean loss."""
    if batch_size % world_size:
        raise ValueError(
            f"optim.batch_size = {batch_size} is the global batch, split evenly over the {world_size} processes: "
            f"it must be a multiple of {world_size}"
        )
    last = n_inputs % batch_size
    if last % world_size:
        raise ValueError(
            f"the last batch of every epoch holds {n_inputs} mod {batch_size} = {last} of the student's {n_inputs} "
            f"training inputs, which {world_size} processes cannot split evenly: choose optim.batch_size or "
            f"data.per_class so that it is a multiple of {world_size}"
        )


def shard(batch: torch.Tensor, processes: Processes) -> torch.Tensor:
    """This process's contiguous share of a global batch of indices (equal shares, see
    :func:`check_global_batch`)."""
    return batch.tensor_split(processes.world_size)[processes.rank] if processes.parallel else batch


def process_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s random generators in a run seeded ``seed``: NumPy's
    ``SeedSequence`` spawn key, so that the processes' streams are independent of each other and of
    the run's other seeds."""
    return int(np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1, np.uint32)[0])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes (in place; returned for chaining)."""
    if current().parallel:
        dist.all_reduce(tensor)
    return tensor


def gather(value: Any) -> list[Any]:
    """Every process's ``value`` (picklable), in rank order; every process must call it."""
    if not current().parallel:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Give ``module`` (on every process, same architecture) process 0's parameters and buffers."""
    if current().parallel:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)
