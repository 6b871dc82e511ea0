import math

import pytest
import torch
from estimator_checks import DTYPE_IDS, DTYPES, assert_matches_reference, cases, correlated_pair, reference_test

from rid_fast.mi import functional

test_matches_reference = reference_test("infonce", temperature=0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n_queries,n_keys,dim,critic", [c for c in cases() if c[0] == c[1]])
def test_symmetric_matches_reference(small_tiles, n_queries, n_keys, dim, critic, dtype):
    x, y = correlated_pair(n_queries, n_keys, dim)
    assert_matches_reference("infonce", x, y, temperature=0.1, critic=critic, impl="torch", dtype=dtype, symmetric=True)


def test_default_tiles_match_reference():
    x, y = correlated_pair(1100, 1500, 24)
    assert_matches_reference("infonce", x, y, temperature=0.1, critic="cosine", impl="torch", dtype=torch.float32)


def test_bounded_by_log_n():
    x, y = correlated_pair(64, 80, 8, rho=0.999)
    assert float(functional.infonce(x, y, temperature=0.01)) <= math.log(80) + 1e-9


def test_single_pair_is_zero():
    x, y = correlated_pair(1, 1, 5)
    assert float(functional.infonce(x, y)) == pytest.approx(0.0, abs=1e-12)


def test_training_takes_gradients_from_the_forward_sweep(monkeypatch):
    """Under autograd the streaming path computes InfoNCE's gradients in its forward sweep (three
    matrix products per tile, not four) when its strips are thick enough to pay; without autograd
    it runs the plain forward only."""
    from rid_fast.ops import streaming

    def unexpected(*args, **kwargs):
        raise AssertionError("wrong streaming routine for this mode")

    x, y = correlated_pair(37, 50, 8)
    x.requires_grad_()
    backward = streaming.cross_entropy_rows_backward
    monkeypatch.setattr(streaming, "cross_entropy_rows_backward", unexpected)
    functional.infonce(x, y, temperature=0.1, impl="torch").backward()
    assert x.grad is not None
    monkeypatch.setattr(streaming, "cross_entropy_rows_mean_and_grad", unexpected)
    with torch.no_grad():
        functional.infonce(x, y, temperature=0.1, impl="torch")
    functional.infonce(x.detach(), y, temperature=0.1, impl="torch")
    # Strips too thin to pay (here: a 2-row strip for 37 queries): forward + recomputing backward.
    monkeypatch.setattr(streaming, "STRIP_BYTES", 2 * 50 * 4)
    monkeypatch.setattr(streaming, "cross_entropy_rows_backward", backward)
    functional.infonce(x, y, temperature=0.1, impl="torch").backward()
