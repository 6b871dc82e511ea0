"""InfoNCE on CPU: streaming vs eager reference vs torch.compile vs chunked+checkpoint (fp32, D=128)."""

from pathlib import Path

import pytest

from rid_fast.bench import Case

CHUNKED = f"{Path(__file__).parent / 'baselines.py'}:chunked_infonce_step"


@pytest.mark.parametrize("impl", ["torch", "reference", "compile", "chunked"])
@pytest.mark.parametrize("batch", [8192, 16384])
def test_infonce(run_case, batch, impl):
    run_case(
        Case("infonce", n_queries=batch, dim=128, impl=impl, device="cpu"),
        step_ref=CHUNKED if impl == "chunked" else None,
    )


@pytest.mark.parametrize("impl", ["torch", "reference", "compile"])
@pytest.mark.parametrize("batch", [8192, 16384])
def test_infonce_symmetric(run_case, batch, impl):
    run_case(Case("infonce_symmetric", n_queries=batch, dim=128, impl=impl, device="cpu"))


def test_infonce_65536_streaming(run_case):
    """The reference would need ~50 GB here (16 GiB score matrices and their gradients)."""
    run_case(Case("infonce", n_queries=65536, dim=128, impl="torch", device="cpu"), rounds=1)
