r"""The forward kernel: per-row statistics of :math:`S = \sigma q k^\top`, and its launcher.

:func:`_row_stats_fwd`, one program per block of ``BLOCK_M`` rows of q, sweeps the column tiles
(:func:`kernels.tiles._sweep`) and writes one fp32 number per row:

* ``REDUCTION = LSE``: :math:`\log\sum_j e^{c(S_{ij})}`, with an online running maximum and
  rescaled sum; ``MASK_DIAGONAL`` drops :math:`j = i`, ``CLIP`` clamps scores to ±clip;
* ``REDUCTION = SOFTPLUS``: :math:`\sum_j \mathrm{softplus}(S_{ij})` (``MASK_DIAGONAL`` as above).

The dot products are scaled in fp32 by the inverse temperature σ, read from a one-element tensor
(no host synchronisation); LSE folds σ·log₂e into the one FMA that forms each exponent.

With ``WEIGHTED_KEYS`` (16-bit inputs, D ≤ 128: the whole feature row in one tile) the forward also
writes :math:`u_i = \sum_{j\ne i} \tilde w_{ij} k_j`, the keys weighted by the row's share of the
gradient — :math:`\tilde w_{ij} = e^{c(S_{ij})-\ell_i} c'(S_{ij})` for LSE (the softmax; the
accumulator is rescaled with the running maximum, as attention's output is), :math:`\sigma(S_{ij})`
for SOFTPLUS — from the k tile it already holds for the scores. For every row loss here
:math:`W_{ij} = a_i \tilde w_{ij}` off the diagonal, so :math:`dq_i = \sigma a_i u_i` (plus, for
InfoNCE, :math:`\sigma a_i (p_{ii} - 1) k_i`, formed outside with ``expm1`` so that a confident
positive keeps its relative precision) needs no second sweep: training then costs four matrix
products and two exponentials per score (forward, and the dk kernel of :mod:`kernels.backward`)
instead of five and three.

Column statistics are row statistics of :math:`S^\top = k q^\top`: the launcher swaps ``q``, ``k``.

Where this kernel has run: compiled ahead of time for sm_90 and sm_80 (``kernels/aot.py``) and run
under the Triton interpreter on CPUs; never on a GPU — no GPU number has been measured yet.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import launch, tuning
from .tiles import (
    LOG2E,
    LSE,
    REDUCTIONS,
    SOFTPLUS,
    _assert_block,
    _load_block,
    _score_tile,
    _sweep,
    _tile_scores_and_keys,
)


class _RowBlock(NamedTuple):
    """What a forward program holds across its sweep."""

    q_ptr: tl.tensor  # (n_rows, dim) and (n_cols, dim) inputs
    k_ptr: tl.tensor
    q_block: tl.tensor | None  # its (BLOCK_M, BLOCK_K) q tile when SINGLE_K, else None
    offs_m: tl.tensor  # its rows (BLOCK_M,)
    n_rows: tl.tensor
    n_cols: tl.tensor
    dim: tl.tensor
    scale: tl.tensor  # σ
    clip: tl.tensor


class _ForwardConstants(NamedTuple):
    """The forward's compile-time constants, as :func:`_row_stats_fwd` takes them."""

    REDUCTION: tl.constexpr
    MASK_DIAGONAL: tl.constexpr
    CLIP: tl.constexpr
    WEIGHTED_KEYS: tl.constexpr
    BLOCK_M: tl.constexpr
    BLOCK_N: tl.constexpr
    BLOCK_K: tl.constexpr
    SINGLE_K: tl.constexpr
    INPUT_PRECISION: tl.constexpr


# fmt: off
@triton.jit
def _softplus_with_exp(x):
    """(log(1 + e^x), e^-|x|): softplus as max(x, 0) + log1p(e^-|x|), with log1p's small-argument
    series inline, and the exponential it used (σ(x) is (1 or e^-|x|) / (1 + e^-|x|))."""
    e = tl.exp2(-tl.abs(x) * LOG2E)
    log1p_e = tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e))
    return tl.maximum(x, 0.0) + log1p_e, e


@triton.jit
def _fold_column_tile(state, offs_n, rows, C: tl.constexpr, MASKED: tl.constexpr):
    """Fold the column tile ``offs_n`` into the running row statistics ``state`` = (running
    maximum, running sum, weighted keys); ``rows`` is the program's :class:`_RowBlock`, ``C`` its
    :class:`_ForwardConstants`.

    LSE keeps its maximum in the units of x = q·k, before σ (σ > 0 keeps the maximum's
    position), so that σ folds into the exponent, one FMA per score: e^{σx − σm} =
    2^{x·σlog₂e − m·σlog₂e}. With CLIP, x = clamp(σ q·k, ±clip) in the scores' own units. Only
    MASKED tiles (the ragged last one, those crossing the diagonal when it is dropped) pay for
    the comparisons and selects of masking. WEIGHTED_KEYS (needs SINGLE_K, and the diagonal band
    among the MASKED tiles) also accumulates Σ_{j≠i} w̃_ij k_j into the weighted keys
    (BLOCK_M, BLOCK_K), unnormalised for LSE.
    """
    running_max, running_sum, weighted_keys = state
    offs_m = rows.offs_m
    exp2_scale = LOG2E if C.CLIP else rows.scale * LOG2E  # the factor of x in each exponent
    if C.WEIGHTED_KEYS:  # the k tile serves the scores and the weighted sum
        x, k_block = _tile_scores_and_keys(
            rows.q_block, rows.k_ptr, offs_n, rows.n_cols, rows.dim, C.BLOCK_K, C.INPUT_PRECISION
        )
    else:
        x = _score_tile(
            q_ptr=rows.q_ptr, k_ptr=rows.k_ptr, q_block=rows.q_block, offs_m=offs_m, offs_n=offs_n,
            n_rows=rows.n_rows, n_cols=rows.n_cols, dim=rows.dim, BLOCK_M=C.BLOCK_M, BLOCK_N=C.BLOCK_N,
            BLOCK_K=C.BLOCK_K, SINGLE_K=C.SINGLE_K, INPUT_PRECISION=C.INPUT_PRECISION,
        )
    if C.CLIP or C.REDUCTION == SOFTPLUS:
        x = rows.scale * x
    if C.CLIP:
        if C.WEIGHTED_KEYS:
            passes = (x >= -rows.clip) & (x <= rows.clip)  # where the clamp passes gradient, ends included
        x = tl.minimum(tl.maximum(x, -rows.clip), rows.clip)
    if MASKED:
        keep = offs_n[None, :] < rows.n_cols
        keep_keys = keep & (offs_m[:, None] != offs_n[None, :])  # u leaves the diagonal out
        if C.MASK_DIAGONAL:
            keep = keep_keys
    if C.REDUCTION == LSE:
        if MASKED:
            x = tl.where(keep, x, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(x, axis=1))
        if MASKED:
            # Rows with only masked entries so far keep a -inf maximum; shift them by 0, not -inf.
            new_max_shift = tl.where(new_max == float("-inf"), 0.0, new_max) * exp2_scale
        else:
            new_max_shift = new_max * exp2_scale
        rescale = tl.exp2(running_max * exp2_scale - new_max_shift)
        terms = tl.exp2(x * exp2_scale - new_max_shift[:, None])
        running_sum = running_sum * rescale + tl.sum(terms, axis=1)
        running_max = new_max
        if C.WEIGHTED_KEYS:
            if C.CLIP:
                terms = tl.where(passes, terms, 0.0)
            if MASKED and not C.MASK_DIAGONAL:
                terms = tl.where(keep_keys, terms, 0.0)
            weighted_keys = tl.dot(terms.to(k_block.dtype), k_block, weighted_keys * rescale[:, None])
    else:
        terms, e = _softplus_with_exp(x)
        if MASKED:
            terms = tl.where(keep, terms, 0.0)
        running_sum += tl.sum(terms, axis=1)
        if C.WEIGHTED_KEYS:
            weights = tl.where(x >= 0.0, 1.0, e) / (1.0 + e)  # σ(x) from softplus's exponential
            if MASKED:
                weights = tl.where(keep_keys, weights, 0.0)
            weighted_keys = tl.dot(weights.to(k_block.dtype), k_block, weighted_keys)
    return running_max, running_sum, weighted_keys


@triton.jit
def _row_stats_fwd(
    q_ptr, k_ptr,  # (n_rows, dim), (n_cols, dim): statistics are per row of q, k streams past
    scale_ptr,  # () fp32 inverse temperature σ
    out_ptr,  # (n_rows,) fp32 statistic per row
    keys_ptr,  # (n_rows, dim) fp32 weighted keys u, written when WEIGHTED_KEYS
    n_rows, n_cols, dim,
    clip,  # fp32 clamp bound, read when CLIP
    REDUCTION: tl.constexpr, MASK_DIAGONAL: tl.constexpr, CLIP: tl.constexpr, WEIGHTED_KEYS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    _assert_block(BLOCK_M)
    _assert_block(BLOCK_N)
    _assert_block(BLOCK_K)
    tl.static_assert(REDUCTION == LSE or REDUCTION == SOFTPLUS, "REDUCTION must be LSE or SOFTPLUS")
    # u is summed from the k tile of the scores, an MMA operand: it needs the whole feature row in
    # one tile (SINGLE_K: dim <= BLOCK_K) and 16-bit operands (fp32 ones would not fit the registers).
    tl.static_assert(not WEIGHTED_KEYS or SINGLE_K, "WEIGHTED_KEYS needs the whole feature row in one tile")
    tl.static_assert(not WEIGHTED_KEYS or q_ptr.dtype.element_ty != tl.float32, "WEIGHTED_KEYS needs 16-bit inputs")
    row0 = tl.program_id(0) * BLOCK_M
    offs_m = row0 + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr)
    q_block = _load_block(q_ptr, offs_m, tl.arange(0, BLOCK_K), n_rows, dim, dim) if SINGLE_K else None
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    weighted_keys = tl.zeros((BLOCK_M, BLOCK_K) if WEIGHTED_KEYS else (BLOCK_M,), dtype=tl.float32)
    rows = _RowBlock(
        q_ptr=q_ptr, k_ptr=k_ptr, q_block=q_block, offs_m=offs_m, n_rows=n_rows, n_cols=n_cols, dim=dim,
        scale=scale, clip=clip,
    )
    # Unmasked tiles get a loop of their own where the ALU work per score is what bounds the
    # kernel: LSE on 16-bit inputs (tensor cores at full rate). Softplus spends a logarithm per
    # score, which dwarfs masking (7 % of its loop); fp32 inputs run the dot at a fraction of that
    # rate. One masked loop keeps their code smaller (and the fp32 variants free of spills).
    running_max, running_sum, weighted_keys = _sweep(
        fold_tile=_fold_column_tile, state=(running_max, running_sum, weighted_keys), held=rows,
        CONSTANTS=_ForwardConstants(  # built in the call: assigned to a name, its values would become tensors
            REDUCTION=REDUCTION, MASK_DIAGONAL=MASK_DIAGONAL, CLIP=CLIP, WEIGHTED_KEYS=WEIGHTED_KEYS,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SINGLE_K=SINGLE_K, INPUT_PRECISION=INPUT_PRECISION,
        ),
        block0=row0, n_swept=n_cols, OWN_BLOCK=BLOCK_M, SWEPT_BLOCK=BLOCK_N,
        BAND=MASK_DIAGONAL or WEIGHTED_KEYS,  # tiles holding the diagonal need its mask
        SPLIT=REDUCTION == LSE and q_ptr.dtype.element_ty != tl.float32,
    )
    if REDUCTION == LSE:
        result = running_max * (1.0 if CLIP else scale) + tl.log(running_sum)
    else:
        result = running_sum
    tl.store(out_ptr + offs_m, result, mask=offs_m < n_rows)
    if WEIGHTED_KEYS:
        if REDUCTION == LSE:  # the softmax's normaliser (a row with no entries keeps u = 0)
            weighted_keys = weighted_keys / tl.where(running_sum > 0.0, running_sum, 1.0)[:, None]
        offs_k = tl.arange(0, BLOCK_K)
        pointers = keys_ptr + offs_m.to(tl.int64)[:, None] * dim + offs_k[None, :]
        tl.store(pointers, weighted_keys, mask=(offs_m[:, None] < n_rows) & (offs_k[None, :] < dim))


# fmt: on


def keys_fit(dtype: torch.dtype, dim: int) -> bool:
    """Whether the forward can form the weighted keys: 16-bit inputs whose feature rows fit one
    tile (D ≤ 128), where the k tile held for the scores feeds the tensor cores a second time.
    Wider rows would need a (BLOCK_M, D) accumulator past the register file; fp32 operands take
    twice the registers."""
    return dtype in (torch.float16, torch.bfloat16) and dim <= 128


def row_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: torch.Tensor,
    *,
    reduction: str,
    mask_diagonal: bool,
    clip: float | None = None,
    weighted_keys: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``"lse"`` or ``"softplus"`` statistic of S = σ q kᵀ (see the module notes), (B,) fp32;
    with ``weighted_keys`` (16-bit inputs, D ≤ 128) also u, (B, D) fp32."""
    q, k = q.contiguous(), k.contiguous()
    n_rows, dim = q.shape
    out = torch.empty(n_rows, device=q.device, dtype=torch.float32)
    if weighted_keys and not keys_fit(q.dtype, dim):
        raise ValueError(f"weighted keys need 16-bit inputs with D <= 128; got {q.dtype}, D = {dim}")
    keys = torch.empty((n_rows, dim) if weighted_keys else (1,), device=q.device, dtype=torch.float32)
    launch.run(
        "row_stats_keys_fwd" if weighted_keys else "row_stats_fwd",
        _row_stats_fwd,
        grid=lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),),
        dtype=q.dtype,
        q_ptr=q,
        k_ptr=k,
        scale_ptr=launch.scale_tensor(scale),
        out_ptr=out,
        keys_ptr=keys,
        n_rows=n_rows,
        n_cols=k.shape[0],
        dim=dim,
        clip=float(clip or 0.0),
        REDUCTION=REDUCTIONS[reduction],
        MASK_DIAGONAL=mask_diagonal,
        CLIP=clip is not None,
        WEIGHTED_KEYS=weighted_keys,
        **tuning.shape_constants(dim, q.dtype),
    )
    return (out, keys) if weighted_keys else out
