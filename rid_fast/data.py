"""Offline datasets: nothing here downloads.

* :func:`correlated_gaussians` — pairs with analytic mutual information, for checking estimators.
"""

from __future__ import annotations

import math

import torch

__all__ = ["correlated_gaussians", "gaussian_mutual_information"]


def gaussian_mutual_information(dim: int, rho: float) -> float:
    r""":math:`I(X;Y) = -\frac d2 \log(1-\rho^2)` nats for :func:`correlated_gaussians`."""
    return -0.5 * dim * math.log1p(-(rho**2))


def correlated_gaussians(
    n: int, dim: int, rho: float, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``n`` pairs :math:`x \sim \mathcal N(0, I_d)`, :math:`y = \rho x + \sqrt{1-\rho^2}\,\varepsilon`:
    each coordinate pair has correlation ``rho``. Shapes: (n, dim), (n, dim)."""
    if not -1.0 < rho < 1.0:
        raise ValueError(f"rho must be in (-1, 1); got {rho}")
    x = torch.randn(n, dim, generator=generator, dtype=dtype)
    noise = torch.randn(n, dim, generator=generator, dtype=dtype)
    return x, rho * x + math.sqrt(1.0 - rho**2) * noise
