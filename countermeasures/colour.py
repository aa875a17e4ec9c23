"""Colour-domain countermeasures that DUNE is tested against (Wang et al., 'Dual-branch Robust Unlearnable Examples',
ICML 2026): per-image channel normalisation, histogram equalisation, LAB and YUV whitening.

The paper names them; their definitions are the official code's (wxldragon/DUNE @a35cbb6, ``train.py``:
``per_image_channel_normalization``, ``histogram_equalization``, ``lab_whitening``, ``yuv_whitening``), on 8-bit
images with OpenCV's 8-bit conventions, written here in torch (and kornia for LAB). Each applies once to the
data (the official code applies them per epoch after ``RandomCrop(32, padding=4)`` and flip, so its statistics
include the crop's black border); each result is floored to 8 bits where the official ``astype(np.uint8)``
truncates (in float64 here, float32 there: a value that is a whole number can floor one lower there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from bench.api import COUNTERMEASURES, Countermeasure, ImageSet

Coding = Callable[[torch.Tensor], torch.Tensor]
CHUNK = 2 ** 22  # values per chunk: bounds the float64 temporaries on large sets


def _chunks(train: ImageSet, device: torch.device, fn: Callable[[torch.Tensor], torch.Tensor]) -> ImageSet:
    """``fn`` (uint8 N×C×H×W on ``device`` → uint8) over chunks of the set, results on the CPU."""
    step = max(1, CHUNK // max(1, train.images[0].numel()))
    out = [fn(part.to(device)).cpu() for part in train.images.split(step)]
    return train.with_images(torch.cat(out) if out else train.images.clone())


def standardise(x: torch.Tensor, dims: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    """Zero mean, unit (population) std over ``dims``; a constant channel gets std 1, as the official code does."""
    std = x.std(dims, correction=0, keepdim=True)
    return (x - x.mean(dims, keepdim=True)) / torch.where(std < 1e-6, torch.ones_like(std), std)


def stretch(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Min–max to [0, 255] over ``dims``, floored (official ``astype(np.uint8)``); a constant span becomes 0."""
    low, high = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    span = high - low
    out = (x - low) / torch.where(span < 1e-6, torch.ones_like(span), span) * 255
    return torch.where(span < 1e-6, torch.zeros_like(out), out).clamp(0, 255).floor()


@COUNTERMEASURES.register("channel_norm")
class ChannelNorm(Countermeasure):
    """Per-image channel normalisation (DUNE 'PICN'): each channel to zero mean and unit std, then one min–max map
    of the whole image (all channels together, so channel means stay equal) to [0, 255], floored. Official
    ``per_image_channel_normalization`` (on 400 CIFAR-10 images 99.7 % of values equal, the rest ± 1). Greyscale:
    the same with one channel (a contrast stretch)."""

    paper: ClassVar[str] = "DUNE (Wang et al. 2026) defences; official train.py per_image_channel_normalization"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        return _chunks(train, device, lambda x: stretch(standardise(x.double()), (1, 2, 3)).to(torch.uint8))


def equalize(x: torch.Tensor) -> torch.Tensor:
    """OpenCV's ``equalizeHist`` per image and channel of uint8 N×C×H×W: with h₀ the count of the lowest level
    present and F the cumulative histogram, level v ↦ round((F(v) − h₀)·255 / (H·W − h₀)) in float32, half to even
    (OpenCV's ``cvRound``); a one-level channel is copied."""
    flat = x.reshape(x.shape[0] * x.shape[1], -1).long()
    hist = torch.zeros(flat.shape[0], 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    low = hist.gather(1, hist.gt(0).int().argmax(1, keepdim=True))
    total = flat.shape[1]
    span = (total - low).clamp(min=1).float()
    scale = torch.full_like(span, 255.0) / span  # float32 as OpenCV (a scalar / tensor is a reciprocal × 255)
    lut = ((hist.cumsum(1) - low).float() * scale).round().clamp(0, 255)
    lut = torch.where(low == total, torch.arange(256, device=x.device, dtype=lut.dtype).expand_as(lut), lut)
    return lut.gather(1, flat).to(torch.uint8).reshape(x.shape)


@COUNTERMEASURES.register("hist_eq")
class HistEq(Countermeasure):
    """Histogram equalisation of each channel of each image (DUNE 'HistEq'): official ``histogram_equalization``,
    OpenCV's ``equalizeHist`` on R, G and B separately (``equalize``; not Pillow's or kornia's ``equalize``, which
    step the histogram differently; equal to OpenCV 5.1's on 400 CIFAR-10 images). Greyscale: the one channel."""

    paper: ClassVar[str] = "DUNE (Wang et al. 2026) defences; official train.py histogram_equalization"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        return _chunks(train, device, equalize)


def whiten(x: torch.Tensor, encode: Coding, decode: Coding) -> torch.Tensor:
    """Whitening in a colour space: ``encode`` 8-bit RGB (float, 0..255) to OpenCV's 8-bit coding of that space
    (integers 0..255, as OpenCV returns uint8); each channel of each image standardised, then min–max stretched to
    [0, 255] and floored (the standardisation does not change the stretch: the official code does both); ``decode``
    back to 8-bit RGB, rounded and clamped. The stretch magnifies a channel of narrow span (a nearly grey
    image's chroma) by up to 255×, so the coding must be OpenCV's to the level. One-channel images are the
    luminance: chroma stays neutral and one channel returns."""
    coded = encode(x.double().expand(-1, 3, -1, -1))
    channels = slice(0, 1) if x.shape[1] == 1 else slice(0, 3)
    coded[:, channels] = stretch(standardise(coded[:, channels]), (2, 3))
    out = decode(coded).round().clamp(0, 255).to(torch.uint8)
    return out[:, :x.shape[1]]


def _lab_encode(rgb: torch.Tensor) -> torch.Tensor:  # OpenCV's 8-bit LAB: L·255/100, a + 128, b + 128, rounded
    from kornia.color import rgb_to_lab  # here: importing kornia costs every `bench list` ~0.2 s
    lab = rgb_to_lab(rgb / 255)
    return torch.cat([lab[:, :1] * 2.55, lab[:, 1:] + 128], 1).round().clamp(0, 255)


def _lab_decode(coded: torch.Tensor) -> torch.Tensor:
    from kornia.color import lab_to_rgb
    return lab_to_rgb(torch.cat([coded[:, :1] / 2.55, coded[:, 1:] - 128], 1), clip=True) * 255


def _descale(v: torch.Tensor) -> torch.Tensor:  # OpenCV's CV_DESCALE(v, 14): fixed point to integer, rounded
    return (v + (1 << 13)) >> 14


def _yuv_encode(rgb: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit RGB→YUV in its 14-bit fixed point (BT.601: Y = 0.299 R + 0.587 G + 0.114 B,
    U = 0.492 (B − Y) + 128, V = 0.877 (R − Y) + 128): kornia's float matrix rounds otherwise on ~7 % of values."""
    r, g, b = rgb.long().unbind(1)
    y = _descale(4899 * r + 9617 * g + 1868 * b)
    u, v = (_descale(k * (c - y) + (128 << 14)) for k, c in ((8061, b), (14369, r)))
    return torch.stack([y, u, v], 1).clamp(0, 255).double()


def _yuv_decode(coded: torch.Tensor) -> torch.Tensor:
    """OpenCV's 8-bit YUV→RGB fixed point: R = Y + 1.140 V′, G = Y − 0.395 U′ − 0.581 V′, B = Y + 2.032 U′."""
    y, u, v = coded.long().unbind(1)
    u, v = u - 128, v - 128
    return torch.stack([y + _descale(18678 * v), y + _descale(-6472 * u - 9519 * v), y + _descale(33292 * u)], 1)


@COUNTERMEASURES.register("lab_whiten")
class LabWhiten(Countermeasure):
    """LAB whitening (DUNE 'LAB'): official ``lab_whitening``, ``whiten`` in CIE L*a*b* (kornia's float sRGB/D65
    conversions scaled to OpenCV's 8-bit coding). Not OpenCV's to the level: its 8-bit LAB is a table-driven fixed
    point (kornia's coding differs by 1–2 levels on ~12 % of values), which the stretch magnifies on low-chroma
    images, and its decoding clips out-of-gamut colours otherwise; against the official function with OpenCV 5.1
    on 400 CIFAR-10 images 57 % of values agree, mean |Δ| 2.7 levels. As there, a constant channel becomes 0: a
    grey RGB image's neutral a*, b* become −128 (a tint). Greyscale sets: only L* is whitened."""

    paper: ClassVar[str] = "DUNE (Wang et al. 2026) defences; official train.py lab_whitening"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        return _chunks(train, device, lambda x: whiten(x, _lab_encode, _lab_decode))


@COUNTERMEASURES.register("yuv_whiten")
class YuvWhiten(Countermeasure):
    """YUV whitening (DUNE 'YUV'): official ``yuv_whitening``, ``whiten`` in YUV with OpenCV's own 8-bit fixed
    point both ways (kornia's float matrices round otherwise, and the stretch magnifies that): against the official
    function with OpenCV 5.1 on 400 CIFAR-10 images 95 % of values agree, the rest by ≤ 3 levels (its float32
    stretch floors some whole numbers one lower). As there, a constant channel becomes 0. Greyscale sets: only Y
    is whitened (the same as ``channel_norm`` there)."""

    paper: ClassVar[str] = "DUNE (Wang et al. 2026) defences; official train.py yuv_whitening"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        return _chunks(train, device, lambda x: whiten(x, _yuv_encode, _yuv_decode))
