"""AR, LSP and OPS: budgets, class-/sample-wise structure, the OPS objective against a direct transcription of
the official search, and (slow) that a victim learns less from their output.

Generic contracts (shape, dtype, labels, no mutation, determinism) are in test_components.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_components import delta, digits_batch, rgb_batch

from bench.core.components import PROTECTIONS, VICTIMS, ImageSet
from bench.core.registry import ConfigError
from bench.data.datasets import DATASETS
from bench.execute.train import train_and_evaluate
from bench.plan.recipes import make_recipe
from bench.protections.ar import OFFSETS, ar_fill, find_processes

CPU = torch.device("cpu")
SHAPES = [(1, 16), (3, 32)]


@pytest.fixture(scope="module")
def rgb() -> ImageSet:
    return rgb_batch()


@pytest.fixture(scope="module", params=["digits", "rgb"])
def batch(request) -> ImageSet:
    return {"digits": digits_batch, "rgb": rgb_batch}[request.param]()


def grey(channels: int, size: int, per_class: int = 4, classes: int = 10, level: int = 128) -> ImageSet:
    """Flat mid-grey images: nothing a perturbation of a few pixel units adds is clipped."""
    n = per_class * classes
    return ImageSet(torch.full((n, channels, size, size), level, dtype=torch.uint8), torch.arange(n) % classes, classes)


def l2(out: ImageSet, before: ImageSet) -> torch.Tensor:
    """Per-image L2 norm of the change, [0, 1] units."""
    return delta(out, before).float().flatten(1).norm(dim=1) / 255


# ------------------------------------------------------------------ budgets and seeds


@pytest.mark.parametrize("channels, size", SHAPES)
@pytest.mark.parametrize("name, params, budget", [
    ("ar", {}, lambda d: math.sqrt(d / 3072)),  # 1.0 on 3×32×32, the paper's; same per-pixel RMS elsewhere
    ("ar", {"l2_norm": 0.5}, lambda d: 0.5 * math.sqrt(d / 3072)),
    ("lsp", {}, lambda d: 6 / 255 * math.sqrt(d)),
    ("lsp", {"l2_per_pixel": 3.0}, lambda d: 3 / 255 * math.sqrt(d))])
def test_l2_budget_on_unclipped_images(name, params, budget, channels, size):
    """On mid-grey images (no clipping) the mean L2 of the change is the budget within 1 %; single images
    within 5 % (rounding to 8 bits adds ±0.5 per pixel, shared by a whole patch for lsp)."""
    data = grey(channels, size)
    out = PROTECTIONS.create(name, **params).protect(data, seed=0, device=CPU)
    target, norms = budget(channels * size * size), l2(out, data)
    assert delta(out, data).abs().max() < 120, "clipped"
    assert out.info["l2_budget"] == pytest.approx(target, rel=1e-5)
    assert norms.mean().item() == pytest.approx(target, rel=0.01)
    assert ((norms / target - 1).abs() < 0.05).all()
    assert out.info["l2_mean"] == pytest.approx(norms.mean().item(), rel=1e-4)


@pytest.mark.parametrize("name", ["ar", "lsp"])
def test_seed_changes_the_perturbation(name, batch):
    protection = PROTECTIONS.create(name)
    assert not torch.equal(protection.protect(batch, seed=0, device=CPU).images,
                           protection.protect(batch, seed=1, device=CPU).images)


def test_real_images_report_their_l2(rgb):
    for name in ("ar", "lsp"):
        out = PROTECTIONS.create(name).protect(rgb, seed=0, device=CPU)
        assert out.info["l2_mean"] == pytest.approx(l2(out, rgb).mean().item(), rel=1e-4)
        assert out.info["l2_max"] <= out.info["l2_budget"] * 1.03


# ------------------------------------------------------------------ lsp


def test_lsp_classwise_is_class_wise_and_patchy(rgb):
    """mode="classwise": every image of a class gets the same change where nothing clipped; classes differ;
    8-px patches."""
    lsp = PROTECTIONS.create("lsp", mode="classwise")
    out = lsp.protect(rgb, seed=0, device=CPU)
    change, free = delta(out, rgb), (out.images > 0) & (out.images < 255)
    members = [torch.nonzero(rgb.labels == c).flatten().tolist() for c in range(rgb.num_classes)]
    for first, *others in members:
        for other in others:
            both = free[first] & free[other]
            assert both.float().mean() > 0.5 and torch.equal(change[first][both], change[other][both])
    flat = grey(3, 32)
    pattern = delta(lsp.protect(flat, seed=0, device=CPU), flat)
    assert not torch.equal(pattern[0], pattern[1])
    patches = pattern[0].view(3, 4, 8, 4, 8)
    assert (patches == patches[:, :, :1, :, :1]).all(), "not constant on 8×8 patches"


def test_lsp_default_is_sample_wise_and_patchy():
    """The default (the official): images of one class get different changes; 8-px patches on 32×32, 4-px
    patches on 16×16 (a 4×4 grid)."""
    flat = grey(3, 32)
    pattern = delta(PROTECTIONS.create("lsp").protect(flat, seed=0, device=CPU), flat)
    same_class = torch.nonzero(flat.labels == flat.labels[0]).flatten()
    assert len(same_class) > 1 and not torch.equal(pattern[same_class[0]], pattern[same_class[1]])
    patches = pattern.view(-1, 3, 4, 8, 4, 8)
    assert (patches == patches[:, :, :, :1, :, :1]).all(), "not constant on 8×8 patches"
    greys = grey(1, 16)
    patches = delta(PROTECTIONS.create("lsp").protect(greys, seed=0, device=CPU), greys).view(-1, 1, 4, 4, 4, 4)
    assert (patches == patches[:, :, :, :1, :, :1]).all()


# ------------------------------------------------------------------ ar


def test_ar_fill_matches_the_raster_recursion():
    """The anti-diagonal fill gives the paper's raster-order recursion exactly."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((2, 3, 12, 12), generator=gen, dtype=torch.float64)
    coef = torch.randn((2, 3, 8), generator=gen, dtype=torch.float64) / 4
    reference = x.clone()
    for r in range(2, 12):
        for c in range(2, 12):
            reference[..., r, c] = sum(coef[..., k] * reference[..., r - dr, c - dc]
                                       for k, (dr, dc) in enumerate(OFFSETS.tolist()))
    assert torch.allclose(ar_fill(x.clone(), coef), reference, rtol=1e-12, atol=0)
    assert torch.equal(ar_fill(x.clone(), coef)[..., :2, :], x[..., :2, :])  # start noise kept


@pytest.mark.parametrize("rule, total", [("bounded", "sum"), ("contractive", "abs")])
def test_ar_coefficient_rules(rule, total):
    found = find_processes(30, 3, rule, 3.0 if rule == "bounded" else 0.0, torch.Generator().manual_seed(0))
    coef = found.coefficients
    assert coef.shape == (30, 3, 8) and found.draws >= 90 and coef.isfinite().all()
    sums = coef.sum(-1) if total == "sum" else coef.abs().sum(-1)
    assert torch.allclose(sums, torch.full((30, 3), 1.0 if total == "sum" else 0.99, dtype=torch.float64), atol=1e-5)


def test_ar_is_sample_wise(rgb):
    """Two images of a class get different realisations of its process."""
    out = PROTECTIONS.create("ar").protect(rgb, seed=0, device=CPU)
    change, free = delta(out, rgb), (out.images > 0) & (out.images < 255)
    first, second = torch.nonzero(rgb.labels == 0).flatten()[:2].tolist()
    both = free[first] & free[second]
    assert not torch.equal(change[first][both], change[second][both])


@pytest.mark.parametrize("rule", ["bounded", "contractive"])
def test_ar_hundred_classes_all_finite_and_non_zero(rule):
    """CIFAR-100-like: 100 classes × 3 channels of processes, every one finite with a non-zero, full-budget
    realisation (the copied coefficient file's class 9 gave NaN / all-zero perturbations)."""
    data = grey(3, 32, per_class=1, classes=100)
    out = PROTECTIONS.create("ar", coefficients=rule).protect(data, seed=0, device=CPU)
    norms = l2(out, data)
    assert norms.isfinite().all() and ((norms / 1.0 - 1).abs() < 0.03).all()
    assert (delta(out, data) != 0).flatten(1).float().mean(1).min() > 0.2  # no class is (nearly) all-zero


# ------------------------------------------------------------------ ops


def test_ops_changes_one_pixel_per_image(batch):
    """L0 = 1: one position per class, set to that class's colour; images already there stay unchanged;
    every class takes a different (position, colour)."""
    out = PROTECTIONS.create("ops").protect(batch, seed=0, device=CPU)
    positions, colours = out.info["positions"], out.info["colours"]
    assert len(positions) == len(colours) == batch.num_classes
    assert len({(*p, *c) for p, c in zip(positions, colours)}) == batch.num_classes
    changed = (out.images != batch.images).any(1)  # N×H×W positions
    for i, label in enumerate(batch.labels.tolist()):
        (row, col), colour = positions[label], torch.tensor(colours[label], dtype=torch.uint8)
        assert set(colours[label]) <= {0, 255}
        assert torch.equal(out.images[i, :, row, col], colour)
        expected = 0 if torch.equal(batch.images[i, :, row, col], colour) else 1
        assert changed[i].sum().item() == expected and (expected == 0 or changed[i, row, col])
    assert out.info["changed_fraction"] == pytest.approx(changed.flatten(1).any(1).float().mean().item())


def official_search(images: np.ndarray, labels: np.ndarray, num_classes: int) -> list[tuple[int, int, int]]:
    """The official pixel_search (cychomatica/One-Pixel-Shotcut perturb.py) written out with loops:
    mean(|ξ − x_σ|)/std(|ξ − x_σ|) over the class's images and channels, taken pairs excluded."""
    n, channels, height, width = images.shape
    taken, chosen = set(), []
    for k in range(num_classes):
        x = images[labels == k] / 255
        best, best_score = None, -1.0
        for row in range(height):
            for col in range(width):
                for v in range(2 ** channels):
                    colour = np.array([(v >> (channels - 1 - c)) & 1 for c in range(channels)], dtype=float)
                    d = np.abs(colour - x[:, :, row, col])
                    score = d.mean() / d.std()
                    if (row, col, v) not in taken and score > best_score:
                        best, best_score = (row, col, v), score
        taken.add(best)
        chosen.append(best)
    return chosen


def test_ops_matches_the_official_objective():
    """Random RGB and greyscale images (every std > 0): the same (position, colour) as the official search."""
    gen = torch.Generator().manual_seed(0)
    for channels in (3, 1):
        images = torch.randint(0, 256, (30, channels, 6, 6), generator=gen, dtype=torch.uint8)
        data = ImageSet(images, torch.arange(30) % 3, 3)
        out = PROTECTIONS.create("ops").protect(data, seed=0, device=CPU)
        expected = official_search(images.numpy(), data.labels.numpy(), 3)
        got = [(r, c, int("".join(str(b // 255) for b in colour), 2))
               for (r, c), colour in zip(out.info["positions"], out.info["colours"])]
        assert got == expected


def test_ops_constant_pixels_and_seed():
    """A position the class never varies at (std 0) is the perfect shortcut; the seed does not matter."""
    images = torch.randint(0, 256, (8, 1, 5, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images[:4, :, 3, 2] = 10  # class 0: constant 10 here → white (deviation 245) scores +∞
    data = ImageSet(images, torch.tensor([0] * 4 + [1] * 4), 2)
    out = PROTECTIONS.create("ops").protect(data, seed=0, device=CPU)
    assert out.info["positions"][0] == [3, 2] and out.info["colours"][0] == [255]
    assert torch.equal(out.images, PROTECTIONS.create("ops").protect(data, seed=9, device=CPU).images)


# ------------------------------------------------------------------ behaviour (slow)
# On real digits (50 per class, cnn, quick recipe) none of the three lowers clean test accuracy much (0.95 →
# ar 0.94, lsp 0.95, ops 0.82; also with all 1,438 images or 40 epochs): the digits are learned as fast as
# any shortcut (again after issue 14's official LSP draw and AR search, with victim_accuracy below: 0.90 clean →
# ar 0.90, lsp 0.90). CIFAR-10 is where these papers measure, so the check runs on its JPEG copy.


@pytest.fixture(scope="module")
def cifar() -> tuple[ImageSet, ImageSet]:
    """5,000 real CIFAR-10 train images (JPEG copy, 500 per class) and 500 test images; skips without it."""
    try:
        return DATASETS.create("cifar10-jpeg", per_class=500, test_per_class=50).load()
    except ConfigError as err:
        pytest.skip(str(err))


def victim_accuracy(train: ImageSet, test: ImageSet) -> float:
    torch.manual_seed(0)
    model = VICTIMS.create("cnn", width=16).build(train.num_classes, train.channels, train.size)
    recipe = make_recipe("quick", epochs=20)  # 10 epochs: lsp only 0.49 → 0.43; shortcuts win with training
    return train_and_evaluate(model, train, test, recipe, seed=0, device=CPU, augment="crop_flip")["final"]


@pytest.fixture(scope="module")
def clean_accuracy(cifar) -> float:
    return victim_accuracy(*cifar)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ar", "lsp", "ops"])
def test_victim_learns_less_from_protected_data(name, cifar, clean_accuracy):
    """Real CIFAR-10 subset, cnn, quick recipe for 20 epochs, crop+flip: clean test accuracy drops by > 0.1
    (measured: clean 0.59; ar 0.10, lsp 0.42, ops 0.25; ~45 s per model on a free core)."""
    train, test = cifar
    protected = victim_accuracy(PROTECTIONS.create(name).protect(train, seed=0, device=CPU), test)
    print(f"{name}: clean {clean_accuracy:.3f} protected {protected:.3f}")
    assert clean_accuracy > 0.45 and protected < clean_accuracy - 0.1
