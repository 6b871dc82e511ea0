"""The RID paper's protocol for measuring the PID of continuous representations.

Representations are flattened, their rows L2-normalised, projected on a few principal axes and
clustered by k-means (:func:`discretize`, matching scikit-learn's PCA and k-means, seeded); the
empirical joint P(y, t_cluster, s_cluster) of the label and the two cluster labels is then solved
exactly by :func:`rid_fast.pid.broja` (:func:`measure`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rid_fast.ops.dispatch import describe_tensor
from rid_fast.pid.broja import PID, broja

__all__ = ["discretize", "joint_distribution", "measure"]


def _describe(x) -> str:
    return f"tensor of {describe_tensor(x)}" if isinstance(x, Tensor) else type(x).__name__


def _pca(x: Tensor, n_components: int) -> Tensor:
    """Scores of ``x`` (n, d) on its first ``n_components`` principal axes, with scikit-learn's
    sign convention (each axis's largest-magnitude loading is positive)."""
    centred = x - x.mean(0)
    n, d = centred.shape
    # The eigenvectors of the smaller of the two Gram matrices: (n, n) when features outnumber
    # samples (wide conv features), (d, d) otherwise — much cheaper than an SVD of x.
    if d > n:
        values, vectors = torch.linalg.eigh(centred @ centred.T)
        u = vectors[:, -n_components:].flip(1)  # (n, k) left singular vectors
        s = values[-n_components:].flip(0).clamp_min(0).sqrt()
        axes = (centred.T @ u / torch.where(s > 0, s, 1.0)).T  # (k, d) right singular vectors
    else:
        axes = torch.linalg.eigh(centred.T @ centred)[1][:, -n_components:].flip(1).T
    signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    return centred @ (axes * signs).T


def _kmeans_plus_plus(x: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding with greedy local trials (2 + log k candidates per centre, keep the one
    that lowers the potential most), as scikit-learn does."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centres = [x[torch.randint(n, (1,), generator=gen, device=x.device)]]
    closest = torch.cdist(x, centres[0]).square()[:, 0]
    for _ in range(1, k):
        weights = closest / closest.sum() if closest.sum() > 0 else torch.full_like(closest, 1.0 / n)
        candidates = torch.multinomial(weights, trials, replacement=True, generator=gen)
        distances = torch.minimum(closest[None], torch.cdist(x[candidates], x).square())  # (trials, n)
        best = distances.sum(1).argmin()
        centres.append(x[candidates[best]][None])
        closest = distances[best]
    return torch.cat(centres)


def _kmeans(x: Tensor, k: int, *, gen: torch.Generator, n_init: int, max_iter: int, tol: float) -> Tensor:
    """Lloyd's k-means, best of ``n_init`` k-means++ starts by inertia; returns labels (n,)."""
    threshold = tol * x.var(0).mean()  # scikit-learn's tolerance: relative to the data's variance
    best_labels, best_inertia = None, math.inf
    for _ in range(n_init):
        centres = _kmeans_plus_plus(x, k, gen)
        for _ in range(max_iter):
            labels = torch.cdist(x, centres).argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).to(x.dtype)[:, None]
            moved = torch.where(counts > 0, sums / counts.clamp_min(1), centres)  # empty clusters stay
            shift = (moved - centres).square().sum()
            centres = moved
            if shift <= threshold:
                break
        labels = torch.cdist(x, centres).argmin(1)
        inertia = float((x - centres[labels]).square().sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    return best_labels


def discretize(
    x: Tensor,
    n_components: int = 5,
    n_clusters: int = 10,
    *,
    seed: int = 0,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> Tensor:
    """Cluster labels of representations, the paper's way: flatten, L2-normalise rows, project
    on the first ``n_components`` principal axes, k-means into ``n_clusters`` clusters.

    Args:
        x: (n, ...) representations (any float dtype, CPU or GPU; computed in float64).
        seed: seeds the k-means++ starts (results are reproducible for a seed).

    Returns:
        (n,) int64 cluster labels on ``x``'s device.
    """
    return _discretize(x, "x", n_components, n_clusters, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol)


def _discretize(x: Tensor, name: str, n_components: int, n_clusters: int, *, seed, n_init, max_iter, tol) -> Tensor:
    """:func:`discretize`, its errors naming ``x`` as ``name``."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty floating-point tensor (n, ...); got {_describe(x)}")
    if not 1 <= n_clusters <= x.shape[0]:
        raise ValueError(f"n_clusters must be in [1, n = {x.shape[0]}]; got {n_clusters}")
    flat = x.detach().flatten(1).to(torch.float64)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError(f"{name} must be finite; it holds NaN or Inf")
    if not 1 <= n_components <= min(flat.shape):
        raise ValueError(f"n_components must be in [1, min(n, features) = {min(flat.shape)}]; got {n_components}")
    flat = torch.nn.functional.normalize(flat, dim=1)
    scores = _pca(flat, n_components)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return _kmeans(scores, n_clusters, gen=gen, n_init=n_init, max_iter=max_iter, tol=tol)


def joint_distribution(labels: Tensor, t: Tensor, s: Tensor, n_labels: int, n_t: int, n_s: int) -> Tensor:
    """Empirical P(y, t, s) (float64, shape (n_labels, n_t, n_s)) of three label vectors (n,)."""
    index = (labels * n_t + t) * n_s + s
    counts = torch.bincount(index, minlength=n_labels * n_t * n_s).to(torch.float64)
    return (counts / counts.sum()).reshape(n_labels, n_t, n_s)


def measure(
    teacher_reps: Tensor,
    student_reps: Tensor,
    labels: Tensor,
    *,
    n_components: int = 5,
    n_clusters: int = 10,
    num_classes: int | None = None,
    seed: int = 0,
    tol: float = 1e-6,
) -> PID:
    """PID of the label with one teacher layer and one student layer, the paper's protocol:
    discretise each representation (:func:`discretize`), form the empirical joint
    P(y, t_cluster, s_cluster) over the samples, and solve BROJA.

    Args:
        teacher_reps, student_reps: (n, ...) representations of the same n held-out inputs.
        labels: (n,) int64 class labels.
        num_classes: size of the label axis (default: max label + 1).
        tol: the solver's tolerance in nats (:func:`~rid_fast.pid.broja.broja`). The default,
            1e-6 nats (1.4e-6 bits), lies far below the sampling error of plug-in estimates from
            a test set (hundredths of a bit at a few hundred samples), so tightening it changes
            nothing a measurement can show; every atom is still within the result's ``gap``.

    Returns:
        :class:`PID` in bits; ``red`` is what the student shares with the teacher about the label,
        ``uni_t`` what the teacher still knows that the student does not.
    """
    if labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be a 1-D integer tensor; got {_describe(labels)}")
    n = labels.shape[0]
    for name, reps in (("teacher_reps", teacher_reps), ("student_reps", student_reps)):
        if not isinstance(reps, Tensor) or reps.dim() < 2 or reps.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n}, ...) to match labels; got {_describe(reps)}")
    if n and int(labels.min()) < 0:
        raise ValueError(f"labels must be class indices ≥ 0; got {int(labels.min())}")
    if num_classes is not None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be an int ≥ 1 (or None: max label + 1); got {num_classes!r}")
        if n and int(labels.max()) >= num_classes:
            raise ValueError(f"labels must be below num_classes = {num_classes}; got {int(labels.max())}")
    options = {"seed": seed, "n_init": 10, "max_iter": 300, "tol": 1e-4}
    t = _discretize(teacher_reps, "teacher_reps", n_components, n_clusters, **options)
    s = _discretize(student_reps, "student_reps", n_components, n_clusters, **options)
    labels = labels.to(t.device, torch.int64)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    return broja(joint_distribution(labels, t, s, num_classes, n_clusters, n_clusters), tol=tol)
