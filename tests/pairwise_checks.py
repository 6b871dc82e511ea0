r"""Shared checks for the pairwise-MLP critic's kernels (rid_fast.kernels.pairwise): values and
gradients against the plain-PyTorch oracle (rid_fast.ops.pairwise_reference) in float64.

The inputs are rounded to the dtype first and the truth is the reference in float64 on those same
values, so what is measured is the kernels' arithmetic. Tolerances are first-order rounding bounds
(unit roundoff u = 2⁻²⁴, the kernels compute in fp32), taken from the truth, never from an observed
error (see :func:`_score_error` and the functions after it): a wrong factor, tile or mask is off by
far more.
"""

from __future__ import annotations

import math

import pytest
import torch

from rid_fast.ops import pairwise_reference as reference

pairwise = pytest.importorskip("rid_fast.kernels.pairwise")

U = 2.0**-24  # fp32 unit roundoff: every statistic and accumulation
OUTPUT_ROUNDOFF = {
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}  # gradients come back in the inputs' dtype


def _output_rounding(dtype: torch.dtype, value: torch.Tensor) -> torch.Tensor:
    """Bound on rounding ``value`` to ``dtype``: relative for normal numbers, plus half the spacing of
    the subnormals (small fp16 gradients, e.g. 8e-6, are subnormal)."""
    info = torch.finfo(dtype)
    return OUTPUT_ROUNDOFF[dtype] * value.abs() + info.smallest_normal * info.eps / 2


CLIP = 1.0


def inputs(n_rows: int, n_cols: int, hidden: int, dtype: torch.dtype, seed: int = 0):
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


def _fast(op: str, a, c, w2, b2, row_grad, col_grad, dtype, device):
    """Values and gradients from the kernels, the inputs in ``dtype`` on ``device``, incoming
    gradients in fp32."""
    a, c, w2, b2 = (t.to(device, dtype) for t in (a, c, w2, b2))
    row_grad, col_grad = row_grad.to(device, torch.float32), col_grad.to(device, torch.float32)
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


def assert_matches_reference(op: str, dtype: torch.dtype, n_rows: int, n_cols: int, hidden: int, device="cpu"):
    """The kernels' values and gradients for ``op`` on (B, N, H) in ``dtype`` on ``device`` are
    within the rounding bounds above of the float64 truth."""
    a, c, w2, b2 = inputs(n_rows, n_cols, hidden, dtype)
    gen = torch.Generator().manual_seed(1)
    row_grad = torch.rand(n_rows, generator=gen, dtype=torch.float64) + 0.5
    col_grad = torch.rand(n_cols, generator=gen, dtype=torch.float64) + 0.5
    row_grad, col_grad = row_grad.float().double(), col_grad.float().double()  # what the kernels see
    values, grads, weights, magnitude, scores = _truth(op, a, c, w2, b2, row_grad, col_grad)
    score_error = _score_error(a, c, w2, b2)
    if op.endswith("clipped"):  # the clamp's gradient switches at ±clip: no score may be within reach of it
        margin = float(((scores.abs() - CLIP).abs() + torch.eye(n_rows, n_cols, dtype=torch.float64)).min())
        assert margin > score_error, f"a score lies within {margin:.2g} of the clip: choose other data"
    fast_values, fast_grads = _fast(op, a, c, w2, b2, row_grad, col_grad, dtype, device)
    fast_values, fast_grads = [t.cpu() for t in fast_values], [t.cpu() for t in fast_grads]
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
