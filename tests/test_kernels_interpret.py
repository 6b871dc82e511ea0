"""The fused Triton kernels under the Triton interpreter (CPU), against the reference.

Run as its own pytest invocation with TRITON_INTERPRET=1 in the environment before Python starts
(``make test-interpret``): the variable is read when the kernels are decorated. The interpreter
runs fp32 and fp16 (its bf16 dot is wrong), on small odd shapes; tiles are 16 × 16, so every
shape below spans several tiles with ragged edges.
"""

import os

import pytest
import torch
from estimator_checks import (
    KERNEL_ESTIMATORS,
    assert_every_candidate_config_matches,
    assert_far_below_zero_matches,
    assert_matches_reference,
    correlated_pair,
)

from rid_fast import functional

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before Python starts"
    ),
]


SHAPES = [
    (n_queries, n_keys, dim)
    for n_queries in (1, 37, 130)
    for n_keys in (n_queries, n_queries + 19)
    for dim in (3, 17, 64)
] + [(37, 37, 130)]  # D > 128: chunked feature loop and a backward grid split along D


def _cases():
    for label, (name, temperature, options) in KERNEL_ESTIMATORS.items():
        for n_queries, n_keys, dim in SHAPES:
            if options.get("symmetric") and n_keys != n_queries:
                continue
            if name != "infonce" and n_keys < 2:
                continue
            # Both critics across the shapes, except SMILE: its clip makes the gradient jump, and the
            # cosine critic's fp16 normalisation (outside the kernels, the same in both fp16 paths)
            # moves scores across the clip relative to the float64 truth.
            critic = "cosine" if (n_queries + dim) % 2 and name != "smile" else "dot"
            yield pytest.param(
                name,
                temperature,
                options,
                n_queries,
                n_keys,
                dim,
                critic,
                id=f"{label}-{n_queries}-{n_keys}-{dim}-{critic}",
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,temperature,options,n_queries,n_keys,dim,critic", list(_cases()))
def test_matches_reference(name, temperature, options, n_queries, n_keys, dim, critic, dtype):
    x, y = correlated_pair(n_queries, n_keys, dim)
    assert_matches_reference(name, x, y, temperature=temperature, critic=critic, impl="triton", dtype=dtype, **options)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["16bit", "fp32"])
@pytest.mark.parametrize("label", ["infonce_symmetric", "smile", "js"])
def test_every_gpu_candidate_config(monkeypatch, label, dtype):
    """The GPU's tiles (64–128 rows and columns), which the 16 × 16 interpreter default never runs:
    a shape with two ragged row tiles of the largest and a feature dimension split in chunks (fp32)."""
    assert_every_candidate_config_matches(monkeypatch, label, (150, 170, 40), dtype=dtype, device="cpu")


def test_auto_stays_on_streaming_for_cpu_tensors():
    x, y = correlated_pair(8, 8, 4)
    torch.testing.assert_close(
        functional.infonce(x.float(), y.float()), functional.infonce(x.float(), y.float(), impl="torch")
    )


def test_deterministic():
    x, y = (t.float().requires_grad_() for t in correlated_pair(37, 56, 17))
    runs = []
    for _ in range(2):
        value = functional.smile(x, y, impl="triton", temperature=0.5, clip=1.0)
        runs.append((value, *torch.autograd.grad(value, (x, y))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# The interpreter evaluates the exponentials of entries that a select then drops with numpy, which
# warns when they overflow; on a GPU they are discarded silently.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("label", ["infonce", "infonce_symmetric", "dv", "smile"])
def test_scores_far_below_zero_on_ragged_tiles(label):
    """Every score ≈ −120 on ragged 16 × 16 tiles: the gradients stay finite and match."""
    assert_far_below_zero_matches(label, (37, 56, 17), dtype=torch.float32, device="cpu")
