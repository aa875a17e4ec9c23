"""Datasets: digits (embedded), class-balanced subsets, clear errors for missing files, CIFAR-10 JPEG copy,
content fingerprints and location-free cache specs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import bench.data.datasets
from bench.core.components import ImageSet
from bench.core.registry import ConfigError
from bench.data.datasets import CIFAR10_JPEG_ENV, DATA_ROOT_ENV, DATASETS, balanced_subset, data_root, fingerprint
from conftest import cifar10_jpeg_path, requires_cifar10_jpeg


@pytest.fixture(scope="module")
def digits_default():
    return DATASETS.create("digits").load()


def per_class(data: ImageSet) -> list[int]:
    return torch.bincount(data.labels, minlength=data.num_classes).tolist()


def rows(images: torch.Tensor) -> list[bytes]:
    return sorted(image.numpy().tobytes() for image in images)


# ------------------------------------------------------------------ digits


def test_digits_shapes_and_types(digits_default):
    train, test = digits_default
    for data in (train, test):
        assert data.images.dtype == torch.uint8 and data.labels.dtype == torch.int64
        assert tuple(data.images.shape[1:]) == (1, 16, 16) and data.num_classes == 10
        assert data.channels == 1 and data.size == 16
        assert set(data.labels.tolist()) == set(range(10))
    assert len(train) + len(test) == 1797


def test_digits_stratified_split(digits_default):
    """Each class keeps round(n_c · 0.2) images for testing, the rest for training."""
    train, test = digits_default
    totals = np.bincount(load_digits().target, minlength=10)
    expected_test = [round(n * 0.2) for n in totals]
    assert per_class(test) == expected_test
    assert per_class(train) == [int(n) - t for n, t in zip(totals, expected_test)]
    assert min(per_class(test)) > 0 and min(per_class(train)) > 0


def test_digits_uses_the_full_range(digits_default):
    train, _ = digits_default
    assert train.images.min().item() == 0 and train.images.max().item() == 255


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_digits_test_fraction(fraction):
    train, test = DATASETS.create("digits", test_fraction=fraction).load()
    totals = np.bincount(load_digits().target, minlength=10)
    assert per_class(test) == [round(n * fraction) for n in totals]
    assert len(train) + len(test) == 1797


def test_digits_size_8_is_the_original_scaled_and_split_is_a_partition():
    """At 8×8 the pixels are round(v / 16 · 255); train and test together are every image exactly once."""
    train, test = DATASETS.create("digits", size=8).load()
    assert tuple(train.images.shape[1:]) == (1, 8, 8) and tuple(test.images.shape[1:]) == (1, 8, 8)
    bunch = load_digits()
    original = torch.from_numpy(np.round(bunch.images / 16 * 255).astype(np.uint8))[:, None]
    assert rows(torch.cat([train.images, test.images])) == rows(original)
    # labels travel with their images
    pairs = sorted(zip((im.numpy().tobytes() for im in original), bunch.target.tolist()))
    ours = sorted(zip((im.numpy().tobytes() for im in torch.cat([train.images, test.images])),
                      torch.cat([train.labels, test.labels]).tolist()))
    assert ours == pairs


@pytest.mark.parametrize("size", [4, 12, 32])
def test_digits_other_sizes(size):
    train, test = DATASETS.create("digits", size=size, per_class=2, test_per_class=1).load()
    assert tuple(train.images.shape) == (20, 1, size, size) and tuple(test.images.shape) == (10, 1, size, size)


def test_digits_deterministic(digits_default):
    again = DATASETS.create("digits").load()
    for first, second in zip(digits_default, again):
        assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


@pytest.mark.parametrize("train_n, test_n", [(5, None), (5, 3), (1, 1), (None, 2)])
def test_digits_per_class(train_n, test_n, digits_default):
    """n images of each class; None (unset) keeps every image."""
    train, test = DATASETS.create("digits", per_class=train_n, test_per_class=test_n).load()
    full_train, full_test = digits_default
    assert per_class(train) == ([train_n] * 10 if train_n else per_class(full_train))
    assert per_class(test) == ([test_n] * 10 if test_n else per_class(full_test))
    assert torch.equal(train.images, balanced_subset(full_train, train_n).images)


# ------------------------------------------------------------------ balanced_subset


def toy(labels: list[int], classes: int = 3) -> ImageSet:
    """Image i is filled with the value i, so the kept order is visible."""
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageSet(images, torch.tensor(labels), classes)


@pytest.mark.parametrize("labels, n, kept", [
    ([2, 0, 1, 0, 2, 1, 0], 1, [0, 1, 2]),
    ([2, 0, 1, 0, 2, 1, 0], 2, [0, 1, 2, 3, 4, 5]),
    ([2, 0, 1, 0, 2, 1, 0], 3, [0, 1, 2, 3, 4, 5, 6]),
    ([0, 0, 0, 1, 1, 1, 2], 2, [0, 1, 3, 4, 6]),
    ([1, 1, 0, 0, 2, 2], 1, [0, 2, 4]),
])
def test_balanced_subset_keeps_first_per_class_in_dataset_order(labels, n, kept):
    data = toy(labels)
    subset = balanced_subset(data, n)
    assert subset.images[:, 0, 0, 0].tolist() == kept
    assert subset.labels.tolist() == [labels[i] for i in kept]
    assert subset.num_classes == data.num_classes


def test_balanced_subset_none_keeps_everything_and_zero_is_rejected():
    data = toy([2, 0, 1])
    assert balanced_subset(data, None) is data
    for n in (0, -1):
        with pytest.raises(ValueError, match="omit it to keep every image"):
            balanced_subset(data, n)


# ------------------------------------------------------------------ missing data


@pytest.mark.parametrize("name, file", [
    ("cifar10", "cifar-10-python.tar.gz"),
    ("cifar100", "cifar-100-python.tar.gz"),
    ("svhn", "train_32x32.mat"),
])
def test_torchvision_dataset_missing_without_download(tmp_path, name, file):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ConfigError) as info:
        DATASETS.create(name, root=str(folder), download=False).load()
    message = str(info.value)
    assert file in message and str(folder) in message and name in message
    assert list(folder.iterdir()) == [], "nothing may be downloaded or written"


def test_cifar10_jpeg_explicit_missing_path(tmp_path, monkeypatch):
    """An explicit path that is not a file is an error naming it (no silent fallback to other copies)."""
    monkeypatch.delenv(CIFAR10_JPEG_ENV, raising=False)
    missing = tmp_path / "nowhere" / "cifar10_jpeg75.npz"
    with pytest.raises(ConfigError) as info:
        DATASETS.create("cifar10-jpeg", path=str(missing), per_class=1).load()
    assert str(missing) in str(info.value)


def test_cifar10_jpeg_not_found_names_env_var_and_places(tmp_path, monkeypatch):
    monkeypatch.delenv(CIFAR10_JPEG_ENV, raising=False)
    empty = tmp_path / "data"
    empty.mkdir()
    monkeypatch.setenv(DATA_ROOT_ENV, str(empty))
    monkeypatch.setattr(bench.data.datasets, "REPO_ROOT", tmp_path / "repo")
    with pytest.raises(ConfigError) as info:
        DATASETS.create("cifar10-jpeg", per_class=1).load()
    message = str(info.value)
    assert f"${CIFAR10_JPEG_ENV}" in message and "cifar10_jpeg75.npz" in message
    assert str(empty / "cifar10_jpeg75.npz") in message
    assert str(tmp_path / "shared" / "data" / "cifar10_jpeg75.npz") in message


def test_cifar10_jpeg_env_var_pointing_nowhere(tmp_path, monkeypatch):
    monkeypatch.setenv(CIFAR10_JPEG_ENV, str(tmp_path / "absent.npz"))
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    monkeypatch.setattr(bench.data.datasets, "REPO_ROOT", tmp_path / "repo")
    with pytest.raises(ConfigError) as info:
        DATASETS.create("cifar10-jpeg").load()
    assert str(tmp_path / "absent.npz") in str(info.value)


def test_tests_find_the_copy_as_the_dataset_does(tmp_path, monkeypatch):
    """tests/conftest.py's cifar10_jpeg_path follows Cifar10Jpeg's search: the env var first, then the data root."""
    monkeypatch.setattr(bench.data.datasets, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "root"))
    monkeypatch.delenv(CIFAR10_JPEG_ENV, raising=False)
    assert cifar10_jpeg_path() is None
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "cifar10_jpeg75.npz").touch()
    assert cifar10_jpeg_path() == tmp_path / "root" / "cifar10_jpeg75.npz"
    (tmp_path / "elsewhere.npz").touch()
    monkeypatch.setenv(CIFAR10_JPEG_ENV, str(tmp_path / "elsewhere.npz"))
    assert cifar10_jpeg_path() == tmp_path / "elsewhere.npz"


def test_data_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env"))
    assert data_root(str(tmp_path / "given")) == tmp_path / "given"
    assert data_root("") == tmp_path / "env"
    monkeypatch.delenv(DATA_ROOT_ENV)
    assert data_root("") == Path.home() / ".cache" / "bench" / "data"


@pytest.mark.parametrize("name, a, b", [
    ("cifar10", {"root": "/a"}, {"root": "/b", "download": False}),
    ("svhn", {"root": "/a"}, {"root": "/b"}),
    ("cifar10-jpeg", {"path": "/x/c.npz"}, {"root": "/y"}),
])
def test_location_fields_are_not_in_the_spec(name, a, b):
    first, second = DATASETS.create(name, **a).spec(), DATASETS.create(name, **b).spec()
    assert first == second
    assert set(first["params"]) == {"per_class", "test_per_class"}


def test_content_fields_are_in_the_spec():
    assert DATASETS.create("digits", size=8).spec() != DATASETS.create("digits").spec()
    assert DATASETS.create("cifar10", per_class=5).spec() != DATASETS.create("cifar10").spec()


# ------------------------------------------------------------------ cifar10-jpeg (development copy)


@requires_cifar10_jpeg
def test_cifar10_jpeg_balanced_subset():
    train, test = DATASETS.create("cifar10-jpeg", path=str(cifar10_jpeg_path()), per_class=10, test_per_class=5).load()
    assert tuple(train.images.shape) == (100, 3, 32, 32) and tuple(test.images.shape) == (50, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert per_class(train) == [10] * 10 and per_class(test) == [5] * 10
    assert train.num_classes == test.num_classes == 10


@requires_cifar10_jpeg
def test_cifar10_jpeg_matches_independent_decoding(tmp_path, monkeypatch):
    """Found through the env var; the first image of each class decodes as Pillow decodes it."""
    path = cifar10_jpeg_path()
    monkeypatch.setenv(CIFAR10_JPEG_ENV, str(path))
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    monkeypatch.setattr(bench.data.datasets, "REPO_ROOT", tmp_path / "repo")  # only the env var can find it
    train, _ = DATASETS.create("cifar10-jpeg", per_class=1, test_per_class=1).load()
    arrays = np.load(path)
    labels, blob, offsets = arrays["train_labels"], arrays["train_jpeg"], arrays["train_offsets"]
    firsts = sorted(int(np.flatnonzero(labels == c)[0]) for c in range(10))
    assert train.labels.tolist() == [int(labels[i]) for i in firsts]
    for image, i in zip(train.images, firsts):
        decoded = np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
        assert torch.equal(image, torch.from_numpy(decoded.copy()).permute(2, 0, 1))


@requires_cifar10_jpeg
def test_cifar10_jpeg_found_in_data_root(tmp_path, monkeypatch):
    monkeypatch.delenv(CIFAR10_JPEG_ENV, raising=False)
    (tmp_path / "cifar10_jpeg75.npz").symlink_to(cifar10_jpeg_path())
    monkeypatch.setattr(bench.data.datasets, "REPO_ROOT", tmp_path / "repo")
    train, test = DATASETS.create("cifar10-jpeg", root=str(tmp_path), per_class=1, test_per_class=1).load()
    assert len(train) == 10 and len(test) == 10


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_changes_with_one_pixel(digits_default):
    train, test = digits_default
    reference = fingerprint(train, test)
    assert fingerprint(ImageSet(train.images.clone(), train.labels.clone(), 10), test) == reference
    changed = train.images.clone()
    changed[7, 0, 3, 5] ^= 1
    assert fingerprint(ImageSet(changed, train.labels, 10), test) != reference


def test_fingerprint_changes_with_one_label(digits_default):
    train, test = digits_default
    labels = train.labels.clone()
    labels[0] = (labels[0] + 1) % 10
    assert fingerprint(ImageSet(train.images, labels, 10), test) != fingerprint(train, test)


def test_fingerprint_depends_on_shape_and_order():
    data = toy([0, 1, 2, 0])
    reshaped = ImageSet(data.images.reshape(4, 1, 1, 4), data.labels, 3)
    assert fingerprint(reshaped) != fingerprint(data)
    other = toy([0, 1])
    assert fingerprint(data, other) != fingerprint(other, data)
