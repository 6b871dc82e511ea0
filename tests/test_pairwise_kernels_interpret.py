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

Tolerances are first-order rounding bounds (unit roundoff u = 2⁻²⁴, the kernels compute in fp32),
taken from the truth, never from an observed error (see :func:`_score_error` and the functions
after it): a wrong factor, tile or mask is off by far more.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from rid_fast.ops import pairwise_reference as reference

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before Python starts"
    ),
]

pairwise = pytest.importorskip("rid_fast.kernels.pairwise")

U = 2.0**-24  # fp32 unit roundoff: every statistic and accumulation
OUTPUT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11}  # gradients come back in the inputs' dtype


def _output_rounding(dtype: torch.dtype, value: torch.Tensor) -> torch.Tensor:
    """Bound on rounding ``value`` to ``dtype``: relative for normal numbers, plus half the spacing of
    the subnormals (small fp16 gradients, e.g. 8e-6, are subnormal)."""
    info = torch.finfo(dtype)
    return OUTPUT_ROUNDOFF[dtype] * value.abs() + info.smallest_normal * info.eps / 2


CLIP = 1.0

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


def _inputs(n_rows: int, n_cols: int, hidden: int, dtype: torch.dtype, seed: int = 0):
    """a (B, H), c (N, H), w2 (H,), b2 () rounded to ``dtype``, returned in float64. Scores come out
    of order one to a few units; w2 has both signs and, for H ≥ 3, one zero (a unit whose gradient
    dw2 still counts, though it adds nothing to the scores)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n_rows, hidden, generator=gen, dtype=torch.float64)
    c = torch.randn(n_cols, hidden, generator=gen, dtype=torch.float64)
    w2 = torch.randn(hidden, generator=gen, dtype=torch.float64) * 2.0 / math.sqrt(hidden)
    if hidden >= 3:
        w2[1] = 0.0
    b2 = torch.tensor(0.3, dtype=torch.float64)
    return tuple(t.to(dtype).double() for t in (a, c, w2, b2))


def _score_error(a, c, w2, b2) -> float:
    r"""Bound on the fp32 error of any score: the operands :math:`|w_h| a_{ih}`, :math:`-|w_h| c_{jh}`
    (one rounding each), the H-term sum of signed maxima and the H-term product :math:`c_j \cdot w_2`
    (sequential: at most H roundings per term), two additions:
    :math:`u\,[(2H + 4) \max_{ij} \sum_h |w_h|(|a_{ih}| + |c_{jh}|) + |b_2|]`. The positives, formed
    directly in fp32 from :math:`\mathrm{relu}(a_i + c_i)`, are within the same bound."""
    hidden = a.shape[1]
    scale = (a.abs() @ w2.abs())[:, None] + (c.abs() @ w2.abs())[None, :]
    return U * ((2 * hidden + 4) * float(scale.max()) + abs(float(b2)))


def _lse_error(score_error: float, scores: torch.Tensor, n_terms: int) -> float:
    r"""Bound on the error of an online log-sum-exp of ``n_terms`` scores, each off by at most
    ``score_error``: the scores' own error, plus the exponents (shift and scale by log₂e round at
    :math:`2 S` with :math:`S = \max|s| + \log N`), the positive sum (at most N + 8 roundings), one
    rescale per tile of at least 16 terms, and the final logarithm."""
    big = float(scores.abs().max()) + math.log(n_terms)
    tiles = n_terms / 16 + 2
    return score_error + U * ((n_terms + 8) + tiles * (4 * big + 4) + big)


def _truth(op: str, a, c, w2, b2, row_grad, col_grad):
    """Values, gradients (a, c, w2, b2) and the weights W = ∂L/∂s with their exponential parts M
    (the magnitudes their rounding scales with), all float64, for L = Σ_i g_i L_i (+ Σ_j h_j L^c_j)."""
    inputs = [t.clone().requires_grad_(True) for t in (a, c, w2, b2)]
    scores = reference.pairwise_scores(*inputs)
    n_rows, n_cols = scores.shape
    eye = torch.eye(n_rows, n_cols, dtype=torch.float64)
    s = scores.detach()
    g = row_grad[:, None]
    if op == "ce_rows":
        values = (reference.cross_entropy_rows(*inputs),)
        magnitude = (g * torch.softmax(s, 1)).abs()
        weights = g * (torch.softmax(s, 1) - eye)
    elif op == "ce_rows_cols":
        values = reference.cross_entropy_rows_cols(*inputs)
        p, q = torch.softmax(s, 1), torch.softmax(s, 0)
        magnitude = (g * p).abs() + (col_grad[None, :] * q).abs()
        weights = g * p + col_grad[None, :] * q - (g + col_grad[:, None]) * eye
    elif op.startswith("lse_negatives"):
        clip = CLIP if op.endswith("clipped") else None
        values = (reference.lse_negatives(*inputs, clip=clip),)
        clamped = s.clamp(-clip, clip) if clip is not None else s
        p = torch.softmax(clamped.masked_fill(eye.bool(), -math.inf), 1)
        magnitude = (g * p).abs()
        weights = g * p * ((s.abs() <= clip) if clip is not None else 1.0)
    else:
        values = (reference.softplus_negatives(*inputs),)
        magnitude = (g * torch.sigmoid(s)).abs().masked_fill(eye.bool(), 0.0)
        weights = (g * torch.sigmoid(s)).masked_fill(eye.bool(), 0.0)
    loss = (values[0] * row_grad).sum() + ((values[1] * col_grad).sum() if len(values) > 1 else 0.0)
    grads = torch.autograd.grad(loss, inputs)
    return [v.detach() for v in values], grads, weights, magnitude, s


def _fast(op: str, a, c, w2, b2, row_grad, col_grad, dtype):
    """Values and gradients from the kernels, the inputs in ``dtype``, incoming gradients in fp32."""
    a, c, w2, b2 = (t.to(dtype) for t in (a, c, w2, b2))
    row_grad, col_grad = row_grad.float(), col_grad.float()
    if op == "ce_rows":
        loss = pairwise.cross_entropy_rows_forward(a, c, w2, b2)
        return (loss,), pairwise.cross_entropy_rows_backward(row_grad, a, c, w2, b2, loss)
    if op == "ce_rows_cols":
        rows, cols = pairwise.cross_entropy_rows_cols_forward(a, c, w2, b2)
        grads = pairwise.cross_entropy_rows_cols_backward(row_grad, col_grad, a, c, w2, b2, rows, cols)
        return (rows, cols), grads
    if op.startswith("lse_negatives"):
        clip = CLIP if op.endswith("clipped") else None
        lse = pairwise.lse_negatives_forward(a, c, w2, b2, clip=clip)
        return (lse,), pairwise.lse_negatives_backward(row_grad, a, c, w2, b2, lse, clip=clip)
    values = pairwise.softplus_negatives_forward(a, c, w2, b2)
    return (values,), pairwise.softplus_negatives_backward(row_grad, a, c, w2, b2)


def _value_bounds(op: str, scores, score_error: float) -> list[torch.Tensor]:
    """Per-row (and per-column) bounds on the forward's outputs."""
    n_rows, n_cols = scores.shape
    if op == "softplus_negatives":
        off = ~torch.eye(n_rows, n_cols, dtype=torch.bool)
        terms = torch.nn.functional.softplus(scores) * off
        # each term off by σ(s)·(score error) plus its log1p, the N-term sum by (N + 8) roundings
        slope = (torch.sigmoid(scores) * off).sum(1)
        return [slope * score_error + U * ((n_cols + 8) * terms.sum(1) + 4 * n_cols)]
    row = _lse_error(score_error, scores, n_cols)
    if op.startswith("lse_negatives"):
        return [torch.full((n_rows,), row)]
    # the cross-entropies subtract the positives, formed in fp32 within the score bound
    bounds = [torch.full((n_rows,), row + score_error)]
    if op == "ce_rows_cols":
        bounds.append(torch.full((n_cols,), _lse_error(score_error, scores, n_rows) + score_error))
    return bounds


def _gradient_bounds(op, a, c, w2, weights, magnitude, scores, score_error, row_grad, dtype):
    r"""Bounds on (da, dc, dw2, db2). Each weight is rebuilt from a recomputed score and a saved
    statistic: an exponential weight is off by at most its size M times (score error + statistic
    error + exponent rounding); the statistic saved for the cross-entropies is the loss plus the
    positives (one more score error). A sigmoid weight is off by at most g·(score error)/4. The
    gradients sum the weights times indicators (≤ 1) or relu(a_ih + c_jh), over N (da), B (dc),
    B·N (dw2, db2) terms: (terms + 8) roundings each. 16-bit outputs add their own rounding."""
    n_rows, n_cols = scores.shape
    big = float(scores.abs().max()) + math.log(max(n_rows, n_cols))
    if op == "softplus_negatives":
        error = row_grad.abs()[:, None] * score_error / 4 + 4 * U * magnitude
    else:
        statistic = max(_lse_error(score_error, scores, n_cols), _lse_error(score_error, scores, n_rows))
        if op.startswith("ce_rows"):
            statistic += 2 * score_error
        error = magnitude * (score_error + statistic + U * (4 * big + 8))
    size = weights.abs() + magnitude
    relu = torch.relu(a[:, None, :] + c[None, :, :])  # (B, N, H), float64: the test shapes are tiny
    da = w2.abs()[None, :] * (error + (n_cols + 8) * U * size).sum(1)[:, None]
    dc = w2.abs()[None, :] * (error + (n_rows + 8) * U * size).sum(0)[:, None]
    everything = error + (n_rows + n_cols + 8) * U * size
    dw2 = torch.einsum("ij,ijh->h", everything, relu)
    db2 = everything.sum()
    return da, dc, dw2, db2


@pytest.mark.parametrize(
    "op,dtype,n_rows,n_cols,hidden",
    CASES,
    ids=[f"{op}-{str(dtype)[6:]}-{b}-{n}-{h}" for op, dtype, b, n, h in CASES],
)
def test_matches_reference(op, dtype, n_rows, n_cols, hidden):
    _assert_matches_reference(op, dtype, n_rows, n_cols, hidden)


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
    _assert_matches_reference("ce_rows_cols", torch.float32, 150, 150, 3)


def _assert_matches_reference(op, dtype, n_rows, n_cols, hidden):
    a, c, w2, b2 = _inputs(n_rows, n_cols, hidden, dtype)
    gen = torch.Generator().manual_seed(1)
    row_grad = torch.rand(n_rows, generator=gen, dtype=torch.float64) + 0.5
    col_grad = torch.rand(n_cols, generator=gen, dtype=torch.float64) + 0.5
    row_grad, col_grad = row_grad.float().double(), col_grad.float().double()  # what the kernels see
    values, grads, weights, magnitude, scores = _truth(op, a, c, w2, b2, row_grad, col_grad)
    score_error = _score_error(a, c, w2, b2)
    if op.endswith("clipped"):  # the clamp's gradient switches at ±clip: no score may be within reach of it
        margin = float(((scores.abs() - CLIP).abs() + torch.eye(n_rows, n_cols, dtype=torch.float64)).min())
        assert margin > score_error, f"a score lies within {margin:.2g} of the clip: choose other data"
    fast_values, fast_grads = _fast(op, a, c, w2, b2, row_grad, col_grad, dtype)
    for what, got, want, bound in zip(("rows", "cols"), fast_values, values, _value_bounds(op, scores, score_error)):
        assert got.dtype == torch.float32
        error = (got.double() - want).abs()
        assert (error <= bound).all(), f"{op} value ({what}): error {float(error.max()):.3g} > {float(bound.max()):.3g}"
    bounds = _gradient_bounds(op, a, c, w2, weights, magnitude, scores, score_error, row_grad, dtype)
    for what, got, want, bound in zip(("da", "dc", "dw2", "db2"), fast_grads, grads, bounds):
        assert got.dtype == dtype and got.shape == want.shape, f"{op} {what}: {got.dtype} {tuple(got.shape)}"
        bound = bound + _output_rounding(dtype, want.abs() + bound)
        error = (got.double() - want).abs()
        assert (error <= bound).all(), (
            f"{op} {what}: error {float(error.max()):.3g} > bound {float(bound.flatten()[error.argmax()]):.3g} "
            f"(gradient scale {float(want.abs().max()):.3g})"
        )


def test_backward_is_deterministic():
    """Two backward passes give the same bits: every program writes only its own block, and the
    per-program partials of dw2 and db2 are summed in a fixed order."""
    a, c, w2, b2 = (t.float() for t in _inputs(37, 56, 3, torch.float32))
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
    a, c, w2, b2 = change(*(t.float() for t in _inputs(5, 7, 3, torch.float32)))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pairwise.lse_negatives_forward(a, c, w2, b2)
