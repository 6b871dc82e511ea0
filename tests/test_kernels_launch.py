"""How the kernels are launched, checked without running one (no GPU, no interpreter needed)."""

import pytest
import torch

launch = pytest.importorskip("rid_fast.kernels.launch", reason="triton is needed")
tuning = pytest.importorskip("rid_fast.kernels.tuning", reason="triton is needed")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kernel", tuning.KERNELS)
def test_autotuner_pruning_sees_keyword_arguments(kernel, dtype):
    """The kernels are launched with keyword arguments, which Triton's autotuner hands its pruning
    hook in ``kwargs`` (``named_args`` holds the positional ones): the hook finds q's dtype either
    way and keeps exactly that dtype's candidates."""
    prune = launch._prune_for(kernel)
    q = torch.empty(4, 8, dtype=dtype)
    expected = {tuning.config_key(c) for c in tuning.candidate_configs(kernel, dtype)}
    for named_args, kwargs in (({}, {"q_ptr": q}), ({"q_ptr": q}, {})):
        kept = prune(tuning.all_candidates(kernel), named_args, **kwargs)
        assert {tuning.config_key(c) for c in kept} == expected
