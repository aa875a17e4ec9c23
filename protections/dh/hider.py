"""DH's fitted model: the hiding network with its semantic images, publishing and the record's quality figures
(§III-B1, §IV-A2: hide, clip the perturbation to L∞ ε, 8-bit; §IV-B: PSNR of x_ue against x_c)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from bench.protections.dh.hinet import HidingNetwork


class Hider(nn.Module):
    """The hiding network and the K×M semantic images it hides (a buffer, so one artifact encrypts new data).

    ``arch``: channels, blocks, clamp, growth (the network), classes, variants, size (the images), epsilon.
    """

    def __init__(self, channels: int, blocks: int, clamp: float, growth: int, classes: int, variants: int,
                 size: int, epsilon: float) -> None:
        super().__init__()
        self.arch = {"channels": channels, "blocks": blocks, "clamp": clamp, "growth": growth, "classes": classes,
                     "variants": variants, "size": size, "epsilon": epsilon}
        self.network = HidingNetwork(channels, blocks, clamp, growth)
        self.register_buffer("secrets", torch.zeros(classes, variants, channels, size, size, dtype=torch.uint8))

    def secret(self, labels: torch.Tensor, variants: torch.Tensor) -> torch.Tensor:
        """Float [0, 1] semantic images for each (label, variant)."""
        return self.secrets[labels, variants].float() / 255

    def publish(self, images: torch.Tensor, labels: torch.Tensor, variants: torch.Tensor, *,
                batch_size: int = 256) -> torch.Tensor:
        """uint8 x_ue = round(255 · clamp(x_c + clip(hide(x_c, x_h) − x_c, ±ε), 0, 1)), batch by batch."""
        if labels.shape != images.shape[:1] or labels.min() < 0 or labels.max() >= self.arch["classes"]:
            raise ValueError(f"dh needs one label in [0, {self.arch['classes']}) per image")
        device, eps = self.secrets.device, self.arch["epsilon"]
        out = torch.empty_like(images)
        with torch.no_grad():
            for first in range(0, len(images), batch_size):
                part = slice(first, first + batch_size)
                x = images[part].to(device).float() / 255
                stego, _ = self.network.hide(x, self.secret(labels[part].to(device), variants[part].to(device)))
                delta = (stego - x).clamp(-eps, eps)
                out[part] = ((x + delta).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        return out

    def quality(self, clean: torch.Tensor, published: torch.Tensor, labels: torch.Tensor, variants: torch.Tensor,
                *, seed: int, sample: int = 1000) -> dict[str, Any]:
        """PSNR/SSIM of x_ue vs x_c; PSNR of the secret revealed (Eq. 5–6, r ~ N(0, 1)) from x_ue and from the
        unclipped stego image, vs the hidden one. On a seeded sample of ≤ ``sample`` images (SSIM is per image)."""
        from skimage.metrics import structural_similarity

        pick = torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed))[:sample]
        device = self.secrets.device
        x, x_ue = (t[pick].to(device).float() / 255 for t in (clean, published))
        secret = self.secret(labels[pick].to(device), variants[pick].to(device))
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            stego, latent = self.network.hide(x, secret)
            noise = torch.randn(latent.shape, generator=gen, device=device)
            revealed = self.network.reveal(x_ue, noise)[1].clamp(0, 1)
            revealed_unclipped = self.network.reveal(stego, noise)[1].clamp(0, 1)
        ssim = [structural_similarity(a, b, channel_axis=0, data_range=1.0)
                for a, b in zip(x.cpu().numpy(), x_ue.cpu().numpy())]
        return {"psnr": psnr(x_ue, x), "ssim": float(np.mean(ssim)), "reveal_psnr": psnr(revealed, secret),
                "reveal_psnr_unclipped": psnr(revealed_unclipped, secret), "quality_sample": len(pick)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of [0, 1] images (capped at 100 dB for identical images)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((10 * torch.log10(1 / mse)).mean())
