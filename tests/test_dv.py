import torch
from estimator_checks import EXP_TEMPERATURE, correlated_pair, reference_test

from rid_fast import functional
from rid_fast.estimators import DV

test_matches_reference = reference_test("dv", temperature=EXP_TEMPERATURE, min_keys=2)


def test_dv_is_at_least_nwj():
    # DV ≥ NWJ for the same critic (log z ≤ z/e), a classical ordering of the two bounds.
    x, y = correlated_pair(50, 60, 6)
    for critic in ("dot", "cosine"):
        assert float(functional.dv(x, y, critic=critic)) >= float(functional.nwj(x, y, critic=critic)) - 1e-12


def test_module_matches_functional():
    x, y = correlated_pair(30, 45, 5)
    torch.testing.assert_close(DV("dot", temperature=0.3)(x, y), functional.dv(x, y, temperature=0.3))
