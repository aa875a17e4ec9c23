"""Surrogate-free noise protections: none (clean), sample-wise uniform noise, class-wise noise."""

from __future__ import annotations

from typing import ClassVar

import torch

from bench.api import PROTECTIONS, ImageSet, Protection, pixel_steps


def add_noise(train: ImageSet, noise: torch.Tensor) -> ImageSet:
    """Publish ``train + noise`` (noise in pixel units) as 8-bit images: add, round, clamp to [0, 255]."""
    shifted = train.images.to(noise.device).float() + noise
    return train.with_images(shifted.round().clamp(0, 255).to(torch.uint8).cpu())


class _LinfNoise(Protection):
    """Shared check of an L∞ budget given in 1/255 pixel units."""

    def __post_init__(self) -> None:
        if not 0 <= self.epsilon <= 255:  # type: ignore[attr-defined]
            raise ValueError(f"epsilon must be in [0, 255] (1/255 pixel units), got {self.epsilon}")  # type: ignore[attr-defined]


@PROTECTIONS.register("clean")
class Clean(Protection):
    """No protection: the reference row of every table."""

    paper: ClassVar[str] = "reference (natural training data)"
    needs_labels: ClassVar[bool] = False
    identity: ClassVar[bool] = True

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        return train


@PROTECTIONS.register("random_noise")
class RandomNoise(_LinfNoise):
    """Sample-wise uniform noise in [−ε, ε] per pixel: the random-noise baseline (Huang et al. 2021, Table 1).

    ``epsilon`` is the L∞ budget in 1/255 pixel units (8 → 8/255, the papers' default).
    """

    paper: ClassVar[str] = "Huang et al. 2021 (EM) Table 1 random-noise baseline; DH §IV-A"
    needs_labels: ClassVar[bool] = False
    epsilon: float = pixel_steps(8.0)

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        gen = torch.Generator().manual_seed(seed)
        noise = (torch.rand(train.images.shape, generator=gen) * 2 - 1) * self.epsilon
        return add_noise(train, noise.to(device))


@PROTECTIONS.register("cwn")
class ClassWiseNoise(_LinfNoise):
    """Class-wise noise (CWN): one fixed uniform [−ε, ε] pattern per class, added to all its images.

    ConfounderGAN §4.2 (the imperceptible alternative to class-wise patches) and Huang et al. 2021
    (class-wise random noise). ``epsilon`` in 1/255 pixel units (8 → 8/255).
    """

    paper: ClassVar[str] = "ConfounderGAN §4.2 (CWN); Huang et al. 2021 class-wise random noise"
    epsilon: float = pixel_steps(8.0)

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        gen = torch.Generator().manual_seed(seed)
        patterns = (torch.rand((train.num_classes, *train.images.shape[1:]), generator=gen) * 2 - 1) * self.epsilon
        return add_noise(train, patterns[train.labels].to(device))
