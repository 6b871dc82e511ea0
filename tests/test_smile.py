import pytest
import torch
from estimator_checks import EXP_TEMPERATURE, assert_matches_reference, correlated_pair, reference_test

from rid_fast.mi import functional

test_matches_reference = reference_test("smile", temperature=EXP_TEMPERATURE, min_keys=2, clip=5.0)


@pytest.mark.parametrize("clip", [0.25, 1.0, 50.0])
def test_clip_levels_match_reference(small_tiles, clip):
    # A small clip zeroes the gradient of most scores; a large one reduces SMILE to DV.
    x, y = correlated_pair(37, 56, 17)
    assert_matches_reference(
        "smile", x, y, temperature=0.1, critic="cosine", impl="torch", dtype=torch.float64, clip=clip
    )


def test_large_clip_equals_dv():
    x, y = correlated_pair(20, 20, 3)
    torch.testing.assert_close(functional.smile(x, y, clip=1e6), functional.dv(x, y))
