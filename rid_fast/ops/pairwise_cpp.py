r"""The pairwise-MLP critic's reductions as a compiled C++ kernel: the fast CPU path.

The concat critic scores :math:`s_{ij} = \sum_h w_{2,h}\,\mathrm{relu}(a_{ih} + c_{jh}) + b_2` from
``a`` (B, H), ``c`` (N, H), ``w2`` (H,), ``b2`` () — see :mod:`rid_fast.ops.pairwise_reference`
for the definitions. ``rid_fast/csrc/pairwise_critic.cpp`` computes every statistic the estimators
need straight from those factors, a tile of scores at a time (OpenMP over row tiles, the H loop
vectorised), and the gradients by recomputing the tiles in one backward sweep that forms ``da``,
``dc``, ``dw2`` and ``db2`` together (partials per fixed row group and column chunk, at most
``GROUPS`` = 8 of each): memory O((B + N)·H), deterministic for any number of threads.

The kernel is compiled on first use with :func:`torch.utils.cpp_extension.load` (ninja, the
system's C++ compiler, ``-O3 -fopenmp -ffp-contract=off``, ``-march=native``; a line on stderr
says so first, as it takes about a minute) into a cache directory,
``$RID_FAST_CACHE`` or ``~/.cache/rid_fast`` (``$XDG_CACHE_HOME/rid_fast``), under a name that
hashes the source, the flags, the torch and Python versions and the CPU, so an edit, an upgrade
or another machine sharing the home directory builds its own copy, and later processes load it in
well under a second. ``-march=native`` because the build is per machine: the widest vectors the
CPU has (AVX-512 doubles the lanes of AVX2), and the CPU's identity in the name keeps a shared
cache from handing one machine's build to another; ``-mprefer-vector-width=512`` where that target
has AVX-512, for the compiler's own loops. ``RID_FAST_PAIRWISE_MARCH=portable`` builds for the
compiler's default target instead, any other value for that ``-march`` (``x86-64-v3``: AVX2).
:func:`status` says whether this process loaded the build from the cache or built it.

When the kernel cannot be built (no compiler, no ninja, a failed build) or is switched off
(``RID_FAST_PAIRWISE_CPP=0``), :func:`status` says why and the estimators run the blocked
PyTorch path (:mod:`rid_fast.ops.pairwise_streaming`); ``rid-fast env`` prints both.

The functions below are this backend's ops, with the contract every pairwise backend shares
(:mod:`rid_fast.ops.pairwise_streaming` states it): statistics in the compute dtype (fp32, fp64 for
fp64 inputs), gradients in the inputs' dtype; 16-bit inputs are computed in fp32.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from rid_fast.ops.common import compute_dtype

__all__ = [
    "SOURCE",
    "available",
    "status",
    "load",
    "cross_entropy_rows_forward",
    "cross_entropy_rows_backward",
    "cross_entropy_rows_cols_forward",
    "cross_entropy_rows_cols_backward",
    "lse_negatives_forward",
    "lse_negatives_backward",
    "softplus_negatives_forward",
    "softplus_negatives_backward",
]

#: The kernel's source, installed with the package.
SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "pairwise_critic.cpp"

#: H is padded with zeros (w₂ too, so they add nothing) to a multiple of 64 bytes: a whole number
#: of the kernel's vectors, whatever the target's width.
_LANES = {torch.float32: 16, torch.float64: 8}

# The row_statistics reductions and backward weight kinds of the C++ source.
_ROW_LSE, _ROW_LSE_NEGATIVES, _ROW_SOFTPLUS_NEGATIVES = 0, 1, 2
_CROSS_ENTROPY, _LSE_NEGATIVES, _SOFTPLUS_NEGATIVES = 0, 1, 2


def _cpu_identity() -> str:
    """What ``-march=native`` compiles for: the CPU's model and feature flags where Linux says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(wanted))) or platform.machine()


@functools.cache
def _compiler_targets_avx512(compiler: str) -> bool:
    """Whether ``compiler -march=native`` targets AVX-512 here (its predefined macros say)."""
    try:
        macros = subprocess.run(
            [compiler, "-march=native", "-dM", "-E", "-x", "c++", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "__AVX512F__" in macros


def _flags() -> list[str]:
    # -ffp-contract=off: the kernel writes its fused multiply-adds out; no other product and sum may
    # be fused, or a pair's score could round differently in two loops that inline differently.
    common = ["-O3", "-fopenmp", "-ffp-contract=off"]
    march = os.environ.get("RID_FAST_PAIRWISE_MARCH", "native")
    if march == "portable":
        return common
    flags = [*common, f"-march={march}"]
    # The kernel's vectors are as wide as the target's registers; the compiler's own loops (the
    # partials' sums) follow -mprefer-vector-width, which some -mtune targets (znver3 and older,
    # skylake-avx512) set below 512 bits. Only where the target has AVX-512 does 512 mean anything.
    if march == "native" and _compiler_targets_avx512(os.environ.get("CXX", "c++")):
        flags.append("-mprefer-vector-width=512")
    return flags


def cache_dir() -> Path:
    """Where builds are kept: ``$RID_FAST_CACHE``, else ``$XDG_CACHE_HOME/rid_fast``, else ``~/.cache/rid_fast``."""
    if "RID_FAST_CACHE" in os.environ:
        return Path(os.environ["RID_FAST_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rid_fast"


def build_name() -> str:
    """The extension's name: a hash of everything the binary depends on."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_flags()).encode(), torch.__version__.encode(), sys.version.encode()):
        key.update(part)
    if "-march=native" in _flags():
        key.update(_cpu_identity().encode())
    return f"rid_fast_pairwise_{key.hexdigest()[:16]}"


#: (module, why) or (None, why not) once the first call has tried; a plain module attribute rather
#: than a cache decorator, so that torch.compile reads it as a constant inside a traced model.
_STATE: tuple[ModuleType | None, str] | None = None


def _state() -> tuple[ModuleType | None, str]:
    """The extension and why, trying to build (or load the cached build of) it once per process."""
    global _STATE
    if _STATE is None:
        _STATE = _build()
    return _STATE


def _build() -> tuple[ModuleType | None, str]:
    if os.environ.get("RID_FAST_PAIRWISE_CPP", "1") == "0":
        return None, "switched off (RID_FAST_PAIRWISE_CPP=0)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler!r} is not on PATH; set CXX)"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed (pip install ninja)"
    name = build_name()
    directory = cache_dir() / name
    cached = (directory / f"{name}.so").exists()
    if not cached:
        # The first use on a machine (or after an upgrade) compiles for about a minute: say so.
        print("rid_fast: building the pairwise-critic C++ kernel (first use, about a minute)...", file=sys.stderr)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        module = cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=_flags(),
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as error:  # a failed compile or link: say what failed, run the PyTorch path
        lines = str(error).splitlines()
        # The compiler's first error says more than ninja's command line that precedes it.
        first_error = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
        return None, (
            f"the build failed ({type(error).__name__}: {' '.join(first_error.split())[:300]}); "
            f"build directory {directory}"
        )
    how = "loaded from the cache" if cached else "built now"
    return module, f"{how}: compiled with {compiler} {' '.join(_flags())}, cached in {directory}"


def load() -> ModuleType:
    """The compiled extension (built on first use); ``RuntimeError`` with the reason if it cannot be."""
    module, why = _state()
    if module is None:
        raise RuntimeError(f"the pairwise-MLP critic's C++ kernel is unavailable: {why}")
    return module


def status() -> tuple[bool, str]:
    """Whether the C++ kernel is available (building it if need be), and why (not)."""
    module, why = _state()
    return module is not None, why


def available() -> bool:
    """Whether the C++ kernel is available (building it on the first call)."""
    return status()[0]


# ---- the backend's ops --------------------------------------------------------------------------


def _prepare(a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor):
    """(a, c, w2, b2) contiguous in the compute dtype, H padded with zeros to a multiple of the lanes."""
    dtype = compute_dtype(a.dtype)
    hidden = a.shape[1]
    pad = -hidden % _LANES[dtype]

    def padded(t: torch.Tensor) -> torch.Tensor:
        t = t.to(dtype)
        return torch.nn.functional.pad(t, (0, pad)).contiguous() if pad else t.contiguous()

    return padded(a), padded(c), padded(w2), b2.to(dtype).reshape(()).contiguous()


def _clip_arg(clip: float | None) -> float:
    return math.nan if clip is None else float(clip)


def _gradients(grads, a, c, w2, b2):
    """The kernel's padded (da, dc, dw, db) cut back to H, in the inputs' dtypes."""
    hidden = a.shape[1]
    da, dc, dw, db = grads
    return (
        da[:, :hidden].to(a.dtype).contiguous(),
        dc[:, :hidden].to(c.dtype).contiguous(),
        dw[:hidden].to(w2.dtype).contiguous(),
        db.to(b2.dtype),
    )


def _statistic(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(compute_dtype(like.dtype)).contiguous()


@torch.no_grad()
def cross_entropy_rows_forward(a, c, w2, b2) -> torch.Tensor:
    r""":math:`\log\sum_j e^{s_{ij}} - s_{ii}`. (B,)"""
    lse, diagonal = load().row_statistics(*_prepare(a, c, w2, b2), _ROW_LSE, math.nan)
    return lse - diagonal


@torch.no_grad()
def cross_entropy_rows_backward(grad, a, c, w2, b2, loss):
    r"""W_ij = g_i (P_ij − δ_ij), P the row softmax."""
    ext, prepared = load(), _prepare(a, c, w2, b2)
    lse = _statistic(loss, a) + ext.diagonal(*prepared)
    return _gradients(
        ext.backward(*prepared, _CROSS_ENTROPY, _statistic(grad, a), lse, None, None, math.nan), a, c, w2, b2
    )


@torch.no_grad()
def cross_entropy_rows_cols_forward(a, c, w2, b2) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Row and column cross-entropies against the diagonal (N = B). (B,), (N,)"""
    ext, prepared = load(), _prepare(a, c, w2, b2)
    row_lse, diagonal = ext.row_statistics(*prepared, _ROW_LSE, math.nan)
    return row_lse - diagonal, ext.column_lse(*prepared) - diagonal


@torch.no_grad()
def cross_entropy_rows_cols_backward(grad_rows, grad_cols, a, c, w2, b2, loss_rows, loss_cols):
    r"""W_ij = g_i P_ij + g'_j Q_ij − (g_i + g'_i) δ_ij, P (Q) the row (column) softmax."""
    ext, prepared = load(), _prepare(a, c, w2, b2)
    diagonal = ext.diagonal(*prepared)
    row_lse, col_lse = _statistic(loss_rows, a) + diagonal, _statistic(loss_cols, a) + diagonal
    grads = ext.backward(
        *prepared, _CROSS_ENTROPY, _statistic(grad_rows, a), row_lse, _statistic(grad_cols, a), col_lse, math.nan
    )
    return _gradients(grads, a, c, w2, b2)


@torch.no_grad()
def lse_negatives_forward(a, c, w2, b2, clip: float | None = None) -> torch.Tensor:
    r""":math:`\log\sum_{j\ne i} e^{\mathrm{clamp}(s_{ij}, \pm\text{clip})}`. (B,)"""
    return load().row_statistics(*_prepare(a, c, w2, b2), _ROW_LSE_NEGATIVES, _clip_arg(clip))[0]


@torch.no_grad()
def lse_negatives_backward(grad, a, c, w2, b2, lse, clip: float | None = None):
    r"""W_ij = g_i e^{clamp(s_ij) − ℓ_i} [|s_ij| ≤ clip], j ≠ i."""
    grads = load().backward(
        *_prepare(a, c, w2, b2), _LSE_NEGATIVES, _statistic(grad, a), _statistic(lse, a), None, None, _clip_arg(clip)
    )
    return _gradients(grads, a, c, w2, b2)


@torch.no_grad()
def softplus_negatives_forward(a, c, w2, b2) -> torch.Tensor:
    r""":math:`\sum_{j\ne i}\mathrm{softplus}(s_{ij})`. (B,)"""
    return load().row_statistics(*_prepare(a, c, w2, b2), _ROW_SOFTPLUS_NEGATIVES, math.nan)[0]


@torch.no_grad()
def softplus_negatives_backward(grad, a, c, w2, b2):
    r"""W_ij = g_i sigmoid(s_ij), j ≠ i."""
    prepared = _prepare(a, c, w2, b2)
    no_shift = prepared[0].new_empty(0)
    grads = load().backward(*prepared, _SOFTPLUS_NEGATIVES, _statistic(grad, a), no_shift, None, None, math.nan)
    return _gradients(grads, a, c, w2, b2)
