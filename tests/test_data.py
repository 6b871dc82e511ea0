import numpy as np
import pytest
import torch

from rid_fast.train.data import CIFAR10_MEAN, load_cifar10, load_dataset, split


def test_digits_is_embedded_and_split_is_stratified_and_seeded():
    data = load_dataset("digits")
    assert data.x_train.shape[1:] == (64,) and data.num_classes == 10
    assert (
        len(data.x_train) + len(data.x_test) == 1797
        and 0.0 <= float(data.x_train.min()) <= float(data.x_train.max()) <= 1.0
    )
    parts = split(data.y_train, per_class=20, val_fraction=0.2, seed=3)
    assert len(parts.student) == 200
    assert torch.bincount(data.y_train[parts.student]).tolist() == [20] * 10
    assert not set(parts.student.tolist()) & set(parts.validation.tolist())
    assert set(parts.student.tolist()) <= set(parts.teacher.tolist())
    assert not set(parts.teacher.tolist()) & set(parts.validation.tolist())
    again = split(data.y_train, per_class=20, val_fraction=0.2, seed=3)
    assert torch.equal(parts.student, again.student)
    other = split(data.y_train, per_class=20, val_fraction=0.2, seed=4)
    assert not torch.equal(parts.student, other.student)


def test_split_errors():
    labels = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="per_class = 5 but class 0 has only 2"):
        split(labels, per_class=5, val_fraction=0.0, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        split(labels, per_class=1, val_fraction=1.0, seed=0)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="data.name must be one of"):
        load_dataset("imagenet")


def test_cifar10_from_a_generated_python_archive(tmp_path, cifar_archive):
    batches = cifar_archive
    data = load_cifar10(str(tmp_path))  # the parent folder works too
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert data.y_train.tolist() == [int(v) for _, labels in batches[:5] for v in labels]
    red = batches[0][0][0, 0].astype(np.float32) / 255.0
    torch.testing.assert_close(data.x_train[0, 0], torch.from_numpy((red - CIFAR10_MEAN[0]) / 0.2470))


def test_cifar10_errors(tmp_path):
    with pytest.raises(ValueError, match="data.data_dir must name"):
        load_cifar10(None)
    with pytest.raises(FileNotFoundError, match="missing data_batch_1"):
        load_cifar10(str(tmp_path))


def test_mnist1d_is_generated_locally():
    pytest.importorskip("mnist1d")
    data = load_dataset("mnist1d")
    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40) and data.num_classes == 10
