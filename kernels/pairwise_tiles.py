r"""What the pairwise-MLP critic's forward and backward kernels share: operand preparation, the
score tile, the positives, input checks and the launch.

The concat critic scores every pair through one hidden layer of width H,

.. math::
    s_{ij} = \sum_h w_{2,h}\,\mathrm{relu}(a_{ih} + c_{jh}) + b_2,
    \qquad a \in \mathbb{R}^{B\times H},\; c \in \mathbb{R}^{N\times H},

which is not a matrix product: a tile of scores costs B·N·H additions, maxima and multiply-adds
on the ALUs (no tensor cores). The kernels make that two instructions per (i, j, h) instead of
three. With :math:`\sigma_h = \mathrm{sign}(w_{2,h})` and the operands scaled by
:math:`|w_{2,h}|` (positive homogeneity of relu), and :math:`\mathrm{relu}(x + y) = \max(x, -y) + y`,

.. math::
    s_{ij} = \sum_h \sigma_h \max(\hat a_{ih}, \hat n_{jh}) + \kappa_j,\qquad
    \hat a_{ih} = |w_{2,h}|\,a_{ih},\; \hat n_{jh} = -|w_{2,h}|\,c_{jh},\;
    \kappa_j = \textstyle\sum_h w_{2,h} c_{jh} + b_2,

one maximum and one fused multiply-add per term; :math:`\kappa` is a matrix–vector product done
once. :func:`prepare_scores` forms :math:`\hat a^\top` (H, B) and :math:`\hat n^\top` (H, N) in fp32
(for 16-bit inputs the products are exact in fp32), laid out so that each hidden unit's values
are one contiguous vector, which the tile loop (:func:`_score_tile`) loads per unit.

Rounding: the two sums :math:`\sum_h \sigma_h \max(\cdot)` and :math:`\kappa_j` each round at the
scale :math:`\sum_h |w_{2,h}|(|a_{ih}| + |c_{jh}|)` — the same scale at which forming
:math:`a_{ih} + c_{jh}` rounds in the direct formula.

Column statistics are row statistics of :math:`s^\top`, which is the same critic with the roles of
``a`` and ``c`` swapped: the launchers prepare the swapped operands instead of a second kernel.

Where these kernels have run: compiled ahead of time for sm_90 (``kernels/aot.py``) and run under
the Triton interpreter on CPUs against the plain-PyTorch reference; never on a GPU — no GPU number
has been measured yet.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rid_fast.ops.common import pairwise_diagonal_scores

from . import tuning

__all__ = ["ScoreOperands", "prepare_scores", "positives", "check_inputs", "run"]


class ScoreOperands(NamedTuple):
    """The prepared operands of :func:`_score_tile` for scores of ``own`` rows against ``other`` rows."""

    own_t: torch.Tensor  # (H, n_own) fp32: |w2_h| · own_ih
    other_t: torch.Tensor  # (H, n_other) fp32: −|w2_h| · other_jh
    sign: torch.Tensor  # (H,) fp32: sign(w2_h)
    other_const: torch.Tensor  # (n_other,) fp32: other_j · w2 + b2


def prepare_scores(own: torch.Tensor, other: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> ScoreOperands:
    """Operands of the scores :math:`s_{ij} = w_2 \\cdot \\mathrm{relu}(\\text{own}_i + \\text{other}_j) + b_2`
    (see the module notes): O((n_own + n_other)·H) work and memory."""
    w = w2.float()
    magnitude = w.abs()
    return ScoreOperands(
        own_t=(own.float() * magnitude).T.contiguous(),
        other_t=(other.float() * -magnitude).T.contiguous(),
        sign=torch.sign(w).contiguous(),
        other_const=(other.float() @ w + b2.float()).contiguous(),
    )


#: The positives s_ii, O(B·H), fp32 for the kernels' dtypes (as the other backends).
positives = pairwise_diagonal_scores


def check_inputs(a: torch.Tensor, c: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *, min_keys: int = 1) -> None:
    """A light check before any kernel runs (the op layer validates in full): shapes, one dtype,
    one device, contiguity."""
    if a.dim() != 2 or c.dim() != 2 or a.shape[1] != c.shape[1]:
        raise ValueError(
            f"a and c must be (B, H) and (N, H) with the same H; got a {tuple(a.shape)}, c {tuple(c.shape)}"
        )
    if w2.shape != (a.shape[1],):
        raise ValueError(f"w2 must have shape (H,) = ({a.shape[1]},); got {tuple(w2.shape)}")
    if b2.dim() != 0:
        raise ValueError(f"b2 must be a 0-dim tensor; got shape {tuple(b2.shape)}")
    if c.shape[0] < max(a.shape[0], min_keys):
        raise ValueError(f"c needs N >= max(B, {min_keys}) rows; got N = {c.shape[0]}, B = {a.shape[0]}")
    tensors = {"a": a, "c": c, "w2": w2, "b2": b2}
    for name, t in tensors.items():
        if t.dtype != a.dtype or t.device != a.device:
            raise ValueError(
                f"{name} must have a's dtype and device ({a.dtype}, {a.device}); got {t.dtype}, {t.device}"
            )
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if max(a.numel(), c.numel()) >= 2**31:  # the score loop indexes the prepared operands in int32
        raise ValueError(f"a and c must each hold fewer than 2**31 elements; got {a.numel()} and {c.numel()}")
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"a must be float32, float16 or bfloat16; got {a.dtype}")


# fmt: off
@triton.jit
def _score_tile(
    own_t_ptr, other_t_ptr, sign_ptr, other_const_ptr, offs_m, offs_n, n_rows, n_cols, hidden,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """fp32 scores (BLOCK_M, BLOCK_N) of rows ``offs_m`` against columns ``offs_n`` from the
    prepared operands (:class:`ScoreOperands`): Σ_h σ_h max(â_ih, n̂_jh) + κ_j, one maximum and one
    FMA per hidden unit. Entries outside the matrix hold finite garbage; callers mask them."""
    rows_in = offs_m < n_rows
    cols_in = offs_n < n_cols
    scores = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for h in range(0, hidden):
        own = tl.load(own_t_ptr + h * n_rows + offs_m, mask=rows_in, other=0.0)
        other = tl.load(other_t_ptr + h * n_cols + offs_n, mask=cols_in, other=0.0)
        scores = tl.fma(tl.load(sign_ptr + h), tl.maximum(own[:, None], other[None, :]), scores)
    return scores + tl.load(other_const_ptr + offs_n, mask=cols_in, other=0.0)[None, :]


# fmt: on

# One autotuner per kernel name and precision class, made on first use.
_AUTOTUNERS: dict[tuple[str, str], triton.runtime.Autotuner] = {}


def run(
    name: str,
    kernel: triton.JITFunction,
    *,
    grid,
    dtype: torch.dtype,
    reset_to_zero: list[str] | None = None,
    **arguments,
) -> None:
    """Launch ``kernel`` (``name``: its entry in :data:`kernels.tuning.PAIRWISE_KERNELS`) for inputs
    of ``dtype``: autotuned over its candidates where autotuning is on, else in its default config.
    ``reset_to_zero`` names the outputs the kernel accumulates into, zeroed before each of the
    autotuner's trial runs. (The dot kernels' :func:`kernels.launch.run` prunes by a ``q_ptr``
    argument these kernels do not have, so they get one autotuner per precision class instead.)"""
    if tuning.autotune_enabled():
        key = (name, "fp32" if dtype == torch.float32 else "16bit")
        if key not in _AUTOTUNERS:
            _AUTOTUNERS[key] = triton.autotune(
                configs=tuning.candidate_configs(name, dtype),
                key=["n_rows", "n_cols", "hidden"],
                reset_to_zero=reset_to_zero,
            )(kernel)
        _AUTOTUNERS[key][grid](**arguments)
        return
    config = tuning.PAIRWISE_INTERPRETER_DEFAULT if tuning.interpreting() else tuning.default_config(name, dtype)
    kernel[grid](**arguments, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
