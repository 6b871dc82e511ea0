"""Each estimator, trained for a few hundred steps, recovers the analytic MI of correlated Gaussians.

x ~ N(0, I_4), y = ρx + √(1−ρ²)ε with ρ = 0.7: I(X;Y) = −2·log(1 − 0.49) ≈ 1.347 nats. The critic is
separable, s = f(x)·g(y) with two small MLPs, which can represent the optimal critic
log p(y|x)/p(y) (a bilinear form plus functions of x and of y alone). InfoNCE, NWJ and DV estimate
lower bounds (DV's batch estimate up to the small upward bias of the log of a mean over 1024·1023
negatives); SMILE is not a bound, but its critic trains on JS, whose maximiser is the log density
ratio, where SMILE exceeds the truth by the clip's bias alone (0.004 nats here, see below); JS is
read as NWJ of its scores + 1. So they may fall short of the truth by the critic's and the
estimator's bias but not exceed it by more than sampling noise: each must land in
[truth − 0.3, truth + 0.1] nats. (Measured over seeds 0–4 while writing this test: InfoNCE
−0.03…−0.06, NWJ −0.05…−0.10, DV −0.08…−0.17, SMILE −0.06…−0.08, JS-trained NWJ −0.09…−0.21.)
InfoNCE's ceiling log N = log 1024 ≫ 1.35.
"""

import math

import pytest
import torch
from torch import nn

from rid_fast.mi import functional
from rid_fast.mi.critics import BilinearCritic
from rid_fast.mi.estimators import SMILE
from rid_fast.train.data import correlated_gaussians, gaussian_mutual_information

DIM, RHO = 4, 0.7


def _mlp():
    return nn.Sequential(nn.Linear(DIM, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16))


def _with_constant_feature(t):
    return torch.cat([t, torch.ones(len(t), 1)], dim=1)


@pytest.mark.parametrize("name", ["infonce", "nwj", "dv", "smile", "js"])
def test_recovers_gaussian_mi(name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    f, g = _mlp(), _mlp()
    optimizer = torch.optim.Adam([*f.parameters(), *g.parameters()], lr=3e-3)
    for _ in range(300):
        x, y = correlated_gaussians(256, DIM, RHO, generator=gen)
        loss = -functional.mi_bound(f(x), g(y), name, temperature=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        estimates = []
        for _ in range(4):
            x, y = correlated_gaussians(1024, DIM, RHO, generator=gen)
            q, k = f(x), g(y)
            if name == "js":  # JS trains the critic; its MI reading is NWJ of the scores + 1
                estimates.append(functional.nwj(_with_constant_feature(q), _with_constant_feature(k), temperature=1.0))
            else:
                estimates.append(functional.mi_bound(q, k, name, temperature=1.0))
    estimate = float(torch.stack(estimates).mean())
    truth = gaussian_mutual_information(DIM, RHO)
    assert truth - 0.3 <= estimate <= truth + 0.1, f"{name}: {estimate:.3f} nats, truth {truth:.3f}"


# ---- SMILE trained on its own estimator: the value stays near the truth ---------------------------

SMILE_CLIP = 5.0
#: Evaluation: batches of 1024 pairs, independent of the training draws.
EVAL_BATCHES, EVAL_BATCH = 16, 1024
#: One-sided z for "above the truth by more than sampling noise": P(t_15 > 4) ≈ 6e-4.
Z = 4.0
#: How far below the truth a JS-trained critic may still be after the training below (the
#: critic's family holds the optimum, so the shortfall is optimisation error: measured 0.05–0.09
#: nats over seeds 0–4).
SHORTFALL = 0.15


@pytest.fixture
def one_thread():
    """Run on one intra-op thread: 256 × 256 scores of 6 features are too small to share out, and
    threads that wait for each other slow these few hundred steps down many times on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quadratic_features(t):
    """(n, D) → (n, D + 2): [t, |t|², 1]. A bilinear critic on these, s = φ(x)ᵀ W φ(y), holds the
    log density ratio of the correlated Gaussians exactly,
    log r = ρ/(1−ρ²) x·y − ρ²/(2(1−ρ²)) (|x|² + |y|²) + const, so the JS objective's maximiser is
    in the family and the test measures the estimator, not the critic's reach."""
    return torch.cat([t, t.square().sum(1, keepdim=True), torch.ones(len(t), 1)], dim=1)


def _log_density_ratio(x, y):
    """log p(x, y) / p(x)p(y) of :func:`correlated_gaussians` with (DIM, RHO). (n,)"""
    return (
        -0.5 * DIM * math.log1p(-(RHO**2)) - (y - RHO * x).square().sum(1) / (2 * (1 - RHO**2)) + y.square().sum(1) / 2
    )


def _clip_bias_at_the_optimum(n: int = 1 << 20) -> tuple[float, float]:
    r"""The population SMILE of the optimal critic minus I(X;Y): E_p[log r] − log E_{p(x)p(y)}[e^{clip(log r)}]
    − I = −log E_{p(x)p(y)}[clip(r, e^{−c}, e^{c})], by Monte Carlo over n independent pairs, and its
    standard error (delta method). For D = 4, ρ = 0.7, c = 5 it is 0.0039 nats (5·10⁷ pairs); this
    estimate gives 0.0014 ± 0.0028."""
    gen = torch.Generator().manual_seed(12345)
    x = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    y = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    clipped = _log_density_ratio(x, y).clamp(-SMILE_CLIP, SMILE_CLIP).exp()
    mean = float(clipped.mean())
    return -math.log(mean), float(clipped.std()) / math.sqrt(n) / mean


def _train_smile(gradient: str, *, steps: int = 300, lr: float = 2e-2, seed: int = 0) -> tuple[float, float]:
    """SMILE module with a bilinear critic on quadratic features, Adam on minus its output for
    ``steps`` batches of 256; returns the mean SMILE estimate over the evaluation batches and its
    standard error."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    smile = SMILE(BilinearCritic(DIM + 2, DIM + 2, temperature=1.0), clip=SMILE_CLIP, gradient=gradient)
    optimizer = torch.optim.Adam(smile.parameters(), lr=lr)
    for _ in range(steps):
        x, y = correlated_gaussians(256, DIM, RHO, generator=gen)
        loss = -smile(_quadratic_features(x), _quadratic_features(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        estimates = torch.stack([
            smile(*map(_quadratic_features, correlated_gaussians(EVAL_BATCH, DIM, RHO, generator=gen)))
            for _ in range(EVAL_BATCHES)
        ]).double()  # fmt: skip
    return float(estimates.mean()), float(estimates.std()) / math.sqrt(EVAL_BATCHES)


@pytest.mark.parametrize(
    "gradient",
    [
        "js",
        # The gradient of the clipped DV itself: unbounded above, so maximising it diverges (83
        # nats after these 300 steps; 46–193 over seeds 0–4). The check must catch it.
        pytest.param("clipped_dv", marks=pytest.mark.xfail(strict=True, raises=AssertionError)),
    ],
)
def test_smile_trained_on_itself_stays_near_the_truth(one_thread, gradient):
    """Song & Ermon's SMILE: the critic trains on the JS objective, SMILE's value is reported. Its
    target is then the SMILE of the optimal critic, I(X;Y) plus the clip's bias there (derived
    above: 0.004 nats); the estimate may exceed that by sampling noise alone, Z standard errors of
    the mean over the evaluation batches (plus the Monte Carlo error of the bias), and fall short
    of the truth by at most :data:`SHORTFALL`."""
    truth = gaussian_mutual_information(DIM, RHO)
    estimate, standard_error = _train_smile(gradient)
    clip_bias, clip_bias_error = _clip_bias_at_the_optimum()
    ceiling = truth + clip_bias + Z * math.hypot(standard_error, clip_bias_error)
    assert truth - SHORTFALL <= estimate <= ceiling, (
        f"SMILE ({gradient} gradient): {estimate:.3f} ± {standard_error:.3f} nats, truth {truth:.3f}, "
        f"allowed [{truth - SHORTFALL:.3f}, {ceiling:.3f}]"
    )
