"""Convolution-based unlearnable datasets (CUDA): one random blur filter per class, convolved with its images."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.api import PROTECTIONS, ImageSet, Protection

CHUNK = 2 ** 22  # values per batch on the device (float64)


def cuda_filters(num_classes: int, channels: int, kernel_size: int, blur: float, grayscale: bool,
                 seed: int) -> torch.Tensor:
    """K×C×k×k filters (float64), drawn from ``seed`` (the private key): off-centre weights uniform in
    [0, ``blur``), centre weight 1, each filter scaled to sum to 1. ``grayscale``: one filter per class,
    repeated over the channels; otherwise one per class and channel."""
    gen = torch.Generator().manual_seed(seed)
    drawn = 1 if grayscale else channels
    filters = torch.rand((num_classes, drawn, kernel_size, kernel_size), generator=gen, dtype=torch.float64) * blur
    filters[..., kernel_size // 2, kernel_size // 2] = 1.0
    filters = filters / filters.sum((-2, -1), keepdim=True)
    return filters.expand(num_classes, channels, kernel_size, kernel_size).contiguous()


def convolve(images: torch.Tensor, filters: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Each uint8 image (N×C×H×W) convolved, channel by channel, with its own C×k×k ``filters`` (N×C×k×k),
    zero padding keeping the size (cross-correlation, torch's convention), rounded and clamped to uint8.
    Batch-wise on ``device``: one grouped ``conv2d`` over the chunk's N·C channels."""
    n, c, h, w = images.shape
    k = filters.shape[-1]
    step = max(1, CHUNK // images[0].numel())
    out = torch.empty_like(images)
    for start in range(0, n, step):
        x = images[start:start + step].to(device, torch.float64)
        m = len(x)
        weight = filters[start:start + step].to(device).reshape(m * c, 1, k, k)
        y = F.conv2d(x.reshape(1, m * c, h, w), weight, padding=k // 2, groups=m * c).reshape(m, c, h, w)
        out[start:start + m] = y.round().clamp(0, 255).to(torch.uint8).cpu()
    return out


@PROTECTIONS.register("cuda")
class ConvolutionUnlearnable(Protection):
    """CUDA (Sadasivan, Soltanolkotabi & Feizi, CVPR 2023, "CUDA: Convolution-based Unlearnable Datasets",
    arXiv 2303.04278): model-free and class-wise (abstract, §3): a private key (``seed``) draws one random
    k×k filter per class; every training image of class y is convolved with class y's filter, so a network
    learns the filter–label relation instead of the image content. Labels are unchanged; there is no L∞
    budget (the change is multiplicative, unbounded by design).

    Settings: ``blur`` is the paper's blur parameter p_b, 0.3 for CIFAR-10 (the official README's command
    line ``--blur-parameter=0.3``); ``kernel_size`` 3, the paper's CIFAR filter size. Filter (``cuda_filters``):
    off-centre weights uniform in [0, p_b), centre weight 1 (p_b = 0 is the identity; a larger p_b blurs
    more), scaled to sum to 1 so that a filtered image stays in [0, 255] and keeps its mean brightness.
    ``grayscale=False`` draws a filter per channel (colour images get channel-specific blur);
    ``grayscale=True`` shares one per class over the channels (the paper's grayscale-filter variant).
    Convolution (``convolve``): zero padding, size kept, on float64 pixels; rounded and clamped to 8 bits.

    Deviations and what could not be checked: the method section's text was not retrievable here and the
    official code (vinusankars/Convolution-based-Unlearnability) was not read, as its licence forbids
    copying; the uniform off-centre draw with centre 1, the unit-sum normalisation, per-channel filters by
    default, zero padding and the rounding to 8 bits are this reading of the paper, not verified against
    its text or code (numbers may differ). The paper's kernel size for ImageNet-size images was not found:
    ``kernel_size`` stays 3 unless set. The README's ``--mix`` (fraction of images protected) is the
    matrix's poison-ratio axis, not a parameter here.
    """

    paper: ClassVar[str] = "Sadasivan et al. 2023 (CUDA), CVPR, §3; p_b = 0.3 as in the official README"
    bounds: ClassVar[dict[str, str]] = {"kernel_size": "[3, inf)"}  # odd, too: __post_init__
    blur: float = 0.3
    kernel_size: int = 3
    grayscale: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.blur) and self.blur >= 0):
            raise ValueError(f"cuda blur (p_b) must be a finite number ≥ 0 (paper: 0.3), got {self.blur}")
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"cuda kernel_size must be odd and ≥ 3 (paper: 3 on CIFAR), got {self.kernel_size}")

    def filters(self, num_classes: int, channels: int, seed: int) -> torch.Tensor:
        """The K×C×k×k filters that ``seed`` (the private key) gives."""
        return cuda_filters(num_classes, channels, self.kernel_size, self.blur, self.grayscale, seed)

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        filters = self.filters(train.num_classes, train.channels, seed)
        return train.with_images(convolve(train.images, filters[train.labels], device))
