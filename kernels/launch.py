"""Launching a kernel: autotuned over its candidates, or in its default config (:mod:`kernels.tuning`).

Every launch goes through :func:`run`, by the kernel's name in the tuning tables, with keyword
arguments only.
"""

from __future__ import annotations

import torch
import triton

from . import tuning

__all__ = ["run", "scale_tensor"]

# One autotuner per kernel name (the forward with and without the weighted keys are one kernel with
# two lists of candidates), made on first use.
_AUTOTUNERS: dict[str, triton.runtime.Autotuner] = {}


def _prune_for(name: str):
    """The autotuner's pruning hook: keep the candidates for this launch's input dtype. The
    autotuner passes arguments given by position in ``named_args`` and keyword ones in ``kwargs``."""

    def prune(configs, named_args, **kwargs):
        q = {**named_args, **kwargs}["q_ptr"]
        allowed = {tuning.config_key(c) for c in tuning.candidate_configs(name, q.dtype)}
        return [c for c in configs if tuning.config_key(c) in allowed]

    return prune


def _autotuned(name: str, kernel: triton.JITFunction) -> triton.runtime.Autotuner:
    # Keyed by the sizes, plus the tensors' dtypes, which Triton appends itself.
    if name not in _AUTOTUNERS:
        _AUTOTUNERS[name] = triton.autotune(
            configs=tuning.all_candidates(name),
            key=["n_rows", "n_cols", "dim"],
            prune_configs_by={"early_config_prune": _prune_for(name)},
        )(kernel)
    return _AUTOTUNERS[name]


def run(name: str, kernel: triton.JITFunction, *, grid, dtype: torch.dtype, **arguments) -> None:
    """Launch ``kernel`` (``name``: its entry in :data:`kernels.tuning.KERNELS`) over ``grid`` with
    ``arguments`` by keyword: autotuned where autotuning is on, else in the default config for
    inputs of ``dtype``."""
    if tuning.autotune_enabled():
        _autotuned(name, kernel)[grid](**arguments)
        return
    config = tuning.default_config(name, dtype)
    kernel[grid](**arguments, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def scale_tensor(scale: torch.Tensor) -> torch.Tensor:
    """The inverse temperature σ as the kernels read it: a one-element fp32 tensor (no host sync)."""
    return scale.reshape(1).float().contiguous()
