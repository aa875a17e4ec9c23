"""CUDA (convolution-based unlearnable datasets): one filter per class, keyed by the seed, and a victim that learns
the filters instead of the images. Generic contracts (shape, dtype, labels, no mutation, determinism) are in
test_components.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.core.components import PROTECTIONS, VICTIMS, ImageSet
from bench.core.registry import ConfigError
from bench.data.datasets import DATASETS
from bench.execute.train import evaluate, train_and_evaluate
from bench.plan.recipes import make_recipe
from bench.testing import coloured

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> tuple[ImageSet, ImageSet]:
    """500 real train images (50 per class) and 300 test images, 16×16, as RGB with three different channels."""
    train, test = DATASETS.create("digits", per_class=50, test_per_class=30).load()
    return coloured(train), coloured(test)


def reference(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Zero-padded k×k correlation of one C×H×W image with its C×k×k filters, written out as shifted sums."""
    k, pad = kernel.shape[-1], kernel.shape[-1] // 2
    x = F.pad(images.double(), (pad, pad, pad, pad))
    h, w = images.shape[-2:]
    out = sum(kernel[:, i, j, None, None] * x[:, i:i + h, j:j + w] for i in range(k) for j in range(k))
    return out.round().clamp(0, 255).to(torch.uint8)


def test_filters_are_normalised_blurs_with_a_unit_centre():
    cuda = PROTECTIONS.create("cuda", blur=0.3, kernel_size=5)
    filters = cuda.filters(7, 3, seed=0)
    assert filters.shape == (7, 3, 5, 5) and torch.allclose(filters.sum((-2, -1)), torch.ones(7, 3, dtype=filters.dtype))
    centre = filters[..., 2, 2]
    ratio = filters / centre[..., None, None]  # undo the unit-sum scaling: centre 1, the rest in [0, p_b)
    off = ratio.flatten(2)[..., torch.arange(25) != 12]
    assert (off >= 0).all() and (off < 0.3).all() and off.std() > 0.05
    assert not torch.equal(filters[:, 0], filters[:, 1])  # a filter per channel
    shared = PROTECTIONS.create("cuda", grayscale=True).filters(4, 3, seed=0)
    assert torch.equal(shared[:, 0], shared[:, 1]) and torch.equal(shared[:, 1], shared[:, 2])
    assert not torch.equal(shared[0], shared[1])


def test_each_class_gets_its_one_filter(digits):
    """Two classes hold the same 20 images (each twice): identical inputs of a class come out identical, the same
    input in the other class differs, and every output is its class's filter applied (re-derived here)."""
    images = digits[0].images[:20]
    data = ImageSet(torch.cat([images, images, images, images]), torch.tensor([0] * 40 + [1] * 40), 2)
    cuda = PROTECTIONS.create("cuda")
    out = cuda.protect(data, seed=5, device=CPU).images
    assert torch.equal(out[:20], out[20:40]) and torch.equal(out[40:60], out[60:])
    assert all(not torch.equal(out[i], out[40 + i]) for i in range(20))
    filters = cuda.filters(2, 3, seed=5)
    for i in (0, 7, 45, 79):
        assert torch.equal(out[i], reference(data.images[i], filters[data.labels[i]]))


def test_seed_is_the_private_key(digits):
    train = digits[0].subset(torch.arange(0, 60))
    cuda = PROTECTIONS.create("cuda")
    first, again = (cuda.protect(train, seed=0, device=CPU) for _ in range(2))
    other = cuda.protect(train, seed=1, device=CPU)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, train.labels)
    assert not torch.equal(first.images, other.images)
    assert not torch.equal(cuda.filters(10, 3, seed=0), cuda.filters(10, 3, seed=1))


def test_any_shape_and_no_blur_is_the_identity():
    gen = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (9, 1, 5, 7), generator=gen, dtype=torch.uint8), torch.arange(9) % 3, 3)
    out = PROTECTIONS.create("cuda", kernel_size=7).protect(data, seed=0, device=CPU)
    assert out.images.shape == data.images.shape and out.images.dtype == torch.uint8
    assert torch.equal(PROTECTIONS.create("cuda", blur=0.0).protect(data, seed=0, device=CPU).images, data.images)


@pytest.mark.parametrize("params", [{"blur": -0.1}, {"blur": float("nan")}, {"kernel_size": 4}, {"kernel_size": 1}])
def test_wrong_parameters_are_refused(params):
    with pytest.raises((ValueError, ConfigError)):
        PROTECTIONS.create("cuda", **params)


def train_victim(train: ImageSet, test: ImageSet, epochs: int) -> dict:
    torch.manual_seed(0)
    model = VICTIMS.create("cnn", width=16).build(train.num_classes, train.channels, train.size)
    augment = "crop_flip" if train.channels == 3 and train.size >= 32 else "crop"
    return train_and_evaluate(model, train, test, make_recipe("quick", epochs=epochs), seed=0, device=CPU,
                              augment=augment)


def test_a_victim_learns_the_filters_not_the_digits(digits):
    """At the paper's p_b = 0.3 a cnn trained on CUDA digits scores ~1.0 on test digits protected with the same key
    (it learned the filter–label relation) and less on clean ones. Measured (2 cores, ~25 s): clean 0.99, CUDA
    0.83 on clean test, 1.00 on CUDA test. (Greyscale digits, one filter per class, hardly drop: 0.95 → 0.94 in 10
    epochs; a plain cnn learns these coarse digits as fast as the filters.)"""
    train, test = digits
    cuda = PROTECTIONS.create("cuda")
    clean = train_victim(train, test, 30)["final"]
    result = train_victim(cuda.protect(train, seed=0, device=CPU), test, 30)
    keyed = evaluate(result["model"], cuda.protect(test, seed=0, device=CPU), 256)
    print(f"cuda digits: clean {clean:.3f} protected {result['final']:.3f} on keyed test {keyed:.3f}")
    assert clean > 0.9 and result["final"] < clean - 0.08
    assert keyed > 0.95 and keyed > result["final"] + 0.08


@pytest.mark.slow
def test_cifar_victim_drops():
    """1,000 real CIFAR-10 images (JPEG copy), 30 epochs; skips without the data. Measured: 0.45 → 0.27."""
    try:
        train, test = DATASETS.create("cifar10-jpeg", per_class=100, test_per_class=50).load()
    except ConfigError as err:
        pytest.skip(str(err))
    clean = train_victim(train, test, 30)["final"]
    protected = train_victim(PROTECTIONS.create("cuda").protect(train, seed=0, device=CPU), test, 30)["final"]
    print(f"cuda cifar: clean {clean:.3f} protected {protected:.3f}")
    assert clean > 0.35 and protected < clean - 0.1
