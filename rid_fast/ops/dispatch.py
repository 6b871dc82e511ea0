"""Input validation and implementation selection, in one place.

Every public estimator validates its inputs here *before* any kernel runs, so bad input fails with
a message that names the argument and what was expected instead of a crash deep in a kernel or a
silently wrong number.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterable

import torch

__all__ = [
    "IMPLS",
    "TRITON_DTYPES",
    "resolve_impl",
    "resolve_pairwise_impl",
    "pairwise_status",
    "triton_status",
    "check_pair",
    "check_pairwise_factors",
    "check_temperature",
    "check_choice",
    "check_bool",
    "check_positive",
    "check_positive_int",
]

#: Implementations an estimator can run on. ``"auto"`` resolves to one of the others; ``"cpp"``
#: is the pairwise-MLP critic's compiled CPU kernel (:mod:`rid_fast.ops.pairwise_cpp`).
IMPLS = ("auto", "reference", "torch", "triton", "cpp")


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def triton_interpreter_enabled() -> bool:
    """True when Triton runs kernels on CPU tensors (``TRITON_INTERPRET=1`` set before start-up)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def triton_status(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the fused Triton kernels can run on ``device`` (default: CUDA), and why not."""
    device = torch.device("cuda" if device is None else device)
    try:
        from rid_fast import kernels
    except ImportError as error:  # triton missing (e.g. macOS, Windows)
        return False, f"triton is not importable ({error})"
    if not kernels.AVAILABLE:
        return False, kernels.UNAVAILABLE_REASON
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, "CUDA"
    if device.type == "cpu" and triton_interpreter_enabled():
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    return False, f"Triton kernels run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), not {device.type}"


def wants_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will need gradients of any of ``tensors`` here."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def weighted_keys_in_forward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, backend: str) -> bool:
    """Whether training's forward should also form dq's weighted keys u (:mod:`rid_fast.kernels`),
    so that the backward sweeps only for dk: on the Triton backend, under autograd, where u fits
    the kernel (:func:`rid_fast.kernels.keys_fit`), unless ``RID_FAST_FORWARD_KEYS=0`` (the
    backward then sweeps for dq as well; e.g. to compare the two on a GPU)."""
    if backend != "triton" or not wants_grad(q, k, scale) or os.environ.get("RID_FAST_FORWARD_KEYS", "1") == "0":
        return False
    from rid_fast.kernels import keys_fit

    return keys_fit(q.dtype, q.shape[1])


def check_choice(name: str, value: object, choices: Iterable[str]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


#: Input dtypes the Triton kernels take (fp64 runs on the streaming path).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Turn ``impl`` (one of :data:`IMPLS`) into the implementation that will actually run.

    ``"auto"`` picks the fused Triton kernels for CUDA tensors of a dtype they take when they can
    run there, and the streaming PyTorch path otherwise. Asking for ``"triton"`` where it cannot
    run is an error.
    """
    check_choice("impl", impl, IMPLS)
    if impl == "cpp":
        raise ValueError(
            "impl='cpp' is the pairwise-MLP critic's (ConcatCritic's) C++ kernel; separable critics take "
            "'auto', 'torch', 'triton' or 'reference'"
        )
    if impl == "auto":
        if device.type == "cuda" and dtype in TRITON_DTYPES and triton_status(device)[0]:
            return "triton"
        return "torch"
    if impl == "triton":
        ok, why = triton_status(device)
        if not ok:
            raise ValueError(f"impl='triton' cannot run on {device.type} tensors: {why}")
        if dtype is not None and dtype not in TRITON_DTYPES:
            raise ValueError(f"impl='triton' takes float16, bfloat16 or float32 inputs; got {dtype} (use impl='torch')")
    return impl


def _pairwise_triton_status(device: torch.device) -> tuple[bool, str]:
    ok, why = triton_status(device)
    if ok and importlib.util.find_spec("rid_fast.kernels.pairwise") is None:
        return False, "this build has no Triton kernels for the pairwise-MLP critic (rid_fast.kernels.pairwise)"
    return ok, why


def pairwise_status(device: torch.device | str = "cpu") -> tuple[str, str]:
    """Which backend ``impl="auto"`` runs the pairwise-MLP critic's reductions on for ``device``,
    and why: the Triton kernels on CUDA, the C++ kernel on the CPU (built on the first call),
    the blocked PyTorch path where neither can run."""
    device = torch.device(device)
    if device.type == "cuda":
        ok, why = _pairwise_triton_status(device)
        return ("triton", why) if ok else ("torch", f"Triton kernels unavailable: {why}")
    if device.type == "cpu":
        from rid_fast.ops import pairwise_cpp

        ok, why = pairwise_cpp.status()
        return ("cpp", why) if ok else ("torch", f"C++ kernel unavailable: {why}")
    return "torch", f"no fused kernel for {device.type} tensors"


def resolve_pairwise_impl(impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """:func:`resolve_impl` for the pairwise-MLP critic: ``"auto"`` is the C++ kernel on CPU
    tensors (the blocked PyTorch path if it cannot be built) and the Triton kernels on CUDA tensors
    of a dtype they take; ``"cpp"`` or ``"triton"`` where they cannot run is an error that says why."""
    check_choice("impl", impl, IMPLS)
    if impl == "auto":
        if device.type == "cuda" and dtype not in TRITON_DTYPES:
            return "torch"
        return pairwise_status(device)[0]
    if impl == "cpp":
        if device.type != "cpu":
            raise ValueError(f"impl='cpp' runs on CPU tensors; got {device.type} tensors")
        backend, why = pairwise_status(device)
        if backend != "cpp":
            raise ValueError(f"impl='cpp' cannot run: {why}")
    if impl == "triton":
        ok, why = _pairwise_triton_status(device)
        if not ok:
            raise ValueError(f"impl='triton' cannot run on {device.type} tensors: {why}")
        if dtype is not None and dtype not in TRITON_DTYPES:
            raise ValueError(f"impl='triton' takes float16, bfloat16 or float32 inputs; got {dtype} (use impl='torch')")
    return impl


def describe_tensor(t: torch.Tensor) -> str:
    """``shape (…), dtype …, device …``: how error messages name a tensor."""
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_matrix(name: str, t: object) -> None:
    """A floating-point tensor of shape (rows ≥ 1, features ≥ 1)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype (float16, bfloat16, float32, float64); got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (rows, features); got {describe_tensor(t)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 rows); an estimate needs at least one pair")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has 0 feature columns; got {describe_tensor(t)}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """``ValueError`` if ``t`` holds NaN or ±Inf. One pass over ``t`` and, on GPU, one sync."""
    if _is_compiling():
        return
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf); {describe_tensor(t)}")


def check_pair(
    x: object,
    y: object,
    *,
    same_features: bool = True,
    features: tuple[int | None, int | None] = (None, None),
    features_for: str = "the critic",
    square: bool = False,
    needs_negatives: bool = False,
    check_values: bool = True,
) -> None:
    """Validate an estimator's inputs: x (B, Dx), y (N, Dy) with N ≥ B, same dtype and device.

    ``same_features``: Dx = Dy (dot and cosine critics). ``features``: the widths (Dx, Dy) that
    ``features_for`` (e.g. a critic with its own weights) takes, None where any width goes.
    ``square``: N must equal B (symmetric InfoNCE). ``needs_negatives``: at least one negative
    pair, N ≥ 2 (every estimator with an off-diagonal average). ``check_values``: no NaN/Inf.
    """
    check_matrix("x", x)
    check_matrix("y", y)
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    if x.device != y.device:
        raise ValueError(f"x and y must be on the same device; got x on {x.device}, y on {y.device}")
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype; got x {x.dtype}, y {y.dtype}")
    for name, t, rows, width in (("x", x, "B", features[0]), ("y", y, "N", features[1])):
        if width is not None and t.shape[1] != width:
            raise ValueError(
                f"{name} must have {width} feature columns for {features_for}: expected shape ({rows}, {width}); "
                f"got {describe_tensor(t)}"
            )
    if same_features and x.shape[1] != y.shape[1]:
        raise ValueError(
            f"x and y must have the same number of features D; got x (B={x.shape[0]}, D={x.shape[1]}), "
            f"y (N={y.shape[0]}, D={y.shape[1]})"
        )
    n_queries, n_keys = x.shape[0], y.shape[0]
    if n_keys < n_queries:
        raise ValueError(
            f"y must have at least as many rows as x (N ≥ B: rows i < B of y are x's positives); "
            f"got B={n_queries}, N={n_keys}"
        )
    if square and n_keys != n_queries:
        raise ValueError(
            f"symmetric InfoNCE needs N = B (every y_j is some x_j's positive); got B={n_queries}, N={n_keys}"
        )
    if needs_negatives and n_keys < 2:
        raise ValueError(f"this estimator averages over negative pairs (i ≠ j) and needs N ≥ 2; got N={n_keys}")
    if check_values:
        check_finite("x", x)
        check_finite("y", y)


#: Rows of the pairwise ops' inputs each op needs beyond N ≥ B ≥ 1.
_PAIRWISE_NEEDS = {"cross_entropy_rows_cols": "square", "lse_negatives": "negatives", "softplus_negatives": "negatives"}


def check_pairwise_factors(a: object, c: object, w2: object, b2: object, *, op: str | None = None) -> None:
    """The pairwise-MLP critic's factors: a (B, H), c (N, H), w2 (H,), b2 () of one floating dtype
    on one device, N ≥ B ≥ 1, H ≥ 1; N = B for ``op="cross_entropy_rows_cols"``, N ≥ 2 for the
    off-diagonal ops (``"lse_negatives"``, ``"softplus_negatives"``)."""
    shapes = (("a", a, 2, "(B, H)"), ("c", c, 2, "(N, H)"), ("w2", w2, 1, "(H,)"), ("b2", b2, 0, "()"))
    for name, t, rank, shape in shapes:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {shape}; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype; got {t.dtype}")
        if t.dim() != rank:
            raise ValueError(f"{name} must have shape {shape} ({rank}-D); got {describe_tensor(t)}")
    assert isinstance(a, torch.Tensor) and isinstance(c, torch.Tensor)
    assert isinstance(w2, torch.Tensor) and isinstance(b2, torch.Tensor)
    hidden = a.shape[1]
    if hidden == 0 or a.shape[0] == 0:
        raise ValueError(f"a must have at least one row and one hidden unit; got {describe_tensor(a)}")
    for name, width in (("c", c.shape[1]), ("w2", w2.shape[0])):
        if width != hidden:
            raise ValueError(f"{name} must have a's hidden width H = {hidden}; got {name} with H = {width}")
    for name, t in (("c", c), ("w2", w2), ("b2", b2)):
        if t.dtype != a.dtype:
            raise TypeError(f"a, c, w2 and b2 must have one dtype; got a {a.dtype}, {name} {t.dtype}")
        if t.device != a.device:
            raise ValueError(f"a, c, w2 and b2 must be on one device; got a on {a.device}, {name} on {t.device}")
    n_queries, n_keys = a.shape[0], c.shape[0]
    if n_keys < n_queries:
        raise ValueError(f"c must have at least as many rows as a (N ≥ B); got B={n_queries}, N={n_keys}")
    needs = _PAIRWISE_NEEDS.get(op or "")
    if needs == "square" and n_keys != n_queries:
        raise ValueError(f"{op} needs N = B; got B={n_queries}, N={n_keys}")
    if needs == "negatives" and n_keys < 2:
        raise ValueError(f"{op} sums over negative pairs (i ≠ j) and needs N ≥ 2; got N={n_keys}")


def check_temperature(temperature: object, *, check_values: bool = True) -> None:
    """A positive, finite number or a one-element floating tensor (e.g. a learnable one)."""
    if isinstance(temperature, bool):
        raise TypeError(f"temperature must be a positive number or a one-element tensor; got {temperature!r}")
    if isinstance(temperature, (int, float)):
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be positive and finite; got {temperature}")
        return
    if not isinstance(temperature, torch.Tensor):
        raise TypeError(
            f"temperature must be a positive number or a one-element tensor; got {type(temperature).__name__}"
        )
    if temperature.numel() != 1 or not temperature.is_floating_point():
        raise ValueError(f"temperature tensor must hold one floating-point value; got {describe_tensor(temperature)}")
    if check_values and not _is_compiling():
        value = float(temperature.detach())
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"temperature must be positive and finite; got {value}")


def check_bool(name: str, value: object) -> None:
    """``TypeError`` unless ``value`` is True or False (a string such as ``'yes'`` is not)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")


def check_positive_int(name: str, value: object) -> None:
    """A positive Python int (a width, a count); bools are not."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int; got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value}")


def check_positive(name: str, value: object) -> None:
    """A positive, finite Python number (e.g. SMILE's clip)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number; got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite; got {value}")
