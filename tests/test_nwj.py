import math

from estimator_checks import EXP_TEMPERATURE, correlated_pair, reference_test

from rid_fast.mi import functional

test_matches_reference = reference_test("nwj", temperature=EXP_TEMPERATURE, min_keys=2)


def test_large_scores_do_not_overflow_early():
    # exp(s) alone overflows fp32 at s > 88.7; the partition is formed in log space, so an
    # estimate whose true value is finite stays finite.
    x, y = correlated_pair(16, 16, 4)
    estimate = functional.nwj(x.float() * 3, y.float() * 3, temperature=0.01, critic="dot")
    truth = functional.nwj(x * 3, y * 3, temperature=0.01, critic="dot", impl="reference")
    assert math.isfinite(float(truth)) == math.isfinite(float(estimate))
