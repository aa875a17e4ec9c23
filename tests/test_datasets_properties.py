"""Properties of bench.data.datasets: the cost outline of a dataset, parameter checks that name the fix, class-balanced
and nested subsets, another dataset's images as material for a set, arrays as ImageSets, the digits data's fixed
content, and the CIFAR-10 JPEG copy read from a tiny stand-in in the copy's format (never the real copy)."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench.data.datasets
from bench.core.components import ImageSet
from bench.data.datasets import (
    CIFAR10_JPEG_ENV,
    DATA_ROOT_ENV,
    DATASETS,
    Outline,
    _outline,
    array_set,
    balanced_subset,
    fingerprint,
    nested_index,
    outline_of,
    train_images,
    train_images_like,
)

COPY = "cifar10_jpeg75.npz"


@pytest.fixture(scope="module")
def digits_train() -> ImageSet:
    return DATASETS.create("digits").load()[0]


def toy(labels: list[int], classes: int = 3) -> ImageSet:
    """Image i is filled with the value i, so which images are kept, and in which order, is visible."""
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageSet(images, torch.tensor(labels), classes)


# ------------------------------------------------------------------ outline: cost estimate without loading


@pytest.mark.parametrize("side, work", [(16, 0.25), (32, 1.0), (64, 4.0), (65, (65 / 32) ** 2 / 16), (128, 1.0),
                                        (224, 49 / 16)])
def test_compute_grows_with_pixels_up_to_64_px_and_is_divided_by_16_above(side: int, work: float):
    """Training work per image relative to 32 px: ∝ pixels up to 64 px, ÷ 16 for the ImageNet stems above."""
    assert Outline(10, 100, side).compute() == pytest.approx(work)


def test_image_bytes_is_channels_times_pixels():
    assert Outline(10, 100, 8, 3).image_bytes() == 192
    assert Outline(10, 100, 32, 1).image_bytes() == 1024


def test_outlines_of_digits_and_of_the_default_cifar10_shape():
    """Digits: 10 classes, 1,438 train images at its size, greyscale; a dataset without its own: CIFAR-10's."""
    assert outline_of("digits", {"size": 8}) == Outline(10, 1_438, 8, 1)
    assert DATASETS.create("digits", size=24).outline() == Outline(10, 1_438, 24, 1)
    assert DATASETS.create("cifar10-jpeg").outline() == Outline(10, 50_000, 32, 3)
    assert outline_of("no-such-dataset", {}) == Outline(10, 50_000)


def test_outline_of_takes_values_that_are_not_json():
    """A parameter such as a Path (a location) is written as its text, not an error."""
    assert outline_of("cifar10-jpeg", {"path": Path("/elsewhere") / COPY}) == Outline(10, 50_000, 32, 3)


def test_outline_of_is_computed_once_per_spec_whatever_the_key_order():
    _outline.cache_clear()
    assert outline_of("digits", {"size": 11, "test_fraction": 0.3}).side == 11
    assert outline_of("digits", {"test_fraction": 0.3, "size": 11}).side == 11
    assert _outline.cache_info().misses == 1 and _outline.cache_info().hits == 1


@pytest.mark.parametrize("params, crafted, expected", [
    ({}, False, 1_438),
    ({"per_class": 5}, False, 50),
    ({"per_class": 500}, False, 1_438),  # more than a class holds: every image
    ({"per_class": 5, "protect_per_class": 20}, False, 50),
    ({"per_class": 5, "protect_per_class": 20}, True, 200),
    ({"per_class": 5}, True, 50),  # nothing crafted beyond the train set
    ({}, True, 1_438),
])
def test_train_images_from_the_outline(params: dict, crafted: bool, expected: int):
    """per_class × classes, at most every image; crafted: protect_per_class where set."""
    assert train_images("digits", params, crafted=crafted) == expected


def test_train_images_counts_the_train_set_by_default():
    assert train_images("digits", {"per_class": 5, "protect_per_class": 20}) == 50
    assert train_images("cifar10-jpeg", {"per_class": 100}) == 1_000


# ------------------------------------------------------------------ parameter checks


@pytest.mark.parametrize("key", ["per_class", "test_per_class", "protect_per_class"])
def test_each_count_below_one_is_rejected_by_its_name(key: str):
    with pytest.raises(ValueError, match=f"{key} must be ≥ 1, got 0: omit it to keep every image"):
        DATASETS.create("digits", **{key: 0})


def test_balanced_subset_names_per_class():
    with pytest.raises(ValueError, match="^per_class must be ≥ 1, got -2"):
        balanced_subset(toy([0, 1, 2]), -2)


@pytest.mark.parametrize("per_class", [None, 8])
def test_protect_per_class_needs_a_per_class_at_most_it(per_class: int | None):
    with pytest.raises(ValueError, match=rf"protect_per_class = 5 needs per_class ≤ it \(got {per_class}\)"):
        DATASETS.create("digits", per_class=per_class, protect_per_class=5)


@pytest.mark.parametrize("per_class", [1, 5])
def test_protect_per_class_accepts_per_class_up_to_it(per_class: int):
    dataset = DATASETS.create("digits", per_class=per_class, protect_per_class=5)
    assert dataset.spec()["params"]["protect_per_class"] == 5
    assert "protect_per_class" not in DATASETS.create("digits", per_class=per_class).spec()["params"]


@pytest.mark.parametrize("params", [{"size": 3}, {"size": 257}, {"test_fraction": 0.0}, {"test_fraction": 1.0},
                                    {"test_fraction": 1.5}])
def test_digits_rejects_sizes_and_fractions_out_of_range(params: dict):
    with pytest.raises(ValueError, match=": digits needs 4 ≤ size ≤ 256 and 0 < test_fraction < 1$"):
        DATASETS.create("digits", **params)


@pytest.mark.parametrize("params", [{"size": 4}, {"size": 256}, {"test_fraction": 0.01}, {"test_fraction": 0.99}])
def test_digits_accepts_the_bounds(params: dict):
    DATASETS.create("digits", **params)


# ------------------------------------------------------------------ digits content


def test_digits_content_is_fixed():
    """The images, their stratified split and labels never change (recorded results stay comparable)."""
    assert fingerprint(*DATASETS.create("digits").load()) == "beb99a314b65f0966e65e16f2c8e58a1"


def test_digits_at_a_size_other_than_8_is_resized():
    train, test = DATASETS.create("digits", size=9, per_class=1, test_per_class=1).load()
    assert tuple(train.images.shape) == (10, 1, 9, 9) and tuple(test.images.shape) == (10, 1, 9, 9)


# ------------------------------------------------------------------ subsets


@pytest.mark.parametrize("n, kept", [(1, [4, 5, 6]), (2, [2, 3, 4, 5, 6]), (3, [0, 1, 2, 3, 4, 5, 6])])
def test_balanced_subset_last_keeps_the_last_per_class_in_dataset_order(n: int, kept: list[int]):
    labels = [0, 1, 0, 1, 2, 1, 0]
    subset = balanced_subset(toy(labels), n, last=True)
    assert subset.images[:, 0, 0, 0].tolist() == kept
    assert subset.labels.tolist() == [labels[i] for i in kept]


def test_nested_index_finds_the_smaller_sets_images_in_the_larger(digits_train: ImageSet):
    larger, smaller = balanced_subset(digits_train, 6), balanced_subset(digits_train, 3)
    index = nested_index(larger, smaller)
    assert index.dtype == torch.int64 and len(index) == 30
    assert torch.equal(larger.images[index], smaller.images) and torch.equal(larger.labels[index], smaller.labels)
    assert bool((index[1:] > index[:-1]).all())  # both in dataset order
    assert torch.equal(nested_index(smaller, smaller), torch.arange(30))


def test_nested_index_names_a_class_with_too_few_images(digits_train: ImageSet):
    with pytest.raises(RuntimeError, match="^class 0 has 3 train images but only 2 to protect$"):
        nested_index(balanced_subset(digits_train, 2), balanced_subset(digits_train, 3))


def test_nested_index_rejects_sets_that_are_not_nested(digits_train: ImageSet):
    with pytest.raises(RuntimeError, match=r"^the train set is not the first images of each class of the set its "
                                           r"protections were crafted on \(protect_per_class\): this dataset's "
                                           r"subsets are not nested$"):
        nested_index(balanced_subset(digits_train, 3, last=True), balanced_subset(digits_train, 3))


# ------------------------------------------------------------------ another dataset as material


def like(size: int, channels: int) -> ImageSet:
    return ImageSet(torch.zeros(2, channels, size, size, dtype=torch.uint8), torch.tensor([0, 1]), 2)


def test_train_images_like_takes_the_first_images_by_default(digits_train: ImageSet):
    images = train_images_like("digits", 2, like(16, 1))
    assert torch.equal(images, balanced_subset(digits_train, 2).images)


def test_train_images_like_last_takes_the_last_images(digits_train: ImageSet):
    images = train_images_like("digits", 2, like(16, 1), last=True)
    assert torch.equal(images, balanced_subset(digits_train, 2, last=True).images)


def test_train_images_like_resizes_as_pillow_does(digits_train: ImageSet):
    """Downsizing is antialiased: each image equals Pillow's bilinear resize of it."""
    images = train_images_like("digits", 2, like(4, 1))
    first = balanced_subset(digits_train, 2).images
    pillow = [np.asarray(Image.fromarray(image[0].numpy()).resize((4, 4), Image.BILINEAR)) for image in first]
    assert tuple(images.shape) == (20, 1, 4, 4)
    assert torch.equal(images[:, 0], torch.from_numpy(np.stack(pillow)))


def test_train_images_like_replicates_greyscale_for_a_colour_set():
    grey, colour = train_images_like("digits", 2, like(8, 1)), train_images_like("digits", 2, like(8, 3))
    assert tuple(colour.shape) == (20, 3, 8, 8) and colour.is_contiguous()
    assert all(torch.equal(colour[:, c], grey[:, 0]) for c in range(3))


def test_train_images_like_turns_colour_into_luma_for_a_greyscale_set(tmp_path: Path, monkeypatch):
    path = write_copy(tmp_path / COPY, TRAIN_LABELS, TEST_LABELS)
    monkeypatch.setenv(CIFAR10_JPEG_ENV, str(path))
    images = train_images_like("cifar10-jpeg", 1, like(8, 1))
    rgb = decoded(path, "train")[first_per_class(TRAIN_LABELS, 1)]
    luma = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in rgb]).astype(int)  # ITU-R 601 luma
    assert tuple(images.shape) == (10, 1, 8, 8)
    assert np.abs(images[:, 0].numpy().astype(int) - luma).max() <= 1


# ------------------------------------------------------------------ arrays as ImageSets


def test_array_set_greyscale_channels_last_and_first():
    pixels = np.arange(12, dtype=np.int64).reshape(2, 2, 3) * 20  # N×H×W, H ≠ W
    for channels_last in (True, False):
        data = array_set(pixels, [1, 0], 2, channels_last=channels_last)
        assert data.images.dtype == torch.uint8 and tuple(data.images.shape) == (2, 1, 2, 3)
        assert torch.equal(data.images[:, 0], torch.from_numpy(pixels).to(torch.uint8))
        assert data.labels.dtype == torch.int64 and data.labels.tolist() == [1, 0] and data.num_classes == 2


def test_array_set_colour_channels_last_becomes_n_c_h_w():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 3), dtype=np.uint8)  # N×H×W×C
    data = array_set(pixels, np.array([2, 1], dtype=np.uint8), 3)
    assert tuple(data.images.shape) == (2, 3, 3, 4) and data.images.is_contiguous()
    assert torch.equal(data.images, torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [2, 1]


# ------------------------------------------------------------------ CIFAR-10 JPEG copy (a tiny stand-in)


TRAIN_LABELS = [(7 * i) % 10 for i in range(30)]  # 3 a class, interleaved
TEST_LABELS = [(3 * i + 1) % 10 for i in range(20)]


def jpeg(seed: int, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format="JPEG", quality=75)
    return out.getvalue()


def write_copy(path: Path, train_labels: list[int], test_labels: list[int], mode: str = "RGB") -> Path:
    """An npz in the copy's format: per split the JPEG files concatenated, int64 offsets (n+1), uint8 labels."""
    arrays = {}
    for split, labels, seed in (("train", train_labels, 0), ("test", test_labels, 1000)):
        files = [jpeg(seed + i, mode) for i in range(len(labels))]
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(files), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def decoded(path: Path, split: str) -> np.ndarray:
    """Every image of a split as Pillow decodes it, N×H×W×C."""
    arrays = np.load(path)
    blob, offsets = arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"]
    return np.stack([np.asarray(Image.open(io.BytesIO(blob[a:b].tobytes())).convert("RGB"))
                     for a, b in itertools.pairwise(offsets)])


def first_per_class(labels: list[int], n: int) -> list[int]:
    return sorted(i for c in range(10) for i in [j for j, label in enumerate(labels) if label == c][:n])


@pytest.fixture
def copy(tmp_path: Path, monkeypatch) -> Path:
    """A stand-in copy, with no other copy findable (no env var, an empty data root, no ../shared)."""
    monkeypatch.delenv(CIFAR10_JPEG_ENV, raising=False)
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "empty-root"))
    monkeypatch.setattr(bench.data.datasets, "REPO_ROOT", tmp_path / "repo")
    return write_copy(tmp_path / "copy" / COPY, TRAIN_LABELS, TEST_LABELS)


def test_cifar10_jpeg_decodes_every_image_of_both_splits_in_order(copy: Path):
    train, test = DATASETS.create("cifar10-jpeg", path=str(copy)).load()
    for data, split, labels in ((train, "train", TRAIN_LABELS), (test, "test", TEST_LABELS)):
        assert data.num_classes == 10 and data.labels.dtype == torch.int64 and data.labels.tolist() == labels
        assert torch.equal(data.images, torch.from_numpy(decoded(copy, split)).permute(0, 3, 1, 2))


def test_cifar10_jpeg_decodes_the_first_images_of_each_class(copy: Path):
    train, test = DATASETS.create("cifar10-jpeg", path=str(copy), per_class=1, test_per_class=2).load()
    for data, split, labels, n in ((train, "train", TRAIN_LABELS, 1), (test, "test", TEST_LABELS, 2)):
        kept = first_per_class(labels, n)
        assert len(data) == 10 * n and data.labels.tolist() == [labels[i] for i in kept]
        assert torch.equal(data.images, torch.from_numpy(decoded(copy, split)[kept]).permute(0, 3, 1, 2))


def test_cifar10_jpeg_decodes_greyscale_files_as_rgb(copy: Path):
    """A greyscale JPEG in the copy still gives 3 equal channels: the set is RGB whatever each file's mode."""
    grey = write_copy(copy.parent / "grey.npz", TRAIN_LABELS, TEST_LABELS, mode="L")
    train, _ = DATASETS.create("cifar10-jpeg", path=str(grey), per_class=1, test_per_class=1).load()
    assert tuple(train.images.shape) == (10, 3, 8, 8)
    assert torch.equal(train.images[:, 0], train.images[:, 1]) and torch.equal(train.images[:, 0], train.images[:, 2])


def test_cifar10_jpeg_is_found_in_the_data_root(copy: Path):
    """root= names the data root holding cifar10_jpeg75.npz."""
    train, _ = DATASETS.create("cifar10-jpeg", root=str(copy.parent), per_class=1, test_per_class=1).load()
    assert train.labels.tolist() == [TRAIN_LABELS[i] for i in first_per_class(TRAIN_LABELS, 1)]


def test_cifar10_jpeg_candidates_in_search_order(tmp_path: Path, monkeypatch):
    """path, then $BENCH_CIFAR10_JPEG, then <data root>/cifar10_jpeg75.npz, then ../shared/data; unset ones left out."""
    monkeypatch.setattr(bench.data.datasets, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "env-root"))
    monkeypatch.delenv(CIFAR10_JPEG_ENV, raising=False)
    shared = tmp_path / "shared" / "data" / COPY
    assert DATASETS.create("cifar10-jpeg").candidates() == [tmp_path / "env-root" / COPY, shared]
    monkeypatch.setenv(CIFAR10_JPEG_ENV, str(tmp_path / "env.npz"))
    dataset = DATASETS.create("cifar10-jpeg", path="~/given.npz", root=str(tmp_path / "root"))
    assert dataset.candidates() == [Path.home() / "given.npz", tmp_path / "env.npz", tmp_path / "root" / COPY, shared]


def test_cifar10_jpeg_not_found_lists_every_place_and_the_fix(copy: Path):
    dataset = DATASETS.create("cifar10-jpeg")
    with pytest.raises(ValueError) as info:
        dataset.load()
    places = ", ".join(map(str, dataset.candidates()))
    assert str(info.value) == (f"cifar10-jpeg: file {COPY} not found; looked at {places}. Pass path=... in the matrix "
                               f"or set ${CIFAR10_JPEG_ENV}.")
