import math

import torch
from estimator_checks import EXP_TEMPERATURE, correlated_pair, reduction_error_bound, reference_test

from rid_fast.mi import functional

test_matches_reference = reference_test("nwj", temperature=EXP_TEMPERATURE, min_keys=2)

#: Largest finite fp32 value, e^88.72.
FP32_MAX = torch.finfo(torch.float32).max


def test_large_scores_do_not_overflow_early():
    """exp(s) alone overflows fp32 at s > 88.7; the partition is formed in log space and
    exponentiated once, so an estimate whose true value is finite — here about −1e37, near fp32's
    largest — comes out finite and as accurate as fp32 sums allow."""
    x32, y32 = (t.float() for t in correlated_pair(16, 16, 4))
    x, y = x32.double(), y32.double()  # the float64 truth of the same (rounded) inputs
    negatives = ~torch.eye(16, dtype=torch.bool)
    # The temperature that puts the largest negative score at 91: its e^s is past fp32's range, but
    # the mean over the 240 negatives, e^(91 − log 240 + …), times e⁻¹, is not.
    temperature = float(torch.tensor(float((x @ y.T)[negatives].max()) / 91.0, dtype=torch.float32))
    scores = x @ y.T / temperature
    assert float(scores[negatives].max()) > math.log(FP32_MAX)  # the case bites: fp32 exp overflows
    assert torch.isinf(torch.exp(scores.float()[negatives]).mean())
    truth = float(functional.nwj(x, y, temperature=temperature, impl="reference"))
    assert math.isfinite(truth) and 1e36 < -truth < FP32_MAX

    estimate = float(functional.nwj(x32, y32, temperature=temperature, critic="dot"))
    bound = reduction_error_bound("nwj", x, y, temperature=temperature)["value"]
    assert abs(estimate - truth) <= bound, f"{estimate:.6g} vs {truth:.6g}: error > {bound:.3g}"
