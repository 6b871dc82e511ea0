import os
import pickle

import numpy as np
import pytest
import torch

from rid_fast.ops import streaming


def pytest_configure(config):
    """Under pytest-xdist (``make test`` starts a worker per core) each worker takes its share of
    the cores for torch's intra-op threads: every worker using every core would oversubscribe them,
    and OpenMP's idle threads spin (batched LAPACK calls ran 4x slower). Tests that need several
    threads set them themselves."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


@pytest.fixture
def small_tiles(monkeypatch):
    """Stream in 16 × 32 tiles (and strips of 16 × 32 fp64 scores) so that odd shapes span several
    tiles, ragged edges and diagonal offsets."""
    monkeypatch.setattr(streaming, "DEFAULT_BLOCK", (16, 32))
    monkeypatch.setattr(streaming, "STRIP_BYTES", 16 * 32 * 8)


@pytest.fixture
def cifar_archive(tmp_path):
    """A CIFAR-10 python archive in ``tmp_path/cifar-10-batches-py`` with 4 random images per
    batch file; returns the list of (images (4, 3, 32, 32) uint8, labels (4,)) per file, the five
    training batches first."""
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=4)
        with open(root / name, "wb") as handle:
            pickle.dump({b"data": images.reshape(len(images), -1), b"labels": list(labels)}, handle)
        batches.append((images, labels))
    return batches
