"""Batch-wise image operations shared by the train-stage countermeasures (not a plugin: no registrations).

Inputs are float N×C×H×W batches in [0, 1] on any device; magnitudes are per image (tensors of length N on
the batch's device). Colour operations follow Pillow's ``ImageEnhance``/``ImageOps`` definitions (a blend with
a degenerate image, clamped); geometric ones resample with an affine grid, bilinear, zero fill. Random draws
come from the training loop's CPU generator (``draw``), or from a device generator seeded by it
(``device_generator``) for large noise tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from bench.api import host_to_device


def require(ok: bool, component: object, rule: str) -> None:
    """Raise ValueError naming the component and the rule its parameters break."""
    if not ok:
        raise ValueError(f"{component.name} needs {rule}, got {component.params()}")  # type: ignore[attr-defined]


def mix_labels(y: torch.Tensor, perm: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """Soft labels λ·onehot(y) + (1 − λ)·onehot(y[perm])."""
    one_hot = F.one_hot(y, num_classes).float()
    return lam * one_hot + (1 - lam) * one_hot[perm]


def paste_box(x: torch.Tensor, perm: torch.Tensor, lam: float, cy: int, cx: int) -> tuple[torch.Tensor, float]:
    """CutMix's box (Yun et al. 2019 ``rand_bbox``): sides ⌊size·√(1 − λ)⌋ centred at (cy, cx), clipped, filled
    from ``x[perm]``; returns the mixed batch and the pasted fraction of the area."""
    h, w = x.shape[-2:]
    cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    out = x.clone()
    out[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    return out, (y2 - y1) * (x2 - x1) / (h * w)


def draw(n: int, gen: torch.Generator, device: torch.device, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """``n`` uniform values in [low, high) from ``gen``, moved to ``device``."""
    return host_to_device(torch.rand(n, generator=gen) * (high - low) + low, torch.device(device))


def signed(n: int, gen: torch.Generator, device: torch.device, low: float, high: float) -> torch.Tensor:
    """Uniform magnitudes in [low, high) with a random sign (TrivialAugment's random mirror of a magnitude)."""
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    return host_to_device(sign * (torch.rand(n, generator=gen) * (high - low) + low), torch.device(device))


def beta(alpha: float, gen: torch.Generator) -> float:
    """One Beta(α, α) draw seeded from ``gen`` (torch's Beta takes no generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def device_generator(gen: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``gen``: large noise is drawn where it is used."""
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))


def per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def luma(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma N×1×H×W (the channel itself for one-channel images)."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    return 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]


def blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``ImageEnhance``: degenerate + factor·(x − degenerate), clamped to [0, 1]."""
    return (degenerate + per_image(factor) * (x - degenerate)).clamp(0, 1)


def brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(torch.zeros_like(x), x, factor)


def contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(luma(x).mean((1, 2, 3), keepdim=True).expand_as(x), x, factor)


def sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with Pillow's SMOOTH kernel (1 1 1 / 1 5 1 / 1 1 1)/13 on the interior; borders kept."""
    n, c, h, w = x.shape
    kernel = torch.ones(1, 1, 3, 3, device=x.device, dtype=x.dtype)
    kernel[0, 0, 1, 1] = 5
    smooth = F.conv2d(x.reshape(n * c, 1, h, w), kernel / 13).reshape(n, c, h - 2, w - 2)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return blend(degenerate, x, factor)


def affine(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Resample with N×2×3 ``matrix`` (output → input, normalised coordinates), bilinear, zero fill."""
    grid = F.affine_grid(matrix.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def identity_matrix(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(2, 3, device=device).repeat(n, 1, 1)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    angle = degrees * math.pi / 180
    matrix = identity_matrix(x.shape[0], x.device)
    matrix[:, 0, 0], matrix[:, 0, 1] = angle.cos(), -angle.sin()
    matrix[:, 1, 0], matrix[:, 1, 1] = angle.sin(), angle.cos()
    return affine(x, matrix)


def cutout(x: torch.Tensor, length: int, gen: torch.Generator) -> torch.Tensor:
    """DeVries & Taylor 2017: zero a ``length``-sided square centred uniformly in each image, clipped at borders."""
    n, _, h, w = x.shape
    cy, cx = (host_to_device(torch.randint(0, s, (n,), generator=gen), x.device) for s in (h, w))
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    inside_y = (rows >= cy[:, None] - length // 2) & (rows < cy[:, None] + length - length // 2)
    inside_x = (cols >= cx[:, None] - length // 2) & (cols < cx[:, None] + length - length // 2)
    mask = inside_y[:, None, :, None] & inside_x[:, None, None, :]
    return x.masked_fill(mask, 0.0)
