"""The benchmark baselines compute what they claim (they are only worth comparing against if so)."""

import baselines  # benchmarks/baselines.py
import torch

from rid_fast.mi import reference


def _inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(48, 32, generator=gen), dim=1)
    y = torch.nn.functional.normalize(x.repeat(2, 1)[:70] + 0.3 * torch.randn(70, 32, generator=gen), dim=1)
    return x.requires_grad_(), y.requires_grad_()


def _value_and_grads(fn):
    x, y = _inputs()
    value = fn(x, y)
    return (value, *torch.autograd.grad(value, (x, y)))


def test_sdpa_trick_matches_reference():
    got = _value_and_grads(lambda x, y: baselines.sdpa_infonce(x, y, temperature=0.1))
    want = _value_and_grads(lambda x, y: reference.infonce(x, y, temperature=0.1))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_matches_reference():
    got = _value_and_grads(lambda x, y: baselines.chunked_infonce(x, y, temperature=0.1, chunk=16))
    want = _value_and_grads(lambda x, y: reference.infonce(x, y, temperature=0.1))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_row_block_pairwise_scores_match_the_whole_hidden_layer(monkeypatch):
    """The concat critic's former path (the benchmark's "rows" baseline): row blocks of a few rows,
    the last one ragged, give the oracle's scores and gradients."""
    from rid_fast.ops.pairwise_reference import pairwise_scores

    monkeypatch.setattr(baselines.RowBlockPairwiseScores, "BLOCK_ELEMENTS", 5 * 56 * 7)
    gen = torch.Generator().manual_seed(0)
    factors = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((37, 7), (56, 7), (7,), ())]
    weights = torch.randn(37, 56, generator=gen, dtype=torch.float64)
    results = []
    for fn in (baselines.RowBlockPairwiseScores.apply, pairwise_scores):
        inputs = [t.clone().requires_grad_(True) for t in factors]
        scores = fn(*inputs)
        results.append((scores, *torch.autograd.grad((scores * weights).sum(), inputs)))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
