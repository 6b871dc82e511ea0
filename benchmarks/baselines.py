"""What users would write without rid_fast, beyond the eager and compiled reference.

* :func:`chunked_infonce` — row chunks with activation checkpointing: memory O(chunk·N), but every
  chunk's score block is built, kept for the chunk's backward, and recomputed.
* :func:`sdpa_infonce` — the "attention log-sum-exp trick": InfoNCE's row log-sum-exps are the
  log-sum-exps a flash-attention kernel computes for queries x and keys y (head dim ≤ 256). With
  values v = y, the attention output is :math:`O = P y`, which is exactly ∂lse/∂x; ∂lse/∂y is
  :math:`P^\\top (g x)`, the value-gradient of the attention backward. Forward + backward = one
  flash forward and one flash backward.
* :func:`infcl_infonce` — the Inf-CL kernel (``pip install inf-cl``), where it installs.
"""

import math

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_loss(x_chunk: torch.Tensor, y: torch.Tensor, offset: int, temperature: float) -> torch.Tensor:
    scores = x_chunk @ y.T / temperature  # (chunk, N)
    targets = torch.arange(offset, offset + len(x_chunk), device=x_chunk.device)
    return torch.nn.functional.cross_entropy(scores, targets, reduction="sum")


def chunked_infonce(x: torch.Tensor, y: torch.Tensor, *, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    total = x.new_zeros((), dtype=torch.float32)
    for start in range(0, x.shape[0], chunk):
        total = total + checkpoint(_chunk_loss, x[start : start + chunk], y, start, temperature, use_reentrant=False)
    return math.log(y.shape[0]) - total / x.shape[0]


def chunked_infonce_step(x: torch.Tensor, y: torch.Tensor) -> None:
    """Forward and backward, as timed by the benchmarks."""
    torch.autograd.grad(chunked_infonce(x, y, temperature=0.1), (x, y))


def _flash_forward(q, k, v, scale):
    if q.is_cuda:
        out, lse, *extra = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
        return out, lse, extra
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    return out, lse, None


def _flash_value_grad(grad_out, q, k, v, out, lse, extra, scale):
    if q.is_cuda:
        cum_q, cum_k, max_q, max_k, rng_state, unused, _ = extra
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, False, rng_state, unused, scale=scale
        )
    else:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, False, scale=scale
        )
    return grads[2]


class _SDPAInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, temperature):
        q, k = x[None, None], y[None, None]  # (1, 1, B, D), (1, 1, N, D)
        scale = 1.0 / temperature
        out, lse, extra = _flash_forward(q, k, k, scale)
        positives = (x.float() * y[: x.shape[0]].float()).sum(-1) * scale
        ctx.save_for_backward(x, y, out, lse)
        ctx.extra, ctx.scale = extra, scale
        return math.log(y.shape[0]) - (lse.reshape(-1) - positives).mean()

    @staticmethod
    def backward(ctx, grad):
        x, y, out, lse = ctx.saved_tensors
        n_queries, scale = x.shape[0], ctx.scale
        weight = grad / n_queries  # d value / d positive_i = +w, d value / d lse_i = −w
        dx = weight * scale * (y[:n_queries].float() - out[0, 0].float())
        value_grad = _flash_value_grad(
            (-weight * x)[None, None].to(x.dtype),
            x[None, None],
            y[None, None],
            y[None, None],
            out,
            lse,
            ctx.extra,
            scale,
        )
        dy = scale * value_grad[0, 0].float()
        dy[:n_queries] += weight * scale * x.float()
        return dx.to(x.dtype), dy.to(y.dtype), None


def sdpa_infonce(x: torch.Tensor, y: torch.Tensor, *, temperature: float = 0.1) -> torch.Tensor:
    """One-sided InfoNCE (nats) through PyTorch's flash-attention kernels; fixed temperature."""
    return _SDPAInfoNCE.apply(x, y, temperature)


def infcl_infonce(x: torch.Tensor, y: torch.Tensor, *, temperature: float = 0.1) -> torch.Tensor:
    """One-sided InfoNCE (nats) through Inf-CL's single-device kernel ``cal_flash_loss`` (per-row
    cross-entropy; its multi-GPU ring, ``cal_inf_loss``, falls back to the same kernel when no process
    group is initialised). Inf-CL upcasts q and k to fp32 itself and splits D into heads of at most
    256 features whose scores add up to the full dot product. CUDA only (its kernels use inline PTX)."""
    from inf_cl import cal_flash_loss

    dim = x.shape[1]
    head_dim = dim if dim <= 256 else 256
    if dim % head_dim:
        raise ValueError(f"Inf-CL needs D ≤ 256 or a multiple of 256; got D = {dim}")
    return math.log(y.shape[0]) - cal_flash_loss(x, y, scale=1.0 / temperature, head_dim=head_dim).mean()


class RowBlockPairwiseScores(torch.autograd.Function):
    r"""The pairwise-MLP critic's (B, N) scores :math:`S_{ij} = w^\top \mathrm{relu}(a_i + c_j) + b`
    built a block of rows at a time, as ``rid_fast.critics.ConcatCritic`` computed them before its
    fused ops: the (rows, N, H) hidden block exists one block at a time, in the forward and again in
    the backward (recomputed from a and c), so memory is O(B·N + block); the estimator's reference
    formula then reduces the materialised scores. a (B, H), c (N, H), w (H,), b () → (B, N)."""

    #: Elements of one (rows, N, H) block (64 MiB in fp32), as before.
    BLOCK_ELEMENTS = 1 << 24

    @classmethod
    def _row_blocks(cls, n_rows: int, n_cols: int, hidden: int):
        rows = max(1, cls.BLOCK_ELEMENTS // max(1, n_cols * hidden))
        for start in range(0, n_rows, rows):
            yield slice(start, min(start + rows, n_rows))

    @staticmethod
    def forward(ctx, a: torch.Tensor, c: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        scores = a.new_empty(a.shape[0], c.shape[0])
        for rows in RowBlockPairwiseScores._row_blocks(a.shape[0], *c.shape):
            hidden = (a[rows, None, :] + c[None]).relu_()  # (r, N, H)
            scores[rows] = hidden @ w
        ctx.save_for_backward(a, c, w)
        return scores.add_(b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        a, c, w = ctx.saved_tensors
        grad = grad.to(a.dtype)
        da, dc, dw = torch.empty_like(a), torch.zeros_like(c), torch.zeros_like(w)
        for rows in RowBlockPairwiseScores._row_blocks(a.shape[0], *c.shape):
            hidden = (a[rows, None, :] + c[None]).relu_()  # (r, N, H), recomputed
            g = grad[rows]  # (r, N)
            dw += hidden.reshape(-1, hidden.shape[-1]).T @ g.reshape(-1)
            d_pre = hidden.gt_(0).mul_(w).mul_(g[..., None])  # ∂S/∂(a_i + c_j), in place of the block
            da[rows] = d_pre.sum(1)
            dc += d_pre.sum(0)
        return da, dc, dw, grad.sum()
