"""What the processes of tests/test_distributed.py run: one spawn per world size, every case inside.

Each case builds the *global* batch from a seed (every process can, and the test's own process
does, for the single-process truth), gives each process its rows, and records per process the
estimate's value and the gradients of the replicated leaves (two encoder matrices and the
temperature) as DDP would hold them before averaging. ``run_world`` spawns the processes (gloo,
a free local port) and returns every process's records.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rid_fast.mi import functional
from rid_fast.mi.critics import BilinearCritic, ConcatCritic
from rid_fast.mi.estimators import MINE, InfoNCE

#: (label, estimator name, options) of every functional estimator.
ESTIMATORS = (
    ("infonce", "infonce", {}),
    ("infonce_symmetric", "infonce", {"symmetric": True}),
    ("nwj", "nwj", {}),
    ("dv", "dv", {}),
    ("smile", "smile", {"clip": 1.5}),  # a clip the scores cross, so both sides of it are exercised
    ("smile_clipped_dv", "smile", {"clip": 1.5, "gradient": "clipped_dv"}),
    ("js", "js", {}),
)
GATHERS = ("ring", "all_gather")
CRITICS = ("dot", "cosine")
RAW_DIM, DIM = 5, 3
TEMPERATURE = 0.5


@dataclass
class Case:
    """One estimate over a global batch split into ``sizes`` rows per process."""

    label: str
    sizes: tuple[int, ...]
    seed: int
    gather: str = "ring"
    critic: str = "dot"
    module: str | None = None  # "mine" or "infonce_bilinear": an estimator module instead of a function
    dtype: torch.dtype = torch.float64

    @property
    def name(self) -> str:
        return f"{self.label}-{self.module or self.critic}-{self.gather}-{'x'.join(map(str, self.sizes))}"


@dataclass
class Leaves:
    """The replicated leaves: encoders x = xr A, y = yr C, the temperature, and a module if any."""

    encoder_x: torch.Tensor
    encoder_y: torch.Tensor
    temperature: torch.Tensor
    module: torch.nn.Module | None = None
    grads: dict = field(default_factory=dict)


def global_batch(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rows (Σ sizes, RAW_DIM) of x and y, y_i correlated with x_i."""
    gen = torch.Generator().manual_seed(case.seed)
    n = sum(case.sizes)
    xr = torch.randn(n, RAW_DIM, generator=gen, dtype=torch.float64)
    yr = 0.8 * xr + 0.6 * torch.randn(n, RAW_DIM, generator=gen, dtype=torch.float64)
    return xr.to(case.dtype), yr.to(case.dtype)


def make_leaves(case: Case) -> Leaves:
    gen = torch.Generator().manual_seed(1000 + case.seed)
    encoder_x = (torch.randn(RAW_DIM, DIM, generator=gen, dtype=torch.float64) / 2).to(case.dtype)
    encoder_y = (torch.randn(RAW_DIM, DIM, generator=gen, dtype=torch.float64) / 2).to(case.dtype)
    module = None
    torch.manual_seed(2000 + case.seed)  # the modules' initial weights
    if case.module == "mine":
        module = MINE(BilinearCritic(DIM, DIM, temperature=TEMPERATURE, learnable_temperature=True), impl="torch")
    elif case.module == "infonce_bilinear":
        module = InfoNCE(BilinearCritic(DIM, DIM, temperature=TEMPERATURE, learnable_temperature=True), impl="torch")
    if module is not None:
        module = module.to(case.dtype)
        for parameter in module.parameters():
            parameter.data.add_(torch.randn(parameter.shape, dtype=parameter.dtype) / 4)
    return Leaves(
        encoder_x.requires_grad_(True),
        encoder_y.requires_grad_(True),
        torch.tensor(TEMPERATURE, dtype=case.dtype, requires_grad=True),
        module,
    )


def estimate(case: Case, leaves: Leaves, xr: torch.Tensor, yr: torch.Tensor, group=None) -> torch.Tensor:
    """The case's estimate of the rows ``xr``, ``yr`` (a process's, or the whole batch's with no group)."""
    x, y = xr @ leaves.encoder_x, yr @ leaves.encoder_y
    if leaves.module is not None:
        leaves.module.group, leaves.module.gather = group, case.gather
        return leaves.module(x, y)
    _, name, options = next(entry for entry in ESTIMATORS if entry[0] == case.label)
    return functional.mi_bound(
        x, y, name, temperature=leaves.temperature, critic=case.critic, impl="torch", group=group,
        gather=case.gather, **options,
    )  # fmt: skip


def value_and_grads(case: Case, group=None) -> dict:
    """Value and gradients of every replicated leaf: of this process's rows under ``group``, of the
    whole batch without. A MINE module takes one training step first (its average starts at the
    first step's partition), so the second step's corrected gradient is the one compared."""
    xr, yr = global_batch(case)
    if group is not None:
        rank = dist.get_rank(group)
        start = sum(case.sizes[:rank])
        xr, yr = xr[start : start + case.sizes[rank]], yr[start : start + case.sizes[rank]]
    leaves = make_leaves(case)
    if case.module == "mine":
        estimate(case, leaves, xr, yr, group).backward()
    named = {"encoder_x": leaves.encoder_x, "encoder_y": leaves.encoder_y, "temperature": leaves.temperature}
    if leaves.module is not None:
        named = {"encoder_x": leaves.encoder_x, "encoder_y": leaves.encoder_y}
        named |= {f"module.{name}": p for name, p in leaves.module.named_parameters()}
    value = estimate(case, leaves, xr, yr, group)
    grads = torch.autograd.grad(value, list(named.values()), allow_unused=True)
    return {
        "value": value.detach(),
        "grads": {n: (g if g is not None else torch.zeros_like(p)).detach() for (n, p), g in zip(named.items(), grads)},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, job: Callable, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    try:
        result = job(dist.group.WORLD)
    except BaseException:  # the test reports it
        result = {"crashed": traceback.format_exc()}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_world(world: int, job: Callable) -> list:
    """``job(group)`` on each of ``world`` processes (gloo); every process's return value, by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world, _free_port(), job, out_dir), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# ---- the jobs --------------------------------------------------------------------------------


def cases_for(sizes: tuple[int, ...]) -> list[Case]:
    """Every estimator × gather × critic on ``sizes``, and the two modules (MINE and a bilinear InfoNCE)."""
    cases = [
        Case(label, sizes, seed, gather, critic)
        for seed, (label, _, _) in enumerate(ESTIMATORS)
        for gather in GATHERS
        for critic in CRITICS
    ]
    cases += [Case("mine", sizes, 20, gather, module="mine") for gather in GATHERS]
    cases += [Case("infonce", sizes, 21, gather, module="infonce_bilinear") for gather in GATHERS]
    return cases


def estimates_job(sizes: tuple[int, ...]) -> Callable:
    return _EstimatesJob(sizes)


@dataclass
class _EstimatesJob:
    sizes: tuple[int, ...]

    def __call__(self, group) -> dict:
        results = {case.name: value_and_grads(case, group) for case in cases_for(self.sizes)}
        results["errors"] = _errors(group)
        results["largest"] = _largest(group)
        return results


def _call_error(call: Callable) -> str:
    """``"TypeName: message"`` of what ``call()`` raises, or ``"no error"``."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - recorded for the test
        return f"{type(error).__name__}: {error}"
    return "no error"


def _errors(group) -> dict:
    """What each bad call raises on this process (every process must raise: none may hang)."""
    rank = dist.get_rank(group)
    x = torch.randn(4, DIM, dtype=torch.float64)
    y = torch.randn(4, DIM, dtype=torch.float64)
    bad = x.clone()
    if rank == 1:
        bad[0, 0] = math.nan
    return {
        "temperature": _call_error(lambda: functional.nwj(x, y, temperature=0.5 + rank, group=group)),
        "estimator": _call_error(lambda: functional.mi_bound(x, y, "dv" if rank else "nwj", group=group)),
        "dtype": _call_error(lambda: functional.js(x if rank else x.float(), y if rank else y.float(), group=group)),
        "nan_on_one": _call_error(lambda: functional.infonce(bad, y, group=group)),
        "extra_keys": _call_error(lambda: functional.infonce(x, torch.cat([y, y[:1]]), group=group)),
        "extra_keys_on_one": _call_error(lambda: functional.dv(x, torch.cat([y, y[:rank]]), group=group)),
        "concat": _call_error(lambda: InfoNCE(ConcatCritic(DIM, DIM, hidden=4).double(), group=group)(x, y)),
        "reference": _call_error(lambda: functional.dv(x, y, impl="reference", group=group)),
        "gather": _call_error(lambda: functional.dv(x, y, group=group, gather="ring_allreduce")),
        "group": _call_error(lambda: functional.dv(x, y, group="world")),
        "after": _call_error(lambda: functional.dv(x, y, group=group)),  # the group still works
    }


def _largest(group) -> dict:
    """The largest tensor (elements) any op makes on this process in a forward and backward of
    InfoNCE and of NWJ over 32 rows per process, D = 16, per gather mode."""
    from estimator_checks import LargestTensor

    sizes = {}
    for gather in GATHERS:
        for name in ("infonce", "nwj"):
            gen = torch.Generator().manual_seed(dist.get_rank(group))
            x = torch.randn(32, 16, generator=gen).requires_grad_(True)
            y = torch.randn(32, 16, generator=gen).requires_grad_(True)
            with LargestTensor() as mode:
                value = functional.mi_bound(x, y, name, temperature=1.0, impl="torch", group=group, gather=gather)
                value.backward()
            sizes[gather, name] = mode.largest
    return sizes


def kernels_job(sizes: tuple[int, ...]) -> Callable:
    return _KernelsJob(sizes)


@dataclass
class _KernelsJob:
    """Every estimator of the kernel tiers on the Triton backend over the ring, fp32 (run under
    the Triton interpreter): per label, the value and this process's gradients w.r.t. its x and y
    rows and the temperature."""

    sizes: tuple[int, ...]

    def __call__(self, group) -> dict:
        from estimator_checks import KERNEL_ESTIMATORS, correlated_pair

        rank = dist.get_rank(group)
        start, rows = sum(self.sizes[:rank]), self.sizes[rank]
        results = {}
        for label, (name, temperature, options) in KERNEL_ESTIMATORS.items():
            x, y = correlated_pair(sum(self.sizes), sum(self.sizes), 5)
            x = x[start : start + rows].float().requires_grad_(True)
            y = y[start : start + rows].float().requires_grad_(True)
            tau = torch.tensor(temperature, requires_grad=True)
            value = functional.mi_bound(x, y, name, temperature=tau, impl="triton", group=group, **options)
            results[label] = (value.detach(), torch.autograd.grad(value, (x, y, tau)))
        return results
