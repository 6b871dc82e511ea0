r"""Estimator modules: a critic (possibly learnable) plus one of the estimators of :mod:`rid_fast.mi.functional`.

Each module's ``forward(x, y)`` returns the scalar estimate in nats; maximise it to train the
critic (and the encoders producing ``x``, ``y``). InfoNCE, NWJ and DV estimate lower bounds on
:math:`I(X;Y)` (InfoNCE's and NWJ's in expectation over batches; DV's mini-batch estimate is
biased upwards, the log of a mean). SMILE's value is not a bound — its gradient is JS's, so
maximising it trains the critic on JS — and JS's is a bound on a Jensen–Shannon divergence, not on
:math:`I(X;Y)`. Every module calls :func:`rid_fast.mi.functional.estimate`, which checks the
inputs against the critic (widths included) before anything runs. Separable critics and
:class:`~rid_fast.mi.critics.ConcatCritic` (from its pairwise factors) run through the fast paths
(``impl``); other critics materialise the score matrix and use the reference formulas.

Example::

    >>> import torch
    >>> from rid_fast.estimators import InfoNCE
    >>> from rid_fast.critics import BilinearCritic
    >>> estimator = InfoNCE(BilinearCritic(16, 8))
    >>> estimate = estimator(torch.randn(32, 16), torch.randn(32, 8))
    >>> estimate.backward()
    >>> estimator.critic.project.weight.grad.shape
    torch.Size([8, 16])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

from rid_fast.mi.critics import CRITICS, CosineCritic, Critic, DotCritic
from rid_fast.mi.functional import DV_TERMS, ESTIMATORS, estimate
from rid_fast.mi.reference import value_with_gradient_of
from rid_fast.ops.dispatch import IMPLS, check_bool, check_choice
from rid_fast.ops.distributed import GATHERS, check_group

#: τ of a critic given by name.
DEFAULT_TEMPERATURE = 0.1

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["MIEstimator", "InfoNCE", "NWJ", "DV", "SMILE", "JS", "MINE", "make_critic"]


def make_critic(critic: str | Critic, temperature: float | None = None) -> Critic:
    """A critic module from a name (``"dot"``, ``"cosine"``; fixed ``temperature``, default 0.1)
    or the module itself (which holds its own temperature: passing one too is an error)."""
    if isinstance(critic, Critic):
        if temperature is not None:
            raise ValueError(
                f"temperature applies to a critic given by name; {critic.describe()} holds its own "
                "(set it when building the critic)"
            )
        return critic
    check_choice("critic", critic, CRITICS)
    return {"dot": DotCritic, "cosine": CosineCritic}[critic](
        DEFAULT_TEMPERATURE if temperature is None else temperature
    )


class MIEstimator(nn.Module):
    """Base class: a critic plus the estimator registered as :attr:`name` in ``ESTIMATORS``.

    Args:
        critic: a :class:`~rid_fast.mi.critics.Critic` or ``"dot"`` / ``"cosine"``.
        temperature: τ of a critic given by name (default 0.1); a critic module holds its own.
        impl: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"`` (see :mod:`rid_fast.mi.functional`).
        check_values: reject NaN/Inf inputs (one pass over them; skipped under torch.compile).
        group: a ``torch.distributed`` process group: estimate over the rows of every process of it
            (default None: this process's rows only); gradients follow DDP's averaging convention,
            the critic's parameters and learnable temperature included (see
            :mod:`rid_fast.mi.functional`).
        gather: how the other processes' keys arrive, ``"ring"`` (default, memory O(B·D)) or
            ``"all_gather"`` (O(W·B·D)).
    """

    name: ClassVar[str]

    def __init__(
        self,
        critic: str | Critic = "dot",
        *,
        temperature: float | None = None,
        impl: str = "auto",
        check_values: bool = True,
        group: ProcessGroup | None = None,
        gather: str = "ring",
    ) -> None:
        super().__init__()
        check_choice("impl", impl, IMPLS)
        check_bool("check_values", check_values)
        check_group(group)
        check_choice("gather", gather, GATHERS)
        self.critic = make_critic(critic, temperature)
        self.impl = impl
        self.check_values = check_values
        self.group, self.gather = group, gather
        self._options: dict = {}

    def _set_options(self, **options) -> None:
        """Validate the estimator's options (as :func:`~rid_fast.mi.functional.estimate` will on
        every call) when the module is built, and keep them."""
        ESTIMATORS[self.name].check_options(**options)
        self._options = options

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """x (B, Dx), y (N, Dy), N ≥ B → scalar estimate in nats."""
        return estimate(self.name, x, y, self.critic, **self._call_options(), **self._options)

    def _call_options(self) -> dict:
        """What every call to :func:`~rid_fast.mi.functional.estimate` takes from the module."""
        return dict(impl=self.impl, check_values=self.check_values, group=self.group, gather=self.gather)

    def extra_repr(self) -> str:
        options = "".join(f", {key}={value}" for key, value in self._options.items())
        group = f", group={self.group!r}, gather={self.gather!r}" if self.group is not None else ""
        return f"impl={self.impl!r}{options}{group}"


class InfoNCE(MIEstimator):
    r"""InfoNCE, :math:`\frac1B\sum_i[s_{ii} - \log\sum_j e^{s_{ij}}] + \log N`; ``symmetric`` as in CLIP."""

    name = "infonce"

    def __init__(self, critic: str | Critic = "dot", *, symmetric: bool = False, **kwargs) -> None:
        super().__init__(critic, **kwargs)
        self._set_options(symmetric=symmetric)


class NWJ(MIEstimator):
    r"""NWJ, :math:`\operatorname{mean}_i s_{ii} - e^{-1}\operatorname{mean}_{i\ne j} e^{s_{ij}}`."""

    name = "nwj"


class DV(MIEstimator):
    r"""Donsker–Varadhan, :math:`\operatorname{mean}_i s_{ii} - \log\operatorname{mean}_{i\ne j} e^{s_{ij}}`."""

    name = "dv"


class SMILE(MIEstimator):
    r"""SMILE: the value of DV with partition scores clipped to :math:`[-c, c]` (``clip``), the
    gradient of the JS objective (``gradient="js"``), as in Song & Ermon's code.

    The clipped DV is not bounded above, so the critic trains on JS and SMILE is the value
    reported; ``gradient="clipped_dv"`` differentiates the value itself, which diverges when
    maximised (see :func:`rid_fast.mi.functional.smile`).
    """

    name = "smile"

    def __init__(self, critic: str | Critic = "dot", *, clip: float = 5.0, gradient: str = "js", **kwargs) -> None:
        super().__init__(critic, **kwargs)
        self._set_options(clip=clip, gradient=gradient)


class JS(MIEstimator):
    r"""Jensen–Shannon objective, :math:`\operatorname{mean}_i[-\mathrm{sp}(-s_{ii})]
    - \operatorname{mean}_{i\ne j}\mathrm{sp}(s_{ij})` (sp = softplus): a critic's training
    objective, a lower bound on :math:`2\,\mathrm{JSD} - \log 4`, not on :math:`I(X;Y)`."""

    name = "js"


class MINE(MIEstimator):
    r"""MINE (Belghazi et al. 2018): the DV value with a bias-corrected gradient.

    The gradient of the DV bound's partition term, :math:`\nabla Z / Z` with
    :math:`Z = \operatorname{mean}_{i\ne j} e^{s_{ij}}`, is biased on mini-batches; MINE replaces
    the denominator by an exponential moving average :math:`\bar Z` over steps. ``forward`` returns
    a tensor whose *value* is the DV estimate and whose *gradient* (in training mode) is
    :math:`\nabla \operatorname{mean}_i s_{ii} - \nabla Z / \bar Z`.

    The average is kept in log space in the buffer ``log_partition_ema`` (saved with the module,
    NaN until the first training step), so it neither overflows nor underflows.

    Args:
        ema_decay: weight of the old average, :math:`\log\bar Z \leftarrow \log(\beta\bar Z + (1-\beta)Z)`.
    """

    name = "mine"

    def __init__(self, critic: str | Critic = "dot", *, ema_decay: float = 0.99, **kwargs) -> None:
        super().__init__(critic, **kwargs)
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)):
            raise TypeError(f"ema_decay must be a number in [0, 1); got {ema_decay!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {ema_decay}")
        self.ema_decay = ema_decay
        self.register_buffer("log_partition_ema", torch.tensor(float("nan")))

    @torch.no_grad()
    def _update_average(self, log_partition: Tensor) -> Tensor:
        current = log_partition.detach().to(self.log_partition_ema.dtype)
        if torch.isnan(self.log_partition_ema):
            self.log_partition_ema.copy_(current)
        else:
            self.log_partition_ema.copy_(
                torch.logaddexp(
                    self.log_partition_ema + math.log(self.ema_decay), current + math.log1p(-self.ema_decay)
                )
            )
        return self.log_partition_ema.clone()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        positive_mean, log_partition = estimate(DV_TERMS, x, y, self.critic, **self._call_options())
        value = positive_mean - log_partition
        if not (self.training and torch.is_grad_enabled()):
            return value
        log_average = self._update_average(log_partition).to(log_partition.dtype)
        surrogate = positive_mean - torch.exp(log_partition - log_average)  # ∇: ∇mean s_ii − ∇Z / Z̄
        return value_with_gradient_of(value, surrogate)
