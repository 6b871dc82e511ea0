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
"""

from __future__ import annotations

from types import ModuleType

import torch

from rid_fast.ops.common import compute_dtype

__all__ = [
    "cross_entropy_rows",
    "cross_entropy_rows_cols",
    "cross_entropy_rows_mean_with_grad",
    "lse_negatives",
    "softplus_negatives",
    "cross_entropy_rows_with_weighted_keys",
    "lse_negatives_with_weighted_keys",
    "softplus_negatives_with_weighted_keys",
]


def _backend(name: str) -> ModuleType:
    if name == "torch":
        from rid_fast.ops import streaming

        return streaming
    if name == "triton":
        from rid_fast import kernels

        return kernels
    raise ValueError(f"backend must be 'torch' or 'triton'; got {name!r}")


def _define(
    name: str,
    *,
    outputs: tuple[str, ...],
    options: tuple[str, ...] = (),
    saves_outputs: bool = True,
    weighted_keys: bool = False,
):
    """Define ``rid_fast::<name>`` and ``rid_fast::<name>_backward`` with fakes and autograd.

    ``outputs`` names each output's length, ``"rows"`` (B) or ``"cols"`` (N); ``options`` are
    extra schema arguments (e.g. ``"float? clip"``) passed through to the backend; the backward
    gets the statistics when ``saves_outputs``. With ``weighted_keys`` the op is
    ``<name>_with_weighted_keys``: one more output, u (B, D) in the compute dtype, always saved for
    the backward and not differentiable.
    """
    if weighted_keys:
        name = f"{name}_with_weighted_keys"
    n_results = len(outputs) + weighted_keys
    option_schema = "".join(f", {option}" for option in options)
    output_schema = "Tensor" if n_results == 1 else "(" + ", ".join("Tensor" for _ in range(n_results)) + ")"

    def forward_impl(q, k, scale, *rest):
        *opts, backend = rest
        implementation = getattr(_backend(backend), f"{name}_forward", None)
        if implementation is None:
            raise ValueError(f"rid_fast::{name} has no {backend!r} backend")
        return implementation(q, k, scale, *opts)

    def forward_fake(q, k, scale, *rest):
        stats = tuple(
            q.new_empty((q.shape[0] if length == "rows" else k.shape[0],), dtype=compute_dtype(q.dtype))
            for length in outputs
        )
        if weighted_keys:
            stats += (q.new_empty(q.shape, dtype=compute_dtype(q.dtype)),)
        return stats[0] if len(stats) == 1 else stats

    def backward_impl(grads, q, k, scale, saved, *rest):
        *opts, backend = rest
        dq, dk, d_scale = getattr(_backend(backend), f"{name}_backward")(*grads, q, k, scale, *saved, *opts)
        return dq, dk, d_scale.to(scale.dtype)

    def backward_fake(grads, q, k, scale, saved, *rest):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale)

    forward = torch.library.custom_op(
        f"rid_fast::{name}",
        forward_impl,
        mutates_args=(),
        schema=f"(Tensor q, Tensor k, Tensor scale{option_schema}, str backend) -> {output_schema}",
    )
    forward.register_fake(forward_fake)
    backward = torch.library.custom_op(
        f"rid_fast::{name}_backward",
        backward_impl,
        mutates_args=(),
        schema=f"(Tensor[] grads, Tensor q, Tensor k, Tensor scale, Tensor[] saved{option_schema}, str backend)"
        " -> (Tensor, Tensor, Tensor)",
    )
    backward.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        q, k, scale, *rest = inputs
        results = output if isinstance(output, tuple) else (output,)
        saved = results if saves_outputs else results[len(outputs) :]  # u alone, if any
        if weighted_keys:
            ctx.mark_non_differentiable(output[-1])
        ctx.save_for_backward(q, k, scale, *saved)
        ctx.rest = rest

    def grad(ctx, *grads):
        q, k, scale, *saved = ctx.saved_tensors
        grads = grads[: len(outputs)]  # u is not differentiable
        # An output that did not reach the loss arrives as None: it contributes nothing.
        lengths = [q.shape[0] if length == "rows" else k.shape[0] for length in outputs]
        grads = [g if g is not None else q.new_zeros(n, dtype=compute_dtype(q.dtype)) for g, n in zip(grads, lengths)]
        dq, dk, d_scale = backward(grads, q, k, scale, saved, *ctx.rest)
        return (dq, dk, d_scale) + (None,) * len(ctx.rest)

    torch.library.register_autograd(f"rid_fast::{name}", grad, setup_context=setup_context)
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
