"""Shared checks: an estimator's fast path against the plain-PyTorch oracle, values and gradients.

The accuracy contract (as in FlashAttention's tests): evaluated in a low-precision dtype, a fast
path's error against a float64 truth — computed from the *same* inputs, rounded to that dtype and
upcast, so that only arithmetic error is measured — is at most twice the error of the reference
in that same dtype, or, when the reference happens to be nearly exact, within torch.testing's
default tolerance for that dtype (fp32: atol 1e-5 + rtol 1.3e-6 · |truth|). In float64 the fast path must
agree with the reference to 1e-9 relative.

The two scalars that reduce over all B·N scores — the value and the temperature's gradient — are
sums, and the error of a sum depends on the order of its additions (vector width, tiling, BLAS
kernel), so "twice the reference's error" there is twice an accident of one order: the same
reference, rows and keys permuted, was off by 2.5e-6 … 1.9e-5 on one InfoNCE case. For these two
the bound is also allowed to reach the first-order error bound of the sum, which holds for every
order (:func:`reduction_error_bound`); the per-element gradients keep the contract as it is.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rid_fast.mi import functional
from rid_fast.mi.critics import critic_factors

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


def assert_matches_reference(
    name: str, x, y, *, temperature: float, impl: str, dtype, device="cpu", fast: Result | None = None, **options
) -> None:
    """The contract above, for the value and each gradient; ``fast``: the fast path's result when
    computed elsewhere (e.g. across processes), else :func:`evaluate` of ``impl``."""
    rounded_temperature = (
        float(torch.tensor(temperature, dtype=torch.float32)) if dtype != torch.float64 else temperature
    )
    truth = evaluate(
        name, x.to(dtype).double(), y.to(dtype).double(), dtype=torch.float64, temperature=rounded_temperature,
        impl="reference", device=device, **options,
    )  # fmt: skip
    if fast is None:
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
    order_free = reduction_error_bound(
        name, x.to(dtype).double(), y.to(dtype).double(), temperature=rounded_temperature, **options
    )
    for (what, got, want), ref_got in zip(pairs, ref_pairs):
        bound = max(2 * _error(ref_got, want), atol + rtol * _scale(want), order_free.get(what, 0.0))
        assert _error(got, want) <= bound, (
            f"{name} {what} ({impl}, {dtype}): error {_error(got, want):.3g} > bound {bound:.3g} "
            f"(reference error {_error(ref_got, want):.3g})"
        )


#: Unit roundoff of fp32, the precision every fast path accumulates in (16-bit inputs included).
FP32_UNIT_ROUNDOFF = 2.0**-24
#: The narrowest tile any path sums over (interpreter and test tiles are 16 wide): a sum over N
#: keys takes at most ⌈N / 16⌉ sequential tile additions besides its tree reductions.
NARROWEST_TILE = 16


def reduction_error_bound(name: str, x, y, *, temperature: float, critic: str = "dot", **options) -> dict[str, float]:
    r"""First-order bound on the fp32 rounding error of the two scalars that reduce over all scores,
    valid for every order of summation: ``{"value": …, "d/dtemperature": …}`` (float64 inputs).

    With G = ∂v/∂S, the temperature's gradient is :math:`-\tfrac1\tau\sum_{ij} G_{ij} S_{ij}`,
    and both it and the value are sums of n = B·N components, each formed from an exponential of a
    score minus a row statistic ℓ_i (softmax, partition and sigmoid weights). So, to first order:

    * each component carries a relative error of at most κ_ij·u, with
      :math:`\kappa_{ij} = \sigma\lVert q_i\rVert\lVert k_j\rVert + |S_{ij}| + L_i + 1`:
      the exponent is formed from the score (its dot product rounds at the scale
      σ‖q_i‖‖k_j‖ — the probabilistic bound for a D-term dot product, Higham & Mary 2019, not the
      worst case D·u·Σ|q k|) and from ℓ_i, both rounded at their magnitudes
      (:math:`|\ell_i| \le L_i = \max_j |S_{ij}| + \log N`, and over columns for the symmetric
      form), and :math:`e^{a(1+\delta)} = e^a (1 + a\delta)`;
    * adding the n components costs at most m = ⌈log₂ n⌉ + ⌈N / 16⌉ roundings each: tree
      reductions plus the sequential additions of tiles at least 16 wide;
    * the components are the exponential weights *before* they cancel against the exact terms
      (InfoNCE's diagonal is 1/B − p_ii/B), so their sizes are W_ij = |G_ij| off the diagonal and
      |G_ii| + 2/B on it; SMILE's value sums its clipped DV's weights, taken on the clipped scores
      (a clipped score has no gradient, but its weight is part of every row's partition), and its
      temperature gradient is JS's, with JS's weights on the scores themselves (the clipped DV's
      with ``gradient="clipped_dv"``).

    Hence :math:`|\hat r - r| \le u \sum_{ij} (\kappa_{ij} + m)\, c_{ij}` with components
    :math:`c_{ij} = W_{ij}` for the value and :math:`W_{ij}|S_{ij}|/\tau` for the temperature's
    gradient, u = 2⁻²⁴ (fp32; the fast paths accumulate 16-bit inputs in fp32 too). A worst case: on
    the interpreter tier's cases it is 10–100× the errors seen over permuted orders, and 1e-4 of
    the gradient's size, so a missing tile or a wrong factor still fails.
    """
    q, k, scale = critic_factors(x, y, temperature=temperature, critic=critic)
    sigma = float(scale)
    scores = sigma * q @ k.T  # (B, N)
    n_queries, n_keys = scores.shape
    value_weights = gradient_weights = _component_weights(name, scores, options)
    if name == "smile":
        clip = options.get("clip", 5.0)
        seen = scores.clone()  # what the clipped DV's exponentials see: the clipped scores off the diagonal
        off = ~torch.eye(n_queries, n_keys, dtype=torch.bool)
        seen[off] = scores[off].clamp(-clip, clip)
        value_weights = _component_weights(name, seen, {**options, "gradient": "clipped_dv"})
        if options.get("gradient") == "clipped_dv":
            gradient_weights = value_weights
    magnitude = scores.abs()
    statistic = magnitude.amax(dim=1, keepdim=True) + math.log(n_keys)  # L_i
    if options.get("symmetric"):
        statistic = torch.maximum(statistic, magnitude.amax(dim=0, keepdim=True) + math.log(n_queries))
    dot_scale = sigma * q.norm(dim=1)[:, None] * k.norm(dim=1)[None, :]
    roundings = math.ceil(math.log2(max(n_queries * n_keys, 2))) + math.ceil(n_keys / NARROWEST_TILE)
    kappa = dot_scale + magnitude + statistic + 1 + roundings
    return {
        "value": FP32_UNIT_ROUNDOFF * float((kappa * value_weights).sum()),
        "d/dtemperature": FP32_UNIT_ROUNDOFF * float((kappa * gradient_weights * magnitude).sum()) / temperature,
    }


def _component_weights(name: str, scores: torch.Tensor, options: dict) -> torch.Tensor:
    """W: |∂v/∂S| of estimator ``name`` at ``scores`` (its gradient, whatever its value), with 2/B
    added on the diagonal. (B, N)"""
    scores = scores.detach().clone().requires_grad_(True)
    (weights,) = torch.autograd.grad(functional.ESTIMATORS[name].from_scores(scores, **options), scores)
    weights = weights.abs()
    diagonal = torch.arange(scores.shape[0])
    weights[diagonal, diagonal] += 2.0 / scores.shape[0]
    return weights


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
DTYPE_IDS = ("fp32", "fp64")


def reference_test(name: str, *, temperature: float, min_keys: int = 1, **options):
    """A test function comparing estimator ``name`` (impl="torch", small tiles) with the reference
    over :func:`cases` in fp32 and fp64; assign it to a ``test_*`` name in the estimator's module."""

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
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
    # The clipped log-sum-exp's backward, which SMILE's default gradient (JS's) no longer runs.
    "smile_clipped_dv": ("smile", EXP_TEMPERATURE, {"clip": 1.0, "gradient": "clipped_dv"}),
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


def inductor_vectors():
    """A context for torch.compile on the CPU: where ``ATEN_CPU_CAPABILITY=default`` forces torch's
    scalar paths (``make test-no-vectors``), torch 2.13's inductor still emits ``at::vec`` code for
    some loops, which then fails to compile; there, compile with AVX2's width instead. The vector
    width of compiled code is not what the compile tests check."""
    if os.environ.get("ATEN_CPU_CAPABILITY") != "default":
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch({"cpp.simdlen": 256})


def assert_compiles_like_eager(loss, parameter: torch.Tensor, *inputs: torch.Tensor) -> None:
    """``torch.compile(loss, fullgraph=True)`` gives eager's value and gradient w.r.t. ``parameter``."""
    eager = loss(*inputs)
    (eager_grad,) = torch.autograd.grad(eager, parameter)
    with inductor_vectors():
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


def direct_row_reduction(q, k, scale, *, reduction: str, clip: float | None = None, diagonal: bool = True):
    r"""The direct formula of a key block's row statistic on the full matrix :math:`S = \sigma q k^\top`:
    ``"lse"`` :math:`\log\sum_j e^{c(S_{ij})}`, ``"softplus"`` :math:`\sum_j \mathrm{softplus}(S_{ij})`,
    over j ≠ i with ``diagonal`` (the block holds the rows' positives), over every j without."""
    s = scale * (q @ k.T)
    if clip is not None:
        s = s.clamp(-clip, clip)
    keep = ~torch.eye(*s.shape, dtype=torch.bool) if diagonal else torch.ones_like(s, dtype=torch.bool)
    if reduction == "lse":
        return torch.logsumexp(s.masked_fill(~keep, -math.inf), 1)
    return torch.logaddexp(s, torch.zeros_like(s)).masked_fill(~keep, 0).sum(1)


def block_reduction(backend, q, k, scale, weights, *, reduction: str, clip: float | None, diagonal: bool):
    """A backend's (``rid_fast.ops.streaming`` or ``rid_fast.kernels``) row statistic of one key block
    and the gradients (dq, dk, dσ) of Σ_i weights_i · statistic_i, from its forward and backward
    functions (what :mod:`rid_fast.ops.distributed`'s ring calls)."""
    if reduction == "lse":
        value = backend.lse_negatives_forward(q, k, scale, clip, diagonal)
        return value, backend.lse_negatives_backward(weights, q, k, scale, value, clip, diagonal)
    value = backend.softplus_negatives_forward(q, k, scale, diagonal)
    return value, backend.softplus_negatives_backward(weights, q, k, scale, diagonal)


def block_reduction_truth(q, k, scale, weights, **options):
    """:func:`direct_row_reduction` and its gradients in float64 (the truth for :func:`block_reduction`)."""
    q, k, scale = (t.detach().double().requires_grad_() for t in (q, k, scale))
    value = direct_row_reduction(q, k, scale, **options)
    grads = torch.autograd.grad((value * weights.double()).sum(), (q, k, scale))
    return value.detach(), grads
