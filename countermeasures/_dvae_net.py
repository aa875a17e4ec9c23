"""The D-VAE network (Yu et al., ICML 2024) that ``countermeasures.dvae`` trains (not a plugin: no registrations).

A ResNet-18 stem encodes the image to features at half its side; a 1×1-conv Gaussian latent (``mu``, ``log_var``)
carries them at a rate the training loss constrains; two decoders map the sampled latent back to full size: one to
the image without its perturbation (sigmoid output), one, with a learnt class-wise spatial embedding added to its
input, to the perturbation itself (unbounded). Layer for layer the official ``ResNetDVAE`` at ``stem_end_block=7``
(yuyi-sd/D-VAE, ``configs/models/resnet.py`` L1960–2262), where ``width`` = 64 and ``latent_dim`` = 256.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """ResNet basic block: two 3×3 conv–BN, with a 1×1 conv–BN shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def decoder(width: int, channels: int, sigmoid: bool) -> nn.Sequential:
    """2·width × H/2 × W/2 features → channels × H × W (transposed convolutions with instance norm)."""
    half = width // 2
    layers: list[nn.Module] = [nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ConvTranspose2d(width, width, 3, 1, 1),
                               nn.InstanceNorm2d(width), nn.ReLU(), nn.ConvTranspose2d(width, half, 3, 1, 1),
                               nn.InstanceNorm2d(half), nn.ReLU(), nn.ConvTranspose2d(half, channels, 3, 1, 1)]
    return nn.Sequential(*layers, *([nn.Sigmoid()] if sigmoid else []))


class DVAE(nn.Module):
    """Encoder, rate-constrained latent, and the image and perturbation decoders.

    Args:
        channels: image channels.
        height: image height (even).
        width_px: image width (even).
        classes: number of classes (one learnt embedding each).
        width: stem channels (the latent features have twice as many).
        latent_dim: channels of the Gaussian latent at each of the H/2 × W/2 positions.
    """

    def __init__(self, channels: int, height: int, width_px: int, classes: int, width: int = 64,
                 latent_dim: int = 256) -> None:
        super().__init__()
        if height % 2 or width_px % 2:
            raise ValueError(f"dvae needs even image sides (its encoder halves them, its decoders double them), "
                             f"got {height}×{width_px}")
        self.encoder = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                     Block(width, width), Block(width, width), Block(width, 2 * width, 2))
        self.mu = nn.Conv2d(2 * width, latent_dim, 1)
        self.log_var = nn.Conv2d(2 * width, latent_dim, 1)
        self.post = nn.Conv2d(latent_dim, 2 * width, 1)
        self.clean = decoder(width, channels, sigmoid=True)
        self.perturbation = decoder(width, channels, sigmoid=False)
        self.feature_shape = (2 * width, height // 2, width_px // 2)
        self.embedding = nn.Embedding(classes, 2 * width * (height // 2) * (width_px // 2))

    def forward(self, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decoded image, decoded perturbation, latent mean and log-variance, for a latent sampled with ``gen``."""
        h = self.encoder(x)
        mu, log_var = self.mu(h), self.log_var(h)
        noise = torch.randn(mu.shape, generator=gen, device=mu.device)
        z = self.post(mu + noise * torch.exp(0.5 * log_var))
        perturbation = self.perturbation(z + self.embedding(y).view(-1, *self.feature_shape))
        return self.clean(z), perturbation, mu, log_var
