r"""What an estimator checks before it runs across processes (``group=``), and the agreement step.

Under ``group=`` every process passes its own rows ``x`` (B_p, D) and ``y`` (B_p, D), and the
estimate is the single-process estimate on the rank-ordered concatenation of all of them: row i of
the global batch is paired with key i, every other global pair is a negative. So each process's
``y`` has exactly as many rows as its ``x`` (N_p = B_p; extra keys, which have no global index, are
not taken); B_p may differ between processes.

Before any collective, :func:`check_group_call` rejects what every process can see wrong on its own
(the group, ``gather``, a critic that is not separable, ``impl="reference"``); then
:func:`global_batch_sizes` runs the one agreement collective: every process's fingerprint —
estimator, options, critic, inverse temperature, feature widths, dtype, device type, backend,
``gather`` — and B_p, gathered, and the same error raised on every process if one of them rejected
its inputs or they differ. Not checked (too costly to compare): the critics' weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from rid_fast.ops.dispatch import check_choice
from rid_fast.ops.distributed import GATHERS, agree, check_group, fingerprint_code, group_world

__all__ = ["GATHERS", "check_group_call", "is_distributed", "check_rows_match", "global_batch_sizes"]


def is_distributed(group) -> bool:
    """Whether ``group`` spans more than this process."""
    return group is not None and group_world(group)[1] > 1


def check_group_call(group: object, gather: object, *, separable: bool, critic: str, impl: str) -> None:
    """The arguments of a call under ``group=``, checked by each process alone (no collective)."""
    check_group(group)
    check_choice("gather", gather, GATHERS)
    if not is_distributed(group):
        return
    if not separable:
        raise NotImplementedError(
            f"{critic} is not separable (its scores are not q kᵀ); estimates across processes (group=) take "
            "separable critics only (dot, cosine, bilinear)"
        )
    if impl == "reference":
        raise ValueError(
            "impl='reference' reduces one process's materialised score matrix; under group= use 'auto', 'torch' "
            "or 'triton'"
        )


def check_rows_match(x: Tensor, y: Tensor) -> None:
    """Under ``group=``, each process's keys pair with its rows one to one (N_p = B_p)."""
    if y.shape[0] != x.shape[0]:
        raise ValueError(
            "under group=, each process's y must have as many rows as its x (N = B: the global batch pairs row i "
            f"with key i of the concatenation); got B={x.shape[0]}, N={y.shape[0]}"
        )


def global_batch_sizes(
    group,
    x: Tensor,
    y: Tensor,
    scale: Tensor,
    *,
    fields: dict[str, object],
    local_error: Exception | None,
) -> list[int]:
    """Every process's B_p (rank order), once the processes of ``group`` agree on ``fields`` (any
    values with a stable ``repr``: the estimator, its options, the critic, the backend, ``gather``),
    on the feature widths, dtype and device type of ``x`` and ``y``, and on the inverse temperature
    ``scale``. ``local_error``: this process's reason to reject its inputs (then the other arguments
    are not read), raised here on it after the others learn of it."""
    names = [*fields, "the feature widths", "the dtype", "the device type", "the temperature"]
    if local_error is not None:  # what this process has may not even be tensors: it only joins
        return agree(group, dict.fromkeys(names, float("nan")), rows=0, device=_device(group), local_error=local_error)
    values = [fingerprint_code(value) for value in fields.values()]
    values += [fingerprint_code((x.shape[1:], y.shape[1:])), fingerprint_code(x.dtype), fingerprint_code(x.device.type)]
    values += [scale]
    return agree(group, dict(zip(names, values)), rows=x.shape[0], device=_device(group))


def _device(group) -> torch.device:
    """Where the group's collectives take their tensors: the current CUDA device under NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
