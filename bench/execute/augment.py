"""Standard train augmentations, batch-wise on the device (no per-sample PIL): the papers' defaults.

CIFAR: random crop with 4-pixel zero padding (size/8 at other sizes) + horizontal flip; SVHN: none;
ImageNet subset: random resized crop (scale 0.08–1, ratio 3/4–4/3) + flip. Random draws come from a CPU
generator, so a seed gives the same batches on any device; they reach a GPU through pinned memory without
blocking the host (``host_to_device``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("crop_flip", "crop", "flip", "rrc_flip", "none")


def standard_augment(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Augment a float batch N×C×H×W in [0, 1] with one of ``KINDS``."""
    if kind in ("crop_flip", "crop"):
        x = random_crop(x, max(1, x.shape[-1] // 8), gen)
    if kind == "rrc_flip":
        x = random_resized_crop(x, gen)
    if kind in ("crop_flip", "flip", "rrc_flip"):
        x = random_flip(x, gen)
    if kind not in KINDS:
        raise ValueError(f"unknown augmentation {kind!r} (known: {KINDS})")
    return x


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``: on CUDA pinned and copied asynchronously (a plain copy would make the host wait
    for the GPU to catch up, every batch); the tensor itself on the CPU."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop back to size at a random offset per image (torchvision RandomCrop)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (host_to_device(torch.randint(0, 2 * pad + 1, (n,), generator=gen), x.device) for _ in range(2))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image horizontally with probability 1/2."""
    mask = host_to_device(torch.rand(x.shape[0], generator=gen) < 0.5, x.device)
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def random_resized_crop(x: torch.Tensor, gen: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop, batch-wise: a random area fraction and aspect ratio per image,
    resampled bilinearly to the input size with an affine grid."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(*scale, generator=gen)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)
    height = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - height)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = width, cx, height, cy
    grid = F.affine_grid(host_to_device(theta.to(x.dtype), x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
