"""Contracts every registered component keeps (timm test_models style), plus golden values for the
data-stage countermeasures against independent computations (Pillow, hand-computed tables)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from bench.components import COUNTERMEASURES, PROTECTIONS, VICTIMS, ImageSet
from bench.data import DATASETS
from protections.patches import PAPER_COLOURS

CPU = torch.device("cpu")


def _digits() -> ImageSet:
    return DATASETS.create("digits", per_class=4).load()[0]


def _rgb() -> ImageSet:
    """Real RGB images where the development copy is present, else a fixed random batch."""
    try:
        return DATASETS.create("cifar10-jpeg", per_class=4, test_per_class=1).load()[0]
    except Exception:
        gen = torch.Generator().manual_seed(0)
        return ImageSet(torch.randint(0, 256, (40, 3, 32, 32), generator=gen, dtype=torch.uint8),
                        torch.arange(40) % 10, 10)


SETS = {"digits": _digits, "rgb": _rgb}


@pytest.fixture(scope="module", params=list(SETS))
def batch(request) -> ImageSet:
    return SETS[request.param]()


@pytest.mark.parametrize("name", PROTECTIONS.names())
def test_protection_contract(name, batch):
    """uint8 out, same shape and labels, input untouched, deterministic for a seed, budget respected."""
    protection = PROTECTIONS.create(name)
    before = batch.images.clone()
    out = protection.protect(batch, seed=3, device=CPU)
    assert out.images.dtype == torch.uint8 and out.images.shape == batch.images.shape
    assert torch.equal(out.labels, batch.labels) and out.num_classes == batch.num_classes
    assert torch.equal(batch.images, before), "the input was mutated"
    assert torch.equal(protection.protect(batch, seed=3, device=CPU).images, out.images)
    eps = getattr(protection, "epsilon", None)
    if eps is not None:
        diff = (out.images.int() - batch.images.int()).abs()
        assert diff.max() <= eps and diff.float().mean() > eps / 4, "noise outside the budget, or too little"
        assert not torch.equal(protection.protect(batch, seed=4, device=CPU).images, out.images)


def test_cwn_is_class_wise_and_random_noise_is_not():
    """cwn adds one pattern per class; random_noise draws a new one per image (on unsaturated images)."""
    flat = ImageSet(torch.full((6, 3, 8, 8), 128, dtype=torch.uint8), torch.tensor([0, 0, 0, 1, 1, 1]), 2)
    cwn = PROTECTIONS.create("cwn").protect(flat, seed=0, device=CPU).images
    assert torch.equal(cwn[0], cwn[1]) and torch.equal(cwn[0], cwn[2]) and not torch.equal(cwn[0], cwn[3])
    noise = PROTECTIONS.create("random_noise").protect(flat, seed=0, device=CPU).images
    assert not torch.equal(noise[0], noise[1])


@pytest.mark.parametrize("channels, size, side", [(3, 32, 5), (1, 16, 2), (3, 224, 32)])
def test_cwp_patch_colour_and_place(channels, size, side):
    """The lower-right side×side patch holds the class colour (paper's list for RGB, grey levels else);
    nothing else changes."""
    images = torch.full((10, channels, size, size), 7, dtype=torch.uint8)
    data = ImageSet(images, torch.arange(10), 10)
    out = PROTECTIONS.create("cwp").protect(data, seed=0, device=CPU).images
    for k in range(10):
        colour = PAPER_COLOURS[k] if channels == 3 else (round((k + 1) * 255 / 10),) * channels
        assert out[k, :, -side:, -side:].flatten(1).unique(dim=1).flatten().tolist() == list(colour)
        assert (out[k, :, :-side] == 7).all() and (out[k, :, :, :-side] == 7).all()


@pytest.mark.parametrize("name", COUNTERMEASURES.names())
def test_countermeasure_contract(name, batch):
    """Data stage: uint8, same shape and labels, input untouched, deterministic."""
    countermeasure = COUNTERMEASURES.create(name)
    before = batch.images.clone()
    out = countermeasure.purify(batch, seed=1, device=CPU)
    assert out.images.dtype == torch.uint8 and out.images.shape == batch.images.shape
    assert torch.equal(out.labels, batch.labels)
    assert torch.equal(batch.images, before), "the input was mutated"
    assert torch.equal(countermeasure.purify(batch, seed=1, device=CPU).images, out.images)


def _pil(images: torch.Tensor, fn) -> np.ndarray:
    out = []
    for image in images.permute(0, 2, 3, 1).numpy():
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        result = np.asarray(fn(pil))
        out.append(result[..., None] if result.ndim == 2 else result)
    return np.stack(out).transpose(0, 3, 1, 2)


def _jpeg(quality: int):
    def encode(pil: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        pil.save(buffer, "JPEG", quality=quality)
        return Image.open(buffer)
    return encode


@pytest.mark.parametrize("name, params, reference", [
    ("median_filter", {"kernel": 3}, lambda pil: pil.filter(ImageFilter.MedianFilter(3))),
    ("median_filter", {"kernel": 5}, lambda pil: pil.filter(ImageFilter.MedianFilter(5))),
    ("jpeg", {"quality": 10}, _jpeg(10)),
    ("jpeg", {"quality": 50}, _jpeg(50)),
])
def test_golden_against_pillow(name, params, reference, batch):
    out = COUNTERMEASURES.create(name, **params).purify(batch, seed=0, device=CPU).images.numpy()
    assert np.array_equal(out, _pil(batch.images, reference))


def test_grayscale_golden_against_pillow():
    rgb = _rgb()
    out = COUNTERMEASURES.create("grayscale").purify(rgb, seed=0, device=CPU).images
    luma = _pil(rgb.images, lambda pil: pil.convert("L"))[:, 0]
    for c in range(3):
        assert np.array_equal(out[:, c].numpy(), luma)


def test_bdr_two_bits_hand_computed():
    """2 bits: levels 0, 85, 170, 255, thresholds halfway (x/255·3 rounded half to even at the boundary)."""
    values = torch.tensor([0, 42, 43, 127, 128, 212, 213, 255], dtype=torch.uint8)
    data = ImageSet(values.view(1, 1, 2, 4), torch.tensor([0]), 1)
    out = COUNTERMEASURES.create("bdr", bits=2).purify(data, seed=0, device=CPU).images.flatten().tolist()
    assert out == [0, 0, 85, 85, 170, 170, 255, 255]


@pytest.mark.parametrize("name", VICTIMS.names())
@pytest.mark.parametrize("channels, size, classes", [(1, 16, 10), (3, 32, 10), (3, 32, 100)])
def test_victim_builds_and_trains_one_step(name, channels, size, classes):
    torch.manual_seed(0)
    model = VICTIMS.create(name).build(classes, channels, size)
    x, y = torch.rand(4, channels, size, size), torch.arange(4) % classes
    logits = model(x)
    assert logits.shape == (4, classes) and torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert torch.isfinite(loss)


def test_resnet18_parameter_count_matches_reference():
    """11,173,962 parameters: torchvision's resnet18 with the CIFAR stem and 10 classes."""
    model = VICTIMS.create("resnet18").build(10, 3, 32)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
