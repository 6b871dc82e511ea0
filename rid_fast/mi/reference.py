r"""Plain-PyTorch oracle of every estimator: materialise the ``B × N`` score matrix, then reduce it.

Slow and memory-hungry on purpose — these functions are the definitions the fast paths are
tested against, written as close to the formulas as PyTorch allows. All values are in nats.

Conventions (shared by every estimator): ``scores[i, j]`` is the critic's score of
:math:`(x_i, y_j)`; the ``B`` positive pairs are the diagonal :math:`(i, i)`, every other entry is a
negative, so extra keys (``N > B``) are negatives only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "critic_scores",
    "infonce_from_scores",
    "nwj_from_scores",
    "dv_from_scores",
    "log_mean_exp_negatives",
    "smile_from_scores",
    "value_with_gradient_of",
    "js_from_scores",
    "infonce",
    "nwj",
    "dv",
    "smile",
    "js",
]


def critic_scores(
    x: torch.Tensor, y: torch.Tensor, *, temperature: float | torch.Tensor = 0.1, critic: str = "dot"
) -> torch.Tensor:
    r"""Score matrix :math:`s_{ij} = \langle x_i, y_j\rangle / \tau` (``"dot"``), with rows
    L2-normalised first for ``"cosine"``. Shapes: x (B, D), y (N, D) → (B, N)."""
    if critic == "cosine":
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    elif critic != "dot":
        raise ValueError(f"critic must be 'dot' or 'cosine'; got {critic!r}")
    return x @ y.T / temperature


def _positives(scores: torch.Tensor) -> torch.Tensor:
    return scores.diagonal()


def _negatives(scores: torch.Tensor) -> torch.Tensor:
    """The ``B·N − B`` off-diagonal scores, flattened."""
    keep = ~torch.eye(*scores.shape, dtype=torch.bool, device=scores.device)
    return scores[keep]


def infonce_from_scores(scores: torch.Tensor, *, symmetric: bool = False) -> torch.Tensor:
    r""":math:`\hat I = \frac1B\sum_i [s_{ii} - \log\sum_j e^{s_{ij}}] + \log N`; the symmetric form
    averages it with the same expression over columns (needs ``N = B``)."""
    n_keys = scores.shape[1]
    rows = (_positives(scores) - torch.logsumexp(scores, dim=1)).mean() + math.log(n_keys)
    if not symmetric:
        return rows
    cols = (_positives(scores) - torch.logsumexp(scores, dim=0)).mean() + math.log(scores.shape[0])
    return 0.5 * (rows + cols)


def nwj_from_scores(scores: torch.Tensor) -> torch.Tensor:
    r""":math:`\hat I = \operatorname{mean}_i s_{ii} - e^{-1}\operatorname{mean}_{i\ne j} e^{s_{ij}}`."""
    return _positives(scores).mean() - torch.exp(_negatives(scores)).mean() / math.e


def log_mean_exp_negatives(scores: torch.Tensor, *, clip: float | None = None) -> torch.Tensor:
    r""":math:`\log\operatorname{mean}_{i\ne j} e^{c(s_{ij})}`, c = clamp to ±clip when given."""
    negatives = _negatives(scores)
    if clip is not None:
        negatives = negatives.clamp(-clip, clip)
    return torch.logsumexp(negatives, dim=0) - math.log(negatives.numel())


def dv_from_scores(scores: torch.Tensor) -> torch.Tensor:
    r""":math:`\hat I = \operatorname{mean}_i s_{ii} - \log\operatorname{mean}_{i\ne j} e^{s_{ij}}`."""
    return _positives(scores).mean() - log_mean_exp_negatives(scores)


def value_with_gradient_of(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """A tensor equal to ``value`` whose gradient is ``surrogate``'s: ``value`` exactly, since
    ``surrogate - surrogate.detach()`` is an exact zero wherever ``surrogate`` is finite."""
    return value.detach() + (surrogate - surrogate.detach())


def smile_from_scores(scores: torch.Tensor, *, clip: float = 5.0, gradient: str = "js") -> torch.Tensor:
    r"""Value: DV with clipped partition, :math:`\operatorname{mean}_i s_{ii} -
    \log\operatorname{mean}_{i\ne j} e^{\operatorname{clip}(s_{ij}, -c, c)}`. Gradient: that of
    :func:`js_from_scores` (``gradient="js"``), or of the value itself (``"clipped_dv"``)."""
    value = _positives(scores).mean() - log_mean_exp_negatives(scores, clip=clip)
    if gradient == "clipped_dv":
        return value
    if gradient != "js":
        raise ValueError(f"gradient must be 'js' or 'clipped_dv'; got {gradient!r}")
    return value_with_gradient_of(value, js_from_scores(scores))


def _softplus(values: torch.Tensor) -> torch.Tensor:
    """Exact softplus, ``log(1 + e^v)`` (no linear cut-off, so it is exact in fp64 too)."""
    return torch.logaddexp(values, torch.zeros_like(values))


def js_from_scores(scores: torch.Tensor) -> torch.Tensor:
    r""":math:`\hat J = \operatorname{mean}_i[-\mathrm{softplus}(-s_{ii})] -
    \operatorname{mean}_{i\ne j}\mathrm{softplus}(s_{ij})`."""
    return (-_softplus(-_positives(scores))).mean() - _softplus(_negatives(scores)).mean()


def infonce(x, y, *, temperature=0.1, critic="dot", symmetric=False) -> torch.Tensor:
    """Oracle of :func:`rid_fast.mi.functional.infonce`."""
    return infonce_from_scores(critic_scores(x, y, temperature=temperature, critic=critic), symmetric=symmetric)


def nwj(x, y, *, temperature=0.1, critic="dot") -> torch.Tensor:
    """Oracle of :func:`rid_fast.mi.functional.nwj`."""
    return nwj_from_scores(critic_scores(x, y, temperature=temperature, critic=critic))


def dv(x, y, *, temperature=0.1, critic="dot") -> torch.Tensor:
    """Oracle of :func:`rid_fast.mi.functional.dv`."""
    return dv_from_scores(critic_scores(x, y, temperature=temperature, critic=critic))


def smile(x, y, *, temperature=0.1, critic="dot", clip=5.0, gradient="js") -> torch.Tensor:
    """Oracle of :func:`rid_fast.mi.functional.smile`."""
    return smile_from_scores(critic_scores(x, y, temperature=temperature, critic=critic), clip=clip, gradient=gradient)


def js(x, y, *, temperature=0.1, critic="dot") -> torch.Tensor:
    """Oracle of :func:`rid_fast.mi.functional.js`."""
    return js_from_scores(critic_scores(x, y, temperature=temperature, critic=critic))
