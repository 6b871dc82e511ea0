"""GPU tier: the fused kernels on CUDA (skipped without a GPU).

bf16, fp16 and fp32 on large and ragged shapes against a float64 truth from the same rounded
inputs (error ≤ 2× the eager reference's error in the same dtype, see estimator_checks), every
config the autotuner may pick (each forced in turn), torch.compile of a model using the ops,
bitwise determinism with and without autotuning, and the PID solver on the GPU.

The accuracy sweep runs the default configs (autotuning each of its shapes would cost minutes of a
short GPU session); ``test_every_candidate_config`` covers what the autotuner can choose instead.
"""

import pytest
import torch
from estimator_checks import (
    KERNEL_ESTIMATORS,
    assert_compiles_like_eager,
    assert_every_candidate_config_matches,
    assert_far_below_zero_matches,
    assert_matches_reference,
    correlated_pair,
)

from rid_fast import pid
from rid_fast.mi import functional

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SHAPES = [(4096, 4096, 128), (2000, 3001, 200), (1031, 1031, 64), (517, 700, 512)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _critic(name: str, dim: int) -> str:
    return "cosine" if dim % 2 == 0 and name != "smile" else "dot"  # as in the interpreter tier


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("label", list(KERNEL_ESTIMATORS))
def test_matches_reference(monkeypatch, label, shape, dtype):
    monkeypatch.setenv("RID_FAST_AUTOTUNE", "0")
    name, temperature, options = KERNEL_ESTIMATORS[label]
    n_queries, n_keys, dim = shape
    if options.get("symmetric"):
        n_keys = n_queries
    x, y = correlated_pair(n_queries, n_keys, dim)
    assert_matches_reference(
        name, x, y, temperature=temperature, critic=_critic(name, dim), impl="triton", dtype=dtype, device="cuda",
        **options,
    )  # fmt: skip


@pytest.mark.parametrize(
    "dtype,dim",
    [(torch.bfloat16, 200), (torch.bfloat16, 128), (torch.float32, 200)],
    ids=["16bit", "16bit-D128", "fp32"],
)
@pytest.mark.parametrize("label", ["infonce_symmetric", "smile_clipped_dv", "js"])
def test_every_candidate_config(monkeypatch, label, dtype, dim):
    """The symmetric InfoNCE runs every kernel with column statistics, SMILE the clipped
    exponential, JS the softplus reduction; at D = 128 the 16-bit forward also forms the weighted
    keys (and the dq kernel does not run)."""
    assert_every_candidate_config_matches(monkeypatch, label, (1031, 1500, dim), dtype=dtype, device="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("label", ["infonce", "infonce_symmetric", "dv", "smile_clipped_dv"])
def test_scores_far_below_zero_on_ragged_tiles(monkeypatch, label, dtype):
    """The GPU tiles' ragged edges with every score ≈ −120; D = 64 as in the accuracy sweep, whose
    compiled kernels these launches reuse."""
    monkeypatch.setenv("RID_FAST_AUTOTUNE", "0")
    assert_far_below_zero_matches(label, (1031, 1500, 64), dtype=dtype, device="cuda")


def test_auto_picks_triton_on_cuda():
    from rid_fast.ops.dispatch import resolve_impl

    assert resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "triton"
    assert resolve_impl("auto", torch.device("cuda"), torch.float64) == "torch"


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one-sided"])
@pytest.mark.parametrize("autotune", ["1", "0"])
def test_deterministic(monkeypatch, autotune, symmetric):
    monkeypatch.setenv("RID_FAST_AUTOTUNE", autotune)
    x, y = (t.to("cuda", torch.bfloat16).requires_grad_() for t in correlated_pair(3000, 3000, 128))
    runs = []
    for _ in range(2):
        value = functional.infonce(x, y, symmetric=symmetric, impl="triton")
        runs.append((value, *torch.autograd.grad(value, (x, y))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-forward-keys"])
def test_compiles_with_fullgraph_on_cuda(dtype):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(64, 64).to("cuda", dtype)

    def loss(x, y):
        q = encoder(x)
        return functional.infonce(q, y, critic="cosine") + functional.smile(q, y, temperature=1.0)

    x, y = torch.randn(512, 64, device="cuda", dtype=dtype), torch.randn(512, 64, device="cuda", dtype=dtype)
    assert_compiles_like_eager(loss, encoder.weight, x, y)


def test_autocast_runs_the_kernels_in_bf16():
    x, y = correlated_pair(1024, 1024, 128)
    x, y = x.float().cuda().requires_grad_(), y.float().cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = functional.infonce(x, y)
    value.backward()
    assert value.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(value, functional.infonce(x.detach().bfloat16(), y.bfloat16()), rtol=0, atol=0)


def test_pid_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(0)  # Dirichlet(0.3) draws, whatever ran before
    p = torch._sample_dirichlet(torch.full((64, 10 * 8 * 8), 0.3, dtype=torch.float64), generator=gen)
    p = p.reshape(64, 10, 8, 8)
    on_gpu, on_cpu = pid.broja_batch(p.cuda()), pid.broja_batch(p)
    assert on_gpu.red.is_cuda
    assert float(on_gpu.gap.max()) <= 1e-6
    for field in ("red", "uni_t", "uni_s", "syn"):
        gap = (on_gpu.gap.cpu() + on_cpu.gap) + 1e-9
        assert bool(((getattr(on_gpu, field).cpu() - getattr(on_cpu, field)).abs() <= gap).all()), field
