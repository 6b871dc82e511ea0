"""Launch configurations: the autotuner's candidates, the defaults, and the per-shape constants.

Autotuning (the default on GPUs; ``RID_FAST_AUTOTUNE=0`` turns it off) benchmarks the candidates
of a kernel the first time it meets a new ``(n_rows, n_cols, dim, dtype)`` and caches the winner;
without it (and always under the Triton interpreter) the kernel's default config runs.

Candidates depend on the kernel and on the input precision: 16-bit inputs feed tensor cores from
wide tiles, fp32 inputs use 32-wide feature chunks and smaller tiles (their operands take twice
the registers). Every candidate is compiled ahead of time for sm_90 — and, for 16-bit inputs,
sm_80 — by ``tests/test_kernels_aot.py``, which fails on register spills, shared memory over the
limit or a missing tensor-core MMA; the lists below are the configs that pass it with both the
Triton of CPU machines (3.9) and that of the GPU image (3.6: its ptxas caps some fp32 backward
tiles at 128 registers and spills, so those tiles are not candidates).
"""

from __future__ import annotations

import os

import torch
import triton

__all__ = [
    "KERNELS",
    "autotune_enabled",
    "interpreting",
    "block_k",
    "block_dv",
    "pairwise_block_hv",
    "input_precision",
    "shape_constants",
    "candidate_configs",
    "default_config",
    "all_candidates",
    "INTERPRETER_DEFAULT",
    "PAIRWISE_INTERPRETER_DEFAULT",
]

#: The kernels, by the names used here and in the AOT checks.
KERNELS = ("row_stats_fwd", "row_stats_keys_fwd", "grad_q", "grad_k")

#: The pairwise-MLP critic's kernels (kernels.pairwise_forward, kernels.pairwise_backward).
PAIRWISE_KERNELS = ("pairwise_row_stats_fwd", "pairwise_grad_rows", "pairwise_grad_cols")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def autotune_enabled() -> bool:
    return not interpreting() and os.environ.get("RID_FAST_AUTOTUNE", "1") != "0"


def _wide(dtype: torch.dtype) -> bool:
    return dtype == torch.float32


def block_k(dim: int, dtype: torch.dtype) -> int:
    """Chunk of the feature dimension per ``tl.dot`` (power of two ≥ 16, as tl.dot requires).
    Up to D = 128 the whole row block of q is held once (one chunk) with 16-bit inputs."""
    if _wide(dtype):
        return max(16, min(triton.next_power_of_2(dim), 32))
    return max(16, triton.next_power_of_2(dim)) if dim <= 128 else 32


def block_dv(dim: int, dtype: torch.dtype) -> int:
    """Columns of dq / dk one backward program owns (a larger D splits the grid along D)."""
    return max(16, min(triton.next_power_of_2(dim), 64 if _wide(dtype) else 128))


def pairwise_block_hv(hidden: int) -> int:
    """Hidden units the pairwise backward folds a tile of weights into at a time: its
    (BLOCK_M, BLOCK_N, BLOCK_HV) products must fit the registers (8 on a GPU: 64 per thread at
    32 × 32 with 4 warps). Under the interpreter 32, so that H = 64 and 130 span several chunks
    (the last of 130 ragged) in few steps."""
    return min(triton.next_power_of_2(hidden), 32 if interpreting() else 8)


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 inputs, following ``torch.set_float32_matmul_precision``:
    "highest" (torch's default) → full fp32 products, "high" → 3×TF32 (≈ fp32 on tensor cores),
    "medium" → TF32. 16-bit inputs always multiply exactly and accumulate in fp32."""
    if dtype != torch.float32:
        return "tf32"  # unused for 16-bit operands
    return {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}[torch.get_float32_matmul_precision()]


def shape_constants(dim: int, dtype: torch.dtype) -> dict:
    """The constexprs that follow from D and the dtype: ``BLOCK_K``, ``SINGLE_K`` (one chunk holds
    the whole feature row, D ≤ BLOCK_K) and ``INPUT_PRECISION``."""
    chunk = block_k(dim, dtype)
    return {"BLOCK_K": chunk, "SINGLE_K": dim <= chunk, "INPUT_PRECISION": input_precision(dtype)}


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def _grid(shapes, stages) -> list[triton.Config]:
    return [_config(m, n, w, s) for m, n, w in shapes for s in stages]


_CANDIDATES = {
    ("row_stats_fwd", "16bit"): _grid(((128, 64, 8), (128, 128, 8)), (2, 3)),
    # The forward that also sums the weighted keys: 16-bit, D ≤ 128 only (no fp32 candidates).
    ("row_stats_keys_fwd", "16bit"): _grid(((128, 64, 8), (64, 64, 4)), (2, 3)),
    ("grad_q", "16bit"): _grid(((128, 64, 8), (64, 128, 8), (64, 64, 8)), (2, 3)),
    # 64 × 64 with 4 warps and 3 stages spills 8 bytes in the symmetric variant under triton 3.6.
    ("grad_k", "16bit"): [_config(64, 64, 4, 2), *_grid(((128, 64, 8),), (2, 3))],
    ("row_stats_fwd", "fp32"): _grid(((64, 64, 8), (64, 64, 4), (32, 32, 4)), (2,)),
    ("grad_q", "fp32"): _grid(((64, 32, 4), (32, 64, 4)), (2,)),
    ("grad_k", "fp32"): _grid(((32, 64, 4), (32, 32, 4)), (2,)),
}

# The pairwise critic's tiles are sums over hidden units on the ALUs, from fp32 operands whatever
# the inputs' dtype (kernels.pairwise_tiles), so both precision classes share one list. Chosen from
# the sm_90 compile (kernels.aot.pairwise_sweep) with triton 3.9 and 3.6: no spills, and SASS per
# hidden unit of the score loop — forward 96 instructions per 32 scores per thread at 128 × 32 with
# 4 warps (64 of them the maxima and FMAs). 128 × 64 does better (168 per 64) but spills 72–88
# bytes under 3.6 when clipped or with softplus. The backward's tiles are held three-dimensional
# (× BLOCK_HV units, pairwise_block_hv), which bounds them at 32–64 × 32.
_PAIRWISE_CANDIDATES = {
    "pairwise_row_stats_fwd": [_config(128, 32, 4, 2), _config(256, 32, 8, 2), _config(128, 32, 4, 3)],
    "pairwise_grad_rows": _grid(((32, 32, 4), (64, 32, 8)), (2,)),
    "pairwise_grad_cols": _grid(((32, 32, 4), (64, 32, 8), (32, 64, 4)), (2,)),
}
for _name, _configs in _PAIRWISE_CANDIDATES.items():
    _CANDIDATES[(_name, "16bit")] = _CANDIDATES[(_name, "fp32")] = _configs

_DEFAULTS = {
    ("row_stats_fwd", "16bit"): _config(128, 64, 8, 3),
    ("row_stats_keys_fwd", "16bit"): _config(128, 64, 8, 3),
    ("grad_q", "16bit"): _config(128, 64, 8, 3),
    ("grad_k", "16bit"): _config(64, 64, 4, 2),
    ("row_stats_fwd", "fp32"): _config(64, 64, 8, 2),
    ("grad_q", "fp32"): _config(64, 32, 4, 2),
    ("grad_k", "fp32"): _config(32, 64, 4, 2),
}

for _name, _configs in _PAIRWISE_CANDIDATES.items():
    _DEFAULTS[(_name, "16bit")] = _DEFAULTS[(_name, "fp32")] = _configs[0]

#: Under the interpreter: small tiles, so odd test shapes span several tiles and stay quick.
INTERPRETER_DEFAULT = _config(16, 16, 1, 1)
#: The pairwise kernels under the interpreter: their score loop runs once per hidden unit and tile,
#: so tiles twice as wide keep the tests short; odd shapes (B = 37, 130) still span ragged tiles.
PAIRWISE_INTERPRETER_DEFAULT = _config(32, 32, 1, 1)


def _precision_class(dtype: torch.dtype) -> str:
    return "fp32" if _wide(dtype) else "16bit"


def candidate_configs(kernel: str, dtype: torch.dtype) -> list[triton.Config]:
    """Configs the autotuner may pick for ``kernel`` with inputs of ``dtype`` on a GPU."""
    return _CANDIDATES.get((kernel, _precision_class(dtype)), [])


def default_config(kernel: str, dtype: torch.dtype) -> triton.Config:
    """The config that runs without autotuning."""
    return INTERPRETER_DEFAULT if interpreting() else _DEFAULTS[(kernel, _precision_class(dtype))]


def config_key(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def all_candidates(kernel: str) -> list[triton.Config]:
    """Every candidate of ``kernel`` over both precision classes (the autotuner's full list, pruned
    per launch by :func:`candidate_configs`)."""
    unique = {}
    for cls in ("16bit", "fp32"):
        for config in _CANDIDATES.get((kernel, cls), []):
            unique.setdefault(config_key(config), config)
    return list(unique.values())
