"""The slow, independent reference for the PID solver: one distribution at a time, by cvxpy.

Used by the tests (tests/test_pid.py) and the PID benchmark (benchmarks/pid_benchmark.py); needs
cvxpy (the ``dev`` extra). Not part of rid_fast's API.
"""

from __future__ import annotations

from rid_fast.pid import check_distribution

__all__ = ["max_conditional_entropy"]


def max_conditional_entropy(p) -> float:
    """max over Δ_P of H_Q(Y|T,S), in nats, of one distribution (|Y|, |T|, |S|) by a general
    convex solver: cvxpy's relative-entropy program (exponential cone, Clarabel), one
    distribution at a time — the slow reference the tests and the benchmark compare against.
    Needs cvxpy (the ``dev`` extra)."""
    import cvxpy as cp

    p = check_distribution(p).numpy()
    n_y, n_t, n_s = p.shape
    q = [cp.Variable((n_t, n_s), nonneg=True) for _ in range(n_y)]
    constraints = []
    for y in range(n_y):
        constraints += [cp.sum(q[y], axis=1) == p[y].sum(1), cp.sum(q[y], axis=0) == p[y].sum(0)]
    q_ts = sum(q)
    problem = cp.Problem(cp.Minimize(sum(cp.sum(cp.rel_entr(q[y], q_ts)) for y in range(n_y))), constraints)
    problem.solve(solver="CLARABEL")
    return -problem.value
