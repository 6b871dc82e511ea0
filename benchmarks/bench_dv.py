"""DV on CPU: streaming vs eager reference vs torch.compile (fp32, D=128)."""

from suites import estimator_suite

test_dv = estimator_suite("dv")
