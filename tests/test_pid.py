"""BROJA PID: canonical distributions, a reference convex solver, invariants, the certificate,
the discretisation protocol against scikit-learn, and bad inputs."""

import importlib
import json
import math
import re
import threading
import warnings

import numpy as np
import pid_accuracy
import pytest
import torch
from pid_accuracy import random_distributions  # benchmarks/pid_accuracy.py: seeded Dirichlet batches

from rid_fast import pid
from rid_fast.pid import protocol

broja_module = importlib.import_module("rid_fast.pid.broja")  # the module (``pid.broja`` is the function)

ATOMS = ("red", "uni_t", "uni_s", "syn")


def from_function(f, n_y: int, n_t: int = 2, n_s: int = 2) -> torch.Tensor:
    """P(y, t, s) with T, S independent and uniform and Y = f(T, S)."""
    p = torch.zeros(n_y, n_t, n_s, dtype=torch.float64)
    for t in range(n_t):
        for s in range(n_s):
            p[f(t, s), t, s] += 1.0 / (n_t * n_s)
    return p


def rdn() -> torch.Tensor:
    p = torch.zeros(2, 2, 2, dtype=torch.float64)
    p[0, 0, 0] = p[1, 1, 1] = 0.5  # Y = T = S
    return p


CANONICAL = {  # (distribution, expected atoms in bits): Bertschinger et al. (2014), Table 1
    "AND": (from_function(lambda t, s: t & s, 2), {"red": 0.311278, "uni_t": 0, "uni_s": 0, "syn": 0.5}),
    "XOR": (from_function(lambda t, s: t ^ s, 2), {"red": 0, "uni_t": 0, "uni_s": 0, "syn": 1}),
    "RDN": (rdn(), {"red": 1, "uni_t": 0, "uni_s": 0, "syn": 0}),
    "UNQ": (from_function(lambda t, s: t, 2), {"red": 0, "uni_t": 1, "uni_s": 0, "syn": 0}),
    "COPY": (from_function(lambda t, s: 2 * t + s, 4), {"red": 0, "uni_t": 1, "uni_s": 1, "syn": 0}),
}


@pytest.mark.parametrize("name", CANONICAL)
def test_canonical_distributions(name):
    p, expected = CANONICAL[name]
    result = pid.broja(p)
    for atom, value in expected.items():
        assert getattr(result, atom) == pytest.approx(value, abs=1e-6), atom
    assert result.gap <= 1e-6


def from_outcomes(outcomes: dict[str, float]) -> torch.Tensor:
    """P(y, t, s) of shape (3, 3, 3) from outcomes written as dit writes them, "t s y" (the target
    last); "_" is an erased value (index 2). Alphabets smaller than 3 are padded with zeros."""
    value = {"0": 0, "1": 1, "_": 2}
    p = torch.zeros(3, 3, 3, dtype=torch.float64)
    for (t, s, y), probability in outcomes.items():
        p[value[y], value[t], value[s]] += probability
    return p


# Two of dit's bivariate PID examples (dit.pid.distributions.bivariates "not two" and "erase"),
# written out. Their BROJA unique informations are exactly 0, and the optimal Q empties whole
# (t, s) blocks: the optimum lies on a face of Δ_P.
NOT_TWO = from_outcomes({"000": 1 / 5, "001": 1 / 5, "010": 1 / 5, "100": 1 / 5, "111": 1 / 5})
ERASE = from_outcomes(  # dit's erasure(RDN): each of T, S, Y = B erased independently with probability 1/2
    {
        **{"000": 1 / 16, "00_": 1 / 16, "0_0": 1 / 16, "0__": 1 / 16, "_00": 1 / 16, "_0_": 1 / 16, "__0": 1 / 16},
        **{"111": 1 / 16, "11_": 1 / 16, "1_1": 1 / 16, "1__": 1 / 16, "_11": 1 / 16, "_1_": 1 / 16, "__1": 1 / 16},
        "___": 1 / 8,
    }
)
ROUNDING = 1e-14  # bits: the float64 rounding of the atoms' sums and differences of entropies (≤ 2 bits)


def assert_within_gap(result, exact: dict[str, float]) -> None:
    """Every atom in ``exact`` lies within the certified gap of its exact value (up to rounding)."""
    for atom, value in exact.items():
        assert abs(float(getattr(result, atom)) - value) <= float(result.gap) + ROUNDING, atom


@pytest.mark.parametrize("tol", [1e-8, 1e-12])
@pytest.mark.parametrize("name", ["not_two", "erase"])
def test_gates_whose_optimum_lies_on_a_face_are_certified_to_tol(name, tol):
    """These stalled at 7.1e-7 and 3.6e-7 bits (unique information reported as that much) whatever
    the tol, without a word: the path only nears the face, and the iterate's entropy trails."""
    p = {"not_two": NOT_TWO, "erase": ERASE}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tol is reached: no warning
        result = pid.broja(p, tol=tol)
    assert result.gap <= tol / pid.LN2
    # Exact: Uni = 0 both ways, so Red = I(Y;T) = I(Y;S). For erase, I(Y;T) = P(Y, T unerased)
    # · 1 bit = 1/4 and I(Y;T,S) = P(Y unerased)·P(T or S unerased) = 3/8, so Syn = 1/8.
    exact = {"uni_t": 0.0, "uni_s": 0.0, "red": result.mi_t}
    if name == "erase":
        exact |= {"red": 0.25, "syn": 0.125, "mi_ts": 0.375}
    assert_within_gap(result, exact)


def solve_and_check_warning(p: torch.Tensor, **options):
    """broja_batch(p, **options), checking its warning: one RuntimeWarning that counts the
    distributions whose gap is above tol, or none when there are none."""
    tol = options.get("tol", 1e-8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pid.broja_batch(p, **options)
    missed = int((result.gap > tol / pid.LN2).sum())
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if missed:
        assert len(messages) == 1 and f"{missed} of {len(p)} distributions" in messages[0], messages
        assert f"{float(result.gap.max()):.3g} bits" in messages[0], messages
    else:
        assert not messages, messages
    return result, missed


def test_a_call_that_stops_above_tol_warns_once_and_its_gap_still_bounds_the_error():
    gates = {  # distribution, exact atoms (bits)
        "not_two": (NOT_TWO, {"uni_t": 0.0, "uni_s": 0.0}),
        "erase": (ERASE, {"red": 0.25, "uni_t": 0.0, "uni_s": 0.0, "syn": 0.125}),
        "XOR": (from_outcomes({"000": 1 / 4, "011": 1 / 4, "101": 1 / 4, "110": 1 / 4}), {"red": 0, "syn": 1}),
        "RDN": (from_outcomes({"000": 1 / 2, "111": 1 / 2}), {"red": 1, "uni_t": 0, "uni_s": 0, "syn": 0}),
        "AND": (
            from_outcomes({"000": 1 / 4, "010": 1 / 4, "100": 1 / 4, "111": 1 / 4}),
            {"red": 1.5 - 0.75 * math.log2(3), "uni_t": 0, "uni_s": 0, "syn": 0.5},
        ),
    }
    p = torch.stack([d for d, _ in gates.values()])
    result, missed = solve_and_check_warning(p, max_iter=5)  # stopped early on purpose
    assert 0 < missed < len(p)  # some certified within 5 steps, some not
    for i, (_, exact) in enumerate(gates.values()):
        assert_within_gap(result.item(i), exact)


def test_a_source_with_one_value_is_certified_to_tol():
    """With one value of T, Δ_P is the single point P and the iterate is exact from the start;
    Newton's multipliers of rows with negligible mass (entries spanning hundreds of decades)
    held the dual bound up to 3.6e-2 bits above it on these distributions."""
    p = random_distributions(128, (4, 1, 6), concentration=0.02, zeros=0.3, seed=1011)
    result, missed = solve_and_check_warning(p)
    assert missed == 0, float(result.gap.max())
    for atom in ("red", "uni_t"):  # I(Y;T) = 0: T knows nothing
        assert bool((getattr(result, atom).abs() <= result.gap + ROUNDING).all()), atom


def test_random_inputs_ignore_the_global_random_state():
    """What the tests compare cannot depend on the order they run in."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        first = random_distributions(2, (3, 4, 2), concentration=0.5, zeros=0.5, seed=9)
        torch.manual_seed(2)
        assert torch.equal(first, random_distributions(2, (3, 4, 2), concentration=0.5, zeros=0.5, seed=9))


def reference_max_conditional_entropy(p: torch.Tensor) -> float:
    pytest.importorskip("cvxpy")
    from cvxpy_oracle import max_conditional_entropy  # benchmarks/cvxpy_oracle.py

    return max_conditional_entropy(p)


@pytest.mark.parametrize("shape", [(2, 2, 2), (3, 4, 2), (5, 3, 6), (10, 8, 8)])
@pytest.mark.parametrize("zeros", [0.0, 0.5])
def test_matches_a_reference_convex_solver(shape, zeros):
    pytest.importorskip("cvxpy")
    p = random_distributions(6, shape, concentration=0.5, zeros=zeros, seed=sum(shape))
    result = pid.broja_batch(p)
    h_y, _, _, mi_ts = pid.mutual_informations(p)
    for i in range(len(p)):
        h_max = reference_max_conditional_entropy(p[i])
        synergy = float(mi_ts[i] - (h_y[i] - h_max)) / pid.LN2
        assert float(result.syn[i]) == pytest.approx(synergy, abs=1e-6)


def test_invariants_and_certificate_on_random_distributions():
    p = torch.cat([random_distributions(32, (4, 5, 3), seed=1), random_distributions(32, (4, 5, 3), zeros=0.6, seed=2)])
    result, _ = solve_and_check_warning(p)
    atoms = torch.stack([getattr(result, a) for a in ATOMS])
    assert bool((atoms >= -1e-6).all())
    torch.testing.assert_close(atoms.sum(0), result.mi_ts, atol=1e-9, rtol=0)
    torch.testing.assert_close(result.red + result.uni_t, result.mi_t, atol=1e-9, rtol=0)
    assert bool((result.gap <= 1e-6).all())
    # Swapping the sources swaps the unique atoms (this also runs the solver on the transposed layout).
    swapped = pid.broja_batch(p.transpose(2, 3))
    torch.testing.assert_close(swapped.uni_t, result.uni_s, atol=1e-6, rtol=0)
    torch.testing.assert_close(swapped.red, result.red, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(4, 1, 6), (3, 5, 4), (6, 12, 9)])
def test_peaked_distributions_with_tiny_entries(shape):
    """Entries spanning hundreds of decades (Dirichlet(0.02), some zeros) and a source with a single
    value: no failure, atoms that add up, and a certified gap within the 1e-4-bit requirement."""
    p = random_distributions(16, shape, concentration=0.02, zeros=0.3, seed=sum(shape))
    result, _ = solve_and_check_warning(p)  # a few may stop above tol, and say so
    assert bool((result.gap <= 1e-4).all()), float(result.gap.max())
    atoms = torch.stack([getattr(result, a) for a in ATOMS])
    assert bool((atoms >= -1e-4).all())
    torch.testing.assert_close(atoms.sum(0), result.mi_ts, atol=1e-9, rtol=0)


def test_certificate_bounds_the_error():
    """The reported gap is a proof: the true optimum lies within it (checked against cvxpy)."""
    pytest.importorskip("cvxpy")
    p = random_distributions(4, (3, 3, 3), seed=7)
    with pytest.warns(RuntimeWarning, match="4 of 4 distributions stopped above tol"):
        coarse = pid.broja_batch(p, max_iter=3)  # stopped early: a large but honest gap
    h_y, _, _, mi_ts = pid.mutual_informations(p)
    for i in range(len(p)):
        synergy = float(mi_ts[i] - (h_y[i] - reference_max_conditional_entropy(p[i]))) / pid.LN2
        assert float(coarse.gap[i]) > 1e-6
        assert 0 <= synergy - float(coarse.syn[i]) <= float(coarse.gap[i]) + 1e-9


def test_batch_equals_one_at_a_time_and_deterministic_target():
    p = random_distributions(3, (3, 4, 4), zeros=0.3, seed=3)
    batch = pid.broja_batch(p)
    for i in range(3):
        single = pid.broja(p[i])
        for atom in ATOMS:
            assert single.__getattribute__(atom) == pytest.approx(float(getattr(batch, atom)[i]), abs=1e-7)
    constant = pid.broja(random_distributions(1, (1, 3, 3), seed=4)[0])  # |Y| = 1: nothing to know
    assert all(abs(getattr(constant, a)) < 1e-9 for a in (*ATOMS, "mi_ts"))


def test_the_scaled_start_never_takes_more_steps_than_the_product_start():
    """Per distribution, on seeded batches of every family of benchmarks/pid_accuracy.py: the
    scaled start (a few sweeps towards the optimum's form, a small τ) against the product start at
    τ = 1, the method's textbook start, with a certificate as good."""
    tol = 1e-8
    for i, (concentration, zeros) in enumerate(pid_accuracy.FAMILIES.values()):
        for shape in [(3, 5, 4), (6, 12, 9)]:
            p = random_distributions(16, shape, concentration=concentration, zeros=zeros, seed=1000 * i + sum(shape))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # compared below instead
                product = broja_module._solve(p, tol, 200, broja_module._PRODUCT_START)
                scaled = broja_module._solve(p, tol, 200, broja_module._SCALED_START)
            assert bool((scaled.steps <= product.steps).all()), (shape, zeros, scaled.steps - product.steps)
            assert int(scaled.steps.sum()) < int(product.steps.sum())  # and fewer in all
            reached = product.gap <= tol / pid.LN2
            assert bool((scaled.gap[reached] <= tol / pid.LN2).all()), (shape, zeros)
            assert scaled.iterations == int(scaled.steps.max())


@pytest.mark.parametrize("zeros", [0.0, 0.85])
def test_the_scaled_start_is_positive_on_the_support_and_fits_the_y_s_marginals(zeros):
    """Started from P's own (t, s) marginal instead of the product, the sweeps left cells of the
    support where P is zero at zero: on sparse inputs the path then started on a wrong face."""
    p = random_distributions(64, (5, 7, 6), zeros=zeros, seed=11)
    problems = broja_module._Newton(p)
    q = broja_module._scaled_start(problems.q, problems.p_yt, problems.p_ys, problems.support, sweeps=100)
    assert bool((q[problems.support] > 0).all()) and bool((q[~problems.support] == 0).all())
    # The last half-sweep fits the (y, s) sums: each a sum of |T| products, mixed with the product
    # distribution's (exact) sums; a few rounding errors per term.
    eps = torch.finfo(torch.float64).eps
    assert float((q.sum(2) - problems.p_ys).abs().max()) <= 4 * (p.shape[2] + 2) * eps * float(problems.p_ys.max())


def fit_counting(monkeypatch, q: torch.Tensor, problems, sweeps: int = 100):
    """_fit_marginals on ``q`` towards ``problems``' marginals, and the host reads of a tensor
    (``float(t)``, ``bool(t)``, ``t.item()``) it made."""
    reads = []
    for name in ("__float__", "__bool__", "item"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, _f=original: reads.append(1) or _f(self))
    try:
        fitted, error = broja_module._fit_marginals(q, problems.p_yt, problems.p_ys, sweeps=sweeps)
    finally:
        monkeypatch.undo()
    return fitted, error, len(reads)


def fitted_to_the_projections_tolerance(q: torch.Tensor, problems) -> torch.Tensor:
    """Whether each distribution's marginals are within what ends its projection (n,)."""
    error, relative = broja_module._marginal_error(q, problems.p_yt, problems.p_ys, relative=True)
    return (error <= broja_module._PROJECTED) & (relative <= broja_module._PROJECTED_RELATIVE)


@pytest.mark.parametrize("concentration, zeros", [(1.0, 0.0), (0.02, 0.3)])
def test_the_projection_reads_the_device_only_after_sweeps_1_2_4_8(monkeypatch, concentration, zeros):
    """Iterative proportional fitting reads on the host whether the batch has converged only after
    sweeps 1, 2, 4, …: at most 7 reads for 100 sweeps (it was one a sweep), stopping at the first
    of those where every distribution is within the projection's tolerance."""
    p = random_distributions(8, (3, 5, 4), concentration=concentration, zeros=zeros, seed=3)
    problems = broja_module._Newton(p)
    noise = torch.rand(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    far = problems.q * (0.5 + noise)  # off Δ_P: several sweeps to fit
    fitted, error, reads = fit_counting(monkeypatch, far, problems)
    assert 2 <= reads <= 7
    exact = broja_module._marginal_error(fitted, problems.p_yt, problems.p_ys)
    torch.testing.assert_close(error, exact, rtol=0, atol=0)
    # It stopped at the first check where the batch had converged: after 2^(reads − 1) sweeps (or
    # all 100 with 7 reads), not at the check before.
    converged = bool(fitted_to_the_projections_tolerance(fitted, problems).all())
    assert converged or reads == 7
    if converged:
        again, _ = broja_module._fit_marginals(far, problems.p_yt, problems.p_ys, sweeps=2 ** (reads - 1))
        torch.testing.assert_close(again, fitted, rtol=0, atol=0)
        before, _ = broja_module._fit_marginals(far, problems.p_yt, problems.p_ys, sweeps=2 ** (reads - 2))
        assert not bool(fitted_to_the_projections_tolerance(before, problems).all())
    # The product distribution is in Δ_P already: one sweep, one read.
    _, error, reads = fit_counting(monkeypatch, problems.q, problems)
    assert reads == 1 and float(error.max()) <= broja_module._PROJECTED


def test_a_distribution_gets_the_same_answer_alone_as_in_its_batch():
    """Distributions of the accuracy record whose rows span hundreds of decades (Dirichlet(0.02)
    at (3, 3, 3), seed 2009). The projection stopped once the batch's absolute marginal error was
    below 1e-15, and rows of mass 1e-62 were then left off by a factor of 3: in their batch the
    others needed more sweeps and hid it, but solved alone these three ended with certified
    gaps of 2.9e16, 2.8e16 and 5.9e-4 bits."""
    p = random_distributions(128, (3, 3, 3), concentration=0.02, zeros=0.3, seed=2009)
    chosen = [57, 81, 92]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one other distribution of the batch stops above tol
        batch = pid.broja_batch(p)
    tol = 1e-8 / pid.LN2
    for i in chosen:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # alone, each reaches tol: no warning
            alone = pid.broja(p[i])
        assert alone.gap <= tol and float(batch.gap[i]) <= tol, (i, alone.gap, float(batch.gap[i]))
        for atom in ATOMS:  # both within their gaps of the exact value
            assert abs(getattr(alone, atom) - float(getattr(batch, atom)[i])) <= 2 * tol + ROUNDING, (i, atom)


def test_a_batch_runs_in_one_chunk_per_thread_and_lapack_on_one_thread(monkeypatch):
    """On two torch threads a batch is solved as two chunks, each on a Python thread of its own
    with one torch thread (no OpenMP barriers for a busy neighbour process to stall); the batched
    Cholesky factorisations and triangular solves run on one thread; the caller's count is left as
    it was, and the chunks' answers are those of the whole batch solved on one thread."""
    seen = []
    for name in ("cholesky_ex", "solve_triangular"):
        original = getattr(torch.linalg, name)
        record = lambda *a, _f=original, **k: (
            seen.append((torch.get_num_threads(), threading.get_ident())) or _f(*a, **k)
        )  # noqa: E731
        monkeypatch.setattr(torch.linalg, name, record)
    p = random_distributions(4, (3, 4, 2), seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = pid.broja_batch(p)
        assert torch.get_num_threads() == 2
        assert {count for count, _ in seen} == {1} and len({ident for _, ident in seen}) == 2
        seen.clear()
        torch.set_num_threads(1)
        whole = pid.broja_batch(p)
        assert len({ident for _, ident in seen}) == 1
    finally:
        torch.set_num_threads(threads)
    assert bool((result.gap <= 1e-8 / pid.LN2).all())
    for atom in ATOMS:  # the same computation per distribution, in either case
        torch.testing.assert_close(getattr(result, atom), getattr(whole, atom), rtol=0, atol=2 * 1e-8 / pid.LN2)


@pytest.mark.slow
def test_largest_size_is_certified():
    p = random_distributions(1, (100, 32, 32), seed=5)
    result = pid.broja_batch(p)
    assert float(result.gap[0]) <= 1e-6
    assert min(float(getattr(result, a)[0]) for a in ATOMS) >= -1e-6


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.full((2, 2), 0.25), r"shape \(\|Y\|, \|T\|, \|S\|\)"),
        (torch.tensor([[[0.5, 0.5], [0.5, -0.5]]]), "non-negative"),
        (torch.full((2, 2, 2), 0.2), "sum to 1"),
        (torch.tensor([[[math.nan, 1.0]]]), "finite"),
        (torch.zeros(0, 2, 2), "empty"),
        ("abc", "array-like"),
    ],
)
def test_bad_distributions(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pid.broja(bad)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"tol": 0.0}, "tol must be a positive number"),
        ({"tol": -1e-8}, "tol must be a positive number"),
        ({"tol": math.nan}, "tol must be a positive number"),
        ({"max_iter": 0}, "max_iter must be a positive integer"),
        ({"max_iter": 2.5}, "max_iter must be a positive integer"),
    ],
)
def test_bad_solver_options(options, match):
    p = CANONICAL["AND"][0]
    for solve in (pid.broja, lambda p, **kw: pid.broja_batch(p[None], **kw)):
        with pytest.raises(ValueError, match=match):
            solve(p, **options)


def test_pca_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.decomposition")
    x = torch.nn.functional.normalize(
        torch.randn(300, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )
    expected = sklearn.PCA(5, svd_solver="full").fit_transform(x.numpy())
    np.testing.assert_allclose(protocol._pca(x, 5).numpy(), expected, atol=1e-10)


def test_kmeans_matches_scikit_learn():
    datasets = pytest.importorskip("sklearn.datasets")
    cluster = pytest.importorskip("sklearn.cluster")
    metrics = pytest.importorskip("sklearn.metrics")
    x, _ = datasets.make_blobs(500, n_features=5, centers=6, random_state=0)
    ours = protocol._kmeans(torch.tensor(x), 6, gen=torch.Generator().manual_seed(0), n_init=10, max_iter=300, tol=1e-4)
    theirs = cluster.KMeans(6, n_init=10, random_state=0).fit(x).labels_
    assert metrics.adjusted_rand_score(theirs, ours.numpy()) == 1.0  # same partition
    # Without clear clusters the local optimum differs; its quality must not.
    z = np.random.default_rng(0).normal(size=(600, 5))
    labels = protocol._kmeans(
        torch.tensor(z), 10, gen=torch.Generator().manual_seed(0), n_init=10, max_iter=300, tol=1e-4
    )
    centres = np.stack([z[labels.numpy() == c].mean(0) for c in range(10)])
    inertia = ((z - centres[labels.numpy()]) ** 2).sum()
    assert inertia <= 1.01 * cluster.KMeans(10, n_init=10, random_state=0).fit(z).inertia_


def test_discretize_is_seeded_and_checks_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 8, 3, 3, generator=gen)
    labels = pid.discretize(x, n_clusters=4, seed=3)
    assert labels.shape == (120,) and labels.dtype == torch.int64 and set(labels.tolist()) <= set(range(4))
    assert torch.equal(labels, pid.discretize(x, n_clusters=4, seed=3))
    with pytest.raises(ValueError, match="n_clusters"):
        pid.discretize(x, n_clusters=500)
    with pytest.raises(ValueError, match="n_components"):
        pid.discretize(torch.randn(10, 3, generator=gen), n_components=4)
    with pytest.raises(ValueError, match="floating-point"):
        pid.discretize(torch.ones(10, 3, dtype=torch.int64))


BAD_MEASURE_INPUTS = {
    "student rows": (lambda t, s, y: (t, s[:40], y), {}, "student_reps must have shape (50, ...)"),
    "float labels": (lambda t, s, y: (t, s, y.double()), {}, "labels must be a 1-D integer tensor"),
    "NaN": (lambda t, s, y: (t, s * math.nan, y), {}, "student_reps must be finite"),
    "empty": (lambda t, s, y: (t[:0], s[:0], y[:0]), {}, "teacher_reps must be a non-empty floating-point"),
    "negative label": (lambda t, s, y: (t, s, y - 1), {}, "labels must be class indices ≥ 0; got -1"),
    "label ≥ num_classes": (lambda t, s, y: (t, s, y), {"num_classes": 2}, "below num_classes = 2; got 2"),
    "num_classes 0": (lambda t, s, y: (t, s, y), {"num_classes": 0}, "num_classes must be an int ≥ 1"),
}


@pytest.mark.parametrize("case", BAD_MEASURE_INPUTS.values(), ids=BAD_MEASURE_INPUTS.keys())
def test_measure_names_what_is_wrong(case):
    make, options, message = case
    gen = torch.Generator().manual_seed(0)
    reps = torch.randn(50, 6, generator=gen), torch.randn(50, 4, generator=gen)
    labels = torch.arange(50) % 3
    with pytest.raises(ValueError, match=re.escape(message)):
        pid.measure(*make(*reps, labels), n_components=3, **options)


def test_measure_a_student_that_copies_the_teacher():
    """Identical representations: everything the teacher knows is redundant, nothing unique."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=gen)
    teacher = torch.nn.functional.one_hot(labels, 4).double() * 3 + torch.randn(
        400, 4, generator=gen, dtype=torch.float64
    )
    copied = pid.measure(teacher, teacher.clone(), labels, n_components=3, n_clusters=4)
    assert copied.uni_t == pytest.approx(0, abs=1e-6) and copied.red == pytest.approx(copied.mi_t, abs=1e-6)
    assert copied.red > 1.0  # the clusters do carry the label
    noise = torch.randn(400, 4, generator=gen, dtype=torch.float64)
    ignorant = pid.measure(teacher, noise, labels, n_components=3, n_clusters=4)
    assert ignorant.uni_t > 0.8 * copied.mi_t  # an unrelated student leaves the teacher's knowledge unique
    with pytest.raises(ValueError, match="student_reps must have shape"):
        pid.measure(teacher, teacher[:10], labels)


def test_accuracy_record_runs_end_to_end(tmp_path):
    """benchmarks/pid_accuracy.py, the record behind the README's accuracy figures, on 2 per row."""
    pid_accuracy.main(["--n", "2", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "pid_accuracy.json").read_text())["rows"]
    assert [(r["family"], tuple(r["shape"])) for r in rows] == [
        (family, shape) for family in pid_accuracy.FAMILIES for shape in pid_accuracy.SHAPES
    ]
    assert all(0 <= r["above_tol"] <= 2 and r["max_gap_bits"] >= 0 for r in rows)
    assert (tmp_path / "pid_accuracy.md").read_text().startswith("# BROJA PID: certified accuracy")
