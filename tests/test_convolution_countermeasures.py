"""COIN and RSK+FF (countermeasures/convolution.py): goldens against SciPy (``map_coordinates`` with the official
``mode='wrap'``, ``dctn``), the displacement bound, the random kernels' moments, the train-stage contract on digits,
and their effect on a class-wise blur poison of digits (a stand-in for CUDA, built here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.fft import dctn, idctn
from scipy.ndimage import map_coordinates

from bench.api import COUNTERMEASURES, DATASETS, VICTIMS, ImageSet, make_recipe, train_and_evaluate
from bench.countermeasures import convolution
from bench.testing import assert_train_hooks, coloured, digits_set

CPU = torch.device("cpu")


def hook(name: str, x: torch.Tensor, seed: int = 0, **params) -> torch.Tensor:
    hooks = COUNTERMEASURES.create(name, **params).train_hooks(10, x.shape[-1])
    return hooks.batch_transform(x, torch.zeros(len(x), dtype=torch.long), torch.Generator().manual_seed(seed))[0]


def real_rgb() -> torch.Tensor:
    return coloured(digits_set()).images.double() / 255


# ------------------------------------------------------------------ contracts


@pytest.mark.parametrize("name", ["coin", "rsk_ff"])
@pytest.mark.parametrize("channels", [1, 3])
def test_train_stage_contract_on_digits(name, channels):
    """Shape, dtype, [0, 1], input untouched, labels kept, reproducible per seed and changed by another
    (tests/test_countermeasures.py runs the same on CIFAR images where they are found)."""
    data = digits_set() if channels == 1 else coloured(digits_set())
    x = data.images.float() / 255
    x0 = x.clone()
    out = hook(name, x)
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    assert torch.equal(x, x0) and torch.equal(out, hook(name, x)) and not torch.equal(out, hook(name, x, seed=1))
    assert_train_hooks(COUNTERMEASURES.create(name), data)


@pytest.mark.parametrize("name, params", [("coin", {"alpha": 0}), ("rsk_ff", {"center_mean": 0.5}),
                                          ("rsk_ff", {"std": -0.1}), ("rsk_ff", {"ff_percentage": 0})])
def test_wrong_parameters_raise(name, params):
    with pytest.raises(ValueError, match="needs"):
        COUNTERMEASURES.create(name, **params)


def test_rsk_ff_rejects_a_size_that_keeps_no_frequency():
    with pytest.raises(ValueError, match="ff_percentage"):
        COUNTERMEASURES.create("rsk_ff", ff_percentage=5).train_hooks(10, 16)


# ------------------------------------------------------------------ COIN


def test_coin_resample_matches_scipy_map_coordinates_wrap():
    """The official COIN_trans: ``map_coordinates(image, (y + dy, x + dx, z), order=1, mode='wrap')``, displacements
    shared by the channels; checked on real images with displacements up to 3 px (the border wraps)."""
    x = real_rgb()[:6]
    gen = torch.Generator().manual_seed(0)
    dy, dx = ((torch.rand(2, 6, 16, 16, generator=gen, dtype=torch.float64) * 2 - 1) * 3).unbind(0)
    ours = convolution.coin_resample(x, dy, dx)
    ys, xs, zs = np.meshgrid(np.arange(16), np.arange(16), np.arange(3), indexing="ij")
    for i in range(6):
        image = x[i].permute(1, 2, 0).numpy()
        coords = [(ys + dy[i].numpy()[..., None]).ravel(), (xs + dx[i].numpy()[..., None]).ravel(), zs.ravel()]
        reference = map_coordinates(image, coords, order=1, mode="wrap").reshape(image.shape)
        assert np.abs(ours[i].permute(1, 2, 0).numpy() - reference).max() < 1e-12


def test_coin_wraps_with_scipys_period():
    """Column 0 moved by −0.5 reads between columns W − 2 and W − 1; the last column moved by +0.5 between 0 and 1
    (SciPy's 'wrap': period W − 1)."""
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    zero = torch.zeros(2, 8, 8, dtype=torch.float64)
    left = convolution.coin_resample(x, zero, zero - 0.5)[..., 0]
    right = convolution.coin_resample(x, zero, zero + 0.5)[..., -1]
    assert torch.allclose(left, (x[..., 6] + x[..., 7]) / 2) and torch.allclose(right, (x[..., 0] + x[..., 1]) / 2)
    assert torch.equal(convolution.coin_resample(x, zero, zero), x)


def test_coin_moves_each_pixel_within_alpha_on_a_ramp():
    """On a horizontal ramp (1/31 per px) an interior output pixel reads the ramp at column + dx, so dx is read
    back: |dx| ≤ α (up to the 8-bit truncation, 1/255 ≈ 0.12 px), spread over ±α, drawn per pixel, shared by the
    channels, and different per image; a vertical ramp shows the same for dy."""
    alpha = 2.0
    ramp = (torch.arange(32.0) / 31).expand(16, 3, 32, 32)
    for axis, image in ((3, ramp), (2, ramp.transpose(2, 3))):
        out = hook("coin", image.contiguous(), alpha=alpha)
        assert torch.equal(out[:, 0], out[:, 2]), "the channels share the displacement"
        moved = (out * 31 - image * 31).narrow(axis, 3, 26)  # columns (rows) 3..28: no wrap within α
        assert moved.max() <= alpha + 1e-3 and moved.min() >= -alpha - 31 / 255 - 1e-3
        assert moved.max() > 0.95 * alpha and moved.min() < -0.95 * alpha
        assert abs(moved.mean() + 31 / 510) < 0.03, "centred (less the truncation's half level)"
        assert (moved.diff(dim=axis).abs() > 0.2).float().mean() > 0.5, "a fresh displacement per pixel"
        assert not torch.equal(moved[0], moved[1]), "a fresh displacement per image"


# ------------------------------------------------------------------ RSK + FF


def test_rsk_kernels_follow_the_official_distribution():
    """Centre ~ N(2.5, 0.1), the four edge neighbours ~ N(−(c − 1)/4, 0.1) (conditional on c), corners 0, so the
    kernel sums to 1 in expectation (1 − the four
    neighbours' noise: std 0.2 whatever the centre); std = 0 gives the fixed SSK kernel, summing to exactly 1."""
    kernels = COUNTERMEASURES.create("rsk_ff").kernels(40_000, torch.Generator().manual_seed(0)).double()
    center, edges = kernels[:, 1, 1], kernels[:, [0, 1, 1, 2], [1, 0, 2, 1]]
    assert abs(center.mean() - 2.5) < 0.005 and abs(center.std() - 0.1) < 0.005
    assert (kernels[:, [0, 0, 2, 2], [0, 2, 0, 2]] == 0).all()
    residual = edges + (center[:, None] - 1) / 4
    assert residual.mean().abs() < 0.002 and abs(residual.std() - 0.1) < 0.002
    assert abs(kernels.sum((1, 2)).mean() - 1) < 0.005 and abs(kernels.sum((1, 2)).std() - 0.2) < 0.005
    fixed = COUNTERMEASURES.create("rsk_ff", std=0).kernels(3, torch.Generator())
    assert torch.allclose(fixed.sum((1, 2)), torch.ones(3)) and torch.allclose(fixed[:, 0, 1], torch.full((3,), -0.375))


def test_sharpen_applies_each_images_kernel_unpadded():
    x = real_rgb()[:4]
    kernels = COUNTERMEASURES.create("rsk_ff").kernels(4, torch.Generator().manual_seed(1)).double()
    ours = convolution.sharpen(x, kernels)
    for i in range(4):
        expected = F.conv2d(x[i:i + 1], kernels[i].expand(3, 1, 3, 3), groups=3)
        assert torch.allclose(ours[i:i + 1], expected, atol=1e-12)


def test_ff_keeps_exactly_the_lowest_dct_coefficients():
    """Against SciPy's orthonormal ``dctn``/``idctn`` per channel on a real 30×30 image: 9 of 30 rows and columns."""
    x = F.interpolate(real_rgb()[:1], size=(30, 30), mode="bilinear", align_corners=False)
    ours = convolution.low_pass(x, 9)[0].numpy()
    mask = np.zeros((30, 30))
    mask[:9, :9] = 1
    coefficients = dctn(x[0].numpy(), axes=(1, 2), norm="ortho")
    assert np.abs(ours - idctn(coefficients * mask, axes=(1, 2), norm="ortho")).max() < 1e-12
    kept = dctn(ours, axes=(1, 2), norm="ortho")
    assert np.abs(kept * (1 - mask)).max() < 1e-12 and np.allclose(kept * mask, coefficients * mask)


def test_rsk_ff_hook_is_valid_sharpening_then_ff_then_a_zero_border():
    """With the identity kernel (centre 1, std 0) the hook is: drop the 1-px border (unpadded conv), keep
    ⌊30·0.3⌋ = 9 frequencies on CIFAR's 32 px, clip, pad with zeros back to 32 px."""
    x = F.interpolate(real_rgb()[:2], size=(32, 32), mode="bilinear", align_corners=False).float()
    out = hook("rsk_ff", x, center_mean=1.0, std=0.0)
    interior = x[..., 1:-1, 1:-1].double().numpy()
    mask = np.zeros((30, 30))
    mask[:9, :9] = 1
    expected = np.clip(idctn(dctn(interior, axes=(2, 3), norm="ortho") * mask, axes=(2, 3), norm="ortho"), 0, 1)
    assert np.abs(out[..., 1:-1, 1:-1].numpy() - expected).max() < 1e-5
    assert (out[..., 0, :] == 0).all() and (out[..., :, -1] == 0).all()


# ------------------------------------------------------------------ behaviour on a blur poison


def blur_poison(per_class: int, size: int, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """TEST FIXTURE, a stand-in for CUDA (Sadasivan et al. 2023), not bench's ``cuda`` protection: one random 3×3
    blur per class (entries U(0, 1), normalised to sum 1) on sklearn's native 8×8 digits (a 3×3 blur on 16 or 32
    px upsampled digits barely changes them), then the dataset's bilinear upsampling to ``size``. The clean test
    split comes from the same dataset."""
    native = DATASETS.create("digits", per_class=per_class, test_per_class=30, size=8).load()[0]
    train, test = DATASETS.create("digits", per_class=per_class, test_per_class=30, size=size).load()
    kernels = torch.rand(10, 3, 3, generator=torch.Generator().manual_seed(seed))
    kernels /= kernels.sum((1, 2), keepdim=True)
    x = native.images.float() / 255
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels[:, None], groups=1)[torch.arange(len(x)), native.labels]
    up = F.interpolate(blurred[:, None], size=(size, size), mode="bilinear", align_corners=False)
    assert torch.equal(native.labels, train.labels)
    return ImageSet((up.clamp(0, 1) * 255).round().to(torch.uint8), train.labels, 10), test


def accuracy(train: ImageSet, test: ImageSet, countermeasure: str, epochs: int, width: int) -> float:
    hooks = COUNTERMEASURES.create(countermeasure).train_hooks(10, train.size)
    torch.manual_seed(0)
    model = VICTIMS.create("cnn", width=width).build(10, 1, train.size)
    return train_and_evaluate(model, train, test, make_recipe("quick", epochs=epochs, batch_size=64), seed=0,
                              device=CPU, augment="crop", hooks=hooks)["final"]


def test_rsk_ff_recovers_accuracy_on_a_class_wise_blur_poison():
    """32×32 digits (CIFAR's size, where ⌊30·0.3⌋ = 9 frequencies are kept), 30 per class, 12 epochs: the poison
    holds the plain victim far below clean digits (≈ 98 %); RSK+FF lifts it (measured 20.0 → 27.3 %; other kernel
    seeds 41.3 → 56.7, 26.7 → 35.3)."""
    train, test = blur_poison(30, 32)
    plain = accuracy(train, test, "none", 12, 16)
    recovered = accuracy(train, test, "rsk_ff", 12, 16)
    assert plain < 0.5 and recovered > plain + 0.03, (plain, recovered)


@pytest.mark.slow
def test_coin_recovers_accuracy_on_a_class_wise_blur_poison():
    """COIN needs longer training than RSK+FF to fit its resampled images (the official script trains 80 epochs):
    50 per class, 30 epochs (≈ 80 s on 2 cores). Measured 25.0 → 40.7 % (kernel seed 1: 22.3 → 28.0)."""
    train, test = blur_poison(50, 32)
    plain = accuracy(train, test, "none", 30, 16)
    recovered = accuracy(train, test, "coin", 30, 16)
    assert plain < 0.5 and recovered > plain + 0.05, (plain, recovered)
