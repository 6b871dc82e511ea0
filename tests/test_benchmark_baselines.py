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
