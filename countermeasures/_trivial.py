"""UEraser's augmentations, batch-wise (not a plugin: no registrations; ``countermeasures.ueraser`` uses them).

Qin et al. 2023 (APBench ``defense/ueraser.py``, built on kornia): plasma brightness and plasma contrast
(TorMentor fractals), channel shuffle, then TrivialAugment (Müller & Hutter 2021) with kornia's default
operation list and ranges. Written here on plain torch (kornia is not a dependency); every draw comes from
the loop's generator (noise maps from a device generator seeded by it), one draw per image.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from bench.api import host_to_device
from bench.countermeasures._ops import (affine, brightness, contrast, device_generator, draw, identity_matrix,
                                        per_image, rotate, sharpness, signed)


def shear(x: torch.Tensor, amount: torch.Tensor, axis: int) -> torch.Tensor:
    matrix = identity_matrix(x.shape[0], x.device)
    matrix[:, axis, 1 - axis] = amount
    return affine(x, matrix)


def translate(x: torch.Tensor, fraction: torch.Tensor, axis: int) -> torch.Tensor:
    """Shift by ``fraction`` of the side (axis 0: horizontal, 1: vertical)."""
    matrix = identity_matrix(x.shape[0], x.device)
    matrix[:, axis, 2] = 2 * fraction
    return affine(x, matrix)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    step = per_image(2.0 ** (8 - bits))
    return torch.floor(torch.round(x * 255) / step) * step / 255


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= per_image(threshold), 1 - x, x)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each image's channels to [0, 1] (Pillow's ``autocontrast`` without cut-off)."""
    low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    return torch.where(high > low, (x - low) / (high - low).clamp_min(1e-8), x)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Pillow's ``ImageOps.equalize`` per image and channel, on the 8-bit levels."""
    n, c, h, w = x.shape
    q = torch.round(x * 255).long().reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device, dtype=torch.long).scatter_add_(1, q, torch.ones_like(q))
    last = hist.gather(1, (255 - (hist > 0).flip(1).long().argmax(1, keepdim=True)))
    step = (h * w - last) // 255
    lut = ((step // 2 + hist.cumsum(1) - hist) // step.clamp_min(1)).clamp(max=255)
    out = torch.where(step > 0, lut.gather(1, q), q)
    return out.reshape(n, c, h, w).to(x.dtype) / 255


# kornia.augmentation.auto.TrivialAugment's default policy: (operation, magnitudes for n images). Signed ranges get
# a random sign; posterize keeps 4–8 bits (TrivialAugment's standard space; kornia's magnitude mapping differs).
def _policy(n: int, gen: torch.Generator, device: torch.device) -> list[tuple[Callable, torch.Tensor]]:
    def factor() -> torch.Tensor:
        return draw(n, gen, device, 0.1, 1.9)

    return [
        (lambda x, m: autocontrast(x), torch.zeros(n, device=device)),
        (lambda x, m: equalize(x), torch.zeros(n, device=device)),
        (rotate, signed(n, gen, device, 0, 30)),
        (posterize, host_to_device(torch.randint(4, 9, (n,), generator=gen), torch.device(device))),
        (solarize, draw(n, gen, device)),
        (contrast, factor()), (brightness, factor()), (sharpness, factor()),
        (lambda x, m: shear(x, m, 0), signed(n, gen, device, 0, 0.3)),
        (lambda x, m: shear(x, m, 1), signed(n, gen, device, 0, 0.3)),
        (lambda x, m: translate(x, m, 0), signed(n, gen, device, 0, 0.5)),
        (lambda x, m: translate(x, m, 1), signed(n, gen, device, 0, 0.5)),
    ]


def trivial_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One operation per image, chosen uniformly (kornia picks one per batch), at a random magnitude."""
    n = x.shape[0]
    ops = _policy(n, gen, x.device)
    choice = torch.randint(0, len(ops), (n,), generator=gen)
    out = x.clone()
    for index, (op, magnitude) in enumerate(ops):
        rows = host_to_device(torch.nonzero(choice == index).flatten(), x.device)
        if len(rows):
            out[rows] = op(x[rows], magnitude[rows]).to(x.dtype)
    return out


def plasma(shape: tuple[int, ...], roughness: torch.Tensor, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Fractal maps in [0, 1] per image and channel: octaves of bilinearly upsampled uniform noise on 2, 4, …
    cells with amplitude ``roughness``^octave, min–max normalised. Plays the part of kornia's diamond-square
    plasma (same roughness semantics: larger is rougher), not its exact algorithm."""
    n, c, h, w = shape
    local = device_generator(gen, device)
    out, cells, octave = torch.zeros(shape, device=device), 2, 0
    while cells <= 2 * max(h, w):
        noise = torch.rand((n, c, cells, cells), generator=local, device=device)
        out += per_image(roughness ** octave) * F.interpolate(noise, (h, w), mode="bilinear", align_corners=True)
        cells, octave = cells * 2, octave + 1
    low, high = out.amin((2, 3), keepdim=True), out.amax((2, 3), keepdim=True)
    return (out - low) / (high - low).clamp_min(1e-8)


def _sometimes(x: torch.Tensor, changed: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.where(per_image(draw(x.shape[0], gen, x.device) < p), changed, x)


def random_jpeg(x: torch.Tensor, gen: torch.Generator, quality: tuple[int, int] = (10, 99)) -> torch.Tensor:
    """APBench's ``random_JPEG_compression``: one quality for the batch, uniform in ``quality`` (inclusive), a
    libjpeg round trip of the 8-bit images (on the CPU: torchvision's codec), back as floats in [0, 1]."""
    from torchvision.transforms.v2.functional import jpeg  # here: torchvision pulls torch._dynamo (~1 s)

    q = int(torch.randint(quality[0], quality[1] + 1, (), generator=gen))
    images = x.detach().float().mul(255).round().clamp(0, 255).to("cpu", torch.uint8)
    return host_to_device(jpeg(images, q), x.device).to(x.dtype) / 255


def ueraser_augment(x: torch.Tensor, gen: torch.Generator, intensity: tuple[float, float] = (0.5, 1.0),
                    roughness: tuple[float, float] = (0.3, 0.7), p_plasma: float = 1.0) -> torch.Tensor:
    """APBench's ``UEraser`` (@9a6fb91: plasma p 1.0; its ``UEraser_jpeg`` passes 0.8): plasma brightness (p,
    roughness, intensity), plasma contrast (p, roughness), channel shuffle (p = 0.5), TrivialAugment (always)."""
    n, device = x.shape[0], x.device
    rough = draw(n, gen, device, *roughness)
    bright = 2 * plasma(x.shape, rough, gen, device) - 1
    x = _sometimes(x, (x + per_image(draw(n, gen, device, *intensity)) * bright).clamp(0, 1), p_plasma, gen)
    rough = draw(n, gen, device, *roughness)
    x = _sometimes(x, ((x - 0.5) * 4 * plasma(x.shape, rough, gen, device) + 0.5).clamp(0, 1), p_plasma, gen)
    perm = host_to_device(torch.rand(n, x.shape[1], generator=gen).argsort(1), torch.device(device))
    x = _sometimes(x, x.gather(1, perm[:, :, None, None].expand_as(x)), 0.5, gen)
    return trivial_augment(x, gen)
