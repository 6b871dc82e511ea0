"""NWJ on CPU: streaming vs eager reference vs torch.compile (fp32, D=128)."""

import pytest

from rid_fast.bench import Case


@pytest.mark.parametrize("impl", ["torch", "reference", "compile"])
@pytest.mark.parametrize("batch", [8192, 16384])
def test_nwj(run_case, batch, impl):
    run_case(Case("nwj", n_queries=batch, dim=128, impl=impl, device="cpu"))
