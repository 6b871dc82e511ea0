r"""Mutual-information estimators between paired batches, in nats.

Every function takes ``x`` (B, D) and ``y`` (N, D) with N ≥ B. The positive pairs are
:math:`(x_i, y_i)` for :math:`i < B`; every other pair :math:`(i, j)` is a negative (extra keys,
``N > B``, are negatives only). A critic scores pairs, :math:`s_{ij} = \langle x_i, y_j\rangle/\tau`
(``critic="dot"``) or the same with L2-normalised rows (``"cosine"``). Each returns a
differentiable scalar in fp32 (fp64 for fp64 inputs):

* :func:`infonce`, :func:`nwj` — estimates of lower bounds on :math:`I(X;Y)` for any critic (in
  expectation over batches; InfoNCE's is at most log N);
* :func:`dv` — the Donsker–Varadhan lower bound's batch estimate, biased upwards by the log of a
  mean (the bias shrinks with the number of negatives);
* :func:`smile` — not a bound: the clipped DV's value, with JS's gradient;
* :func:`js` — a critic's training objective, a lower bound on a Jensen–Shannon divergence, not on
  :math:`I(X;Y)`.

``impl`` selects the implementation:

* ``"auto"`` — fused Triton kernels on CUDA tensors, the streaming path elsewhere;
* ``"torch"`` — streaming PyTorch: blockwise, online log-sum-exp, recompute in backward;
  memory O((B+N)·D + block²) (one-sided InfoNCE under autograd: gradients computed in the
  forward's sweep over strips of whole rows, O((B+N)·D + strip), where the strips are thick
  enough to pay — see :func:`rid_fast.ops.streaming.one_sweep_pays`);
* ``"triton"`` — fused Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``); under
  autograd with 16-bit inputs and D ≤ 128 the forward of the one-sided estimators also forms
  dq's weighted keys, so the backward sweeps once (for dk) instead of twice;
* ``"reference"`` — plain PyTorch that materialises the B×N scores (the oracle, for tests);
* ``"cpp"`` — the pairwise-MLP critic's compiled CPU kernel (:class:`~rid_fast.mi.critics.ConcatCritic`
  only; see :mod:`rid_fast.ops.pairwise_cpp`).

With :class:`~rid_fast.mi.critics.ConcatCritic` (through :func:`estimate` and the estimator
modules) ``"auto"`` is the C++ kernel on CPU tensors — compiled on first use, the blocked PyTorch
path (``"torch"``, :mod:`rid_fast.ops.pairwise_streaming`) where it cannot be built — and the
Triton kernels on CUDA tensors; ``"reference"`` materialises the B × N × H hidden layer.

``group`` (a ``torch.distributed`` process group; default None, this process only) makes the
estimate one over the batch of every process: ``x``, ``y`` are this process's rows (N = B on each
process, B may differ between them) and the value, the same on every process, is the
single-process estimate on the rank-ordered concatenation of all processes' rows — positives are
the pairs with the same global index, every other global pair a negative. Gradients follow DDP's
convention: the gradient reaching this process's ``x``, ``y`` (and a temperature) is W times its
share of the global estimate's, so that once DDP averages parameter gradients over the W
processes every parameter (critic, learnable temperature, encoders) holds exactly the
single-process gradient of the global estimate. Every process must run the backward, as under DDP.
``gather`` says how the other processes' keys arrive: ``"ring"`` (default; key blocks passed
around the processes, memory O(B·D) whatever the number of processes) or ``"all_gather"``
(gathered at once with autograd, O(W·B·D)); see :mod:`rid_fast.mi.reductions`. The processes must
call with the same estimator, options, critic, temperature, dtype and feature width; a
disagreement is the same ``ValueError`` on every process, not a hang.

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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from rid_fast.mi import reference
from rid_fast.mi.critics import CRITICS, Critic, critic_factors
from rid_fast.mi.distributed import check_group_call, check_rows_match, global_batch_sizes, is_distributed
from rid_fast.mi.reductions import PairwiseReductions, ScoreReductions, score_reductions
from rid_fast.ops.dispatch import (
    check_bool,
    check_choice,
    check_pair,
    check_positive,
    check_temperature,
    resolve_impl,
    resolve_pairwise_impl,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["ESTIMATORS", "SMILE_GRADIENTS", "infonce", "nwj", "dv", "smile", "js", "mi_bound", "estimate"]


# ---- estimator terms from the reductions of S = σ q kᵀ (streaming / Triton backends) ---------


def log_mean_exp_negatives(rows: ScoreReductions, clip: float | None = None) -> Tensor:
    r""":math:`\log \operatorname{mean}_{i\ne j} e^{c(s_{ij})}` from per-row off-diagonal log-sum-exps."""
    row_lse = rows.lse_negatives(clip)
    # O(B) work: combine the rows in float64 so that only the per-row statistics carry fp32 roundoff
    # (NWJ exponentiates this value, turning absolute error into relative error).
    total = rows.logsumexp(row_lse.double()) - math.log(rows.n_rows * (rows.n_keys - 1))
    return total.to(row_lse.dtype)


def _infonce_factors(rows: ScoreReductions, symmetric: bool = False) -> Tensor:
    # InfoNCE is minus the mean cross-entropy of each row against its diagonal target, plus log N.
    if symmetric:
        loss_rows, loss_cols = rows.cross_entropy_rows_cols()
        loss = rows.mean(0.5 * (loss_rows + loss_cols))
    else:
        loss = rows.mean_cross_entropy_rows()
    return math.log(rows.n_keys) - loss


def _nwj_factors(rows: ScoreReductions) -> Tensor:
    log_partition = log_mean_exp_negatives(rows)
    return rows.mean(rows.positives()) - torch.exp(log_partition.double() - 1.0).to(log_partition.dtype)


def _dv_factors(rows: ScoreReductions) -> Tensor:
    return rows.mean(rows.positives()) - log_mean_exp_negatives(rows)


def _clipped_dv_factors(rows: ScoreReductions, clip: float) -> Tensor:
    return rows.mean(rows.positives()) - log_mean_exp_negatives(rows, clip)


def _smile_factors(rows: ScoreReductions, clip: float = 5.0, gradient: str = "js") -> Tensor:
    """SMILE's value (the clipped DV) with JS's gradient, or with its own for ``gradient="clipped_dv"``.

    Under autograd with JS's gradient the forward sweeps the scores twice — the clipped
    log-sum-exps without autograd (no backward, no weighted keys), then JS's off-diagonal softplus
    sums with it — and the backward sweeps once, for JS's term alone. Not fused into one sweep yet,
    because that needs a new op: a row kernel that keeps both statistics of one score tile (the
    online max and sum of e^clip(s), and the sum of softplus(s)) with, in training, the weighted
    keys of the softplus term only (sigmoid(s_ij)·k_j); its streaming twin; and a library op with two
    row outputs whose backward is ``softplus_negatives``'s (the clipped statistic marked
    non-differentiable). That would save one of the forward's two sweeps; the backward would not
    change.
    """
    if gradient == "clipped_dv" or not rows.wants_grad():
        return _clipped_dv_factors(rows, clip)
    with torch.no_grad():
        value = _clipped_dv_factors(rows, clip)
    return reference.value_with_gradient_of(value, _js_factors(rows))


def _js_factors(rows: ScoreReductions) -> Tensor:
    positives = -rows.mean(F.softplus(-rows.positives()))
    negatives = rows.sum(rows.softplus_negatives()) / (rows.n_rows * (rows.n_keys - 1))
    return positives - negatives


def _no_options() -> None:
    """An estimator without options: any keyword is a ``TypeError``."""


def _check_infonce_options(*, symmetric: bool = False) -> None:
    check_bool("symmetric", symmetric)


#: How SMILE's value is differentiated: ``"js"`` (the default) trains the critic on the JS
#: objective, as Song & Ermon do; ``"clipped_dv"`` differentiates the clipped DV value itself,
#: which is not bounded above (maximising it diverges).
SMILE_GRADIENTS = ("js", "clipped_dv")


def _check_smile_options(*, clip: float = 5.0, gradient: str = "js") -> None:
    check_positive("clip", clip)
    check_choice("gradient", gradient, SMILE_GRADIENTS)


@dataclass(frozen=True)
class Estimator:
    """How one estimator is computed: from a materialised score matrix (the oracle) and from the
    reductions of S = σ q kᵀ (:class:`rid_fast.mi.reductions.ScoreReductions`, over this process's
    batch or a group's) with a streaming/fused backend; ``check_options(**options)`` validates its
    keyword options."""

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


def _dv_terms_from_factors(rows: ScoreReductions) -> tuple[Tensor, Tensor]:
    return rows.mean(rows.positives()), log_mean_exp_negatives(rows)


#: DV's two terms apart, (mean positive score, log mean exp of the negatives): what MINE needs to
#: correct the partition term's gradient.
DV_TERMS = Estimator(_dv_terms_from_scores, _dv_terms_from_factors)


class NamedCritic:
    """The critic of the functional API: ``"dot"`` or ``"cosine"`` at ``temperature`` (a number
    or a one-element tensor, learnable), with the interface of :class:`rid_fast.mi.critics.Critic`."""

    separable = True
    pairwise = False
    same_features = True
    x_dim = y_dim = None

    def __init__(self, name: str, temperature: float | Tensor, *, check_values: bool = True) -> None:
        if isinstance(name, torch.nn.Module):  # a learnable critic belongs to the modules
            kind = type(name).__name__
            raise TypeError(
                f"critic must be one of {', '.join(map(repr, CRITICS))} here; got a {kind} module: critic modules "
                f"go with the estimator modules, e.g. rid_fast.estimators.InfoNCE({kind}(...))"
            )
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
    group: ProcessGroup | None = None,
    gather: str = "ring",
    **options,
):
    """The one front door of every estimator, functional or module: validate ``x`` and ``y`` for
    ``critic``, pick the implementation, and evaluate ``estimator`` (a name of
    :data:`ESTIMATORS`, or an :class:`Estimator`) with ``options``.

    Separable critics run on the streaming or fused backends from their factors (q, k, σ), the
    pairwise-MLP critic (``critic.pairwise``) from its factors (a, c, w₂, b₂); the reference
    implementation, and any other critic, reduce the materialised score matrix. Under ``group=``
    (more than one process; separable critics) the estimate is over the global batch
    (:mod:`rid_fast.mi.distributed`, :mod:`rid_fast.mi.reductions`).
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
    check_group_call(group, gather, separable=critic.separable, critic=critic.describe(), impl=impl)
    distributed = is_distributed(group)
    try:  # under a group, what only this process sees wrong is first told to the others
        check_pair(
            x,
            y,
            same_features=critic.same_features,
            features=(critic.x_dim, critic.y_dim),
            features_for=critic.describe(),
            square=options.get("symmetric", False),
            needs_negatives=estimator.needs_negatives and not distributed,
            check_values=check_values,
        )
        if distributed:
            check_rows_match(x, y)
        backend = (resolve_pairwise_impl if critic.pairwise else resolve_impl)(impl, x.device, x.dtype)
        if backend != "reference" and critic.separable:
            q, k, scale = critic.factors(x, y)
    except (ValueError, TypeError) as error:
        if not distributed:
            raise
        local_error = error
    else:
        local_error = None
    sizes = None
    if distributed:
        fields = {
            "the estimator": estimator.from_factors.__qualname__,
            "the estimator's options": sorted(options.items()),
            "the critic": critic.describe(),
            "the implementation": impl,
            "gather": gather,
        }
        sizes = global_batch_sizes(group, x, y, None if local_error else scale, fields=fields, local_error=local_error)
        if estimator.needs_negatives and sum(sizes) < 2:
            raise ValueError(f"this estimator averages over negative pairs (i ≠ j) and needs N ≥ 2; got N={sum(sizes)}")
    if backend == "reference" or not (critic.separable or critic.pairwise):
        return estimator.from_scores(critic.scores(x, y), **options)
    if critic.pairwise:
        return estimator.from_factors(PairwiseReductions(*critic.pairwise_factors(x, y), backend), **options)
    q, k = autocast_factors(q, k, backend)
    rows = score_reductions(q, k, scale, backend, group=group, gather=gather, sizes=sizes)
    return estimator.from_factors(rows, **options)


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
    """Estimator ``name`` with a critic given by name (the public functions below); ``options``
    include ``group`` and ``gather``."""
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
    group: ProcessGroup | None = None,
    gather: str = "ring",
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
        group=group,
        gather=gather,
    )


def nwj(
    x: Tensor,
    y: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    critic: str = "dot",
    impl: str = "auto",
    check_values: bool = True,
    group: ProcessGroup | None = None,
    gather: str = "ring",
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
    return _named(
        "nwj", x, y, temperature=temperature, critic=critic, impl=impl, check_values=check_values, group=group,
        gather=gather,
    )  # fmt: skip


def dv(
    x: Tensor,
    y: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    critic: str = "dot",
    impl: str = "auto",
    check_values: bool = True,
    group: ProcessGroup | None = None,
    gather: str = "ring",
) -> Tensor:
    r"""Donsker–Varadhan bound (the value MINE maximises):
    :math:`\hat I = \operatorname{mean}_i s_{ii} - \log\operatorname{mean}_{i\ne j} e^{s_{ij}}`.

    :math:`E_p[s] - \log E_{p(x)p(y)}[e^s] \le I(X;Y)` for any critic; this batch estimate of it is
    biased upwards (:math:`E\log\hat Z \le \log Z`), by less as the negatives grow in number, and
    its gradient is biased; :class:`rid_fast.mi.estimators.MINE` corrects the gradient with an
    exponential moving average. Needs N ≥ 2.

    Shape:
        - x: (B, D), y: (N, D), N ≥ max(B, 2) → scalar.

    Example::

        >>> x = torch.randn(64, 8); y = x + 0.1 * torch.randn(64, 8)
        >>> float(dv(x, y, temperature=0.5, critic="cosine")) > 0
        True
    """
    return _named(
        "dv", x, y, temperature=temperature, critic=critic, impl=impl, check_values=check_values, group=group,
        gather=gather,
    )  # fmt: skip


def smile(
    x: Tensor,
    y: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    critic: str = "dot",
    clip: float = 5.0,
    gradient: str = "js",
    impl: str = "auto",
    check_values: bool = True,
    group: ProcessGroup | None = None,
    gather: str = "ring",
) -> Tensor:
    r"""SMILE (Song & Ermon 2020): the value of DV with the partition's scores clipped to
    :math:`[-c, c]`, :math:`\hat I = \operatorname{mean}_i s_{ii} - \log\operatorname{mean}_{i\ne j}
    e^{\operatorname{clip}(s_{ij}, -c, c)}`, and the gradient of :func:`js`.

    The clipped DV is *not* a lower bound on :math:`I(X;Y)` and is not bounded above: a critic that
    raises its positive scores while its negatives sit at the clip raises it without limit. So it is
    reported, not maximised: under autograd its gradient is the JS objective's (``gradient="js"``,
    what Song & Ermon's code does, ``js + (smile - js).detach()``), whose maximiser is the log
    density ratio r = p(x,y)/p(x)p(y); with that critic SMILE's large-batch value is :math:`I(X;Y)`
    plus the clip's bias :math:`-\log E_{p(x)p(y)}[\operatorname{clip}(r, e^{-c}, e^c)]` (0.004 nats
    for c = 5 on the Gaussians named below), which vanishes as c grows. ``gradient="clipped_dv"``
    differentiates the value itself (zero through clipped scores); maximising that diverges — 46–193
    nats after 300 Adam steps on Gaussians whose MI is 1.35, over five seeds
    (``tests/test_known_mi.py``) — so it is there only to study that behaviour.

    Cost under autograd (``gradient="js"``): two sweeps over the scores in the forward (the clipped
    log-sum-exps, without autograd, and JS's softplus sums) and one in the backward (JS's); what
    one fused sweep would need is in ``_smile_factors``.

    Shape:
        - x: (B, D), y: (N, D), N ≥ max(B, 2) → scalar.

    Example::

        >>> x = torch.randn(64, 8); y = x + 0.1 * torch.randn(64, 8)
        >>> float(smile(x, y, temperature=0.5, critic="cosine", clip=5.0)) > 0
        True
    """
    return _named(
        "smile", x, y, temperature=temperature, critic=critic, impl=impl, check_values=check_values, clip=clip,
        gradient=gradient, group=group, gather=gather,
    )  # fmt: skip


def js(
    x: Tensor,
    y: Tensor,
    *,
    temperature: float | Tensor = 0.1,
    critic: str = "dot",
    impl: str = "auto",
    check_values: bool = True,
    group: ProcessGroup | None = None,
    gather: str = "ring",
) -> Tensor:
    r"""Jensen–Shannon (f-GAN) objective: :math:`\hat J = \operatorname{mean}_i[-\mathrm{softplus}(-s_{ii})]
    - \operatorname{mean}_{i\ne j}\mathrm{softplus}(s_{ij})`.

    A stable objective for *training* a critic, not an MI value and not a bound on :math:`I(X;Y)`:
    it is a lower bound on :math:`2\,\mathrm{JSD}(p(x,y)\,\|\,p(x)p(y)) - \log 4`. Its optimal
    critic is :math:`\log p(x,y)/p(x)p(y)`, so report MI as :func:`nwj` of the same critic with
    scores shifted by +1 (Poole et al. 2019), or as :func:`smile` (which trains on this
    objective). Needs N ≥ 2.

    Shape:
        - x: (B, D), y: (N, D), N ≥ max(B, 2) → scalar.

    Example::

        >>> x = torch.randn(64, 8); y = x + 0.1 * torch.randn(64, 8)
        >>> float(js(x, y, temperature=0.5, critic="cosine")) < 0
        True
    """
    return _named(
        "js", x, y, temperature=temperature, critic=critic, impl=impl, check_values=check_values, group=group,
        gather=gather,
    )  # fmt: skip


_PUBLIC: dict[str, Callable[..., Tensor]] = {"infonce": infonce, "nwj": nwj, "dv": dv, "smile": smile, "js": js}


def mi_bound(x: Tensor, y: Tensor, estimator: str = "infonce", **kwargs) -> Tensor:
    """Dispatch to the estimator named ``estimator`` (one of :data:`ESTIMATORS`) with ``kwargs``
    (whether the value is a bound depends on the estimator: see the module's docstring).

    Example::

        >>> x = torch.randn(32, 4)
        >>> mi_bound(x, x, "dv", temperature=1.0).shape
        torch.Size([])
    """
    check_choice("estimator", estimator, _PUBLIC)
    return _PUBLIC[estimator](x, y, **kwargs)
