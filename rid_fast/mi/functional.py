r"""Mutual-information lower bounds between paired batches, in nats.

Every function takes ``x`` (B, D) and ``y`` (N, D) with N ≥ B. The positive pairs are
:math:`(x_i, y_i)` for :math:`i < B`; every other pair :math:`(i, j)` is a negative (extra keys,
``N > B``, are negatives only). A critic scores pairs, :math:`s_{ij} = \langle x_i, y_j\rangle/\tau`
(``critic="dot"``) or the same with L2-normalised rows (``"cosine"``). Each returns a
differentiable scalar: the estimate of a lower bound on :math:`I(X;Y)`, in fp32 (fp64 for fp64
inputs).

``impl`` selects the implementation:

* ``"auto"`` — fused Triton kernels on CUDA tensors, the streaming path elsewhere;
* ``"torch"`` — streaming PyTorch: blockwise, online log-sum-exp, recompute in backward;
  memory O((B+N)·D + block²) (one-sided InfoNCE under autograd: gradients computed in the
  forward's sweep over strips of whole rows, O((B+N)·D + strip), where the strips are thick
  enough to pay — see :func:`rid_fast.ops.streaming.one_sweep_pays`);
* ``"triton"`` — fused Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``); under
  autograd with 16-bit inputs and D ≤ 128 the forward of the one-sided estimators also forms
  dq's weighted keys, so the backward sweeps once (for dk) instead of twice;
* ``"reference"`` — plain PyTorch that materialises the B×N scores (the oracle, for tests).

``check_values`` (default True) rejects NaN/Inf inputs and a non-positive tensor temperature; it
costs one pass over the inputs and, on GPU, a device sync, and is skipped under ``torch.compile``.
Pass ``check_values=False`` in a hot loop once inputs are known to be sane.

Example::

    >>> import torch
    >>> from rid_fast import functional as MI
    >>> x = torch.randn(256, 32); y = x + 0.5 * torch.randn(256, 32)
    >>> bound = MI.infonce(x, y, temperature=0.5, critic="cosine")
    >>> bool(0 < bound <= torch.log(torch.tensor(256.0)))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rid_fast.mi import reference
from rid_fast.mi.critics import CRITICS, Critic, critic_factors
from rid_fast.ops import library
from rid_fast.ops.common import diagonal_scores
from rid_fast.ops.dispatch import (
    check_bool,
    check_choice,
    check_pair,
    check_positive,
    check_temperature,
    resolve_impl,
    wants_grad,
    weighted_keys_in_forward,
)
from rid_fast.ops.streaming import one_sweep_pays

__all__ = ["ESTIMATORS", "infonce", "nwj", "dv", "smile", "js", "mi_bound", "estimate"]


# ---- estimator terms from the factors of S = σ q kᵀ (streaming / Triton backends) ----------


def _row_statistic(op: Callable, weighted_op: Callable, q: Tensor, k: Tensor, scale: Tensor, *args) -> Tensor:
    """``op(q, k, scale, *args)`` — or, when training on the Triton backend where the forward can
    also form dq's weighted keys, the same statistic from ``weighted_op`` (whose backward then
    sweeps only for dk). ``args`` end with the backend."""
    if weighted_keys_in_forward(q, k, scale, args[-1]):
        return weighted_op(q, k, scale, *args)[0]
    return op(q, k, scale, *args)


def log_mean_exp_negatives(q: Tensor, k: Tensor, scale: Tensor, backend: str, clip: float | None = None) -> Tensor:
    r""":math:`\log \operatorname{mean}_{i\ne j} e^{c(s_{ij})}` from per-row off-diagonal log-sum-exps."""
    n_queries, n_keys = q.shape[0], k.shape[0]
    row_lse = _row_statistic(
        library.lse_negatives, library.lse_negatives_with_weighted_keys, q, k, scale, clip, backend
    )
    # O(B) work: combine the rows in float64 so that only the per-row statistics carry fp32 roundoff
    # (NWJ exponentiates this value, turning absolute error into relative error).
    total = torch.logsumexp(row_lse.double(), dim=0) - math.log(n_queries * (n_keys - 1))
    return total.to(row_lse.dtype)


def _one_sweep(q: Tensor, k: Tensor, scale: Tensor, backend: str) -> bool:
    """Train InfoNCE with gradients from the forward's sweep (streaming backend, autograd on, and
    a shape where that is faster)."""
    return backend == "torch" and wants_grad(q, k, scale) and one_sweep_pays(q.shape[0], k.shape[0], q.dtype)


def _infonce_factors(q: Tensor, k: Tensor, scale: Tensor, backend: str, symmetric: bool = False) -> Tensor:
    # InfoNCE is minus the mean cross-entropy of each row against its diagonal target, plus log N.
    if symmetric:
        loss_rows, loss_cols = library.cross_entropy_rows_cols(q, k, scale, backend)
        loss = 0.5 * (loss_rows + loss_cols)
    elif _one_sweep(q, k, scale, backend):
        # Training on the streaming path: the gradients come from the forward's own sweep.
        loss = library.cross_entropy_rows_mean_with_grad(q, k, scale)[0]
    else:
        loss = _row_statistic(
            library.cross_entropy_rows, library.cross_entropy_rows_with_weighted_keys, q, k, scale, backend
        )
    return math.log(k.shape[0]) - loss.mean()


def _nwj_factors(q: Tensor, k: Tensor, scale: Tensor, backend: str) -> Tensor:
    log_partition = log_mean_exp_negatives(q, k, scale, backend)
    return diagonal_scores(q, k, scale).mean() - torch.exp(log_partition.double() - 1.0).to(log_partition.dtype)


def _dv_factors(q: Tensor, k: Tensor, scale: Tensor, backend: str) -> Tensor:
    return diagonal_scores(q, k, scale).mean() - log_mean_exp_negatives(q, k, scale, backend)


def _smile_factors(q: Tensor, k: Tensor, scale: Tensor, backend: str, clip: float = 5.0) -> Tensor:
    return diagonal_scores(q, k, scale).mean() - log_mean_exp_negatives(q, k, scale, backend, clip)


def _js_factors(q: Tensor, k: Tensor, scale: Tensor, backend: str) -> Tensor:
    n_queries, n_keys = q.shape[0], k.shape[0]
    positives = -F.softplus(-diagonal_scores(q, k, scale)).mean()
    sums = _row_statistic(
        library.softplus_negatives, library.softplus_negatives_with_weighted_keys, q, k, scale, backend
    )
    negatives = sums.sum() / (n_queries * (n_keys - 1))
    return positives - negatives


def _no_options() -> None:
    """An estimator without options: any keyword is a ``TypeError``."""


def _check_infonce_options(*, symmetric: bool = False) -> None:
    check_bool("symmetric", symmetric)


def _check_smile_options(*, clip: float = 5.0) -> None:
    check_positive("clip", clip)


@dataclass(frozen=True)
class Estimator:
    """How one estimator is computed: from a materialised score matrix (the oracle) and from the
    factors of S = σ q kᵀ with a streaming/fused backend; ``check_options(**options)`` validates
    its keyword options."""

    from_scores: Callable[..., Tensor]
    from_factors: Callable[..., Tensor]
    #: Needs at least one negative pair (an off-diagonal average): N ≥ 2.
    needs_negatives: bool = True
    check_options: Callable[..., None] = _no_options


#: Registry of the estimators by name (the names ``mi_bound`` and the modules accept).
ESTIMATORS: dict[str, Estimator] = {
    "infonce": Estimator(
        reference.infonce_from_scores, _infonce_factors, needs_negatives=False, check_options=_check_infonce_options
    ),
    "nwj": Estimator(reference.nwj_from_scores, _nwj_factors),
    "dv": Estimator(reference.dv_from_scores, _dv_factors),
    "smile": Estimator(reference.smile_from_scores, _smile_factors, check_options=_check_smile_options),
    "js": Estimator(reference.js_from_scores, _js_factors),
}


def _dv_terms_from_scores(scores: Tensor) -> tuple[Tensor, Tensor]:
    return scores.diagonal().mean(), reference.log_mean_exp_negatives(scores)


def _dv_terms_from_factors(q: Tensor, k: Tensor, scale: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    return diagonal_scores(q, k, scale).mean(), log_mean_exp_negatives(q, k, scale, backend)


#: DV's two terms apart, (mean positive score, log mean exp of the negatives): what MINE needs to
#: correct the partition term's gradient.
DV_TERMS = Estimator(_dv_terms_from_scores, _dv_terms_from_factors)


class NamedCritic:
    """The critic of the functional API: ``"dot"`` or ``"cosine"`` at ``temperature`` (a number
    or a one-element tensor, learnable), with the interface of :class:`rid_fast.mi.critics.Critic`."""

    separable = True
    same_features = True
    x_dim = y_dim = None

    def __init__(self, name: str, temperature: float | Tensor, *, check_values: bool = True) -> None:
        check_choice("critic", name, CRITICS)
        check_temperature(temperature, check_values=check_values)
        self.name, self.temperature = name, temperature

    def describe(self) -> str:
        return f"critic={self.name!r}"

    def factors(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return critic_factors(x, y, temperature=self.temperature, critic=self.name)

    def scores(self, x: Tensor, y: Tensor) -> Tensor:
        return reference.critic_scores(x, y, temperature=self.temperature, critic=self.name)


def estimate(
    estimator: str | Estimator,
    x: Tensor,
    y: Tensor,
    critic: Critic | NamedCritic,
    *,
    impl: str = "auto",
    check_values: bool = True,
    **options,
):
    """The one front door of every estimator, functional or module: validate ``x`` and ``y`` for
    ``critic``, pick the implementation, and evaluate ``estimator`` (a name of
    :data:`ESTIMATORS`, or an :class:`Estimator`) with ``options``.

    Separable critics run on the streaming or fused backends from their factors (q, k, σ); the
    reference implementation and non-separable critics reduce the materialised score matrix.
    """
    if isinstance(estimator, str):
        check_choice("estimator", estimator, ESTIMATORS)
        estimator = ESTIMATORS[estimator]
    if not isinstance(critic, (Critic, NamedCritic)):
        raise TypeError(
            f"critic must be a rid_fast.mi.critics.Critic (or a NamedCritic); got {type(critic).__name__} "
            "(the functions infonce(), nwj(), … take critic names)"
        )
    estimator.check_options(**options)
    check_bool("check_values", check_values)
    check_pair(
        x,
        y,
        same_features=critic.same_features,
        features=(critic.x_dim, critic.y_dim),
        features_for=critic.describe(),
        square=options.get("symmetric", False),
        needs_negatives=estimator.needs_negatives,
        check_values=check_values,
    )
    backend = resolve_impl(impl, x.device, x.dtype)
    if backend == "reference" or not critic.separable:
        return estimator.from_scores(critic.scores(x, y), **options)
    q, k, scale = critic.factors(x, y)
    return estimator.from_factors(*autocast_factors(q, k, backend), scale, backend, **options)


def _named(
    name: str,
    x: Tensor,
    y: Tensor,
    *,
    temperature: float | Tensor,
    critic: str,
    impl: str,
    check_values: bool,
    **options,
) -> Tensor:
    """Estimator ``name`` with a critic given by name (the public functions below)."""
    return estimate(
        name, x, y, NamedCritic(critic, temperature, check_values=check_values), impl=impl, check_values=check_values,
        **options,
    )  # fmt: skip


def autocast_factors(q: Tensor, k: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Inside an autocast region the fused kernels take the autocast dtype, as a matmul would
    (the streaming path accumulates in fp32 whatever it gets, so it keeps the inputs as they are)."""
    device_type = q.device.type
    if backend != "triton" or not torch.is_autocast_enabled(device_type):
        return q, k
    dtype = torch.get_autocast_dtype(device_type)
    return q.to(dtype), k.to(dtype)


def infonce(
    x: Tensor,
    y: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    critic: str = "dot",
    symmetric: bool = False,
    impl: str = "auto",
    check_values: bool = True,
) -> Tensor:
    r"""InfoNCE (van den Oord et al. 2018): :math:`\hat I = \frac1B\sum_i \big[s_{ii} -
    \log\sum_{j<N} e^{s_{ij}}\big] + \log N \le \log N`.

    ``symmetric=True`` averages the row form with the column form (log-sum-exp over i), as in
    CLIP; it needs N = B.

    Shape:
        - x: (B, D), y: (N, D), N ≥ B → scalar.

    Example::

        >>> x = torch.randn(64, 8); y = x + 0.1 * torch.randn(64, 8)
        >>> float(infonce(x, y, critic="cosine", symmetric=True)) > 0
        True
    """
    return _named(
        "infonce",
        x,
        y,
        temperature=temperature,
        critic=critic,
        impl=impl,
        check_values=check_values,
        symmetric=symmetric,
    )


def nwj(
    x: Tensor,
    y: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    critic: str = "dot",
    impl: str = "auto",
    check_values: bool = True,
) -> Tensor:
    r"""NWJ / f-divergence bound (Nguyen, Wainwright & Jordan 2010):
    :math:`\hat I = \operatorname{mean}_i s_{ii} - e^{-1}\operatorname{mean}_{i\ne j} e^{s_{ij}}`.

    Unbiased but high-variance; the partition term is computed in log space and exponentiated
    once, so it overflows only when the true value does. Needs N ≥ 2.

    Shape:
        - x: (B, D), y: (N, D), N ≥ max(B, 2) → scalar.

    Example::

        >>> x = torch.randn(64, 8); y = x + 0.1 * torch.randn(64, 8)
        >>> nwj(x, y, temperature=1.0, critic="cosine").shape
        torch.Size([])
    """
    return _named("nwj", x, y, temperature=temperature, critic=critic, impl=impl, check_values=check_values)


def dv(
    x: Tensor,
    y: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    critic: str = "dot",
    impl: str = "auto",
    check_values: bool = True,
) -> Tensor:
    r"""Donsker–Varadhan bound (the value MINE maximises):
    :math:`\hat I = \operatorname{mean}_i s_{ii} - \log\operatorname{mean}_{i\ne j} e^{s_{ij}}`.

    Its mini-batch gradient is biased; :class:`rid_fast.mi.estimators.MINE` corrects it with an
    exponential moving average. Needs N ≥ 2.

    Shape:
        - x: (B, D), y: (N, D), N ≥ max(B, 2) → scalar.

    Example::

        >>> x = torch.randn(64, 8); y = x + 0.1 * torch.randn(64, 8)
        >>> float(dv(x, y, temperature=0.5, critic="cosine")) > 0
        True
    """
    return _named("dv", x, y, temperature=temperature, critic=critic, impl=impl, check_values=check_values)


def smile(
    x: Tensor,
    y: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    critic: str = "dot",
    clip: float = 5.0,
    impl: str = "auto",
    check_values: bool = True,
) -> Tensor:
    r"""SMILE (Song & Ermon 2020): DV with the partition's scores clipped to :math:`[-c, c]`,
    :math:`\hat I = \operatorname{mean}_i s_{ii} - \log\operatorname{mean}_{i\ne j}
    e^{\operatorname{clip}(s_{ij}, -c, c)}`, trading a little bias for much lower variance.

    The gradient is that of this value (zero through clipped scores). Song & Ermon's code trains
    the critic with the JS objective and reports SMILE; combine :func:`js` and :func:`smile` for that.

    Shape:
        - x: (B, D), y: (N, D), N ≥ max(B, 2) → scalar.

    Example::

        >>> x = torch.randn(64, 8); y = x + 0.1 * torch.randn(64, 8)
        >>> float(smile(x, y, temperature=0.5, critic="cosine", clip=5.0)) > 0
        True
    """
    return _named(
        "smile", x, y, temperature=temperature, critic=critic, impl=impl, check_values=check_values, clip=clip
    )


def js(
    x: Tensor,
    y: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    critic: str = "dot",
    impl: str = "auto",
    check_values: bool = True,
) -> Tensor:
    r"""Jensen–Shannon (f-GAN) objective: :math:`\hat J = \operatorname{mean}_i[-\mathrm{softplus}(-s_{ii})]
    - \operatorname{mean}_{i\ne j}\mathrm{softplus}(s_{ij})`.

    A stable objective for *training* a critic, not an MI value itself: its optimal critic is
    :math:`\log p(x,y)/p(x)p(y)`, so report MI as :func:`nwj` of the same critic with scores
    shifted by +1 (Poole et al. 2019). Needs N ≥ 2.

    Shape:
        - x: (B, D), y: (N, D), N ≥ max(B, 2) → scalar.

    Example::

        >>> x = torch.randn(64, 8); y = x + 0.1 * torch.randn(64, 8)
        >>> float(js(x, y, temperature=0.5, critic="cosine")) < 0
        True
    """
    return _named("js", x, y, temperature=temperature, critic=critic, impl=impl, check_values=check_values)


_PUBLIC: dict[str, Callable[..., Tensor]] = {"infonce": infonce, "nwj": nwj, "dv": dv, "smile": smile, "js": js}


def mi_bound(x: Tensor, y: Tensor, estimator: str = "infonce", **kwargs) -> Tensor:
    """Dispatch to the estimator named ``estimator`` (one of :data:`ESTIMATORS`) with ``kwargs``.

    Example::

        >>> x = torch.randn(32, 4)
        >>> mi_bound(x, x, "dv", temperature=1.0).shape
        torch.Size([])
    """
    check_choice("estimator", estimator, _PUBLIC)
    return _PUBLIC[estimator](x, y, **kwargs)
