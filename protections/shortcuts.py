"""Synthetic shortcuts: linear separable perturbations (LSP) and the one-pixel shortcut (OPS)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from bench.api import PROTECTIONS, ImageSet, Protection, pixel_steps
from bench.protections.ar import publish

CHUNK = 4096  # images per batch when summing class statistics
CLASS_SEP = 10.0  # the official make_classification(class_sep=10.)


def lsp_patterns(labels: torch.Tensor, num_classes: int, channels: int, size: int, grid: int, mode: str,
                 seed: int) -> torch.Tensor:
    """Unit-L2 LSP patterns, N×C×S×S (one per image) for "samplewise", K×C×S×S for "classwise".

    "samplewise" (official ``synthetic_perturbations/cifar_train.py``): ``make_classification`` points,
    one Gaussian cluster per class (``n_features = n_informative`` = grid²·C, ``n_redundant=0``,
    ``n_repeated=0``, ``class_sep=10``, ``flip_y=0``, ``n_clusters_per_class=1``; ``random_state=seed``),
    K × (largest class) points so that every class has one for each of its images; the i-th image of a
    class takes the class's i-th point, as the official ``simple_data[simple_label == label][:count]``.
    A point is reshaped grid×grid×C (HWC, as the official) and each value fills a patch: repeated
    ⌈S/grid⌉ times along both axes, cropped to S×S, then normalised (official ``normalize_l2norm``
    after upsampling). "classwise": one standard Gaussian grid per class (torch, seeded), the same steps.
    """
    patch = math.ceil(size / grid)
    if mode == "samplewise":
        from sklearn.datasets import make_classification

        features, counts = grid * grid * channels, torch.bincount(labels, minlength=num_classes)
        points, point_labels = make_classification(
            n_samples=num_classes * int(counts.max()), n_features=features, n_informative=features, n_redundant=0,
            n_repeated=0, n_classes=num_classes, n_clusters_per_class=1, class_sep=CLASS_SEP, flip_y=0.0,
            random_state=seed)
        point_labels = torch.from_numpy(point_labels)
        drawn = torch.bincount(point_labels, minlength=num_classes)
        if (drawn < counts).any():
            raise RuntimeError(f"lsp: make_classification gave {drawn.tolist()} points per class for {counts.tolist()}")
        by_class = torch.argsort(point_labels, stable=True)  # each class's points in the order drawn
        in_order = torch.argsort(labels, stable=True)  # each class's images in data set order
        rank = torch.empty_like(labels)  # an image's index among its class's images
        rank[in_order] = torch.arange(len(labels)) - (torch.cumsum(counts, 0) - counts)[labels[in_order]]
        chosen = by_class[(torch.cumsum(drawn, 0) - drawn)[labels] + rank]
        low = torch.from_numpy(points).float()[chosen].view(-1, grid, grid, channels).permute(0, 3, 1, 2)
    else:
        low = torch.randn((num_classes, channels, grid, grid), generator=torch.Generator().manual_seed(seed))
    patterns = low.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :size, :size]
    return patterns / patterns.flatten(1).norm(dim=1)[:, None, None, None]


@PROTECTIONS.register("lsp")
class LinearSeparablePerturbation(Protection):
    """LSP / synthetic noise (Yu et al., KDD 2022, "Availability Attacks Create Shortcuts", Alg. 1;
    official dayu11/Availability-Attacks-Create-Shortcuts ``synthetic_perturbations/cifar_train.py``, also
    APBench ``attack/lsp_poisons.py``): every image gets its own pattern, drawn from a Gaussian cluster of
    its class (``make_classification``, ``class_sep=10``, all grid²·C features informative: linearly
    separable by class), a ``grid``×``grid`` value per channel each filling a patch (the paper: 8-px
    patches on 32×32, a 4×4 grid; 4-px patches on 16×16), scaled to L2 = (``l2_per_pixel``/255)·√d in
    [0, 1] units, d = C·H·W (the official ``comput_l2norm_lim(linf=6/255)``), before clipping; added,
    rounded and clamped to [0, 255] (``lsp_patterns``). ``mode="classwise"`` (not the official): one
    pattern per class, shared by all its images.

    Deviations: K × (largest class) cluster points are drawn (the official: the data set's size, twice
    for SVHN), the same when classes are balanced, and any channel count works (the official is RGB);
    the official truncates to uint8 after clipping, this rounds. Numbers follow scikit-learn's
    ``make_classification`` for a seed (scikit-learn 1.9 here).
    """

    paper: ClassVar[str] = "Yu et al. 2022 (LSP / synthetic noise) Alg. 1"
    version: ClassVar[int] = 2
    mode: str = "samplewise"
    l2_per_pixel: float = pixel_steps(6.0)
    grid: int = 4

    def __post_init__(self) -> None:
        if self.mode not in ("samplewise", "classwise"):
            raise ValueError(f"lsp mode must be 'samplewise' (the official) or 'classwise', got {self.mode!r}")
        if self.l2_per_pixel < 0 or self.grid < 1:
            raise ValueError(f"lsp needs l2_per_pixel ≥ 0 and grid ≥ 1, got {self.l2_per_pixel}, {self.grid}")

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        size, dim = train.size, train.images[0].numel()
        if self.mode == "samplewise" and 2 ** (self.grid ** 2 * train.channels) < train.num_classes:
            raise ValueError(f"lsp: {train.num_classes} classes need 2^(grid²·C) ≥ {train.num_classes} cluster "
                             f"vertices (make_classification), got grid={self.grid}; raise grid")
        patterns = lsp_patterns(train.labels, train.num_classes, train.channels, size, self.grid, self.mode, seed)
        budget = self.l2_per_pixel * math.sqrt(dim)  # pixel units
        patterns = (patterns * budget).to(device)
        noise = patterns if self.mode == "samplewise" else patterns[train.labels.to(device)]
        return publish(train, noise, l2_budget=round(budget / 255, 6))


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
