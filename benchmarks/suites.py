"""The CPU suite of one estimator, shared by the ``bench_<op>.py`` files that need nothing else."""

import pytest

from rid_fast.bench import Case


def estimator_suite(estimator: str):
    """A pytest-benchmark test: ``estimator`` at B = N = 8192 and 16384 (fp32, D = 128, forward +
    backward) through the streaming path, the eager reference and ``torch.compile`` of it."""

    @pytest.mark.parametrize("impl", ["torch", "reference", "compile"])
    @pytest.mark.parametrize("batch", [8192, 16384])
    def test(run_case, batch, impl):
        run_case(Case(estimator, n_queries=batch, dim=128, impl=impl, device="cpu"))

    return test
