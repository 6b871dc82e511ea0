"""Offline datasets: nothing here downloads.

* ``digits``  — scikit-learn's 8×8 handwritten digits (1797 images, embedded in scikit-learn);
* ``mnist1d`` — the ``mnist1d`` package's ``make_dataset`` (generated locally);
* ``cifar10`` — a user's CIFAR-10 in its standard python archive (``cifar-10-batches-py``),
  read with pickle, no torchvision;
* :func:`correlated_gaussians` — pairs with analytic mutual information, for checking estimators.

A :class:`Dataset` holds fixed train/test tensors; :func:`split` draws the seeded student subset
(``per_class`` images per class) and a validation split from the training set, so that one seed
fixes the same subset for every method.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Dataset",
    "Split",
    "DATASETS",
    "load_dataset",
    "load_digits",
    "load_mnist1d",
    "load_cifar10",
    "split",
    "correlated_gaussians",
    "gaussian_mutual_information",
]


@dataclass
class Dataset:
    """Train and test tensors; inputs float32, labels int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass
class Split:
    """Index sets into ``Dataset.x_train``: the student's training subset and the validation set
    (disjoint); ``teacher`` is every training index not in validation."""

    student: torch.Tensor
    validation: torch.Tensor
    teacher: torch.Tensor


def _stratified_test_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(y))
    train, test = train_test_split(indices, test_size=test_fraction, stratify=y, random_state=seed)
    return np.sort(train), np.sort(test)


def load_digits(data_dir: str | None = None) -> Dataset:
    """scikit-learn's digits: 64 pixel values scaled to [0, 1]; a fixed stratified 30 % test split."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = bunch.data.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    train, test = _stratified_test_split(y, 0.3, seed=0)
    return Dataset(
        "digits",
        torch.from_numpy(x[train]),
        torch.from_numpy(y[train]),
        torch.from_numpy(x[test]),
        torch.from_numpy(y[test]),
        10,
    )


def load_mnist1d(data_dir: str | None = None) -> Dataset:
    """MNIST-1D (Greydanus 2020) from ``mnist1d.data.make_dataset`` with its default arguments:
    4000 training and 1000 test sequences of length 40."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    as_x = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    as_y = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    return Dataset("mnist1d", as_x(data["x"]), as_y(data["y"]), as_x(data["x_test"]), as_y(data["y_test"]), 10)


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar10(data_dir: str | None) -> Dataset:
    """CIFAR-10 from ``data_dir`` (the ``cifar-10-batches-py`` folder, or its parent): five
    training batches and the test batch, normalised per channel. Nothing is downloaded."""
    if not data_dir:
        raise ValueError("data.data_dir must name the folder holding cifar-10-batches-py (nothing is downloaded)")
    root = Path(data_dir)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    expected = [root / f"data_batch_{i}" for i in range(1, 6)] + [root / "test_batch"]
    missing = [p.name for p in expected if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{root} is not a CIFAR-10 python archive: missing {', '.join(missing)}")
    train = [_read_cifar_batch(p) for p in expected[:5]]
    x_test, y_test = _read_cifar_batch(expected[5])
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    normalise = lambda a: (torch.from_numpy(a).float() / 255.0 - mean) / std  # noqa: E731
    x_train = np.concatenate([images for images, _ in train])
    y_train = np.concatenate([labels for _, labels in train])
    return Dataset(
        "cifar10", normalise(x_train), torch.from_numpy(y_train), normalise(x_test), torch.from_numpy(y_test), 10
    )


#: Name → loader(data_dir).
DATASETS = {"digits": load_digits, "mnist1d": load_mnist1d, "cifar10": load_cifar10}


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
    if name not in DATASETS:
        raise ValueError(f"data.name must be one of {', '.join(map(repr, DATASETS))}; got {name!r}")
    return DATASETS[name](data_dir)


def split(labels: torch.Tensor, *, per_class: int | None, val_fraction: float, seed: int) -> Split:
    """Seeded split of the training indices: a stratified validation set (``val_fraction``), and
    from the rest a student subset of ``per_class`` images per class (all of them if None)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1); got {val_fraction}")
    gen = torch.Generator().manual_seed(seed)
    validation, student, teacher = [], [], []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        n_val = int(round(val_fraction * len(members)))
        validation.append(members[:n_val])
        rest = members[n_val:]
        teacher.append(rest)
        if per_class is not None and per_class > len(rest):
            raise ValueError(f"data.per_class = {per_class} but class {cls} has only {len(rest)} training images")
        student.append(rest if per_class is None else rest[:per_class])
    cat = lambda parts: torch.sort(torch.cat(parts)).values  # noqa: E731
    return Split(student=cat(student), validation=cat(validation), teacher=cat(teacher))


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
