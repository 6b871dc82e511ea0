"""Ahead-of-time compile of every pairwise-MLP kernel config the autotuner may pick, for sm_90.

No GPU needed (see tests/test_kernels_aot.py). The pairwise kernels sum over hidden units on the
ALUs, without tensor cores: each config must compile without local memory (spills), within the
shared-memory limit, with its loop over hidden units (the maxima, FMNMX) found in the SASS.
"""

import pytest

triton = pytest.importorskip("triton")
aot = pytest.importorskip("rid_fast.kernels.aot", reason="triton with the NVIDIA backend is needed")

JOBS = aot.pairwise_sweep(90)


def _id(job):
    config = job["config"]
    blocks = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}w{config.num_warps}s{config.num_stages}"
    return f"sm{job['arch']}-{job['kernel']}-{job['variant']}-{job['dtype']}-H{job['dim']}-{blocks}"


@pytest.mark.parametrize("job", JOBS, ids=[_id(j) for j in JOBS])
def test_compiles_for_gpu(job):
    report = aot.compile_kernel(**job)
    assert report.local_bytes == 0 and not report.ptx_local_access, f"local memory (spills) in {report}"
    assert report.shared_bytes <= aot.SHARED_MEMORY_LIMIT[report.arch], f"shared memory over the limit in {report}"
    assert report.mma == "none", f"the pairwise kernels have no matrix product: {report}"
    assert report.loop_instructions, f"no loop over hidden units found in the SASS of {report}"


def test_block_hv_must_be_a_power_of_two():
    """The backward's unit chunk is checked at compile time (it feeds tl.arange, not tl.dot)."""
    config = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    constexprs = {"MODE": 0, "CLIP": False, "COLUMN_STATS": False, "OWN_ROWS": True}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aot.tuning, "pairwise_block_hv", lambda hidden: 12)
        with pytest.raises(triton.compiler.errors.CompilationError) as error:
            aot.compile_kernel("pairwise_grad_rows", arch=90, dtype="bfloat16", dim=64, config=config,
                               constexprs=constexprs)  # fmt: skip
    causes = [error.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    assert "BLOCK_HV must be a power of two" in str(causes[-1])
