"""Shared checks: an estimator's fast path against the plain-PyTorch oracle, values and gradients.

The accuracy contract (as in FlashAttention's tests): evaluated in a low-precision dtype, a fast
path's error against a float64 truth — computed from the *same* inputs, rounded to that dtype and
upcast, so that only arithmetic error is measured — is at most twice the error of the reference
in that same dtype, or, when the reference happens to be nearly exact, within torch.testing's
default tolerance for that dtype (fp32: atol 1e-5 + rtol 1.3e-6 · |truth|). In float64 the fast path must
agree with the reference to 1e-9 relative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rid_fast import functional

SHAPES_B = (1, 2, 37, 257)

#: Temperature for the bounds that exponentiate single scores (NWJ, DV, SMILE, JS): their fp32
#: error grows like |s|·eps·e^s, so they are compared where e^s is well-conditioned (|s| ≤ 4.5).
#: InfoNCE, a log-softmax, is compared at τ = 0.1 (|s| up to 22).
EXP_TEMPERATURE = 0.5
SHAPES_D = (1, 3, 17, 130)


def correlated_pair(n_queries: int, n_keys: int, dim: int, *, seed: int = 0, rho: float = 0.8):
    """x (B, D), y (N, D) in float64, y_i correlated with x_i for i < B, every row's norm in
    [0.5, 1.5] whatever D (so dot scores stay within ±2.25/τ, also at D = 1)."""
    gen = torch.Generator().manual_seed(seed)

    def rows(n: int) -> torch.Tensor:
        direction = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)
        return direction * (0.5 + torch.rand(n, 1, generator=gen, dtype=torch.float64))

    x, y = rows(n_queries), rows(n_keys)
    y[:n_queries] = rho * x + math.sqrt(1 - rho**2) * y[:n_queries]
    return x, y


@dataclass
class Result:
    value: torch.Tensor
    grads: tuple[torch.Tensor, ...]  # d/dx, d/dy, d/dtemperature


def evaluate(name: str, x, y, *, dtype, temperature: float, impl: str, device="cpu", **options) -> Result:
    """Value and gradients (x, y, temperature) of estimator ``name`` with inputs cast to ``dtype``."""
    xx = x.detach().to(device, dtype).requires_grad_(True)
    yy = y.detach().to(device, dtype).requires_grad_(True)
    t_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tt = torch.tensor(temperature, dtype=t_dtype, device=device, requires_grad=True)
    value = functional.mi_bound(xx, yy, name, temperature=tt, impl=impl, **options)
    grads = torch.autograd.grad(value, (xx, yy, tt))
    return Result(value.detach().double().cpu(), tuple(g.double().cpu() for g in grads))


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _scale(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


#: torch.testing.assert_close's defaults: dtype → (rtol, atol).
DEFAULT_TOLERANCES = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


def assert_matches_reference(name: str, x, y, *, temperature: float, impl: str, dtype, device="cpu", **options) -> None:
    """The contract above, for the value and each gradient."""
    rounded_temperature = (
        float(torch.tensor(temperature, dtype=torch.float32)) if dtype != torch.float64 else temperature
    )
    truth = evaluate(
        name, x.to(dtype).double(), y.to(dtype).double(), dtype=torch.float64, temperature=rounded_temperature,
        impl="reference", device=device, **options,
    )  # fmt: skip
    fast = evaluate(name, x, y, dtype=dtype, temperature=temperature, impl=impl, device=device, **options)
    pairs = [("value", fast.value, truth.value)] + [
        (f"d/d{arg}", g_fast, g_true) for arg, g_fast, g_true in zip(("x", "y", "temperature"), fast.grads, truth.grads)
    ]
    if dtype == torch.float64:
        for what, got, want in pairs:
            bound = 1e-9 * max(1.0, _scale(want))
            assert _error(got, want) <= bound, f"{name} {what}: float64 error {_error(got, want):.3g}"
        return
    ref = evaluate(name, x, y, dtype=dtype, temperature=temperature, impl="reference", device=device, **options)
    ref_pairs = [ref.value, *ref.grads]
    rtol, atol = DEFAULT_TOLERANCES[dtype]
    for (what, got, want), ref_got in zip(pairs, ref_pairs):
        bound = max(2 * _error(ref_got, want), atol + rtol * _scale(want))
        assert _error(got, want) <= bound, (
            f"{name} {what} ({impl}, {dtype}): error {_error(got, want):.3g} > bound {bound:.3g} "
            f"(reference error {_error(ref_got, want):.3g})"
        )


def cases(*, min_keys: int = 1) -> list[tuple[int, int, int, str]]:
    """(B, N, D, critic) over the odd shapes, with N = B and N = B + 19 (extra keys are negatives
    only), both critics; cases with fewer than ``min_keys`` keys are left out."""
    return [
        (n_queries, n_keys, dim, critic)
        for n_queries in SHAPES_B
        for n_keys in (n_queries, n_queries + 19)
        for dim in SHAPES_D
        for critic in ("dot", "cosine")
        if n_keys >= min_keys
    ]


DTYPES = (torch.float32, torch.float64)


def reference_test(name: str, *, temperature: float, min_keys: int = 1, **options):
    """A test function comparing estimator ``name`` (impl="torch", small tiles) with the reference
    over :func:`cases` in fp32 and fp64; assign it to a ``test_*`` name in the estimator's module."""

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("n_queries,n_keys,dim,critic", cases(min_keys=min_keys))
    def test(small_tiles, n_queries, n_keys, dim, critic, dtype):
        x, y = correlated_pair(n_queries, n_keys, dim)
        assert_matches_reference(
            name, x, y, temperature=temperature, critic=critic, impl="torch", dtype=dtype, **options
        )

    return test


#: The estimators as the kernel tiers run them: label → (name, temperature, options).
KERNEL_ESTIMATORS = {
    "infonce": ("infonce", 0.1, {}),
    "infonce_symmetric": ("infonce", 0.1, {"symmetric": True}),
    "nwj": ("nwj", EXP_TEMPERATURE, {}),
    "dv": ("dv", EXP_TEMPERATURE, {}),
    "smile": ("smile", EXP_TEMPERATURE, {"clip": 1.0}),
    "js": ("js", EXP_TEMPERATURE, {}),
}


def assert_every_candidate_config_matches(monkeypatch, label: str, shape, *, dtype, device: str) -> None:
    """Each autotuner candidate of each kernel, forced as the launch config in turn (kernels with
    fewer candidates cycle through theirs), meets the accuracy contract for estimator ``label`` on
    ``shape`` (B, N, D): whatever the autotuner picks computes the right thing."""
    from rid_fast.kernels import tuning

    monkeypatch.setenv("RID_FAST_AUTOTUNE", "0")
    name, temperature, options = KERNEL_ESTIMATORS[label]
    n_queries, n_keys, dim = shape
    candidates = {kernel: tuning.candidate_configs(kernel, dtype) for kernel in tuning.KERNELS}
    candidates = {kernel: configs for kernel, configs in candidates.items() if configs}  # fp32: no keys fwd
    x, y = correlated_pair(n_queries, n_queries if options.get("symmetric") else n_keys, dim)
    critic = "cosine" if name != "smile" else "dot"
    for i in range(max(len(configs) for configs in candidates.values())):
        chosen = {kernel: configs[i % len(configs)] for kernel, configs in candidates.items()}
        monkeypatch.setattr(tuning, "default_config", lambda kernel, _dtype, chosen=chosen: chosen[kernel])
        assert_matches_reference(
            name, x, y, temperature=temperature, critic=critic, impl="triton", dtype=dtype, device=device, **options
        )


def assert_compiles_like_eager(loss, parameter: torch.Tensor, *inputs: torch.Tensor) -> None:
    """``torch.compile(loss, fullgraph=True)`` gives eager's value and gradient w.r.t. ``parameter``."""
    eager = loss(*inputs)
    (eager_grad,) = torch.autograd.grad(eager, parameter)
    compiled = torch.compile(loss, fullgraph=True)(*inputs)
    (compiled_grad,) = torch.autograd.grad(compiled, parameter)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces (memory-bound tests)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def assert_far_below_zero_matches(label: str, shape, *, dtype, device: str) -> None:
    """Estimator ``label`` on (B, N, D) = ``shape`` (N = B when symmetric) with every ⟨x_i, y_j⟩
    ≈ −12 (−120 at τ = 0.1) meets the accuracy contract: the log-sum-exps ℓ are then ≪ 0, and a
    weight e^{S − ℓ} formed from the zero scores that ragged tiles hold outside the matrix would
    overflow (inf × 0 = NaN in the gradients). SMILE's clip is widened to leave the scores (and 0)
    unclipped."""
    name, _, options = KERNEL_ESTIMATORS[label]
    if name == "smile":
        options = {**options, "clip": 200.0}
    n_queries, n_keys, dim = shape
    x, y = correlated_pair(n_queries, n_queries if options.get("symmetric") else n_keys, dim, rho=0.0)
    direction = torch.nn.functional.normalize(torch.ones(dim, dtype=torch.float64), dim=0)
    x, y = x + 3.0 * direction, y - 4.0 * direction
    assert_matches_reference(name, x, y, temperature=0.1, impl="triton", dtype=dtype, device=device, **options)
