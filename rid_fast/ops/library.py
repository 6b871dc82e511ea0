r"""The score-matrix reductions as ``torch.library`` custom operators, with autograd.

Each reduction of :math:`S = \sigma\, q k^\top` (math in :mod:`rid_fast.ops.streaming`) is one custom
op for the forward and one for the backward, taking a ``backend`` string:

* ``"torch"`` — the streaming PyTorch implementation (:mod:`rid_fast.ops.streaming`), any device;
* ``"triton"`` — the fused Triton kernels (:mod:`rid_fast.kernels`), CUDA tensors, or CPU tensors
  under the Triton interpreter.

Both backends expose the same functions with the same argument order,
``<op>_forward(q, k, scale, *options)`` and
``<op>_backward(*grads, q, k, scale, *saved_outputs, *options) -> (dq, dk, dscale)``,
so the ops only route. Registering custom ops (with fake implementations and
``register_autograd``) rather than calling an autograd.Function keeps models that use the
estimators compilable with ``torch.compile(fullgraph=True)`` on CPU as well as on CUDA: the
compiler treats each op as one opaque call.

Shapes: q (B, D), k (N, D), scale () the inverse temperature σ; statistics are (B,) per row or
(N,) per column in the accumulation dtype (fp32, or fp64 for fp64 inputs); gradients have the
dtypes of q, k and scale.

=====================  =====================================================  ================
op                     output                                                 estimators
=====================  =====================================================  ================
cross_entropy_rows     :math:`\log\sum_j e^{S_{ij}} - S_{ii}`                 InfoNCE
cross_entropy_rows_cols  the above and its column twin (N = B)                symmetric InfoNCE
cross_entropy_rows_mean_with_grad  the mean of the first, gradients computed     InfoNCE, training
                       in the same sweep (``"torch"`` backend only)            (streaming path)
lse_negatives          :math:`\log\sum_{j\ne i} e^{c(S_{ij})}` (clip c)        NWJ, DV, SMILE, MINE
softplus_negatives     :math:`\sum_{j\ne i}\mathrm{softplus}(S_{ij})`          JS
=====================  =====================================================  ================

``<op>_with_weighted_keys`` (for the three row ops; ``"triton"`` backend, 16-bit inputs, D ≤ 128)
returns the op's statistic and, as a second, non-differentiable output, the keys weighted by each
row's share of the gradient, :math:`u_i` (B, D) fp32 (see :mod:`rid_fast.kernels.forward`),
formed in the forward's sweep; its backward takes dq from them and sweeps only for dk.

The pairwise-MLP critic's scores, :math:`s_{ij} = w_2^\top\mathrm{relu}(a_i + c_j) + b_2`, are not
a product of factors, but the same four reductions of them are ops too, ``pairwise_<op>``, over
``(a (B, H), c (N, H), w2 (H,), b2 ())`` with gradients ``(da, dc, dw2, db2)`` and the backends

* ``"torch"`` — blocked PyTorch (:mod:`rid_fast.ops.pairwise_streaming`), any device;
* ``"cpp"`` — the compiled C++ kernel (:mod:`rid_fast.ops.pairwise_cpp`), CPU tensors;
* ``"triton"`` — the Triton kernels (``rid_fast.kernels.pairwise``), CUDA tensors.

Their inputs are checked (:func:`rid_fast.ops.dispatch.check_pairwise_factors`) before any backend
runs, in the fake implementations too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from rid_fast.ops.common import compute_dtype
from rid_fast.ops.dispatch import check_pairwise_factors

__all__ = [
    "cross_entropy_rows",
    "cross_entropy_rows_cols",
    "cross_entropy_rows_mean_with_grad",
    "lse_negatives",
    "softplus_negatives",
    "cross_entropy_rows_with_weighted_keys",
    "lse_negatives_with_weighted_keys",
    "softplus_negatives_with_weighted_keys",
    "pairwise_cross_entropy_rows",
    "pairwise_cross_entropy_rows_cols",
    "pairwise_lse_negatives",
    "pairwise_softplus_negatives",
]


def _backend(name: str) -> ModuleType:
    if name == "torch":
        from rid_fast.ops import streaming

        return streaming
    if name == "triton":
        from rid_fast import kernels

        return kernels
    raise ValueError(f"backend must be 'torch' or 'triton'; got {name!r}")


def _pairwise_backend(name: str) -> ModuleType:
    if name == "torch":
        from rid_fast.ops import pairwise_streaming

        return pairwise_streaming
    if name == "cpp":
        from rid_fast.ops import pairwise_cpp

        return pairwise_cpp
    if name == "triton":
        try:
            from rid_fast.kernels import pairwise
        except ImportError as error:
            raise ValueError(f"the pairwise-MLP critic's Triton kernels cannot be imported ({error})") from error
        return pairwise
    raise ValueError(f"backend must be 'torch', 'cpp' or 'triton'; got {name!r}")


@dataclass(frozen=True)
class _Family:
    """The ops of one kind of critic: their name prefix, the tensors they take (the first two give
    the row and column counts B and N), where each backend lives, and the check of the tensors that
    runs before any backend (in the fake implementations too), given the op's name."""

    prefix: str
    inputs: tuple[str, ...]
    backend: Callable[[str], ModuleType]
    check: Callable[..., None] | None = None


# The backend functions are looked up when an op runs, not bound here, so that a substitute for
# them (a test recording which backend ran) takes effect.
#: Scores σ q kᵀ: (q (B, D), k (N, D), scale ()).
_SEPARABLE = _Family("", ("q", "k", "scale"), lambda name: _backend(name))
#: Scores w2ᵀ relu(a_i + c_j) + b2: (a (B, H), c (N, H), w2 (H,), b2 ()).
_PAIRWISE = _Family("pairwise_", ("a", "c", "w2", "b2"), lambda name: _pairwise_backend(name), check_pairwise_factors)


def _define(
    name: str,
    *,
    outputs: tuple[str, ...],
    options: tuple[str, ...] = (),
    saves_outputs: bool = True,
    weighted_keys: bool = False,
    family: _Family = _SEPARABLE,
):
    """Define ``rid_fast::<prefix><name>`` and its ``_backward`` with fakes and autograd.

    ``outputs`` names each output's length, ``"rows"`` (B) or ``"cols"`` (N); ``options`` are
    extra schema arguments (e.g. ``"float? clip"``) passed through to the backend; the backward
    gets the statistics when ``saves_outputs``. With ``weighted_keys`` the op is
    ``<name>_with_weighted_keys``: one more output, u (B, D) in the compute dtype, always saved for
    the backward and not differentiable. ``family`` says which tensors the op takes and where its
    backends are; the backend's ``<name>_forward(*tensors, *options)`` and
    ``<name>_backward(*grads, *tensors, *saved, *options)`` return the statistics and one gradient
    per tensor.
    """
    op_name = name
    if weighted_keys:
        name = f"{name}_with_weighted_keys"
    qualified = f"rid_fast::{family.prefix}{name}"
    n_inputs = len(family.inputs)
    n_results = len(outputs) + weighted_keys
    option_schema = "".join(f", {option}" for option in options)
    output_schema = "Tensor" if n_results == 1 else "(" + ", ".join("Tensor" for _ in range(n_results)) + ")"
    input_schema = ", ".join(f"Tensor {input_name}" for input_name in family.inputs)
    gradient_schema = "(" + ", ".join("Tensor" for _ in family.inputs) + ")"

    def check(tensors) -> None:
        if family.check is not None:
            family.check(*tensors, op=op_name)

    def forward_impl(*args):
        tensors, (*opts, backend) = args[:n_inputs], args[n_inputs:]
        check(tensors)
        implementation = getattr(family.backend(backend), f"{name}_forward", None)
        if implementation is None:
            raise ValueError(f"{qualified} has no {backend!r} backend")
        return implementation(*tensors, *opts)

    def forward_fake(*args):
        tensors = args[:n_inputs]
        check(tensors)
        rows, cols = tensors[0], tensors[1]
        dtype = compute_dtype(rows.dtype)
        stats = tuple(
            rows.new_empty((rows.shape[0] if length == "rows" else cols.shape[0],), dtype=dtype) for length in outputs
        )
        if weighted_keys:
            stats += (rows.new_empty(rows.shape, dtype=dtype),)
        return stats[0] if len(stats) == 1 else stats

    def backward_impl(grads, *args):
        tensors, saved, (*opts, backend) = args[:n_inputs], args[n_inputs], args[n_inputs + 1 :]
        gradients = getattr(family.backend(backend), f"{name}_backward")(*grads, *tensors, *saved, *opts)
        return tuple(g.to(t.dtype) for g, t in zip(gradients, tensors))

    def backward_fake(grads, *args):
        return tuple(torch.empty_like(t) for t in args[:n_inputs])

    forward = torch.library.custom_op(
        qualified,
        forward_impl,
        mutates_args=(),
        schema=f"({input_schema}{option_schema}, str backend) -> {output_schema}",
    )
    forward.register_fake(forward_fake)
    backward = torch.library.custom_op(
        f"{qualified}_backward",
        backward_impl,
        mutates_args=(),
        schema=f"(Tensor[] grads, {input_schema}, Tensor[] saved{option_schema}, str backend) -> {gradient_schema}",
    )
    backward.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        tensors, rest = inputs[:n_inputs], inputs[n_inputs:]
        results = output if isinstance(output, tuple) else (output,)
        saved = results if saves_outputs else results[len(outputs) :]  # u alone, if any
        if weighted_keys:
            ctx.mark_non_differentiable(output[-1])
        ctx.save_for_backward(*tensors, *saved)
        ctx.rest = rest

    def grad(ctx, *grads):
        tensors, saved = ctx.saved_tensors[:n_inputs], ctx.saved_tensors[n_inputs:]
        rows, cols = tensors[0], tensors[1]
        grads = grads[: len(outputs)]  # u is not differentiable
        # An output that did not reach the loss arrives as None: it contributes nothing.
        lengths = [rows.shape[0] if length == "rows" else cols.shape[0] for length in outputs]
        dtype = compute_dtype(rows.dtype)
        grads = [g if g is not None else rows.new_zeros(n, dtype=dtype) for g, n in zip(grads, lengths)]
        return tuple(backward(grads, *tensors, saved, *ctx.rest)) + (None,) * len(ctx.rest)

    torch.library.register_autograd(qualified, grad, setup_context=setup_context)
    return forward


#: c_i = log Σ_j e^{S_ij} − S_ii, (B,).
cross_entropy_rows = _define("cross_entropy_rows", outputs=("rows",))
#: (c^r, c^c): row and column cross-entropies against the diagonal, N = B.
cross_entropy_rows_cols = _define("cross_entropy_rows_cols", outputs=("rows", "cols"))
#: ℓ_i = log Σ_{j≠i} e^{clamp(S_ij, ±clip)}, (B,).
lse_negatives = _define("lse_negatives", outputs=("rows",), options=("float? clip",))
#: Σ_{j≠i} softplus(S_ij), (B,).
softplus_negatives = _define("softplus_negatives", outputs=("rows",), saves_outputs=False)
#: (c, u): the first op's statistic and the weighted keys u_i = Σ_j p_ij k_j − k_i.
cross_entropy_rows_with_weighted_keys = _define("cross_entropy_rows", outputs=("rows",), weighted_keys=True)
#: (ℓ, u): u_i = Σ_{j≠i} e^{c(S_ij) − ℓ_i} c'(S_ij) k_j.
lse_negatives_with_weighted_keys = _define(
    "lse_negatives", outputs=("rows",), options=("float? clip",), weighted_keys=True
)
#: (Σ_{j≠i} softplus(S_ij), u): u_i = Σ_{j≠i} sigmoid(S_ij) k_j.
softplus_negatives_with_weighted_keys = _define(
    "softplus_negatives", outputs=("rows",), saves_outputs=False, weighted_keys=True
)

#: The pairwise-MLP critic's twins of the four reductions, over (a, c, w2, b2, …, backend).
pairwise_cross_entropy_rows = _define("cross_entropy_rows", outputs=("rows",), family=_PAIRWISE)
pairwise_cross_entropy_rows_cols = _define("cross_entropy_rows_cols", outputs=("rows", "cols"), family=_PAIRWISE)
pairwise_lse_negatives = _define("lse_negatives", outputs=("rows",), options=("float? clip",), family=_PAIRWISE)
pairwise_softplus_negatives = _define("softplus_negatives", outputs=("rows",), saves_outputs=False, family=_PAIRWISE)


def _define_mean_with_grad():
    """``rid_fast::cross_entropy_rows_mean_with_grad``: (L, dq, dk, dσ) for the mean row
    cross-entropy L, from :func:`rid_fast.ops.streaming.cross_entropy_rows_mean_and_grad`. Only L is
    differentiable; its backward scales the precomputed gradients by the incoming gradient."""

    def impl(q, k, scale):
        from rid_fast.ops import streaming

        return streaming.cross_entropy_rows_mean_and_grad(q, k, scale)

    def fake(q, k, scale):
        dtype = compute_dtype(q.dtype)
        return (
            q.new_empty((), dtype=dtype),
            torch.empty_like(q, dtype=dtype),
            torch.empty_like(k, dtype=dtype),
            q.new_empty((), dtype=dtype),
        )

    op = torch.library.custom_op(
        "rid_fast::cross_entropy_rows_mean_with_grad",
        impl,
        mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor scale) -> (Tensor, Tensor, Tensor, Tensor)",
    )
    op.register_fake(fake)

    def setup_context(ctx, inputs, output):
        _, dq, dk, d_scale = output
        ctx.mark_non_differentiable(dq, dk, d_scale)
        ctx.save_for_backward(dq, dk, d_scale)
        ctx.dtypes = tuple(t.dtype for t in inputs)

    def grad(ctx, grad_loss, *unused):
        # Scale in the compute dtype, then round once to each input's dtype.
        g = grad_loss.to(ctx.saved_tensors[0].dtype)
        return tuple((g * d).to(dtype) for d, dtype in zip(ctx.saved_tensors, ctx.dtypes))

    torch.library.register_autograd("rid_fast::cross_entropy_rows_mean_with_grad", grad, setup_context=setup_context)
    return op


#: (L, dq, dk, dσ): L = mean_i c_i with its gradients from the same sweep — for training on the
#: streaming path, where it saves one of four matrix products per tile.
cross_entropy_rows_mean_with_grad = _define_mean_with_grad()
