"""Ahead-of-time compile of every kernel config the autotuner may pick, for sm_90 (and sm_80).

No GPU needed: Triton compiles to PTX and cubin with the ptxas it ships. This guards against
kernels that pass the interpreter but would be slow or fail on a real GPU: fp16/bf16 must use
tensor-core MMA (wgmma on Hopper, mma.sync on Ampere), no config may spill to local memory, and
shared memory must fit the device. The per-kernel numbers are written by
``benchmarks/aot_report.py``.
"""

import pytest

aot = pytest.importorskip("rid_fast.kernels.aot", reason="triton with the NVIDIA backend is needed")


def _id(job):
    config = job["config"]
    tiles = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}w{config.num_warps}s{config.num_stages}"
    dtype = job["dtype"] if job["dtype"] != "float32" else f"float32-{job['precision']}"
    return f"sm{job['arch']}-{job['kernel']}-{job['variant']}-{dtype}-D{job['dim']}-{tiles}"


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
