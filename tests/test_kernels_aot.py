"""Ahead-of-time compile of every kernel config the autotuner may pick, for sm_90 (and sm_80).

No GPU needed: Triton compiles to PTX and cubin with the ptxas it ships. This guards against
kernels that pass the interpreter but would be slow or fail on a real GPU: fp16/bf16 must use
tensor-core MMA (wgmma on Hopper, mma.sync on Ampere), no config may spill to local memory, and
shared memory must fit the device. The per-kernel numbers are written by
``benchmarks/aot_report.py``.
"""

import pytest

triton = pytest.importorskip("triton")
aot = pytest.importorskip("rid_fast.kernels.aot", reason="triton with the NVIDIA backend is needed")
tiles = pytest.importorskip("rid_fast.kernels.tiles")


def _id(job):
    config = job["config"]
    blocks = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}w{config.num_warps}s{config.num_stages}"
    dtype = job["dtype"] if job["dtype"] != "float32" else f"float32-{job['precision']}"
    return f"sm{job['arch']}-{job['kernel']}-{job['variant']}-{dtype}-D{job['dim']}-{blocks}"


JOBS = aot.sweep(90) + aot.sweep(80)


def _check(report):
    assert report.local_bytes == 0 and not report.ptx_local_access, f"local memory (spills) in {report}"
    assert report.shared_bytes <= aot.SHARED_MEMORY_LIMIT[report.arch], f"shared memory over the limit in {report}"
    if report.dtype == "bfloat16":
        expected = "wgmma" if report.arch == 90 else "mma.sync"
        assert report.mma == expected, f"no tensor-core MMA ({expected}) in {report}"
        assert report.loop_instructions, f"no loop issuing MMAs found in the SASS of {report}"


@pytest.mark.parametrize("job", JOBS, ids=[_id(j) for j in JOBS])
def test_compiles_for_gpu(job):
    _check(aot.compile_kernel(**job))


def _forward(*, weighted_keys: bool) -> dict:
    return {"REDUCTION": tiles.REDUCTIONS["lse"], "MASK_DIAGONAL": False, "CLIP": False, "WEIGHTED_KEYS": weighted_keys}


def _backward(mode: str, *, clip: bool = False, column_stats: bool = False) -> dict:
    return {"MODE": tiles.MODES[mode], "CLIP": clip, "COLUMN_STATS": column_stats}


# name: (kernel, dtype, D, (BLOCK_M, BLOCK_N), constexprs, the assertion's message)
_INVARIANTS = {
    "keys-need-one-tile": ("row_stats_keys_fwd", "bfloat16", 512, (128, 64), _forward(weighted_keys=True),
                           "WEIGHTED_KEYS needs the whole feature row in one tile"),
    "keys-need-16-bit": ("row_stats_keys_fwd", "float32", 32, (64, 64), _forward(weighted_keys=True),
                         "WEIGHTED_KEYS needs 16-bit inputs"),
    "block-power-of-two": ("grad_k", "bfloat16", 128, (64, 48), _backward("ce_rows"),
                           "blocks must be powers of two >= 16"),
    "block-at-least-16": ("row_stats_fwd", "bfloat16", 128, (8, 64), _forward(weighted_keys=False),
                          "blocks must be powers of two >= 16"),
    "column-stats": ("grad_q", "bfloat16", 128, (128, 64), _backward("ce_rows_cols", column_stats=False),
                     "column statistics are read for CE_ROWS_COLS only"),
    "clip": ("grad_k", "bfloat16", 128, (64, 64), _backward("softplus_negatives", clip=True),
             "CLIP applies to LSE_NEGATIVES only"),
}  # fmt: skip


@pytest.mark.parametrize("case", _INVARIANTS.values(), ids=_INVARIANTS.keys())
def test_invariants_fail_at_compile_time(case):
    """The kernels' invariants are ``tl.static_assert``s: a launch that breaks one does not compile."""
    kernel, dtype, dim, (block_m, block_n), constexprs, message = case
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=2)
    with pytest.raises(triton.compiler.errors.CompilationError) as error:
        aot.compile_kernel(kernel, arch=90, dtype=dtype, dim=dim, config=config, constexprs=constexprs)
    causes = [error.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    assert isinstance(causes[-1], triton.compiler.errors.CompileTimeAssertionFailure)
    assert message in str(causes[-1])
