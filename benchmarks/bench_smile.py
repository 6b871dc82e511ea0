"""SMILE (clip 5) on CPU: streaming vs eager reference vs torch.compile (fp32, D=128)."""

from suites import estimator_suite

test_smile = estimator_suite("smile")
