"""The contracts of every built-in protection and countermeasure (``bench.testing``: the checks a plugin's author
runs on theirs), golden values of the data-stage countermeasures against independent computations (Pillow,
hand-computed tables) and the behaviour of the noise and patch protections."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from bench.core.components import COUNTERMEASURES, PROTECTIONS, Countermeasure, ImageSet, Victim
from bench.core.registry import Registry
from bench.protections.patches import PAPER_COLOURS
from bench.testing import (CountermeasureContracts, ProtectionContracts, assert_image_set_contract, builtin_names,
                           digits_set, rgb_set)
from conftest import REPO

__all__ = ["assert_image_set_contract", "delta", "digits_batch", "rgb_batch"]  # other test modules import these

CPU = torch.device("cpu")
digits_batch, rgb_batch = digits_set, rgb_set  # 40 real images each; rgb_batch skips without the CIFAR-10 copy
BATCHES = {"digits": digits_batch, "rgb": rgb_batch}


class TestBuiltins(ProtectionContracts, CountermeasureContracts):
    """Each contract that applies, over every protection and countermeasure bench ships (victims:
    tests/test_victims.py); plugins found on this machine are their authors' to test."""

    components = [f"protection:{n}" for n in builtin_names(PROTECTIONS)] + \
        [f"countermeasure:{n}" for n in builtin_names(COUNTERMEASURES)]


@pytest.fixture(scope="module", params=list(BATCHES))
def batch(request) -> ImageSet:
    data = BATCHES[request.param]()
    assert len(data) == 40 and data.images.dtype == torch.uint8
    return data


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return digits_batch()


@pytest.fixture(scope="module")
def rgb() -> ImageSet:
    return rgb_batch()


def delta(after: ImageSet, before: ImageSet) -> torch.Tensor:
    """Per-pixel change in integer pixel units."""
    return after.images.to(torch.int16) - before.images.to(torch.int16)


# ------------------------------------------------------------------ protections: noise

@pytest.mark.parametrize("name", ["random_noise", "cwn"])
def test_noise_uses_its_budget(name, batch):
    """The noise protections change most pixels and reach the budget (uniform noise in [−ε, ε])."""
    out = PROTECTIONS.create(name, epsilon=8).protect(batch, seed=0, device=CPU)
    change = delta(out, batch)
    assert change.abs().max().item() == 8
    assert (change != 0).float().mean().item() > 0.5
    assert (change > 0).any() and (change < 0).any()


@pytest.mark.parametrize("name", ["random_noise", "cwn"])
def test_noise_depends_on_seed(name, batch):
    protection = PROTECTIONS.create(name)
    first = protection.protect(batch, seed=0, device=CPU)
    second = protection.protect(batch, seed=1, device=CPU)
    assert not torch.equal(first.images, second.images)


def unclamped(batch: ImageSet, epsilon: int = 8) -> torch.Tensor:
    """Pixels where adding any noise in [−ε, ε] cannot be clipped to [0, 255]."""
    return (batch.images >= epsilon) & (batch.images <= 255 - epsilon)


def test_cwn_is_one_pattern_per_class(rgb):
    """Class-wise noise: every image of a class gets the same noise (where not clipped); classes differ."""
    out = PROTECTIONS.create("cwn").protect(rgb, seed=0, device=CPU)
    change, free = delta(out, rgb), unclamped(rgb)
    patterns = {}
    for c in range(rgb.num_classes):
        members = torch.nonzero(rgb.labels == c).flatten().tolist()
        assert len(members) >= 2
        reference = members[0]
        for other in members[1:]:
            both = free[reference] & free[other]
            assert both.float().mean() > 0.3
            assert torch.equal(change[reference][both], change[other][both]), f"class {c} has two patterns"
        patterns[c] = (change[reference], free[reference])
    (p0, f0), (p1, f1) = patterns[0], patterns[1]
    assert not torch.equal(p0[f0 & f1], p1[f0 & f1]), "two classes share a pattern"


def test_cwn_pattern_does_not_depend_on_image_content():
    """On a mid-grey batch (no clipping) the change is exactly the class pattern, identical within a class."""
    images = torch.full((6, 3, 8, 8), 128, dtype=torch.uint8)
    images[1::2] = 100
    data = ImageSet(images, torch.tensor([0, 0, 1, 1, 2, 2]), 3)
    change = delta(PROTECTIONS.create("cwn").protect(data, seed=0, device=CPU), data)
    for c in range(3):
        assert torch.equal(change[2 * c], change[2 * c + 1])
    assert not torch.equal(change[0], change[2]) and not torch.equal(change[2], change[4])


def test_random_noise_is_sample_wise(rgb):
    """Sample-wise noise: two images of the same class get different noise."""
    out = PROTECTIONS.create("random_noise").protect(rgb, seed=0, device=CPU)
    change, free = delta(out, rgb), unclamped(rgb)
    first, second = torch.nonzero(rgb.labels == 0).flatten()[:2].tolist()
    both = free[first] & free[second]
    assert not torch.equal(change[first][both], change[second][both])


@pytest.mark.parametrize("name", ["clean", "cwp"])
def test_deterministic_protections_ignore_seed(name, batch):
    """clean and cwp have no randomness: any seed gives the same output."""
    protection = PROTECTIONS.create(name)
    assert torch.equal(protection.protect(batch, seed=0, device=CPU).images,
                       protection.protect(batch, seed=123, device=CPU).images)


# ------------------------------------------------------------------ protections: cwp


def expected_colours(num_classes: int, channels: int) -> list[tuple[int, ...]]:
    """The paper's colours for RGB with ≤ 25 classes; otherwise grey levels ≈ (k + 1)·255 / K on every channel."""
    if channels == 3 and num_classes <= 25:
        return [tuple(c) for c in PAPER_COLOURS[:num_classes]]
    return [None] * num_classes  # checked against the formula with a rounding tolerance


def check_patch(out: ImageSet, data: ImageSet, side: int) -> None:
    patch = out.images[:, :, -side:, -side:]
    outside = torch.ones_like(data.images, dtype=torch.bool)
    outside[:, :, -side:, -side:] = False
    assert torch.equal(out.images[outside], data.images[outside]), "pixels outside the patch changed"
    colours = expected_colours(data.num_classes, data.channels)
    seen = {}
    for i, label in enumerate(data.labels.tolist()):
        pixels = patch[i].reshape(data.channels, -1)
        assert (pixels == pixels[:, :1]).all(), "the patch is not a solid colour"
        colour = tuple(pixels[:, 0].tolist())
        if colours[label] is not None:
            assert colour == colours[label], f"class {label}"
        else:
            level = (label + 1) * 255 / data.num_classes
            assert len(set(colour)) == 1 and abs(colour[0] - level) <= 0.5, f"class {label}: {colour}"
        assert seen.setdefault(label, colour) == colour
    assert len(set(seen.values())) == len(seen), "two classes share a colour"


def test_paper_colours_table():
    """ConfounderGAN App. G.2 as printed: 25 colours, the first ten as below."""
    assert len(PAPER_COLOURS) == 25
    assert PAPER_COLOURS[:10] == ((220, 0, 0), (230, 0, 0), (240, 0, 0), (250, 0, 0), (0, 220, 0), (0, 230, 0),
                                  (0, 240, 0), (0, 250, 0), (0, 0, 220), (0, 0, 230))


@pytest.mark.parametrize("which, side", [("digits", 2), ("rgb", 5)])  # round(16·32/224) = 2, round(32·32/224) = 5
def test_cwp_default_patch(which, side, digits, rgb):
    data = {"digits": digits, "rgb": rgb}[which]
    check_patch(PROTECTIONS.create("cwp").protect(data, seed=0, device=CPU), data, side)


@pytest.mark.parametrize("fraction, side_16, side_32", [(0.375, 6, 12), (0.5, 8, 16), (1.0, 16, 32), (0.01, 1, 1)])
def test_cwp_patch_size(fraction, side_16, side_32, digits, rgb):
    protection = PROTECTIONS.create("cwp", size_fraction=fraction)
    check_patch(protection.protect(digits, seed=0, device=CPU), digits, side_16)
    check_patch(protection.protect(rgb, seed=0, device=CPU), rgb, side_32)


def test_cwp_grey_levels_for_one_channel(digits):
    """Digits (1 channel, 10 classes): evenly spaced grey levels, the last one white."""
    out = PROTECTIONS.create("cwp").protect(digits, seed=0, device=CPU)
    levels = {int(label): int(out.images[i, 0, -1, -1]) for i, label in enumerate(digits.labels)}
    assert sorted(levels) == list(range(10))
    assert [levels[k] for k in range(10)] == sorted(levels.values())
    assert levels[9] == 255 and levels[4] == 128 and levels[1] == 51


def test_cwp_rgb_with_many_classes_uses_grey_levels():
    """More classes than the paper's 25 colours: grey levels on every channel."""
    data = ImageSet(torch.zeros(30, 3, 8, 8, dtype=torch.uint8), torch.arange(30), 30)
    check_patch(PROTECTIONS.create("cwp", size_fraction=0.5).protect(data, seed=0, device=CPU), data, 4)


# ------------------------------------------------------------------ countermeasures


@pytest.mark.parametrize("name, params", [("bdr", {"bits": 2}), ("bdr", {"bits": 5}), ("grayscale", {})])
def test_idempotent_countermeasures(name, params, batch):
    """Quantisation and greyscale conversion applied twice give the same as once."""
    countermeasure = COUNTERMEASURES.create(name, **params)
    once = countermeasure.purify(batch, seed=0, device=CPU)
    assert torch.equal(countermeasure.purify(once, seed=0, device=CPU).images, once.images)


@pytest.mark.parametrize("name, params", [("jpeg", {"quality": 10}), ("median_filter", {}), ("bdr", {})])
def test_lossy_countermeasures_change_images(name, params, batch):
    out = COUNTERMEASURES.create(name, **params).purify(batch, seed=0, device=CPU)
    assert not torch.equal(out.images, batch.images)


# ------------------------------------------------------------------ countermeasures: goldens


def as_pil(image: torch.Tensor) -> Image.Image:
    """C×H×W uint8 → a Pillow image ('L' for one channel, 'RGB' for three)."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def from_pil(image: Image.Image) -> torch.Tensor:
    array = np.array(image)  # a writable copy
    return torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1)


@pytest.mark.parametrize("kernel", [3, 5])
def test_median_filter_matches_pillow(kernel, batch):
    out = COUNTERMEASURES.create("median_filter", kernel=kernel).purify(batch, seed=0, device=CPU)
    reference = torch.stack([from_pil(as_pil(im).filter(ImageFilter.MedianFilter(kernel))) for im in batch.images])
    assert torch.equal(out.images, reference)


def test_median_filter_kernel_one_is_identity(batch):
    out = COUNTERMEASURES.create("median_filter", kernel=1).purify(batch, seed=0, device=CPU)
    assert torch.equal(out.images, batch.images)


def test_median_filter_removes_salt():
    """A single bright pixel on a flat image disappears (also at the border)."""
    images = torch.full((1, 1, 6, 6), 40, dtype=torch.uint8)
    images[0, 0, 2, 3] = images[0, 0, 0, 0] = images[0, 0, 5, 2] = 255
    out = COUNTERMEASURES.create("median_filter").purify(ImageSet(images, torch.zeros(1, dtype=torch.long), 1),
                                                          seed=0, device=CPU)
    assert (out.images == 40).all()


def test_grayscale_matches_pillow(rgb):
    out = COUNTERMEASURES.create("grayscale").purify(rgb, seed=0, device=CPU)
    reference = torch.stack([from_pil(as_pil(im).convert("L")) for im in rgb.images])
    assert torch.equal(out.images, reference.expand(-1, 3, -1, -1))


def test_grayscale_matches_pillow_on_every_primary_level():
    """Pure red, green and blue ramps 0..255 and a random batch, against Pillow's 'L' conversion."""
    ramp = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)
    zero = torch.zeros_like(ramp)
    gen = torch.Generator().manual_seed(0)
    images = torch.stack([torch.cat([ramp, zero, zero]), torch.cat([zero, ramp, zero]), torch.cat([zero, zero, ramp]),
                          torch.cat([ramp, ramp, ramp]),
                          torch.randint(0, 256, (3, 16, 16), generator=gen, dtype=torch.uint8)])
    data = ImageSet(images, torch.zeros(5, dtype=torch.long), 1)
    out = COUNTERMEASURES.create("grayscale").purify(data, seed=0, device=CPU)
    reference = torch.stack([from_pil(as_pil(im).convert("L")) for im in images])
    assert torch.equal(out.images, reference.expand(-1, 3, -1, -1))
    assert torch.equal(out.images[3], images[3]), "grey pixels must stay as they are"


def test_grayscale_is_identity_on_one_channel(digits):
    assert torch.equal(COUNTERMEASURES.create("grayscale").purify(digits, seed=0, device=CPU).images, digits.images)


@pytest.mark.parametrize("quality", [10, 50, 95])
def test_jpeg_matches_pillow(quality, batch):
    """Exact equality with a Pillow round trip: RGB as RGB, one channel as single-channel 'L' JPEG."""
    out = COUNTERMEASURES.create("jpeg", quality=quality).purify(batch, seed=0, device=CPU)
    reference = []
    for image in batch.images:
        buffer = io.BytesIO()
        pil = as_pil(image)
        assert pil.mode == ("L" if batch.channels == 1 else "RGB")
        pil.save(buffer, "JPEG", quality=quality)
        buffer.seek(0)
        reference.append(from_pil(Image.open(buffer)))
    assert torch.equal(out.images, torch.stack(reference))


def test_jpeg_lower_quality_loses_more(rgb):
    errors = []
    for quality in (10, 50, 95):
        out = COUNTERMEASURES.create("jpeg", quality=quality).purify(rgb, seed=0, device=CPU)
        errors.append(delta(out, rgb).abs().float().mean().item())
    assert errors[0] > errors[1] > errors[2]


BDR2 = {0: 0, 1: 0, 42: 0, 43: 85, 85: 85, 127: 85, 128: 170, 170: 170, 212: 170, 213: 255, 254: 255, 255: 255}


def test_bdr_two_bits_hand_table():
    values = torch.tensor(list(BDR2), dtype=torch.uint8).view(1, 1, 1, -1)
    out = COUNTERMEASURES.create("bdr", bits=2).purify(ImageSet(values, torch.zeros(1, dtype=torch.long), 1),
                                                       seed=0, device=CPU)
    assert dict(zip(BDR2, out.images.flatten().tolist())) == BDR2


@pytest.mark.parametrize("bits", range(1, 9))
def test_bdr_matches_formula_on_all_levels(bits):
    """round(round(x/255·L)/L·255) with L = 2^bits − 1, over every 8-bit value and on 3 channels."""
    levels = 2 ** bits - 1
    x = np.arange(256)
    expected = np.round(np.round(x / 255 * levels) / levels * 255).astype(np.uint8)
    assert len(np.unique(expected)) == levels + 1
    images = torch.from_numpy(np.stack([x, x[::-1], x]).reshape(1, 3, 16, 16).astype(np.uint8))
    out = COUNTERMEASURES.create("bdr", bits=bits).purify(ImageSet(images, torch.zeros(1, dtype=torch.long), 1),
                                                          seed=0, device=CPU)
    assert torch.equal(out.images, torch.from_numpy(np.stack([expected, expected[::-1], expected]).reshape(1, 3, 16, 16)))
    if bits == 8:
        assert torch.equal(out.images, images)

# Victims: tests/test_victims.py.


# ------------------------------------------------------------------ what the contract tests read, checked at registration


@pytest.mark.parametrize("declaration, message", [
    ({"test_params": {"strenght": 1}}, r"test_params names \['strenght'\], which are not parameters"),
    ({"test_params": {"strength": "1"}}, "test_params 'strength': expected int"),
    ({"hooks_draw": False}, "hooks_draw = False describes train hooks"),
    ({"keeps_images": True}, "keeps_images = True needs a data stage that fits models"),
])
def test_test_declarations_are_checked_at_registration(declaration, message):
    """A typo in test_params would otherwise surface as a failing contract test far from its cause."""
    namespace = {"__annotations__": {"strength": "int"}, "strength": 255, "stages": frozenset({"data"}),
                 "purify": lambda self, train, *, seed, device: train, **declaration}
    with pytest.raises(TypeError, match=message):
        Registry("countermeasure", Countermeasure).register("declared_test")(type("Declared", (Countermeasure,), namespace))


@pytest.mark.parametrize("count", [0, 2.5])
def test_a_reference_size_must_be_a_positive_count(count):
    namespace = {"reference_params": count, "build": lambda self, num_classes, in_channels, image_size: None}
    with pytest.raises(TypeError, match="reference_params must be a positive int"):
        Registry("victim", Victim).register("sized_test")(type("Sized", (Victim,), namespace))


# ------------------------------------------------------------------ the plugin stays out of bench's imports


def test_bench_and_its_components_import_without_pytest():
    """bench.testing imports pytest; nothing else in bench imports it, so a run needs no pytest installed."""
    code = ("import sys; sys.modules['pytest'] = None\n"  # any import of pytest now raises ImportError
            "import bench, bench.api, bench.cli\n"
            "from bench.core.components import COUNTERMEASURES, PROTECTIONS, VICTIMS\n"
            "PROTECTIONS.names(), COUNTERMEASURES.names(), VICTIMS.names()\n"
            "assert 'bench.testing' not in sys.modules, 'something in bench imported bench.testing'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
