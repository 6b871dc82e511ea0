import pytest
import torch
from estimator_checks import EXP_TEMPERATURE, assert_matches_reference, correlated_pair, evaluate, reference_test

from rid_fast.mi import functional

test_matches_reference = reference_test("smile", temperature=EXP_TEMPERATURE, min_keys=2, clip=5.0)
test_clipped_dv_gradient_matches_reference = reference_test(
    "smile", temperature=EXP_TEMPERATURE, min_keys=2, clip=5.0, gradient="clipped_dv"
)


@pytest.mark.parametrize("gradient", ["js", "clipped_dv"])
@pytest.mark.parametrize("clip", [0.25, 1.0, 50.0])
def test_clip_levels_match_reference(small_tiles, clip, gradient):
    # A small clip zeroes the clipped DV's gradient of most scores; a large one reduces SMILE to DV.
    x, y = correlated_pair(37, 56, 17)
    assert_matches_reference(
        "smile", x, y, temperature=0.1, critic="cosine", impl="torch", dtype=torch.float64, clip=clip,
        gradient=gradient,
    )  # fmt: skip


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_value_is_the_clipped_dv_and_gradient_is_js(small_tiles, impl):
    """The default: the value of the clipped DV, exactly, and the gradient of JS (x, y and the
    temperature), as Song & Ermon's ``js + (smile - js).detach()``."""
    x, y = correlated_pair(37, 56, 17)
    options = dict(dtype=torch.float64, temperature=0.3, impl=impl)
    smile = evaluate("smile", x, y, clip=1.0, **options)
    clipped_dv = evaluate("smile", x, y, clip=1.0, gradient="clipped_dv", **options)
    js = evaluate("js", x, y, **options)
    assert torch.equal(smile.value, clipped_dv.value)
    for got, want, other in zip(smile.grads, js.grads, clipped_dv.grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(got, other)  # the two gradients differ: the choice is real


def test_value_without_autograd_is_the_same():
    x, y = correlated_pair(37, 56, 17)
    trained = functional.smile(x.clone().requires_grad_(), y, temperature=0.3, clip=1.0)
    with torch.no_grad():
        inference = functional.smile(x, y, temperature=0.3, clip=1.0)
    assert torch.equal(trained.detach(), inference)


def test_large_clip_equals_dv():
    x, y = correlated_pair(20, 20, 3)
    torch.testing.assert_close(functional.smile(x, y, clip=1e6), functional.dv(x, y))
    xx = x.clone().requires_grad_()
    (grad_smile,) = torch.autograd.grad(functional.smile(xx, y, clip=1e6, gradient="clipped_dv"), xx)
    (grad_dv,) = torch.autograd.grad(functional.dv(xx, y), xx)
    torch.testing.assert_close(grad_smile, grad_dv)
