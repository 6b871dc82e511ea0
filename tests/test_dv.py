from estimator_checks import EXP_TEMPERATURE, correlated_pair, reference_test

from rid_fast.mi import functional

test_matches_reference = reference_test("dv", temperature=EXP_TEMPERATURE, min_keys=2)


def test_dv_is_at_least_nwj():
    # DV ≥ NWJ for the same critic (log z ≤ z/e), a classical ordering of the two bounds.
    x, y = correlated_pair(50, 60, 6)
    for critic in ("dot", "cosine"):
        assert float(functional.dv(x, y, critic=critic)) >= float(functional.nwj(x, y, critic=critic)) - 1e-12
