"""Tests in several processes: a worker function run in a gloo process group on the CPU."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def spawn(worker, *args, world_size: int = 2) -> None:
    """``worker(rank, *args)`` in ``world_size`` spawned processes joined in a gloo process group
    (one thread each); an exception in any of them fails the caller."""
    mp.spawn(_join, args=(world_size, _free_port(), worker, args), nprocs=world_size, join=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank, world_size, port, worker, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()
