r"""The BROJA partial information decomposition (PID): a batched, certified solver.

For a target Y and two sources T (teacher) and S (student), the BROJA PID (Bertschinger, Rauh,
Olbrich, Jost, Ay 2014) splits :math:`I(Y;T,S)` into four non-negative atoms::

    I(Y;T,S) = Red(Y:T,S) + Uni(Y:T\S) + Uni(Y:S\T) + Syn(Y:T,S)
    I(Y;T)   = Red + Uni(Y:T\S)            I(Y;S) = Red + Uni(Y:S\T)

from one convex problem over :math:`\Delta_P`, the distributions Q with the same (y, t) and (y, s)
marginals as P:

.. math::  \mathrm{Uni}(Y{:}T\backslash S) = \min_{Q \in \Delta_P} I_Q(Y;T \mid S),

equivalently :math:`\max_{Q\in\Delta_P} H_Q(Y \mid T,S)` (the (y, t), (y, s) marginals fix H(Y),
I(Y;T) and I(Y;S)). In RID's terms Red(Y:T,S) is the knowledge the student has taken from the
teacher and Uni(Y:T\S) what is left to distil.

:func:`broja_batch` solves a batch of these problems at once, in float64 PyTorch, CPU or GPU, with
a primal–dual log-barrier interior-point method (below) that returns, for every distribution, a
certified bound on its error: the duality gap between the primal value and a dual-feasible point.
:func:`broja` is the one-distribution front-end. The RID paper's protocol for continuous
representations (row-normalise, PCA, k-means, empirical joint, BROJA) is in
:mod:`rid_fast.pid.protocol`.

Example::

    >>> import torch
    >>> from rid_fast.pid import broja
    >>> p_and = torch.zeros(2, 2, 2)               # Y = T AND S, T and S uniform bits
    >>> for t in (0, 1):
    ...     for s in (0, 1):
    ...         p_and[t & s, t, s] = 0.25
    >>> pid = broja(p_and)
    >>> round(pid.syn, 4), round(pid.red, 4), round(pid.uni_t, 4)
    (0.5, 0.3113, 0.0)

**The solver.** Variables are the entries of Q on the support of the feasible set, the (y, t, s)
with P(y, t) > 0 and P(y, s) > 0; everything else is zero in every Q of :math:`\Delta_P`. The start
takes 100 sweeps of a scaling towards the optimum's form :math:`Q = r(t,s)\,a(y,t)\,b(y,s)` from
the product :math:`P(y,t)P(y,s)/P(y)`, with a little of the product mixed back in so that it is
strictly positive there, and starts the path at a small barrier weight (τ = 1e-3): a fifth to a
half fewer Newton steps than from the product itself at τ = 1. Each Newton step maximises
:math:`f(Q) + \tau\sum\log Q` (f = H(Y|T,S)) subject to :math:`A\Delta = 0` (A: the two marginal
maps), so iterates stay exactly feasible. The Hessian of f is block diagonal over (t, s) — a
diagonal plus a rank-one term per block — and inverts blockwise by Sherman–Morrison; the
Newton system then reduces to the marginal constraints, |Y|(|T| + |S|) unknowns, whose (y, t)
block is itself block diagonal and is eliminated, leaving a dense |Y|·min(|T|, |S|) system per
distribution (assembled with one batched matrix product, factored by batched Cholesky). τ falls
tenfold whenever the barrier problem is solved to its own accuracy (Newton decrement ≤ τ per
variable). The multipliers give :math:`\lambda_{yt} + \mu_{ys} \approx -\log Q(y \mid t,s)`; shifted
so that :math:`\log\sum_y e^{-(\lambda_{yt}+\mu_{ys})} \le 0` for every (t, s), they are feasible for
the dual :math:`\min \sum\lambda_{yt}P(y,t) + \sum\mu_{ys}P(y,s)`, whose value bounds
:math:`\max H_Q(Y|T,S)` from above. Where the gap stops closing, two more certificates are tried:
the entropy of a feasible point on the face of :math:`\Delta_P` where the optimum appears to lie
(whole (t, s) blocks empty, which the path nears only as fast as τ falls), and the dual objective at
multipliers refit to the iterate (Newton's are all but undetermined on rows of negligible mass).

**Accuracy.** A distribution stops once its gap is at most ``tol``, when the gap has stalled
(the Newton system loses digits when entries of Q span many decades), or after ``max_iter``
steps; a call where some stopped above ``tol`` says so in one ``RuntimeWarning`` (their number
and largest gap). Whatever the stop, every atom lies within its ``gap`` of the exact value. With
the default ``tol`` (1e-8 nats, 1.44e-8 bits), random distributions, dense or with most entries
zero, and the canonical and degenerate gates reach it; distributions whose entries span hundreds
of decades miss it now and then, by up to a few 1e-7 bits (benchmarks/results/pid_accuracy.md).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PID", "broja", "broja_batch", "check_distribution", "mutual_informations", "LN2"]

LN2 = math.log(2.0)

# ---- the solver's constants (nats where a unit applies) --------------------------------------
# Iterates and their certificate.
_Q_FLOOR = 1e-30  # smallest entry of Q on the support (rounding could zero one and pin the path)
_FEASIBLE = 1e-13  # largest marginal error of an iterate whose entropy counts as a lower bound
_PROJECT_SWEEPS = 100  # most sweeps of iterative proportional fitting per projection onto Δ_P
_PROJECTED = 1e-15  # marginal error at which the projection stops early
# ... and the relative error of every marginal it also needs: far above the rounding of a sum of
# |T| or |S| positive terms (a few 1e-15), far below anything that moves log Q by more than that.
_PROJECTED_RELATIVE = 1e-12
_TINY = 1e-300  # floor of divisors that are 0 only where their result is masked out
_START_MIX = 1e-3  # the fraction of the product distribution P(y,t)P(y,s)/P(y) in the scaled start
# The Newton system.
_RIDGE = 1e-13  # added to the diagonal of the unit-scaled reduced blocks M_tt, M_ss
_RIDGE_FALLBACK = 1e-10  # the ridge of an M_tt block that rounding left singular under _RIDGE
_REFINE = 2  # most steps of iterative refinement of each Newton direction
_REFINED = _FEASIBLE / 100  # marginal residual of a direction at which refinement stops
# The barrier path.
_TAU_MIN = 1e-14  # smallest barrier weight
_TAU_DECREASE = 0.1  # factor on τ once the barrier problem is solved (or admits no ascent)
_TAU_BACKOFF = 100.0  # factor on τ after a step blocked by the boundary (re-centre)
# The step along a Newton direction.
_TO_BOUNDARY = 0.99  # the longest step goes this fraction of the way to the boundary Q = 0
_ARMIJO = 1e-4  # sufficient ascent: the fraction of the predicted ascent α·decrement required
_ARMIJO_ROUNDING = 1e-15  # relative rounding allowance on the barrier objective in that test
_BACKTRACKS = 12  # step halvings before a distribution skips the step
_BLOCKED_STEP = 1e-10  # an accepted step shorter than this counts as blocked by the boundary
# Stopping, stalls and restarts.
_PROGRESS = 0.5  # a step makes progress when the gap falls below this fraction of its best so far
_STALL_STEPS = 8  # Newton steps without progress before a distribution stops
_RESTART_ABOVE = 1e-7  # a stalled gap above this restarts the path (at most _RESTARTS times)
_RESTARTS = 3
_COMPACT = 4  # finished distributions leave the batch once they are 1/_COMPACT of it


@dataclass
class PID:
    """The four PID atoms and the mutual informations they add up to, in bits.

    Floats from :func:`broja`, tensors of shape (n,) from :func:`broja_batch`. ``gap`` is the
    solver's duality gap (bits): a certified bound on the error of every atom. ``iterations`` is
    the number of Newton steps the call took (its slowest distribution's); ``steps``, each
    distribution's own (int64 (n,), or an int from :func:`broja`).
    """

    red: float | Tensor
    uni_t: float | Tensor
    uni_s: float | Tensor
    syn: float | Tensor
    mi_t: float | Tensor
    mi_s: float | Tensor
    mi_ts: float | Tensor
    gap: float | Tensor
    iterations: int = 0
    steps: int | Tensor = 0

    def item(self, index: int) -> PID:
        """Distribution ``index`` of a batched result, as floats (``steps`` an int)."""
        values = {f.name: float(getattr(self, f.name)[index]) for f in fields(self) if f.name not in _COUNTS}
        return PID(**values, iterations=self.iterations, steps=int(self.steps[index]))

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


_COUNTS = ("iterations", "steps")  # the fields of PID that count Newton steps


def check_distribution(p, *, name: str = "p", batched: bool = False, atol: float = 1e-6) -> Tensor:
    """``p`` as a float64 tensor of shape (n, |Y|, |T|, |S|) (``batched``) or (|Y|, |T|, |S|), after
    checking that it is a finite, non-negative distribution summing to 1 (within ``atol``)."""
    if not isinstance(p, Tensor):
        try:
            p = torch.as_tensor(p, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must be array-like of numbers; got {type(p).__name__} ({error})") from None
    rank = 4 if batched else 3
    layout = "(n, |Y|, |T|, |S|)" if batched else "(|Y|, |T|, |S|)"
    if p.dim() != rank:
        raise ValueError(f"{name} must have shape {layout}; got shape {tuple(p.shape)}")
    if p.numel() == 0:
        raise ValueError(f"{name} must not be empty; got shape {tuple(p.shape)}")
    if p.dtype == torch.bool or p.is_complex():
        raise TypeError(f"{name} must hold real numbers; got {p.dtype}")
    p = p.to(torch.float64)
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name} must be finite; it holds NaN or Inf")
    if bool((p < 0).any()):
        raise ValueError(f"{name} must be non-negative; smallest entry {float(p.min()):.3g}")
    totals = p.flatten(-3).sum(-1)
    worst = float((totals - 1).abs().max())
    if worst > atol:
        raise ValueError(f"{name} must sum to 1 (per distribution); off by up to {worst:.3g}")
    return p / totals[..., None, None, None]


def _xlogy(x: Tensor, y: Tensor) -> Tensor:
    """x·log y with 0·log 0 = 0."""
    return torch.special.xlogy(x, y)


def mutual_informations(p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """H(Y), I(Y;T), I(Y;S), I(Y;T,S) of (n, Y, T, S) distributions, in nats."""
    p_y, p_t, p_s = p.sum((2, 3)), p.sum((1, 3)), p.sum((1, 2))
    p_yt, p_ys, p_ts = p.sum(3), p.sum(2), p.sum(1)
    entropy = lambda q: -_xlogy(q, q).flatten(1).sum(1)  # noqa: E731
    h_y = entropy(p_y)
    mi_t = h_y + entropy(p_t) - entropy(p_yt)
    mi_s = h_y + entropy(p_s) - entropy(p_ys)
    mi_ts = h_y + entropy(p_ts) - entropy(p)
    return h_y, mi_t, mi_s, mi_ts


def _conditional_entropy(q: Tensor) -> Tensor:
    """H_Q(Y | T, S) of (n, Y, T, S) distributions, in nats."""
    q_ts = q.sum(1, keepdim=True)
    return -(_xlogy(q, q) - _xlogy(q, q_ts.expand_as(q))).flatten(1).sum(1)


class _Factors(NamedTuple):
    """What :meth:`_Newton.factorize` keeps for the solves (shapes for n distributions)."""

    q: Tensor  # (n, Y, T, S) the iterate
    w: Tensor  # (n, Y, T, S) and c (n, 1, T, S): K⁻¹ = diag(w) + c w wᵀ per (t, s) block
    c: Tensor
    d_t: Tensor  # (n, Y, T), (n, Y, S): the Jacobi scaling of the constraint rows
    d_s: Tensor
    e: Tensor  # (n, Y, T, S): the scaled M_ts = δ_yy' e + c·left·rightᵀ per (t, s)
    left: Tensor
    right: Tensor
    l_inv: Tensor  # (n, T, Y, Y): M_tt = L Lᵀ per t
    schur: Tensor  # (n, Y·S, Y·S) the dense reduced system and its Cholesky factor
    factor: Tensor
    failed: Tensor  # indices whose Cholesky failed (solved by LU)


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """Run the enclosed torch calls on one CPU thread, then restore the caller's thread count
    (``torch.set_num_threads`` is the process's setting: the solver leaves it as it found it,
    inside the trainer as anywhere). On a GPU this does nothing.

    On the CPU, torch runs a batched factorisation as one LAPACK call per matrix, and for
    matrices of |Y|·|S| ≤ a few hundred rows each call splits into several short OpenMP parallel
    regions: thousands of thread barriers per factorisation. OpenMP threads spin at a barrier, so
    when another process holds a core (training beside ``rid-fast pid`` or ``pid_every``, a
    data loader, anything) every barrier waits for a descheduled thread: on two cores beside one
    busy process a factorisation was seen to take 8–12 times as long. On one thread the calls
    have no barriers, and a competing process takes at most its share of the core. :func:`_solve`
    runs a whole chunk of the batch this way, one chunk per core; a batch solved as one chunk
    (one thread, or one distribution) keeps only its LAPACK calls here."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _m_tt_solve(l_inv: Tensor, v: Tensor) -> Tensor:
    """M_tt⁻¹ v = L⁻ᵀ(L⁻¹ v) per t: l_inv (n, T, Y, Y), v (n, Y, T) → (n, Y, T)."""
    return (l_inv.mT @ (l_inv @ v.transpose(1, 2)[..., None]))[..., 0].transpose(1, 2)


class _Newton:
    """One batch of BROJA problems and the linear algebra of their Newton steps, arranged so that
    |S| ≤ |T| (the problem is symmetric in T and S; the eliminated (y, t) block is then the
    larger one)."""

    def __init__(self, p: Tensor, q: Tensor | None = None) -> None:
        """The problems of the distributions ``p`` (n, Y, T, S), at the iterate ``q`` (default: the
        product distribution P(y,t)P(y,s)/P(y), which lies in Δ_P and is positive on its support)."""
        self.p = p
        self.n, self.Y, self.T, self.S = p.shape
        self.p_yt, self.p_ys = p.sum(3), p.sum(2)  # (n, Y, T), (n, Y, S)
        self.support = (self.p_yt[..., None] > 0) & (self.p_ys[:, :, None, :] > 0)  # (n, Y, T, S)
        if q is None:
            p_y = self.p_yt.sum(2)
            q = self.p_yt[..., None] * self.p_ys[:, :, None, :] / p_y.clamp_min(_TINY)[..., None, None]
            q = torch.where(self.support, q, 0.0)
        self.q = q
        self.n_vars = self.support.flatten(1).sum(1).to(p.dtype)  # (n,)
        # Constraint rows with no variables are inactive, and per label one (y, s) row is
        # implied by the others (Σ_t P(y, t) = Σ_s P(y, s)): drop the one of largest mass.
        self.active_t = self.p_yt > 0  # (n, Y, T)
        dropped = torch.nn.functional.one_hot(self.p_ys.argmax(2), self.S).bool()
        self.active_s = (self.p_ys > 0) & ~dropped  # (n, Y, S)
        self._buffers: dict[str, Tensor] = {}
        self._info = torch.empty(self.n, dtype=torch.int32, device=p.device)

    def subset(self, keep: Tensor) -> _Newton:
        """The problems where ``keep`` (n,) is true, at their current iterates."""
        return _Newton(self.p[keep], self.q[keep])

    # ---- objective --------------------------------------------------------------------------
    def barrier_objective(self, q: Tensor, tau: Tensor, entropy: Tensor | None = None) -> Tensor:
        """H_Q(Y|T,S) + τ Σ_support log Q; −inf if an entry of the support is not positive.
        ``entropy``: H_Q(Y|T,S), when the caller has it already."""
        logs = torch.where(self.support, torch.log(torch.where(self.support, q, 1.0)), 0.0)
        bad = (self.support & (q <= 0)).flatten(1).any(1)
        entropy = _conditional_entropy(q) if entropy is None else entropy
        return torch.where(bad, -math.inf, entropy + tau * logs.flatten(1).sum(1))

    def gradient(self, q: Tensor) -> Tensor:
        """∇H_Q(Y|T,S) = −log Q(y|t,s) on the support, 0 elsewhere; (n, Y, T, S)."""
        safe_q = torch.where(self.support, q, 1.0)
        q_ts = q.sum(1, keepdim=True).clamp_min(_TINY)
        return torch.where(self.support, -torch.log(safe_q / q_ts), 0.0)

    # ---- the Newton system -------------------------------------------------------------------
    def factorize(self, q: Tensor, z: Tensor) -> None:
        """Factor the Newton system at (Q, Z) for :meth:`solve`.

        K = −∇²H + diag(z/q) per (t, s) block = diag((1 + z)/q) − 11ᵀ/q_ts; its inverse is
        diag(w) + c w wᵀ with w = q/(1 + z) and c = 1/(q_ts − Σ_y w) (Sherman–Morrison). The
        reduced system M ν = r over the constraint rows (y, t) and (y, s), M = A K⁻¹ Aᵀ, has blocks
        M_tt[t] = Σ_s K⁻¹_ts (block diagonal over t), M_ss[s] = Σ_t K⁻¹_ts and
        M_ts[(y, t), (y', s)] = K⁻¹_ts[y, y'] = δ_yy' w_yts + c_ts w_yts w_y'ts. Rows without
        variables, and per label the implied (y, s) row, get scale 0 and a unit diagonal (ν = 0
        there); the others are scaled to a unit diagonal (the entries span many decades as Q
        nears the boundary). The (y, t) part is eliminated with M_tt = L Lᵀ and X = L⁻¹ M_ts,
        leaving the dense |Y||S| × |Y||S| system M_ss − XᵀX, factored by Cholesky.
        """
        n, Y, T, S = q.shape
        support = self.support
        w = torch.where(support, q / (1 + z), 0.0)  # (n, Y, T, S)
        slack = q.sum(1) - w.sum(1)  # (n, T, S), > 0 where the block has support
        c = torch.where(slack > 0, 1.0 / slack.clamp_min(_TINY), 0.0)  # (n, T, S)
        diag = w + c[:, None] * w * w  # diagonal of each K⁻¹_ts block
        d_t = torch.where(self.active_t, diag.sum(3).clamp_min(_TINY).rsqrt(), 0.0)  # (n, Y, T)
        d_s = torch.where(self.active_s, diag.sum(2).clamp_min(_TINY).rsqrt(), 0.0)  # (n, Y, S)
        rows_t = w * d_t[..., None]  # (n, Y, T, S): w on the (y, t) rows, scaled
        rows_s = w * d_s[:, :, None]  # (n, Y, T, S): w on the (y, s) rows, scaled
        left = rows_t.transpose(1, 2)  # (n, T, Y, S)
        right = rows_s.permute(0, 3, 1, 2)  # (n, S, Y, T)
        m_tt = (left * c[:, :, None]) @ left.transpose(2, 3)  # (n, T, Y, Y)
        m_tt.diagonal(dim1=2, dim2=3).add_((w.sum(3) * d_t * d_t + ~self.active_t + _RIDGE).transpose(1, 2))
        m_ss = (right * c.transpose(1, 2)[:, :, None]) @ right.transpose(2, 3)  # (n, S, Y, Y)
        m_ss.diagonal(dim1=2, dim2=3).add_((w.sum(2) * d_s * d_s + ~self.active_s + _RIDGE).transpose(1, 2))
        eye = torch.eye(Y, dtype=q.dtype, device=q.device)
        with _one_thread(q.device):
            l_tt, info = torch.linalg.cholesky_ex(m_tt)
            if bool((info != 0).any()):  # a block left (numerically) singular by rounding: a larger ridge
                l_tt = torch.linalg.cholesky(m_tt + _RIDGE_FALLBACK * eye)
            l_inv = torch.linalg.solve_triangular(l_tt, eye.expand(n, T, Y, Y), upper=False)  # (n, T, Y, Y)
        # X[t, y, y', s] = L⁻¹_t[y, y'] e[y', t, s] + h[t, y, s] r[y', t, s]: the diagonal part
        # e = d_t w d_s and the rank-one part h = c L⁻¹(d_t w), r = w d_s of M_ts.
        e = rows_t * d_s[:, :, None]  # (n, Y, T, S)
        h = (l_inv @ left) * c[:, :, None]  # (n, T, Y, S)
        x = torch.mul(l_inv[..., None], e.transpose(1, 2)[:, :, None], out=self._buffer("x", (n, T, Y, Y, S), q))
        x.addcmul_(h[:, :, :, None], right.permute(0, 3, 2, 1)[:, :, None])
        x = x.view(n, T * Y, Y * S)
        schur = torch.bmm(x.transpose(1, 2), x, out=self._buffer("schur", (n, Y * S, Y * S), q)).neg_()
        schur.view(n, Y, S, Y, S).diagonal(dim1=2, dim2=4).add_(m_ss.permute(0, 2, 3, 1))
        # schur = Uᵀ U, factored through column-major views (the same matrix, as it is symmetric):
        # LAPACK then needs no layout copy, about 40 % faster. ``factor`` holds L = Uᵀ, row-major.
        factor = self._buffer("factor", schur.shape, q)
        with _one_thread(q.device):
            _, info = torch.linalg.cholesky_ex(schur.mT, upper=True, out=(factor.mT, self._info))
        self._state = _Factors(
            q=q,
            w=w,
            c=c[:, None],
            d_t=d_t,
            d_s=d_s,
            e=e,
            left=rows_t,
            right=rows_s,
            l_inv=l_inv,
            schur=schur,
            factor=factor,
            failed=(info != 0).nonzero().flatten(),
        )

    def solve(self, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The Newton direction Δ = K⁻¹(g − Aᵀν) with A Δ = −(A Q − b), for the system last
        factored: returns Δ (n, Y, T, S) and the multipliers λ (n, Y, T), μ (n, Y, S). The
        residual A Q − b pulls rounding drift back onto the constraints.

        Δ satisfies the first equation by construction; the second only as accurately as the
        reduced system is solved, which near the boundary (entries of M spanning many decades)
        can be far from machine precision. Iterative refinement on A Δ + (A Q − b)
        restores it: iterates must stay feasible for their entropy to be a certified bound.
        """
        q = self._state.q
        drift_t, drift_s = q.sum(3) - self.p_yt, q.sum(2) - self.p_ys  # A Q − b
        lam, mu = self._multipliers(g, drift_t, drift_s)
        direction = self._k_inverse(g - lam[..., None] - mu[:, :, None, :])
        for _ in range(_REFINE):
            res_t = direction.sum(3) + drift_t
            res_s = direction.sum(2) + drift_s
            # Only the distributions whose direction misses the constraints are refined: how
            # many refinements one gets must not depend on the batch it is solved in.
            residual = torch.maximum(res_t.abs().flatten(1).amax(1), res_s.abs().flatten(1).amax(1))
            refine = residual > _REFINED  # (n,)
            if not bool(refine.any()):
                break
            d_lam, d_mu = self._multipliers(None, res_t, res_s)
            d_lam, d_mu = torch.where(refine[:, None, None], d_lam, 0.0), torch.where(refine[:, None, None], d_mu, 0.0)
            direction = direction - self._k_inverse(d_lam[..., None] + d_mu[:, :, None, :])
            lam, mu = lam + d_lam, mu + d_mu
        return direction, lam, mu

    def _k_inverse(self, v: Tensor) -> Tensor:
        """K⁻¹ v = w·v + c·w·Σ_y w·v per (t, s) block."""
        w, c = self._state.w, self._state.c
        return w * v + w * (c * (w * v).sum(1, keepdim=True))

    def _multipliers(self, g: Tensor | None, res_t: Tensor, res_s: Tensor) -> tuple[Tensor, Tensor]:
        """ν = (λ, μ) solving M ν = A K⁻¹ g + res, where res = (res_t (n, Y, T), res_s (n, Y, S)).

        (M_ss − M_tsᵀ M_tt⁻¹ M_ts) ν_s = r_s − M_tsᵀ M_tt⁻¹ r_t, then ν_t = M_tt⁻¹ (r_t − M_ts ν_s).
        Products with M_ts use its diagonal-plus-rank-one blocks, O(|Y||T||S|) per distribution,
        so a solve reads only the Cholesky factor of the dense system."""
        f = self._state
        n, Y, T, S = f.q.shape
        if g is not None:
            kg = self._k_inverse(g)
            res_t, res_s = res_t + kg.sum(3), res_s + kg.sum(2)
        r_t, r_s = res_t * f.d_t, res_s * f.d_s  # scaled
        rhs = r_s - self._m_ts_transposed(_m_tt_solve(f.l_inv, r_t))
        rhs = rhs.reshape(n, Y * S, 1)
        # Two triangular solves: faster than cholesky_solve for a batch of small systems.
        with _one_thread(rhs.device):
            nu_s = torch.linalg.solve_triangular(f.factor, rhs, upper=False)
            nu_s = torch.linalg.solve_triangular(f.factor.mH, nu_s, upper=True)
            if f.failed.numel():  # left (numerically) indefinite by rounding: LU instead
                nu_s[f.failed] = torch.linalg.solve(f.schur[f.failed], rhs[f.failed])
        nu_s = nu_s.view(n, Y, S)
        nu_t = _m_tt_solve(f.l_inv, r_t - self._m_ts(nu_s))
        return nu_t * f.d_t, nu_s * f.d_s  # unscaled

    def _m_ts(self, v: Tensor) -> Tensor:
        """M_ts v for v (n, Y, S): Σ_s e v + Σ_s c·left·(Σ_y' right·v); (n, Y, T)."""
        f = self._state
        v = v[:, :, None, :]
        return (f.e * v).sum(3) + (f.c * f.left * (f.right * v).sum(1, keepdim=True)).sum(3)

    def _m_ts_transposed(self, u: Tensor) -> Tensor:
        """M_tsᵀ u for u (n, Y, T): Σ_t e u + Σ_t c·right·(Σ_y left·u); (n, Y, S)."""
        f = self._state
        u = u[..., None]
        return (f.e * u).sum(2) + (f.c * f.right * (f.left * u).sum(1, keepdim=True)).sum(2)

    def _buffer(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A workspace reused across Newton steps: the (n, |Y||S|, ·) arrays are the largest the
        step touches, and fresh allocations of that size cost more than filling them."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape:
            buffer = self._buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buffer

    def project(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """``q`` rescaled onto the marginal constraints and its remaining marginal error (n,)
        (:func:`_fit_marginals`): a no-op up to rounding on a feasible q, and a cure for the drift
        that rounding adds over many Newton steps."""
        return _fit_marginals(q, self.p_yt, self.p_ys)

    # ---- the certificate ---------------------------------------------------------------------
    def dual_point(self, lam: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
        """A dual-feasible point from multipliers with λ + μ ≈ −log Q(y|t,s): λ shifted per t until
        every (t, s) satisfies logsumexp_y(−λ_yt − μ_ys) ≤ 0. Returns the shifted λ (n, Y, T) and
        each block's slack in that constraint, −logsumexp_y(−λ_yt − μ_ys) ≥ 0 (n, T, S; +inf
        where the block has no support): at the optimum, blocks with positive slack hold no mass."""
        scores = torch.where(self.support, -(lam[..., None] + mu[:, :, None, :]), -math.inf)
        lse = torch.logsumexp(scores, dim=1)  # (n, T, S); −inf where the block has no support
        shift = lse.amax(2)  # (n, T)
        shift = torch.where(torch.isfinite(shift), shift, 0.0)
        return lam + shift[:, None, :], shift[..., None] - lse

    def dual_objective(self, lam: Tensor, mu: Tensor) -> Tensor:
        """Σ λ P(y,t) + Σ μ P(y,s): at a dual-feasible point, an upper bound on max H_Q(Y|T,S); (n,)."""
        return (lam * self.p_yt).flatten(1).sum(1) + (mu * self.p_ys).flatten(1).sum(1)


class _Start(NamedTuple):
    """Where the barrier path starts: ``sweeps`` of :func:`_scaled_start` from the product
    distribution (0: the product itself), and the first barrier weight ``tau`` per distribution,
    spread over its variables."""

    sweeps: int
    tau: float


# The scaled start lies near the optimum, so the path can start far along it (small τ; on a seeded
# (6, 12, 9) batch 1e-2 and 1e-4 took more steps, 1e-5 many more): a fifth to a half fewer Newton
# steps per distribution on average than from the product at τ = 1, the method's textbook start.
# The tests keep that as the reference: no distribution of their seeded batches may take more
# steps from the scaled start (of the 2,944 seeded distributions of benchmarks/pid_accuracy.py and
# pid_benchmark.py, 14 do, 12 of them with entries spanning hundreds of decades).
_SCALED_START = _Start(sweeps=100, tau=1e-3)
_PRODUCT_START = _Start(sweeps=0, tau=1.0)


def _scaled_start(product: Tensor, p_yt: Tensor, p_ys: Tensor, support: Tensor, sweeps: int) -> Tensor:
    r"""A start for the barrier path (n, Y, T, S) near the optimum, in Δ_P up to the (y, t)
    marginals' residual and positive on ``support`` (n, Y, T, S): ``sweeps`` of the scaling below
    from ``product`` = P(y,t)P(y,s)/P(y) (zero off the support), for the marginals ``p_yt``
    (n, Y, T) and ``p_ys`` (n, Y, S); ``product`` itself when ``sweeps`` is 0.

    The optimum has the form Q(y,t,s) = r(t,s)·a(y,t)·b(y,s) with Σ_y a·b = 1 on every (t, s) that
    holds mass (stationarity: −log Q(y|t,s) = λ_yt + μ_ys). Starting from the product
    :math:`\Pi(y,t,s) = P(y,t)P(y,s)/P(y)` (r = Σ_y Π, b = 1), each sweep fits a, then b, to the
    two marginals at the current r, and moves r to the (t, s) marginal of r·a·b; the fixed points
    are exactly those stationary points. A few sweeps bring Q most of the way, leaving the barrier
    method fewer Newton steps. Π is itself in Δ_P and positive on the support; mixing in a
    fraction _START_MIX of it keeps Q₀ positive there (the sweeps can drive entries to zero, and
    an entry at zero would pin the path), and a sweep leaves the (y, s) marginals exact, the
    (y, t) ones near (the first projection of :meth:`_Batch.step` closes the rest). Starting the
    sweeps from P's own (t, s) marginal instead leaves cells where P is zero at zero: on sparse
    inputs the path then starts on the wrong face."""
    if sweeps == 0:
        return product
    r = product.sum(1)  # (n, T, S)
    b = torch.ones_like(p_ys)  # (n, Y, S)
    for _ in range(sweeps):
        a = torch.where(p_yt > 0, p_yt / (b @ r.mT).clamp_min(_TINY), 0.0)  # (n, Y, T): Σ_s r·a·b = P(y,t)
        b = torch.where(p_ys > 0, p_ys / (a @ r).clamp_min(_TINY), 0.0)  # (n, Y, S): Σ_t r·a·b = P(y,s)
        fitted, r = r, r * (a.mT @ b)  # (n, T, S): r·a·b fits P(y,s); r moves to its Σ_y
    scaled = fitted[:, None] * a[..., None] * b[:, :, None, :]  # (n, Y, T, S)
    return torch.where(support, (1 - _START_MIX) * scaled + _START_MIX * product, 0.0)


def _fit_marginals(q: Tensor, p_yt: Tensor, p_ys: Tensor, sweeps: int = _PROJECT_SWEEPS) -> tuple[Tensor, Tensor]:
    """``q`` (n, Y, T, S) rescaled towards the marginals ``p_yt`` (n, Y, T), ``p_ys`` (n, Y, S) by
    iterative proportional fitting (for each y, alternately match the (y, t) and (y, s) sums), and
    its largest marginal error (n,) (:func:`_marginal_error`). Zero entries stay zero, so the fit
    stays on q's support (converging when that support holds a feasible point).

    Each distribution stops on its own, after ``sweeps`` or once it has *converged*: every
    marginal within _PROJECTED and within a fraction _PROJECTED_RELATIVE of its own mass. The
    absolute test alone is met long before rows of tiny mass (entries spanning hundreds of
    decades) fit: a row of mass 2e-62 was left off by a factor of 3, and the multipliers Newton
    then derives from log Q held the dual bound above 1e16 bits. Sweeping such a distribution
    until the rest of its batch had converged hid that, and made its answer depend on the batch
    it was solved in; a converged distribution is left as it is, so the sweeps it gets depend
    on it alone. Convergence is read on the host (a device sync) only after sweeps 1, 2, 4,
    8, …: at most 1 + log₂(sweeps) reads instead of one a sweep, for at most twice the sweeps a
    distribution needs."""
    fitting = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)  # (n,): not converged yet
    for sweep in range(1, sweeps + 1):
        rows = q.sum(3, keepdim=True)
        fitted = q * torch.where(rows > 0, p_yt[..., None] / torch.where(rows > 0, rows, 1.0), 0.0)
        cols = fitted.sum(2, keepdim=True)
        fitted = fitted * torch.where(cols > 0, p_ys[:, :, None] / torch.where(cols > 0, cols, 1.0), 0.0)
        q = torch.where(fitting[:, None, None, None], fitted, q)
        if sweep & (sweep - 1) == 0 or sweep == sweeps:  # a power of two, or the last
            error, relative = _marginal_error(q, p_yt, p_ys, relative=True)
            fitting = fitting & ((error > _PROJECTED) | (relative > _PROJECTED_RELATIVE))
            if not bool(fitting.any()):
                break
    return q, error


def _marginal_error(q: Tensor, p_yt: Tensor, p_ys: Tensor, relative: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Largest deviation of Q's (y, t) and (y, s) marginals from ``p_yt``, ``p_ys``; (n,). With
    ``relative``, also the largest deviation as a fraction of the marginal's own mass; (n,)."""
    rows, cols = (q.sum(3) - p_yt).abs(), (q.sum(2) - p_ys).abs()  # (n, Y, T), (n, Y, S)
    error = torch.maximum(rows.flatten(1).amax(1), cols.flatten(1).amax(1))
    if not relative:
        return error
    # A marginal of mass 0 has an empty row of Q (off the support), matched exactly.
    rows, cols = rows / torch.where(p_yt > 0, p_yt, 1.0), cols / torch.where(p_ys > 0, p_ys, 1.0)
    return error, torch.maximum(rows.flatten(1).amax(1), cols.flatten(1).amax(1))


@dataclass
class _Batch:
    """The distributions still being solved, with everything the solve loop tracks per
    distribution: the problems and their iterates Q (:class:`_Newton`) and (m,) tensors for the
    m distributions in the batch. A distribution that is done leaves with all of it
    (:meth:`without_finished`); :meth:`step` is one Newton step for all of them."""

    problems: _Newton
    index: Tensor  # int64: positions in the caller's batch
    tau: Tensor  # the barrier weight τ
    lower: Tensor  # certified bounds on max H_Q(Y|T,S): the entropy of a feasible point (P, iterates),
    upper: Tensor  # and the dual objective at a dual-feasible point
    best_gap: Tensor  # the gap when progress was last made (a fall below _PROGRESS × the previous)
    since_improved: Tensor  # int64: Newton steps since then
    restarts: Tensor  # int64: restarts of the barrier path so far
    steps: Tensor  # int64: Newton steps taken while not done
    done: Tensor  # bool: certified to ``tol``, or stalled for good

    @classmethod
    def start(cls, problems: _Newton, start: _Start) -> _Batch:
        """Every distribution at the ``start`` (from the product distribution, ``problems``' own
        iterate), with its τ spread over the variables. The lower bound starts at H_P(Y|T,S), as
        P itself lies in Δ_P: it is sometimes better than any iterate's near a degenerate optimum,
        and it keeps Syn ≥ 0 (up to rounding)."""
        problems.q = _scaled_start(problems.q, problems.p_yt, problems.p_ys, problems.support, start.sweeps)
        n, like = problems.n, problems.p
        unbounded = torch.full((n,), math.inf, dtype=like.dtype, device=like.device)
        count = torch.zeros(n, dtype=torch.long, device=like.device)
        return cls(
            problems=problems,
            index=torch.arange(n, device=like.device),
            tau=torch.full((n,), start.tau, dtype=like.dtype, device=like.device) / problems.n_vars.clamp_min(1),
            lower=_conditional_entropy(problems.p),  # P itself lies in Δ_P
            upper=unbounded.clone(),
            best_gap=unbounded.clone(),
            since_improved=count,
            restarts=count.clone(),
            steps=count.clone(),
            done=torch.zeros(n, dtype=torch.bool, device=like.device),
        )

    def worth_compacting(self) -> bool:
        """Whether the finished distributions are 1/_COMPACT of the batch or more: they then leave,
        so that a few slow ones cost what they are, not a full batch per step."""
        return _COMPACT * int(self.done.sum()) >= len(self.index) > 0 and bool(self.done.any())

    def without_finished(self) -> _Batch:
        """The distributions not done, each with all of its state."""
        keep = ~self.done
        state = {f.name: getattr(self, f.name)[keep] for f in fields(self) if f.name != "problems"}
        return _Batch(problems=self.problems.subset(keep), **state)

    def record(self, lower: Tensor, upper: Tensor, steps: Tensor) -> None:
        """Write this batch's bounds and step counts into the whole batch's (n,) ``lower``,
        ``upper`` and ``steps``."""
        lower[self.index], upper[self.index], steps[self.index] = self.lower, self.upper, self.steps

    def step(self, tol: float) -> bool:
        """One Newton step for every distribution: certify both bounds at the current iterate,
        track progress (done, stalled, restarted), then move Q and τ. True when all are done."""
        problems = self.problems
        self.steps = self.steps + ~self.done
        # Keep the support strictly positive (rounding can zero an entry, which would pin every
        # later step to length 0), then make Q exactly feasible: its entropy is a certified
        # lower bound.
        problems.q, error = problems.project(torch.where(problems.support, problems.q.clamp_min(_Q_FLOOR), 0.0))
        feasible = error <= _FEASIBLE  # only then is the entropy a bound
        entropy = _conditional_entropy(problems.q)
        self.lower = torch.where(feasible, torch.maximum(self.lower, entropy), self.lower)
        safe_q = torch.where(problems.support, problems.q, 1.0)
        barrier = torch.where(problems.support, self.tau[:, None, None, None] / safe_q, 0.0)  # τ/Q
        grad = problems.gradient(problems.q) + barrier
        problems.factorize(problems.q, barrier)
        direction, lam, mu = problems.solve(grad)
        # The Newton decrement from the reduced gradient: gᵀΔ would cancel to rounding noise near
        # the optimum, and the iterate would never count as centred for small τ.
        decrement = ((grad - lam[..., None] - mu[:, :, None, :]) * direction).flatten(1).sum(1)
        lam, slack = problems.dual_point(lam, mu)
        self.upper = torch.minimum(self.upper, problems.dual_objective(lam, mu))
        centred = decrement <= self.tau * problems.n_vars  # at this τ, before a restart changes it
        # Where the certificate is not closing (this iterate's entropy could not count, as its
        # projection missed the marginals, or the gap is about to stall), try two more bounds.
        gap = self.upper - self.lower
        stalling = ~(gap < _PROGRESS * self.best_gap) & (self.since_improved + 1 >= _STALL_STEPS)
        stuck = (~feasible | stalling) & (gap > tol)
        if bool(stuck.any()):
            self._bound_on_face(stuck, slack)
            self._bound_by_refit(stuck, mu)
        self._track_progress(tol)
        if bool(self.done.all()):
            return True
        alpha, accept = self._step_length(direction, decrement, entropy)
        problems.q = torch.where(problems.support, problems.q + alpha[:, None, None, None] * direction, 0.0)
        # Once the barrier problem is solved to its own accuracy (or no ascent is left at this τ),
        # move along the central path. A step cut to nothing by the boundary means the iterate
        # left the path's neighbourhood: back off to a larger τ to re-centre.
        blocked = accept & (alpha < _BLOCKED_STEP) & ~self.done
        tau = torch.where((centred | ~accept) & ~self.done, (self.tau * _TAU_DECREASE).clamp_min(_TAU_MIN), self.tau)
        self.tau = torch.where(blocked, tau * _TAU_BACKOFF, tau)
        return False

    def _track_progress(self, tol: float) -> None:
        """Done when certified to ``tol``, or when the gap has stopped shrinking: near the optimum
        the Newton system loses digits (its entries span many decades) and the certificate
        levels off, typically around 1e-9 nats. A stall well above the usual floor
        (_RESTART_ABOVE) means the iterate lost the central path (its τ is too small for the
        digits left): it restarts from there with τ matched to the gap, a few times."""
        gap = self.upper - self.lower
        improved = gap < _PROGRESS * self.best_gap
        self.best_gap = torch.where(improved, gap, self.best_gap)
        self.since_improved = torch.where(improved, 0, self.since_improved + 1)
        stalled = self.since_improved >= _STALL_STEPS
        restart = stalled & (gap > _RESTART_ABOVE) & (self.restarts < _RESTARTS)
        self.tau = torch.where(restart, gap / self.problems.n_vars.clamp_min(1), self.tau)
        self.restarts = self.restarts + restart.long()
        self.since_improved = torch.where(restart, 0, self.since_improved)
        self.done = (gap <= tol) | (stalled & ~restart)

    def _bound_on_face(self, which: Tensor, slack: Tensor) -> None:
        """Raise ``lower`` where ``which`` (m,) by the entropy of a feasible point on the face of
        Δ_P where the optimum appears to lie; ``slack`` (m, T, S) from :meth:`_Newton.dual_point`.

        At the optimum a (t, s) block either holds no mass or has no slack in its dual
        constraint (complementary slackness). When whole blocks are empty at the optimum (as in
        the ``not_two`` and ``erase`` gates, where Uni = 0), the iterate empties them only as fast
        as τ falls, its entropy trails the optimum by a term linear in the mass they still hold,
        and near the face the Newton system (whose constraint rows there become nearly
        dependent) loses the digits that keep Q feasible: the lower bound stops improving a few
        orders of magnitude above ``tol``. The face is read off the iterate and the dual: blocks
        whose mass is below their slack are taken as empty. Emptying them and fitting the
        marginals on the rest (:func:`_fit_marginals` keeps zeros) gives a point whose entropy is
        within O(‖Q − Q*‖²) of the optimum when the face is right, as Q* is then a stationary point
        of H on it. A wrong guess costs only the fit: the point counts only if it is feasible, and
        then its entropy is a valid lower bound whatever the face."""
        problems, q = self.problems, self.problems.q[which]
        kept = problems.support[which] & (q.sum(1) >= slack[which])[:, None]  # (k, Y, T, S)
        p_yt, p_ys = problems.p_yt[which], problems.p_ys[which]
        point, error = _fit_marginals(torch.where(kept, q, 0.0), p_yt, p_ys)
        feasible = error <= _FEASIBLE
        lower = self.lower[which]
        self.lower[which] = torch.where(feasible, torch.maximum(lower, _conditional_entropy(point)), lower)

    def _bound_by_refit(self, which: Tensor, mu: Tensor) -> None:
        """Lower ``upper`` where ``which`` (m,) by the dual objective at multipliers refit to the
        iterate: λ_yt = Σ_s Q(y,t,s) (−log Q(y|t,s) − μ_ys) / Q(y,t), the λ that makes
        λ + μ = −log Q(y|t,s) on average over s (exactly, at the optimum, on blocks with mass).

        Newton's multipliers of constraint rows whose mass is negligible next to the rest
        (entries spanning hundreds of decades) are all but undetermined, as those rows barely
        enter the system, and one λ_yt far too small inflates the shift that makes its whole t
        dual-feasible: the upper bound then stalls, even where Δ_P is a single point (a source
        with one value) and Q is exact. The refit λ, made feasible the same way
        (:meth:`_Newton.dual_point`), gives a valid bound too."""
        problems = self.problems
        q, support = problems.q, problems.support
        held = support & (q > 0)
        neg_log = -torch.log(torch.where(held, q, 1.0) / q.sum(1, keepdim=True).clamp_min(_TINY))  # −log Q(y|t,s)
        weighted = torch.where(held, (neg_log - mu[:, :, None, :]) * q, 0.0)
        lam = weighted.sum(3) / torch.where(held, q, 0.0).sum(3).clamp_min(_TINY)  # (m, Y, T); 0 on rows without mass
        lam, _ = problems.dual_point(lam, mu)
        bound = problems.dual_objective(lam, mu)
        usable = which & torch.isfinite(bound)
        self.upper = torch.where(usable, torch.minimum(self.upper, bound), self.upper)

    def _step_length(self, direction: Tensor, decrement: Tensor, entropy: Tensor) -> tuple[Tensor, Tensor]:
        """Step lengths α (m,) along ``direction`` and whether each found ascent: the largest step
        keeping the support positive (a fraction _TO_BOUNDARY of the way to the boundary), then
        halved until the barrier objective rises enough (Armijo). α = 0 where done or where no
        ascent was found (a rounding-level direction)."""
        problems, q = self.problems, self.problems.q
        ratio = torch.where(direction < 0, -q / torch.where(direction < 0, direction, -1.0), math.inf)
        alpha = torch.where(self.done, 0.0, (_TO_BOUNDARY * ratio.flatten(1).amin(1)).clamp(max=1.0))
        current = problems.barrier_objective(q, self.tau, entropy)
        for _ in range(_BACKTRACKS):
            trial = q + alpha[:, None, None, None] * direction
            required = current + _ARMIJO * alpha * decrement - _ARMIJO_ROUNDING * current.abs()
            accept = problems.barrier_objective(trial, self.tau) >= required
            if bool(accept.all()):
                break
            alpha = torch.where(accept, alpha, alpha / 2)
        return torch.where(accept, alpha, 0.0), accept


def broja_batch(p, *, tol: float = 1e-8, max_iter: int = 200) -> PID:
    """BROJA PID of a batch of distributions.

    Args:
        p: (n, |Y|, |T|, |S|) probabilities (any real dtype, CPU or GPU): target first, then the
            two sources; each distribution non-negative and summing to 1.
        tol: stop a distribution once its duality gap is at most ``tol`` nats (1e-8 nats is
            1.44e-8 bits).
        max_iter: most Newton steps.

    Returns:
        :class:`PID` of (n,) float64 tensors on ``p``'s device, in bits. Every atom is within
        its distribution's ``gap`` of the exact value, whether or not ``tol`` was reached.

    Warns:
        RuntimeWarning: once per call when some distributions stop with a gap above ``tol``
        (``max_iter`` reached, or the certificate stalled: entries spanning hundreds of
        decades, or a ``tol`` near the float64 floor), with their number and largest gap.
    """
    _check_options(tol, max_iter)
    return _solve(check_distribution(p, batched=True), tol, max_iter)


def broja(p, *, tol: float = 1e-8, max_iter: int = 200) -> PID:
    """BROJA PID of one distribution ``p`` of shape (|Y|, |T|, |S|) (target first); floats, bits.
    ``tol``, ``max_iter`` and the warning as in :func:`broja_batch`."""
    _check_options(tol, max_iter)
    return _solve(check_distribution(p)[None], tol, max_iter).item(0)


def _check_options(tol: float, max_iter: int) -> None:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf:
        raise ValueError(f"tol must be a positive number of nats; got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}")


def _bounds(p: Tensor, tol: float, max_iter: int, start: _Start) -> tuple[Tensor, Tensor, Tensor, int]:
    """The Newton steps of :func:`_solve` on the batch ``p`` (n, Y, T, S): certified bounds on
    max H_Q(Y|T,S) (``lower``, ``upper``, (n,) nats), each distribution's Newton steps (n,) and the
    batch's."""
    transposed = p.shape[3] > p.shape[2]
    batch = _Batch.start(_Newton(p.transpose(2, 3) if transposed else p), start)
    # Filled in as distributions leave the batch.
    lower = torch.full((batch.problems.n,), -math.inf, dtype=p.dtype, device=p.device)
    upper = torch.full_like(lower, math.inf)
    steps = torch.zeros(len(lower), dtype=torch.long, device=p.device)
    iterations = 0
    while iterations < max_iter:
        if batch.worth_compacting():
            batch.record(lower, upper, steps)
            batch = batch.without_finished()
        iterations += 1
        if batch.step(tol):
            break
    batch.record(lower, upper, steps)
    return lower, upper, steps, iterations


def _solve(p: Tensor, tol: float, max_iter: int, start: _Start = _SCALED_START) -> PID:
    """:func:`broja_batch` on an already checked float64 batch, from ``start``.

    On the CPU the batch is split into one chunk per torch thread, each solved on a Python
    thread of its own with one torch thread (torch releases the GIL inside its ops): both cores
    stay busy without OpenMP, whose threads spin at every barrier of a parallel region and stall
    whenever a competing process holds a core (:func:`_one_thread`). A distribution's answer does
    not depend on the batch it is solved in, so chunking does not change it."""
    chunks = torch.tensor_split(p, min(torch.get_num_threads(), len(p))) if p.device.type == "cpu" else (p,)
    if len(chunks) == 1:
        lower, upper, steps, iterations = _bounds(p, tol, max_iter, start)
    else:
        with _one_thread(p.device), ThreadPoolExecutor(len(chunks)) as pool:
            parts = list(pool.map(lambda chunk: _bounds(chunk, tol, max_iter, start), chunks))
        lower, upper, steps = (torch.cat(part) for part in list(zip(*parts))[:3])
        iterations = max(part[3] for part in parts)
    gap = upper - lower  # nats
    missed = gap > tol
    if bool(missed.any()):
        warnings.warn(
            f"BROJA: {int(missed.sum())} of {len(missed)} distributions stopped above tol = {tol:.3g} nats, "
            f"the largest gap {float(gap.max()) / LN2:.3g} bits (after {iterations} Newton steps); "
            "every atom is still within its distribution's `gap`",
            RuntimeWarning,
            stacklevel=3,
        )
    h_y, mi_t, mi_s, mi_ts = mutual_informations(p)
    mi_q = h_y - lower  # min over Δ_P of I_Q(Y;T,S)
    bits = lambda v: v / LN2  # noqa: E731
    return PID(
        red=bits(mi_t + mi_s - mi_q),
        uni_t=bits(mi_q - mi_s),
        uni_s=bits(mi_q - mi_t),
        syn=bits(mi_ts - mi_q),
        mi_t=bits(mi_t),
        mi_s=bits(mi_s),
        mi_ts=bits(mi_ts),
        gap=bits(gap.clamp_min(0)),
        iterations=iterations,
        steps=steps,
    )
