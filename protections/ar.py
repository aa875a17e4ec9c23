"""Autoregressive (AR) perturbations (Sandoval-Segura et al., NeurIPS 2022)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from bench.components import PROTECTIONS, ImageSet, Protection

# The 8 causal neighbours of a 3×3 window as (row, column) offsets back from the pixel being generated.
OFFSETS = torch.tensor([(dr, dc) for dr in range(3) for dc in range(3) if (dr, dc) != (0, 0)])
REFERENCE_DIM = 3 * 32 * 32  # the paper's budget is an L2 norm on 3×32×32 CIFAR images
SEARCH_ROUND = 256  # candidate processes tested per round: fixed, so a class's process does not depend on K
TRIALS = 3  # realisations tested per candidate (the official finder's num_gen_trials)
CHUNK = 1024  # images per batch: fixed, so the start noise does not depend on the device's memory


def ar_fill(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Overwrite ``x[..., r, c]`` (r, c ≥ 2) in place with Σₖ coef[..., k]·x[..., r − drₖ, c − dcₖ].

    The paper fills pixels in raster order; a pixel depends only on pixels up and to the left of it, so
    each anti-diagonal r + c = d depends on earlier ones only and is filled at once (2S steps, not S²),
    with exactly the raster order's values. Rows and columns 0–1 keep the start noise.
    """
    size = x.shape[-1]
    dr, dc = OFFSETS.to(x.device).unbind(1)
    for d in range(4, 2 * size - 1):
        r = torch.arange(max(2, d - size + 1), min(size, d - 1), device=x.device)
        c = d - r
        neighbours = x[..., r[:, None] - dr, c[:, None] - dc]  # (..., L, 8)
        x[..., r, c] = (neighbours * coef[..., None, :]).sum(-1)
    return x


def find_processes(count: int, size: int, crop: int, rule: str, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """``count`` single-channel AR processes (count×8 coefficients) that pass the stability check, and
    how many candidates were drawn. Runs on the CPU so that the processes never depend on the device."""
    found, drawn = [], 0
    while sum(len(f) for f in found) < count:
        if drawn >= 1000 * SEARCH_ROUND:  # e.g. huge images, where bounded processes get rare
            raise RuntimeError(f"ar: {drawn} candidate processes drawn, fewer than {count} passed the check")
        coef = torch.randn((SEARCH_ROUND, 8), generator=gen, dtype=torch.float64)
        # 'bounded' (official): sum to 1, keep if bounded; 'contractive': Σ|b| = 0.99 < 1, stable by construction.
        coef = coef / (coef.sum(1, keepdim=True) if rule == "bounded" else coef.abs().sum(1, keepdim=True) / 0.99)
        trial = ar_fill(torch.randn((SEARCH_ROUND, TRIALS, size + crop, size + crop), generator=gen,
                                    dtype=torch.float64), coef[:, None])
        rms = trial[..., crop:, crop:].pow(2).mean((-2, -1))
        # Finite and non-zero (a copied CIFAR-100 coefficient file has a NaN / all-zero class 9); a 'bounded'
        # process must also not amplify its unit-variance start noise: RMS over the crop ≤ 1 in every trial.
        ok = (rms.isfinite() & (rms > 1e-12) & ((rms <= 1) | (rule == "contractive"))).all(1)
        found.append(coef[ok].float())
        drawn += SEARCH_ROUND
    return torch.cat(found)[:count], drawn


def publish(train: ImageSet, noise: torch.Tensor, **info) -> ImageSet:
    """``train + noise`` (pixel units, on any device) rounded and clamped to 8 bits, reporting the L2 norm
    of the change that was published (mean and max over images, [0, 1] units) in ``info``."""
    images = (train.images.to(noise.device).float() + noise).round().clamp(0, 255)
    l2 = (images - train.images.to(noise.device).float()).flatten(1).norm(dim=1) / 255
    return train.with_images(images.to(torch.uint8).cpu(), **info, l2_mean=round(l2.mean().item(), 6),
                             l2_max=round(l2.max().item(), 6))


@PROTECTIONS.register("ar")
class Autoregressive(Protection):
    """AR perturbations (Sandoval-Segura et al., NeurIPS 2022, §3; official code
    psandovalsegura/autoregressive-poisoning, also in APBench). One AR process per class and channel:
    a pixel is a linear combination of its 8 previously generated neighbours in a causal 3×3 window.
    Each image gets its own realisation (sample-wise): a Gaussian start signal of (size + ``crop``)²
    per channel, the recursion run over it, the first ``crop`` rows and columns dropped (the start-up
    transient; the paper: 36×36 → 32×32), the result scaled to L2 = ``l2_norm`` (paper: 1.0 in [0, 1]
    units on 3×32×32) and added; then rounded and clamped to [0, 255].

    Coefficients, ``coefficients="bounded"`` (the official finder): Gaussian, normalised to sum to 1 per
    channel, kept only if ``TRIALS`` realisations are finite, non-zero and do not amplify the start noise
    (RMS over the crop ≤ 1; the finder bounds the crop's L2 norm instead). ``"contractive"``: scaled so that
    Σ|bₖ| = 0.99 < 1, stable by construction, but such processes decay away from the start noise: the
    perturbation sits on the top and left borders (on 3×32×32, 5 % of its energy outside the top/left
    8-px bands, which leave 56 % of the area; 49 % for ``"bounded"``), unlike the paper's, and poison less
    (CIFAR-10, 500 per class, cnn, quick: 0.49 clean → 0.21 bounded, 0.28 contractive). Either way every
    class's process is checked finite and non-zero (a copied CIFAR-100 coefficient file has a NaN / all-zero
    class 9) and resampled otherwise.

    Deviations: the official finder also requires each new process to respond strongly (≥ 10 on CIFAR-10)
    to every earlier process's filter; not done here. Channels are independent processes, as the official
    grouped convolution; any channel count works. Other sizes keep the paper's per-pixel RMS: the L2
    budget is ``l2_norm``·√(d / 3072), d = C·H·W (0.29 on 1×16×16).
    """

    paper: ClassVar[str] = "Sandoval-Segura et al. 2022 (AR perturbations) §3"
    l2_norm: float = 1.0
    crop: int = 4
    coefficients: str = "bounded"

    def __post_init__(self) -> None:
        if self.l2_norm < 0 or self.crop < 2 or self.coefficients not in ("bounded", "contractive"):
            raise ValueError("ar needs l2_norm ≥ 0, crop ≥ 2 (rows 0–1 are start noise) and coefficients "
                             f"'bounded' or 'contractive', got {self.l2_norm}, {self.crop}, {self.coefficients!r}")

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        gen = torch.Generator().manual_seed(seed)
        channels, size, side = train.channels, train.size, train.size + self.crop
        coef, drawn = find_processes(train.num_classes * channels, size, self.crop, self.coefficients, gen)
        coef = coef.view(train.num_classes, channels, 8).to(device)
        budget = self.l2_norm * math.sqrt(channels * size * size / REFERENCE_DIM)
        noise = torch.empty(train.images.shape, device=device)
        for start in range(0, len(train), CHUNK):
            labels = train.labels[start:start + CHUNK].to(device)
            x = torch.randn((len(labels), channels, side, side), generator=gen).to(device)
            x = ar_fill(x, coef[labels])[..., self.crop:, self.crop:]
            norms = x.flatten(1).norm(dim=1)
            if not (norms.isfinite() & (norms > 0)).all():  # cannot happen after the search; never publish NaN
                raise RuntimeError("ar: a perturbation is not finite or is zero")
            noise[start:start + CHUNK] = x * (budget * 255 / norms)[:, None, None, None]
        return publish(train, noise, l2_budget=round(budget, 6), candidates_drawn=drawn)
