"""Synthetic shortcuts: linear separable perturbations (LSP) and the one-pixel shortcut (OPS)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from bench.components import PROTECTIONS, ImageSet, Protection
from protections.ar import publish

CHUNK = 4096  # images per batch when summing class statistics


@PROTECTIONS.register("lsp")
class LinearSeparablePerturbation(Protection):
    """LSP / synthetic noise (Yu et al., KDD 2022, "Availability Attacks Create Shortcuts", Alg. 1;
    APBench ``attack/lsp_poisons.py``): per class one Gaussian pattern of ``grid``×``grid`` values per
    channel, each value filling a patch (the paper: 8-px patches on 32×32, a 4×4 grid; 4-px patches on
    16×16), nearest-upsampled (repeat, then crop to the image size as the official code does), scaled to
    L2 = (``l2_per_pixel``/255)·√d in [0, 1] units, d = C·H·W (the official ``linf = 6/255``), added to
    every image of the class, rounded and clamped to [0, 255].

    Deviation: the official code draws a separate pattern for every image with sklearn's
    ``make_classification`` (a Gaussian cluster per class, ``class_sep=10``, all 48 features informative)
    and normalises each; here every image of a class gets one class pattern (class-wise, the shortcut the
    paper describes). The official code truncates to uint8 after clipping; this rounds.
    """

    paper: ClassVar[str] = "Yu et al. 2022 (LSP / synthetic noise) Alg. 1"
    l2_per_pixel: float = 6.0
    grid: int = 4

    def __post_init__(self) -> None:
        if self.l2_per_pixel < 0 or self.grid < 1:
            raise ValueError(f"lsp needs l2_per_pixel ≥ 0 and grid ≥ 1, got {self.l2_per_pixel}, {self.grid}")

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        gen = torch.Generator().manual_seed(seed)
        size, dim = train.size, train.images[0].numel()
        patch = math.ceil(size / self.grid)
        low = torch.randn((train.num_classes, train.channels, self.grid, self.grid), generator=gen)
        patterns = low.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :size, :size]
        budget = self.l2_per_pixel * math.sqrt(dim)  # pixel units
        patterns = patterns * (budget / patterns.flatten(1).norm(dim=1))[:, None, None, None]
        return publish(train, patterns.to(device)[train.labels.to(device)], l2_budget=round(budget / 255, 6))


@PROTECTIONS.register("ops")
class OnePixelShortcut(Protection):
    """OPS (Wu et al., ICLR 2023, "One-Pixel Shortcut", §3, Alg. 1; official ``perturb.py``, APBench
    ``attack/ops_poisons.py``): every image of class k gets one pixel, the same position σₖ for the class,
    set to one colour ξₖ, a corner of the colour cube {0, 255}^C (8 for RGB, 2 for greyscale). Classes in
    order 0 … K−1 each take the (σ, ξ) that maximises

        mean(|ξ − x_σ|) / std(|ξ − x_σ|)   over the class's images and channels (population std),

    i.e. a large and consistent deviation from the class's own pixels, excluding (σ, ξ) pairs already
    taken by earlier classes (as the official code does). The search is exact and batch-wise: per class,
    position and channel it needs only Σx and Σx² (integers), from which every colour's score follows.

    Deviations, where the official code divides by zero: a position where |ξ − x_σ| is constant over the
    class (std 0, e.g. the black border of digits) scores +∞ if the deviation is non-zero (a perfectly
    consistent shortcut) and 0 if it is zero. Ties go to the larger mean deviation, then to the first
    (row, column, colour) in raster order (colour index: channel 0 the most significant bit). Seed-free.
    """

    paper: ClassVar[str] = "Wu et al. 2023 (One-Pixel Shortcut) §3, Alg. 1"

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        channels, height, width = train.images.shape[1:]
        count = torch.bincount(train.labels, minlength=train.num_classes).to(device)
        sum1 = torch.zeros((train.num_classes, channels, height, width), dtype=torch.int64, device=device)
        sum2 = torch.zeros_like(sum1)
        for start in range(0, len(train), CHUNK):
            x = train.images[start:start + CHUNK].to(device).long()
            labels = train.labels[start:start + CHUNK].to(device)
            sum1.index_add_(0, labels, x)
            sum2.index_add_(0, labels, x * x)
        # Colour v: channel c is 255 where bit (C − 1 − c) of v is set; |255 − x| = 255 − x, |0 − x| = x.
        shifts = torch.arange(channels - 1, -1, -1, device=device)
        bits = (torch.arange(2 ** channels, device=device)[:, None] >> shifts) & 1  # V×C
        white = bits.bool()[None, :, :, None, None]  # 1×V×C×1×1
        n = count[:, None, None, None, None]
        dev1 = torch.where(white, 255 * n - sum1[:, None], sum1[:, None]).sum(2)  # K×V×H×W: Σ|ξ − x|
        dev2 = torch.where(white, 255 * 255 * n - 510 * sum1[:, None] + sum2[:, None], sum2[:, None]).sum(2)
        m = (count * channels)[:, None, None, None]  # entries per class
        spread = (m * dev2 - dev1 * dev1).double()  # m²·variance, exact in integers
        score = torch.where(spread > 0, dev1.double() / spread.clamp_min(1).sqrt(),
                            torch.where(dev1 > 0, math.inf, 0.0))
        # (row, column, colour) raster order, as the official (point, pixel_value) ranking.
        score, dev1 = score.permute(0, 2, 3, 1).flatten(1), dev1.permute(0, 2, 3, 1).flatten(1)
        taken = torch.zeros_like(score[0], dtype=torch.bool)
        chosen = []
        for k in range(train.num_classes):
            s = score[k].masked_fill(taken, -math.inf)
            best = torch.where(s == s.max(), dev1[k], -1).argmax()  # ties: larger mean, then first
            taken[best] = True
            chosen.append(best.item())
        index = torch.tensor(chosen)
        colour_index, pixel = index % 2 ** channels, index // 2 ** channels
        rows, cols, colours = pixel // width, pixel % width, bits.cpu()[colour_index] * 255
        images = train.images.clone()
        labels = train.labels
        images[torch.arange(len(train)), :, rows[labels], cols[labels]] = colours[labels].to(torch.uint8)
        changed = (images != train.images).flatten(1).any(1).float().mean().item()
        return train.with_images(images, positions=torch.stack([rows, cols], 1).tolist(),
                                 colours=colours.tolist(), changed_fraction=round(changed, 6))
