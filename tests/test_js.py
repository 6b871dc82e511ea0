from estimator_checks import EXP_TEMPERATURE, correlated_pair, reference_test

from rid_fast.mi import functional

test_matches_reference = reference_test("js", temperature=EXP_TEMPERATURE, min_keys=2)


def test_objective_is_negative():
    # Both terms are minus a softplus: the f-GAN JS objective is always below 0.
    x, y = correlated_pair(40, 40, 8, rho=0.99)
    assert float(functional.js(x, y, temperature=0.05, critic="cosine")) < 0
