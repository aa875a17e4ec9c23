"""Spatial filters and additive noise applied to the train set before training (DH §IV-A5: MeanF, MedianF,
GaussF with kernel 3 and σ = 0.1, GaussN with σ = 0.1).

Edges are replicated (as Pillow's rank and box filters do); images are processed on the device in chunks of
about ``CHUNK`` values (float64; float32 for the median, exact on integers) and rounded back to 8 bits.
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from bench.api import COUNTERMEASURES, Countermeasure, ImageSet

CHUNK = 2 ** 22


def _chunked(train: ImageSet, device: torch.device, fn: Callable[[torch.Tensor], torch.Tensor],
             dtype: torch.dtype = torch.float64) -> ImageSet:
    """Apply ``fn`` (float images in 0..255 → float) chunk by chunk, rounded and clamped to uint8."""
    step = max(1, CHUNK // train.images[0].numel())
    out = [fn(train.images[i:i + step].to(device, dtype)).round().clamp(0, 255).to(torch.uint8).cpu()
           for i in range(0, len(train), step)]
    return train.with_images(torch.cat(out) if out else train.images.clone())


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate every channel with a k×k ``kernel``, edges replicated."""
    n, c, h, w = x.shape
    pad = kernel.shape[-1] // 2
    padded = F.pad(x.reshape(n * c, 1, h, w), (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(padded, kernel.to(x)[None, None]).reshape(n, c, h, w)


def _check_kernel(name: str, kernel: int) -> None:
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"{name} kernel must be odd and ≥ 1, got {kernel}")


@COUNTERMEASURES.register("median_filter")
class MedianFilter(Countermeasure):
    """Median filter over a ``kernel``×``kernel`` window per channel, edges replicated (as Pillow's
    ``MedianFilter``): kornia's ``median_blur`` on the replicate-padded images (byte for byte the same as an
    unfold median, and faster). DH §IV-A5 'MedianF' (k = 3)."""

    paper: ClassVar[str] = "DH §IV-A5 (MedianF, k = 3)"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})
    kernel: int = 3

    def __post_init__(self) -> None:
        _check_kernel("median_filter", self.kernel)

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        import kornia  # here, not at the top: importing it costs every `bench list` ~0.2 s

        pad = self.kernel // 2

        def median(x: torch.Tensor) -> torch.Tensor:  # kornia pads with zeros: replicate first, then crop
            padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
            return kornia.filters.median_blur(padded, self.kernel)[..., pad:pad + x.shape[-2], pad:pad + x.shape[-1]]

        return _chunked(train, device, median, torch.float32)  # a median of integers is exact in float32


@COUNTERMEASURES.register("mean_filter")
class MeanFilter(Countermeasure):
    """Mean (box) filter over a ``kernel``×``kernel`` window per channel, edges replicated, rounded to the
    nearest level (one rounding, where Pillow's two-pass ``BoxBlur`` rounds twice). DH §IV-A5 'MeanF' (k = 3)."""

    paper: ClassVar[str] = "DH §IV-A5 (MeanF, k = 3)"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})
    kernel: int = 3

    def __post_init__(self) -> None:
        _check_kernel("mean_filter", self.kernel)

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        box = torch.full((self.kernel, self.kernel), 1.0 / self.kernel ** 2, dtype=torch.float64)
        return _chunked(train, device, lambda x: _filter(x, box))


def gaussian_kernel(kernel: int, sigma: float) -> torch.Tensor:
    """The normalised k×k Gaussian exp(−(i² + j²) / 2σ²), float64."""
    offsets = torch.arange(kernel, dtype=torch.float64) - kernel // 2
    one = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    two = one[:, None] * one[None, :]
    return two / two.sum()


@COUNTERMEASURES.register("gauss_filter")
class GaussianFilter(Countermeasure):
    """Gaussian smoothing with a ``kernel``×``kernel`` window and standard deviation ``sigma`` pixels, edges
    replicated. DH §IV-A5 'GaussF': k = 3, σ = 0.1. At σ = 0.1 the neighbours weigh e^(−50) ≈ 2·10⁻²² of the
    centre, so on 8-bit images the filter is the identity: DH Table I's GaussF column ≈ its Vanilla column
    agrees. The paper's setting is kept; sweep ``sigma`` for a filter that smooths."""

    paper: ClassVar[str] = "DH §IV-A5 (GaussF, k = 3, σ = 0.1)"
    test_params: ClassVar[dict[str, object]] = {"sigma": 1.0}  # σ = 0.1 is the identity at 8 bits
    stages: ClassVar[frozenset[str]] = frozenset({"data"})
    kernel: int = 3
    sigma: float = 0.1

    def __post_init__(self) -> None:
        _check_kernel("gauss_filter", self.kernel)
        if not self.sigma > 0:
            raise ValueError(f"gauss_filter sigma must be > 0, got {self.sigma}")

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        weights = gaussian_kernel(self.kernel, self.sigma)
        return _chunked(train, device, lambda x: _filter(x, weights))


@COUNTERMEASURES.register("gauss_noise")
class GaussianNoise(Countermeasure):
    """Additive Gaussian noise N(0, ``sigma``²) on [0, 1] images, one draw per pixel from a CPU generator
    seeded with the cell's seed (the same noise on any device), clamped to [0, 1] and rounded to 8 bits.
    DH §IV-A5 'GaussN': σ = 0.1, drawn once (data stage), not per epoch."""

    paper: ClassVar[str] = "DH §IV-A5 (GaussN, σ = 0.1)"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})
    sigma: float = 0.1

    def __post_init__(self) -> None:
        if not self.sigma >= 0 or math.isinf(self.sigma):
            raise ValueError(f"gauss_noise sigma must be finite and ≥ 0, got {self.sigma}")

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        gen = torch.Generator().manual_seed(seed)
        shape = train.images.shape[1:]
        return _chunked(train, device, lambda x: x + 255 * self.sigma * torch.randn(
            (x.shape[0], *shape), generator=gen, dtype=torch.float64).to(x.device))
