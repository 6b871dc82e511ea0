"""JS (softplus partition terms) on CPU: streaming vs eager reference vs torch.compile (fp32, D=128)."""

from suites import estimator_suite

test_js = estimator_suite("js")
