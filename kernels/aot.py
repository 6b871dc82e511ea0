"""Ahead-of-time compilation of the kernels for NVIDIA GPUs, on any machine (no GPU needed).

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs Triton's whole pipeline
and NVIDIA's ``ptxas`` (shipped with triton) to PTX and cubin. From those we read what decides
whether a kernel that passes the interpreter will be fast — or run at all — on a real GPU:

* tensor-core MMA in the PTX (``wgmma.mma_async`` on sm_90, ``mma.sync`` on sm_80) for fp16/bf16;
* local memory (register spills or stack arrays), from ``cuobjdump -res-usage`` of the cubin and
  ``ld.local``/``st.local`` in the PTX;
* registers per thread and shared memory per block (H100 allows 227 KiB).

The pairwise-MLP critic's kernels (``kernels/pairwise_*.py``, listed in
``tuning.PAIRWISE_KERNELS``) use no tensor cores: their report counts the SASS instructions of the
loop over hidden units (:func:`pairwise_sweep`).

Used by ``tests/test_kernels_aot.py`` and ``benchmarks/aot_report.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import tuning
from .backward import _grad_k_kernel, _grad_q_kernel
from .forward import _row_stats_fwd, keys_fit
from .pairwise_backward import _pairwise_grad_kernel
from .pairwise_forward import _pairwise_row_stats_fwd
from .tiles import MODES, REDUCTIONS

__all__ = ["CompileReport", "compile_kernel", "sweep", "pairwise_sweep", "SHARED_MEMORY_LIMIT"]

#: Largest dynamic shared memory per block on the architectures we target (bytes).
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

_TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}

# Runtime (non-constexpr) arguments and their types; "*in" is the input dtype.
_INPUTS = {"q_ptr": "*in", "k_ptr": "*in", "scale_ptr": "*fp32"}
_SIZES = {"n_rows": "i32", "n_cols": "i32", "dim": "i32", "clip": "fp32"}
_STATS = {"row_stat_ptr": "*fp32", "row_grad_ptr": "*fp32", "col_stat_ptr": "*fp32", "col_grad_ptr": "*fp32"}
_FORWARD = {**_INPUTS, "out_ptr": "*fp32", "keys_ptr": "*fp32", **_SIZES}
_SIGNATURES = {
    "row_stats_fwd": (_row_stats_fwd, _FORWARD),
    "row_stats_keys_fwd": (_row_stats_fwd, _FORWARD),
    "grad_q": (_grad_q_kernel, {**_INPUTS, "dq_ptr": "*fp32", **_STATS, **_SIZES}),
    "grad_k": (_grad_k_kernel, {**_INPUTS, "dk_ptr": "*in", **_STATS, **_SIZES}),
}
# The pairwise critic's kernels: prepared fp32 operands of the scores, then (backward) the inputs.
_SCORE_OPERANDS = {"own_t_ptr": "*fp32", "other_t_ptr": "*fp32", "sign_ptr": "*fp32", "other_const_ptr": "*fp32"}
_PAIRWISE_SIZES = {"n_rows": "i32", "n_cols": "i32", "hidden": "i32", "clip": "fp32"}
_PAIRWISE_GRAD = {
    **{"a_t_ptr": "*fp32", "neg_c_t_ptr": "*fp32", "sign_ptr": "*fp32", "col_const_ptr": "*fp32"},
    **{"a_ptr": "*in", "c_ptr": "*in"},
    **_STATS,
    **{"sums_ptr": "*fp32", "dw2_ptr": "*fp32", "db2_ptr": "*fp32"},
    **_PAIRWISE_SIZES,
}
_SIGNATURES.update({
    "pairwise_row_stats_fwd": (_pairwise_row_stats_fwd, {**_SCORE_OPERANDS, "out_ptr": "*fp32", **_PAIRWISE_SIZES}),
    "pairwise_grad_rows": (_pairwise_grad_kernel, _PAIRWISE_GRAD),
    "pairwise_grad_cols": (_pairwise_grad_kernel, _PAIRWISE_GRAD),
})  # fmt: skip


@dataclass(frozen=True)
class CompileReport:
    kernel: str
    arch: int
    dtype: str
    dim: int
    variant: str
    config: str
    registers: int
    local_bytes: int  # spills + stack, per thread
    ptx_local_access: bool
    shared_bytes: int
    mma: str  # "wgmma", "mma.sync" or "none"
    loop_instructions: str  # SASS instructions per iteration of each MMA loop, "/"-separated

    def as_dict(self) -> dict:
        return asdict(self)


def _cuobjdump(cubin: bytes, option: str) -> str:
    tool = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        return subprocess.run([tool, option, handle.name], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes) of the cubin's kernel, from ``cuobjdump -res-usage``."""
    text = _cuobjdump(cubin, "-res-usage")
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    if usage is None:
        raise RuntimeError(f"cannot read resource usage from cuobjdump:\n{text}")
    registers, stack, local = map(int, usage.groups())
    return registers, stack + local


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[^;]*?(?:0x([0-9a-f]+))?\s*;")


def mma_loop_instructions(cubin: bytes, marks: tuple[str, ...] = ("HGMMA", "HMMA")) -> list[int]:
    """SASS instructions in each loop that issues tensor-core MMAs (HGMMA, HMMA), in program
    order: the per-tile cost of a kernel's main loops, a static measure of the work besides the
    MMAs (exponentials, masks, bookkeeping). A loop is the span from a backward branch's target
    to the branch. Other ``marks`` select other loops (the pairwise kernels: FMNMX, their maxima)."""
    lines = [
        (int(match.group(1), 16), match.group(2), match.group(3))
        for match in map(_SASS_LINE.search, _cuobjdump(cubin, "-sass").splitlines())
        if match
    ]
    sizes = []
    for address, opcode, target in lines:
        if opcode == "BRA" and target is not None and int(target, 16) < address:
            body = [op for a, op, _ in lines if int(target, 16) <= a <= address]
            if any(op in marks for op in body):
                sizes.append(len(body))
    return sizes


def compile_kernel(
    kernel: str,
    *,
    arch: int,
    dtype: str,
    dim: int,
    config: triton.Config,
    constexprs: dict,
    variant: str = "",
    precision: str = "ieee",
) -> CompileReport:
    """Compile ``kernel`` (a key of the signature table) for ``sm_<arch>`` and inspect it.

    Pointers and ``dim`` (when a multiple of 16) carry the 16-byte divisibility the runtime
    launcher would specialise on, so the code matches what a real launch compiles.
    """
    fn, runtime_args = _SIGNATURES[kernel]
    signature = {name: kind.replace("*in", "*" + _TRITON_DTYPES[dtype]) for name, kind in runtime_args.items()}
    torch_dtype = getattr(torch, dtype)
    pairwise = kernel in tuning.PAIRWISE_KERNELS  # ``dim`` is then the hidden width H
    if pairwise:
        all_constexprs = {**constexprs, **config.kwargs}
        if kernel != "pairwise_row_stats_fwd":
            all_constexprs["BLOCK_HV"] = tuning.pairwise_block_hv(dim)
    else:
        all_constexprs = {
            **constexprs,
            **config.kwargs,
            **tuning.shape_constants(dim, torch_dtype),
            "INPUT_PRECISION": precision if dtype == "float32" else "tf32",  # the sweep's, not torch's setting
        }
    if kernel in ("grad_q", "grad_k"):
        all_constexprs["BLOCK_DV"] = tuning.block_dv(dim, torch_dtype)
    signature.update({name: "constexpr" for name in all_constexprs})
    names = list(fn.arg_names)
    aligned = [
        n for n, kind in runtime_args.items() if kind.startswith("*") or (n in ("dim", "hidden") and dim % 16 == 0)
    ]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource(fn, signature, constexprs=all_constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True}
    compiled = triton.compile(source, target=target, options=options)
    ptx = compiled.asm["ptx"]
    registers, local_bytes = _resource_usage(compiled.asm["cubin"])
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    config_text = f"BLOCK_M={block_m} BLOCK_N={block_n} warps={config.num_warps} stages={config.num_stages}"
    return CompileReport(
        kernel=kernel,
        arch=arch,
        dtype=f"{dtype}/{precision}" if dtype == "float32" and not pairwise else dtype,
        dim=dim,
        variant=variant,
        config=config_text,
        registers=registers,
        local_bytes=local_bytes,
        ptx_local_access=bool(re.search(r"\b(ld|st)\.local", ptx)),
        shared_bytes=compiled.metadata.shared,
        mma=mma,
        loop_instructions="/".join(
            map(str, mma_loop_instructions(compiled.asm["cubin"], ("FMNMX",) if pairwise else ("HGMMA", "HMMA")))
        ),
    )


# The constexpr variants compiled per kernel: the heaviest of each family (most live values), and
# InfoNCE's forward, the headline case.
_FORWARD_VARIANTS = {
    "lse": {"REDUCTION": REDUCTIONS["lse"], "MASK_DIAGONAL": False, "CLIP": False},  # InfoNCE: the headline case
    "lse_masked_clipped": {"REDUCTION": REDUCTIONS["lse"], "MASK_DIAGONAL": True, "CLIP": True},
    "softplus_masked": {"REDUCTION": REDUCTIONS["softplus"], "MASK_DIAGONAL": True, "CLIP": False},
}
_BACKWARD_VARIANTS = {
    "ce_rows_cols": {"MODE": MODES["ce_rows_cols"], "CLIP": False, "COLUMN_STATS": True},
    "lse_negatives_clipped": {"MODE": MODES["lse_negatives"], "CLIP": True, "COLUMN_STATS": False},
}
_VARIANTS = {
    "row_stats_fwd": {name: {**c, "WEIGHTED_KEYS": False} for name, c in _FORWARD_VARIANTS.items()},
    # Training's forward, which also sums the weighted keys: every variant is used.
    "row_stats_keys_fwd": {name: {**c, "WEIGHTED_KEYS": True} for name, c in _FORWARD_VARIANTS.items()},
    "grad_q": _BACKWARD_VARIANTS,
    "grad_k": _BACKWARD_VARIANTS,
}


def sweep(arch: int, dims=(128, 512)) -> list[dict]:
    """Every (kernel, variant, dtype, D, candidate config) to compile for ``arch``, as kwargs of
    :func:`compile_kernel`: bf16 (fp16 compiles to the same tiles) and, on sm_90, fp32 in each
    precision torch's matmul setting can select."""
    precisions = [("bfloat16", "ieee")] + ([("float32", p) for p in ("ieee", "tf32x3", "tf32")] if arch >= 90 else [])
    jobs = []
    for kernel, variants in _VARIANTS.items():
        for variant, constexprs in variants.items():
            for dtype, precision in precisions:
                for dim in dims:
                    if kernel == "row_stats_keys_fwd" and not keys_fit(getattr(torch, dtype), dim):
                        continue
                    for config in tuning.candidate_configs(kernel, getattr(torch, dtype)):
                        jobs.append(dict(kernel=kernel, arch=arch, dtype=dtype, dim=dim, config=config,
                                         constexprs=constexprs, variant=variant, precision=precision))  # fmt: skip
    return jobs


# The pairwise kernels' variants: the forward's reductions (its operands are fp32 whatever the
# inputs, so one dtype), the backward's heaviest weights, each kernel in its role.
_PAIRWISE_FORWARD_VARIANTS = {
    "lse": {"REDUCTION": REDUCTIONS["lse"], "MASK_DIAGONAL": False, "CLIP": False},
    "lse_masked_clipped": {"REDUCTION": REDUCTIONS["lse"], "MASK_DIAGONAL": True, "CLIP": True},
    "softplus_masked": {"REDUCTION": REDUCTIONS["softplus"], "MASK_DIAGONAL": True, "CLIP": False},
}
_PAIRWISE_BACKWARD_VARIANTS = {
    "ce_rows_cols": {"MODE": MODES["ce_rows_cols"], "CLIP": False, "COLUMN_STATS": True},
    "lse_negatives_clipped": {"MODE": MODES["lse_negatives"], "CLIP": True, "COLUMN_STATS": False},
}
_PAIRWISE_VARIANTS = {
    "pairwise_row_stats_fwd": _PAIRWISE_FORWARD_VARIANTS,
    "pairwise_grad_rows": {name: {**c, "OWN_ROWS": True} for name, c in _PAIRWISE_BACKWARD_VARIANTS.items()},
    "pairwise_grad_cols": {name: {**c, "OWN_ROWS": False} for name, c in _PAIRWISE_BACKWARD_VARIANTS.items()},
}


def pairwise_sweep(arch: int = 90, hidden: int = 256) -> list[dict]:
    """Every (pairwise kernel, variant, dtype, candidate config) to compile for ``arch`` at hidden
    width ``hidden``, as kwargs of :func:`compile_kernel`: the forward once (fp32 operands), the
    backward for bf16 and fp32 inputs."""
    jobs = []
    for kernel, variants in _PAIRWISE_VARIANTS.items():
        dtypes = ("float32",) if kernel == "pairwise_row_stats_fwd" else ("bfloat16", "float32")
        for variant, constexprs in variants.items():
            for dtype in dtypes:
                for config in tuning.candidate_configs(kernel, getattr(torch, dtype)):
                    jobs.append(dict(kernel=kernel, arch=arch, dtype=dtype, dim=hidden, config=config,
                                     constexprs=constexprs, variant=variant))  # fmt: skip
    return jobs
