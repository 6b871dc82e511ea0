r"""The pairwise-MLP critic's Triton kernels (rid_fast.kernels.pairwise) under the Triton interpreter,
against the plain-PyTorch oracle (rid_fast.ops.pairwise_reference) in float64.

Run with TRITON_INTERPRET=1 set before Python starts (``make test-interpret``). The interpreter
runs fp32 and fp16 (its bf16 is wrong); the inputs are rounded to the dtype first and the truth is
the reference in float64 on those same values, so what is measured is the kernels' arithmetic.

The score loop runs once per hidden unit and tile, slowly under the interpreter, so the grid is a
subset of B ∈ {1, 37, 130} × N ∈ {B, B + 19} × H ∈ {3, 17, 64, 130} that gives every reduction
both dtypes and covers each odd size (see ``CASES``; about a minute on two cores). Tiles are
32 × 32 here and the backward folds 32 hidden units at a time: B = 37 and 130 span ragged row
and column tiles with the diagonal crossing tiles, H = 130 spans five unit chunks, the last
ragged, H = 64 two and H = 17 one ragged chunk.

Tolerances: first-order rounding bounds from the truth (tests/pairwise_checks.py).
"""

from __future__ import annotations

import os

import pytest
import torch
from pairwise_checks import assert_matches_reference, inputs, pairwise

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before Python starts"
    ),
]

# (op, dtype, B, N, H): each reduction in both dtypes; B = 1, 37, 130, N = B and B + 19, H = 3, 17, 64, 130.
CASES = [
    ("ce_rows", torch.float32, 37, 56, 17),
    ("ce_rows", torch.float16, 1, 20, 130),
    ("ce_rows_cols", torch.float32, 37, 37, 3),
    ("ce_rows_cols", torch.float16, 130, 130, 3),
    ("lse_negatives", torch.float32, 130, 149, 3),
    ("lse_negatives", torch.float16, 37, 56, 64),
    ("lse_negatives_clipped", torch.float32, 37, 37, 17),
    ("lse_negatives_clipped", torch.float16, 1, 20, 17),
    ("softplus_negatives", torch.float32, 1, 20, 64),
    ("softplus_negatives", torch.float16, 37, 56, 17),
]


@pytest.mark.parametrize(
    "op,dtype,n_rows,n_cols,hidden",
    CASES,
    ids=[f"{op}-{str(dtype)[6:]}-{b}-{n}-{h}" for op, dtype, b, n, h in CASES],
)
def test_matches_reference(op, dtype, n_rows, n_cols, hidden):
    assert_matches_reference(op, dtype, n_rows, n_cols, hidden)


@pytest.mark.parametrize("round_", range(3))
def test_every_gpu_candidate_config(monkeypatch, round_):
    """The GPU's tiles (32–256 rows and columns, 8 hidden units at a time), which the interpreter's
    defaults never run, each candidate forced in turn (kernels with fewer cycle through theirs):
    symmetric InfoNCE at B = N = 150 — two ragged row tiles of the largest forward tile, the rows'
    and the columns' kernels — and H = 3, one ragged chunk of units."""
    from rid_fast.kernels import tuning

    chosen = {}
    for kernel in tuning.PAIRWISE_KERNELS:
        configs = tuning.candidate_configs(kernel, torch.float32)
        chosen[kernel] = configs[round_ % len(configs)]
    monkeypatch.setattr(tuning, "interpreting", lambda: False)  # the GPU's configs and unit chunk
    monkeypatch.setenv("RID_FAST_AUTOTUNE", "0")
    monkeypatch.setattr(tuning, "default_config", lambda kernel, _dtype: chosen[kernel])
    assert_matches_reference("ce_rows_cols", torch.float32, 150, 150, 3)


def test_backward_is_deterministic():
    """Two backward passes give the same bits: every program writes only its own block, and the
    per-program partials of dw2 and db2 are summed in a fixed order."""
    a, c, w2, b2 = (t.float() for t in inputs(37, 56, 3, torch.float32))
    lse = pairwise.lse_negatives_forward(a, c, w2, b2)
    grad = torch.linspace(0.5, 1.5, 37)
    first = pairwise.lse_negatives_backward(grad, a, c, w2, b2, lse)
    second = pairwise.lse_negatives_backward(grad, a, c, w2, b2, lse)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a, c, w2, b2: (a, c[:, :2], w2, b2), "with the same H"),
        (lambda a, c, w2, b2: (a, c, w2[:2], b2), "w2 must have shape"),
        (lambda a, c, w2, b2: (a, c, w2, b2[None]), "b2 must be a 0-dim tensor"),
        (lambda a, c, w2, b2: (a, c.double(), w2, b2), "c must have a.s dtype"),
        (lambda a, c, w2, b2: (a.T.contiguous().T, c, w2, b2), "a must be contiguous"),
        (lambda a, c, w2, b2: (a, c[:4], w2, b2), "c needs N >= max(B, 2) rows"),
    ],
    ids=["hidden", "w2-shape", "b2-shape", "dtype", "contiguous", "too-few-keys"],
)
def test_bad_inputs_are_named(change, message):
    """Bad inputs raise a ValueError naming the argument, before any kernel runs."""
    a, c, w2, b2 = change(*(t.float() for t in inputs(5, 7, 3, torch.float32)))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pairwise.lse_negatives_forward(a, c, w2, b2)


#: Every estimator module with the concat critic: (module, options, B, N); H = 17 (one ragged unit chunk).
ESTIMATOR_CASES = {
    "infonce": ("InfoNCE", {}, 9, 13),
    "infonce_symmetric": ("InfoNCE", {"symmetric": True}, 9, 9),
    "nwj": ("NWJ", {}, 9, 13),
    "dv": ("DV", {}, 9, 13),
    "smile": ("SMILE", {"clip": 1.0}, 9, 13),
    "js": ("JS", {}, 9, 13),
    "mine": ("MINE", {}, 9, 13),
}


def _estimate(label: str, impl: str, dtype: torch.dtype):
    """Value and gradients (x, y, then A, b1, C, w2, b2) of the estimator module with a
    ConcatCritic of seeded weights, inputs and weights in ``dtype``."""
    from rid_fast.mi import estimators
    from rid_fast.mi.critics import ConcatCritic

    name, options, n_rows, n_keys = ESTIMATOR_CASES[label]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n_rows, 5, generator=gen).to(dtype).requires_grad_(True)
    y = torch.randn(n_keys, 3, generator=gen).to(dtype).requires_grad_(True)
    torch.manual_seed(0)
    module = getattr(estimators, name)(ConcatCritic(5, 3, hidden=17), impl=impl, **options).to(dtype)
    value = module(x, y)
    grads = torch.autograd.grad(value, (x, y, *module.parameters()))
    return [t.detach().double() for t in (value, *grads)]


@pytest.mark.parametrize("label", ESTIMATOR_CASES)
def test_estimators_run_on_the_kernels_through_the_ops(label):
    """Every estimator with a ConcatCritic and ``impl="triton"`` goes through the
    ``rid_fast::pairwise_*`` ops to these kernels: value and every gradient (x, y, A, b1, C, w2, b2)
    in fp32 against the float64 truth (the oracle on the same rounded values), within twice the fp32
    oracle's own error or torch.testing's default fp32 tolerance (estimator_checks' contract)."""
    from estimator_checks import DEFAULT_TOLERANCES

    rtol, atol = DEFAULT_TOLERANCES[torch.float32]
    truth = _estimate(label, "reference", torch.float64)
    oracle = _estimate(label, "reference", torch.float32)
    got = _estimate(label, "triton", torch.float32)
    names = ["value", "x", "y", "A", "b1", "C", "w2", "b2"]
    for name, g, o, t in zip(names, got, oracle, truth):
        allowed = torch.maximum(2 * (o - t).abs(), atol + rtol * t.abs())
        excess = (g - t).abs() - allowed
        assert float(excess.max()) <= 0, f"{label} {name}: error {float((g - t).abs().max()):.3g}"
