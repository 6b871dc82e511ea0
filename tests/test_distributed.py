"""Estimators across processes (``group=``): gloo on CPUs, processes spawned here, one spawn per
world size running every case (tests/distributed_worker.py).

Every estimator × ``gather`` × critic (and the MINE and bilinear-InfoNCE modules), at 2 processes
with 4 rows each and at 4 processes with ragged 3, 1, 4, 2 rows: the value, the same on every
process to the bit, equals the single-process estimate on the concatenated batch, and the
gradients of the replicated leaves (encoders, temperature, critic weights) averaged over the
processes as DDP does equal the single-process gradients. All in float64, to the project's fp64
contract (1e-9 relative; the two computations differ only in the order of their sums).
Bad calls raise on every process instead of hanging, and the ring's largest tensor does not grow
with the number of processes while the all-gather's does.

Cost: two spawns (2 and 4 processes) for the whole module, most of their time spent importing
torch in each process; the cases themselves are a few rows each.
"""

from __future__ import annotations

import pytest
import torch
from distributed_worker import cases_for, estimates_job, run_world, value_and_grads

#: Rows per process, by world size.
SIZES = {2: (4, 4), 4: (3, 1, 4, 2)}
#: The fp64 contract (tests/estimator_checks.py): agreement to 1e-9 relative to the quantity's scale.
RTOL = 1e-9

_RESULTS: dict[int, list] = {}


def _world(world: int) -> list:
    """Every process's records at ``world`` processes (spawned once per module run)."""
    if world not in _RESULTS:
        _RESULTS[world] = run_world(world, estimates_job(SIZES[world]))
        crashed = [r["crashed"] for r in _RESULTS[world] if "crashed" in r]
        assert not crashed, crashed[0]
    return _RESULTS[world]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(float(expected.abs().max()), 1.0)
    error = float((actual - expected).abs().max())
    assert error <= RTOL * scale, f"{what}: off by {error:.3g} (scale {scale:.3g})"


CASES = [(world, case) for world, sizes in SIZES.items() for case in cases_for(sizes)]


@pytest.mark.parametrize("world, case", CASES, ids=[f"W{world}-{case.name}" for world, case in CASES])
def test_global_estimate_and_ddp_gradients(world, case):
    per_process = [records[case.name] for records in _world(world)]
    truth = value_and_grads(case)  # one process, the whole batch
    values = [float(r["value"]) for r in per_process]
    assert values == [values[0]] * world, f"processes disagree on the value: {values}"
    _close(per_process[0]["value"], truth["value"], "value")
    for name, expected in truth["grads"].items():
        averaged = sum(r["grads"][name] for r in per_process) / world  # what DDP does
        _close(averaged, expected, f"gradient of {name}")


#: Bad call → (what the processes that caused it raise, what the others raise); None: the same.
ERRORS = {
    "temperature": ("ValueError: the processes of the group disagree on the temperature", None),
    "estimator": ("ValueError: the processes of the group disagree on the estimator", None),
    "dtype": ("ValueError: the processes of the group disagree on the dtype", None),
    "nan_on_one": ("ValueError: x contains 1 non-finite value", "ValueError: process(es) [1] of the group rejected"),
    "extra_keys": ("ValueError: under group=, each process's y must have as many rows as its x", None),
    "extra_keys_on_one": (
        "ValueError: under group=, each process's y must have as many rows as its x",
        "ValueError: process(es) [1",
    ),
    "concat": ("NotImplementedError: ConcatCritic", None),
    "reference": ("ValueError: impl='reference' reduces one process's", None),
    "gather": ("ValueError: gather must be one of 'ring', 'all_gather'", None),
    "group": ("TypeError: group must be None or a torch.distributed ProcessGroup", None),
    "after": ("no error", None),
}
#: The processes that cause each bad call (the others only take part); all when not listed.
CAUSED_BY = {"nan_on_one": {1}, "extra_keys_on_one": {1, 2, 3}}


@pytest.mark.parametrize("world", sorted(SIZES))
@pytest.mark.parametrize("call", sorted(ERRORS))
def test_bad_calls_raise_on_every_process(world, call):
    """Every process raises (none waits for the others in a collective), with a message that says
    what is wrong; the group still works afterwards ("after")."""
    own, others = ERRORS[call]
    for rank, records in enumerate(_world(world)):
        message = records["errors"][call]
        expected = own if others is None or rank in CAUSED_BY[call] else others
        assert message.startswith(expected), f"process {rank}: {message}"


def test_ring_memory_does_not_grow_with_processes():
    """The largest tensor a process makes in InfoNCE's and NWJ's forward and backward, 32 rows of
    16 features per process: the same at 4 processes as at 2 under the ring, within the larger of
    a key block (32 × 16) and a score tile (32 × 32); under all_gather it grows (the measurement
    sees the keys of every process)."""
    for name in ("infonce", "nwj"):
        ring = {world: max(r["largest"]["ring", name] for r in _world(world)) for world in SIZES}
        gathered = {world: max(r["largest"]["all_gather", name] for r in _world(world)) for world in SIZES}
        assert ring[2] == ring[4] <= max(32 * 16, 32 * 32), (name, ring)
        assert gathered[4] > gathered[2], (name, gathered)
