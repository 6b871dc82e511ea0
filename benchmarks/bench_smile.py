"""SMILE on CPU: streaming vs eager reference vs torch.compile (fp32, D=128, clip 5)."""

import pytest

from rid_fast.bench import Case


@pytest.mark.parametrize("impl", ["torch", "reference", "compile"])
@pytest.mark.parametrize("batch", [8192, 16384])
def test_smile(run_case, batch, impl):
    run_case(Case("smile", n_queries=batch, dim=128, impl=impl, device="cpu"))
