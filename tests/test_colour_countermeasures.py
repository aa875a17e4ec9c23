"""``jpeg_gray`` (ISS's greyscale + JPEG) and DUNE's colour-domain countermeasures (countermeasures/colour.py): each
one's defining property on real images, the greyscale cases, and that ``jpeg_gray`` recovers a poisoned victim.

Generic contracts (shape, dtype, labels, no mutation, determinism) are in test_components.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from bench.api import COUNTERMEASURES, DATASETS, PROTECTIONS, VICTIMS, ImageSet, make_recipe, train_and_evaluate
from bench.countermeasures import colour

CPU = torch.device("cpu")
COLOUR = ["channel_norm", "hist_eq", "lab_whiten", "yuv_whiten"]
# OpenCV 5.1's 8-bit cvtColor of red, green, blue, orange, azure, grey (measured once; cv2 is no dependency)
PIXELS = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 120, 40], [17, 99, 230], [128, 128, 128]]
OPENCV_YUV = [[76, 91, 255], [150, 54, 0], [29, 239, 103], [135, 81, 185], [89, 197, 65], [128, 128, 128]]
OPENCV_LAB = [[136, 208, 195], [224, 42, 211], [82, 207, 20], [148, 153, 182], [116, 156, 56], [137, 128, 128]]


def purify(name: str, data: ImageSet, **params: object) -> ImageSet:
    return COUNTERMEASURES.create(name, **params).purify(data, seed=0, device=CPU)


def tinted(data: ImageSet, seed: int) -> ImageSet:
    """Greyscale digits as ink of a random colour per image (each channel x·w, w in [0.5, 1)): their luma and
    colours agree (bench.testing's ``coloured`` inverts a channel, which a greyscale-trained victim cannot read)."""
    w = torch.rand((len(data), 3, 1, 1), generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.5
    return ImageSet((data.images.float() * w).round().to(torch.uint8), data.labels, data.num_classes)


@pytest.fixture(scope="module")
def photos() -> ImageSet:
    """Three real photographs shipped with scikit-image, 64×64 RGB."""
    from skimage import data
    images = [torch.from_numpy(np.ascontiguousarray(f()[:256:4, :256:4, :3])).permute(2, 0, 1)
              for f in (data.astronaut, data.coffee, data.chelsea)]
    return ImageSet(torch.stack(images), torch.arange(3), 3)


@pytest.fixture(scope="module")
def digits() -> tuple[ImageSet, ImageSet]:
    return DATASETS.create("digits", per_class=50, test_per_class=30).load()


def pillow_iss(image: torch.Tensor, quality: int) -> torch.Tensor:
    """The official ISS pipeline on one RGB image: torchvision's Grayscale(3) (Pillow 'L', then RGB), Pillow JPEG."""
    grey = Image.fromarray(image.permute(1, 2, 0).numpy()).convert("L").convert("RGB")
    buffer = io.BytesIO()
    grey.save(buffer, "JPEG", quality=quality)
    return torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1)


def test_jpeg_gray_is_grayscale_then_jpeg(photos, digits):
    grey, jpeg = COUNTERMEASURES.create("grayscale"), COUNTERMEASURES.create("jpeg", quality=10)
    for data in (photos, tinted(digits[0], 0), digits[0]):
        composed = jpeg.purify(grey.purify(data, seed=0, device=CPU), seed=0, device=CPU)
        assert torch.equal(purify("jpeg_gray", data).images, composed.images)
        reverse = grey.purify(jpeg.purify(data, seed=0, device=CPU), seed=0, device=CPU)
        assert torch.equal(purify("jpeg_gray", data, gray_first=False).images, reverse.images)
    out = purify("jpeg_gray", photos, quality=25).images
    assert all(torch.equal(out[i], pillow_iss(photos.images[i], 25)) for i in range(len(photos)))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])  # grey stays grey
    with pytest.raises(ValueError, match="quality"):
        COUNTERMEASURES.create("jpeg_gray", quality=0)


def test_channel_norm_maps_standardised_channels_together(photos):
    out = purify("channel_norm", photos).images.double()
    assert (out.amin((1, 2, 3)) == 0).all() and (out.amax((1, 2, 3)) == 255).all()
    means, stds = out.mean((2, 3)), out.std((2, 3), correction=0)
    assert (means.amax(1) - means.amin(1)).max() < 1 and (stds.amax(1) - stds.amin(1)).max() < 1
    x = photos.images.double()
    assert not torch.allclose(x.mean((2, 3)), x.mean((2, 3))[:, :1])  # the photos' channel means differed


def test_hist_eq_is_opencvs_equalize_hist():
    """Worked by hand: levels 0 (×2), 5, 9 (×5): h₀ = 2, scale 255/6; 5 ↦ 42.5 ↦ 42 (half to even), 9 ↦ 255."""
    x = torch.tensor([0, 0, 5, 9, 9, 9, 9, 9], dtype=torch.uint8).view(1, 1, 2, 4)
    assert colour.equalize(x).flatten().tolist() == [0, 0, 42, 255, 255, 255, 255, 255]
    flat = torch.full((1, 1, 2, 2), 77, dtype=torch.uint8)
    assert torch.equal(colour.equalize(flat), flat)  # one level: copied, as OpenCV does


def test_hist_eq_flattens_the_histogram(photos):
    out = purify("hist_eq", photos).images
    for image, before in zip(out, photos.images):
        for channel, x in zip(image.flatten(1), before.flatten(1)):
            h0 = (x == x.min()).float().mean()
            for level in channel.unique():  # F_out(v) ≈ v/255 for each level of an equalised channel
                assert abs((channel <= level).float().mean() - level / 255) <= h0 + 1 / 255
            order = x.argsort()
            assert (channel[order].diff() >= 0).all()  # monotone: equalisation only relabels levels


def test_colour_codings_are_opencvs():
    rgb = torch.tensor(PIXELS, dtype=torch.float64).T.reshape(1, 3, 1, -1)
    assert colour._yuv_encode(rgb)[0, :, 0].T.tolist() == OPENCV_YUV
    assert (colour._lab_encode(rgb)[0, :, 0].T - torch.tensor(OPENCV_LAB)).abs().max() <= 2
    coded = torch.tensor(OPENCV_YUV[3:], dtype=torch.float64).T.reshape(1, 3, 1, -1)  # the primaries clip V or U
    assert (colour._yuv_decode(coded) - rgb[..., 3:]).abs().max() <= 2  # unclipped: back within rounding


@pytest.mark.parametrize("encode", [colour._lab_encode, colour._yuv_encode])
def test_whitening_standardises_then_stretches_each_channel(photos, encode):
    coded = encode(photos.images.double())
    z = colour.standardise(coded)
    assert torch.allclose(z.mean((2, 3)), torch.zeros(3, 3, dtype=z.dtype), atol=1e-9)
    assert torch.allclose(z.std((2, 3), correction=0), torch.ones(3, 3, dtype=z.dtype))
    stretched = colour.stretch(z, (2, 3))
    assert (stretched.amin((2, 3)) == 0).all() and (stretched.amax((2, 3)) == 255).all()


def test_greyscale_sets(digits):
    grey = digits[0].subset(torch.arange(40))
    outs = {name: purify(name, grey).images for name in COLOUR}
    assert all(out.shape == grey.images.shape for out in outs.values())
    assert torch.equal(outs["yuv_whiten"], outs["channel_norm"])  # Y of grey is grey: both stretch it
    lab, x = outs["lab_whiten"].flatten(1).double(), grey.images.flatten(1).double()
    assert all((a[b.argsort()].diff() >= 0).all() for a, b in zip(lab, x))  # L* stretched: order kept


@pytest.mark.parametrize("name", COLOUR + ["jpeg_gray"])
def test_deterministic_and_labels_kept(name, photos):
    before = photos.images.clone()
    first, second = purify(name, photos), purify(name, photos)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, photos.labels)
    assert torch.equal(photos.images, before) and not torch.equal(first.images, before)


def victim_accuracy(train: ImageSet, test: ImageSet) -> float:
    """A small cnn, no augmentation: a crop shifts a class-wise pattern off its pixels and weakens the poison."""
    torch.manual_seed(0)
    model = VICTIMS.create("cnn", width=16).build(train.num_classes, train.channels, train.size)
    return train_and_evaluate(model, train, test, make_recipe("quick"), seed=0, device=CPU, augment="none")["final"]


def test_jpeg_gray_recovers_from_class_wise_noise(digits):
    """Digits are coarse 17-level images: class-wise noise poisons them at ε = 64/255 (measured: clean 0.96,
    cwn 0.48, jpeg_gray 0.86 on a 2-core CPU in ~15 s)."""
    train, test = tinted(digits[0], 0), tinted(digits[1], 1)
    poisoned = PROTECTIONS.create("cwn", epsilon=64.0).protect(train, seed=0, device=CPU)
    clean, dropped = victim_accuracy(train, test), victim_accuracy(poisoned, test)
    recovered = victim_accuracy(purify("jpeg_gray", poisoned), test)
    assert dropped < clean - 0.25, (clean, dropped)
    assert recovered > dropped + 0.2, (dropped, recovered)


def test_matches_the_official_opencv_functions(photos):
    """Against DUNE's train.py functions re-stated with OpenCV, where OpenCV is installed (it is no dependency)."""
    cv2 = pytest.importorskip("cv2")
    images = [np.ascontiguousarray(x) for x in photos.images.permute(0, 2, 3, 1).numpy()]
    want = torch.from_numpy(np.stack([np.stack([cv2.equalizeHist(np.ascontiguousarray(a[..., c]))
                                                for c in range(3)], -1) for a in images])).permute(0, 3, 1, 2)
    assert torch.equal(purify("hist_eq", photos).images, want)

    def yuv(a: np.ndarray) -> np.ndarray:
        z = cv2.cvtColor(a, cv2.COLOR_RGB2YUV).astype(np.float32)
        z = (z - z.mean((0, 1))) / z.std((0, 1))
        z = (z - z.min((0, 1))) / (z.max((0, 1)) - z.min((0, 1))) * 255
        return cv2.cvtColor(np.clip(z, 0, 255).astype(np.uint8), cv2.COLOR_YUV2RGB)
    want = torch.from_numpy(np.stack([yuv(a) for a in images])).permute(0, 3, 1, 2)
    assert (purify("yuv_whiten", photos).images.int() - want.int()).abs().max() <= 3
