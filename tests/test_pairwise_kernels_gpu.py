"""GPU tier of the pairwise-MLP critic's kernels (skipped without a CUDA device).

Every reduction in bf16, fp16 and fp32 on ragged shapes with H up to 256 against the float64
truth (the rounding bounds of tests/pairwise_checks.py), in the default configs and autotuned,
and bitwise determinism. The kernels' per-unit sums are read and written back by the program that
owns them (kernels.pairwise_backward): on a GPU, unlike under the interpreter, that relies on
each program's memory order, which these tests check.
"""

import pytest
import torch
from pairwise_checks import assert_matches_reference, inputs, pairwise

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

OPS = ["ce_rows", "ce_rows_cols", "lse_negatives", "lse_negatives_clipped", "softplus_negatives"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# B = 300, N = 319 (N = B for the symmetric op), H = 256: ragged against every candidate tile and
# unit chunk. (The float64 truth holds the B×N×H hidden layer on the host: kept small.)
SHAPE = (300, 319, 256)


def _check(op, dtype):
    n_rows, n_cols, hidden = SHAPE
    assert_matches_reference(op, dtype, n_rows, n_rows if op == "ce_rows_cols" else n_cols, hidden, device="cuda")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(monkeypatch, op, dtype):
    monkeypatch.setenv("RID_FAST_AUTOTUNE", "0")
    _check(op, dtype)


@pytest.mark.parametrize("op", OPS)
def test_autotuned_matches_reference(monkeypatch, op):
    """The autotuner runs every candidate on the launch's own buffers, which the backward
    accumulates into: they must be zeroed before the chosen config runs."""
    monkeypatch.setenv("RID_FAST_AUTOTUNE", "1")
    _check(op, torch.bfloat16)


def test_backward_is_deterministic():
    a, c, w2, b2 = (t.to("cuda", torch.bfloat16) for t in inputs(517, 600, 256, torch.bfloat16))
    rows, cols = pairwise.cross_entropy_rows_cols_forward(a, c[:517].contiguous(), w2, b2)
    grad = torch.linspace(0.5, 1.5, 517, device="cuda")
    args = (grad, grad, a, c[:517].contiguous(), w2, b2, rows, cols)
    first = pairwise.cross_entropy_rows_cols_backward(*args)
    for _ in range(3):
        for x, y in zip(first, pairwise.cross_entropy_rows_cols_backward(*args)):
            assert torch.equal(x, y)
