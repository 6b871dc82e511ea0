r"""Critics: the functions :math:`s_{ij} = f(x_i, y_j)` the estimators score pairs with.

A critic is *separable* when its score matrix factors as :math:`S = q k^\top` with ``q`` computed
from ``x`` alone and ``k`` from ``y`` alone (dot, cosine, bilinear). The fast paths consume the
factors and never build ``S``. The pairwise MLP (:class:`ConcatCritic`) is not separable, but its
scores are a fixed function of per-row factors, :math:`s_{ij} = w_2^\top\mathrm{relu}(a_i + c_j) + b_2`
(``pairwise``): the estimators reduce them with their own fused ops, never building ``S`` nor the
B × N × H hidden layer either.

Example::

    >>> import torch
    >>> from rid_fast.critics import CosineCritic
    >>> critic = CosineCritic(temperature=0.1, learnable=True)
    >>> q, k, inverse_temperature = critic.factors(torch.randn(8, 16), torch.randn(8, 16))
    >>> tuple((inverse_temperature * q @ k.T).shape)
    (8, 8)
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rid_fast.ops.dispatch import check_positive_int
from rid_fast.ops.pairwise_reference import pairwise_scores

__all__ = [
    "CRITICS",
    "critic_factors",
    "inverse_temperature",
    "Critic",
    "DotCritic",
    "CosineCritic",
    "BilinearCritic",
    "ConcatCritic",
]

#: Critic names accepted by the functional estimators.
CRITICS = ("dot", "cosine")


def inverse_temperature(temperature: float | Tensor, like: Tensor) -> Tensor:
    """σ = 1/τ as a 0-dim tensor in the accumulation dtype of ``like`` (fp32, fp64 for fp64), on
    its device; differentiable when ``temperature`` is a tensor. No device sync."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(temperature, Tensor):
        return temperature.reshape(()).to(device=like.device, dtype=dtype).reciprocal()
    return torch.full((), 1.0 / temperature, dtype=dtype, device=like.device)


def critic_factors(x: Tensor, y: Tensor, *, temperature: float | Tensor, critic: str) -> tuple[Tensor, Tensor, Tensor]:
    r"""Factors ``(q, k, σ)`` with :math:`S = \sigma q k^\top`: ``"dot"`` gives :math:`(x, y, 1/\tau)`,
    ``"cosine"`` the same after L2-normalising the rows. The inverse temperature stays a separate
    0-dim tensor, applied in fp32 inside the kernels, so 16-bit inputs are not rounded a second
    time and a learnable temperature gets its gradient through autograd.

    Shapes: x (B, D), y (N, D) → q (B, D), k (N, D), σ ().
    """
    if critic == "cosine":
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return x, y, inverse_temperature(temperature, x)


class Critic(nn.Module):
    """Base class: ``forward(x, y)`` returns the (B, N) score matrix."""

    #: Whether :meth:`factors` is available (the score matrix factors as q kᵀ).
    separable: ClassVar[bool] = True
    #: Whether ``pairwise_factors`` is available (scores w₂ᵀ relu(a_i + c_j) + b₂, :class:`ConcatCritic`).
    pairwise: ClassVar[bool] = False
    #: Whether x and y must have the same number of features.
    same_features: ClassVar[bool] = True
    #: The feature widths the critic's weights take, x (B, x_dim) and y (N, y_dim); None where
    #: any width goes. The estimators check them before anything runs.
    x_dim: int | None = None
    y_dim: int | None = None

    def describe(self) -> str:
        """How error messages name the critic, e.g. ``BilinearCritic(x_dim=16, y_dim=8)``."""
        if self.x_dim is None and self.y_dim is None:
            return type(self).__name__
        return f"{type(self).__name__}(x_dim={self.x_dim}, y_dim={self.y_dim})"

    def factors(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(q, k, σ)`` with ``σ · q @ k.T`` equal to the score matrix (σ a 0-dim tensor)."""
        raise NotImplementedError(f"{type(self).__name__} is not separable; use scores()")

    def scores(self, x: Tensor, y: Tensor) -> Tensor:
        """The materialised (B, N) score matrix."""
        q, k, scale = self.factors(x, y)
        return (q @ k.T) * scale.to(q.dtype)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.scores(x, y)


class _TemperatureMixin(nn.Module):
    """A fixed temperature (a buffer) or a learnable one (parameter ``log_temperature``)."""

    def _init_temperature(self, temperature: float, learnable: bool) -> None:
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number; got {temperature!r}")
        log_t = torch.tensor(math.log(temperature))
        if learnable:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> Tensor:
        """τ = exp(log_temperature): positive by construction."""
        return self.log_temperature.exp()

    def extra_repr(self) -> str:
        kind = "learnable" if isinstance(self.log_temperature, nn.Parameter) else "fixed"
        return f"temperature={float(self.temperature.detach()):.4g} ({kind})"


class DotCritic(Critic, _TemperatureMixin):
    r""":math:`s_{ij} = \langle x_i, y_j\rangle / \tau`.

    Args:
        temperature: initial τ > 0.
        learnable: train τ (as :math:`\log\tau`, so it stays positive).
    """

    critic_name: ClassVar[str] = "dot"

    def __init__(self, temperature: float = 0.1, *, learnable: bool = False) -> None:
        super().__init__()
        self._init_temperature(temperature, learnable)

    def factors(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return critic_factors(x, y, temperature=self.temperature, critic=self.critic_name)


class CosineCritic(DotCritic):
    r""":math:`s_{ij} = \langle \hat x_i, \hat y_j\rangle / \tau` with L2-normalised rows."""

    critic_name: ClassVar[str] = "cosine"


class BilinearCritic(Critic, _TemperatureMixin):
    r""":math:`s_{ij} = x_i^\top W y_j / \tau`, computed as a projection :math:`q = x W` followed by
    the dot critic — never a B×N×D tensor.

    Shapes: x (B, x_dim), y (N, y_dim); W (x_dim, y_dim).
    """

    same_features: ClassVar[bool] = False

    def __init__(
        self, x_dim: int, y_dim: int, *, temperature: float = 1.0, learnable_temperature: bool = False
    ) -> None:
        super().__init__()
        check_positive_int("x_dim", x_dim)
        check_positive_int("y_dim", y_dim)
        self.x_dim, self.y_dim = x_dim, y_dim
        self.project = nn.Linear(x_dim, y_dim, bias=False)
        self._init_temperature(temperature, learnable_temperature)

    def factors(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q = self.project(x)
        return q, y, inverse_temperature(self.temperature, q)


class ConcatCritic(Critic):
    r"""Pairwise MLP :math:`s_{ij} = w_2^\top \mathrm{relu}(A x_i + C y_j + b_1) + b_2` (hidden H),
    MINE's and SMILE's joint critic.

    Not separable, but every estimator runs from its factors :math:`a = A x + b_1` (B, H),
    :math:`c = C y` (N, H), :math:`w_2` (H,), :math:`b_2` () (:meth:`pairwise_factors`) through the
    fused pairwise ops — the C++ kernel on the CPU, the Triton kernels on CUDA, blocked PyTorch
    otherwise (``impl``, see :mod:`rid_fast.mi.functional`): memory O((B + N)·H), never the (B, N)
    scores nor the (B, N, H) hidden layer. :meth:`scores` (``impl="reference"``) builds both.

    Example::

        >>> import torch
        >>> from rid_fast.estimators import DV
        >>> critic = ConcatCritic(16, 8, hidden=32)
        >>> DV(critic)(torch.randn(64, 16), torch.randn(64, 8)).shape
        torch.Size([])
    """

    separable: ClassVar[bool] = False
    pairwise: ClassVar[bool] = True
    same_features: ClassVar[bool] = False

    def __init__(self, x_dim: int, y_dim: int, hidden: int = 64) -> None:
        super().__init__()
        for name, value in (("x_dim", x_dim), ("y_dim", y_dim), ("hidden", hidden)):
            check_positive_int(name, value)
        self.x_dim, self.y_dim = x_dim, y_dim
        self.x_in = nn.Linear(x_dim, hidden)  # A, b1
        self.y_in = nn.Linear(y_dim, hidden, bias=False)  # C
        self.out = nn.Linear(hidden, 1)  # w2, b2

    def pairwise_factors(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(a, c, w2, b2)`` in one dtype (a's, e.g. an autocast dtype): a = A x + b₁ (B, H), c = C y (N, H)."""
        a, c = self.x_in(x), self.y_in(y)
        return a, c.to(a.dtype), self.out.weight[0].to(a.dtype), self.out.bias[0].to(a.dtype)

    def scores(self, x: Tensor, y: Tensor) -> Tensor:
        """The (B, N) scores, through the whole (B, N, H) hidden layer at once (the oracle)."""
        return pairwise_scores(*self.pairwise_factors(x, y))
