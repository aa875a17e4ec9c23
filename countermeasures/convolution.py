"""Train-stage countermeasures aimed at convolution-based poisons (CUDA, Sadasivan et al. 2023: a class-wise blur).

``coin``: COIN (Li, Wang et al., AAAI 2025, arXiv 2311.18403 v3), a random per-pixel resampling; ``rsk_ff``: Random
Sharpening Kernels + Frequency Filtering (Kim & Sandoval-Segura, NeurIPS 2024 AdvML-Frontiers workshop, arXiv
2411.01742). Both run as ``TrainHooks.batch_transform`` on float batches in [0, 1], fresh draws every batch from the
loop's generator (the official code draws per image per epoch in a torchvision transform); the test set is never
transformed (both official scripts test on ``ToTensor`` only).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.api import COUNTERMEASURES, Countermeasure, TrainHooks
from bench.countermeasures import _ops

Batch = tuple[torch.Tensor, torch.Tensor]


@COUNTERMEASURES.register("coin")
class Coin(Countermeasure):
    """COIN: each pixel (i, j) takes the bilinear sample of its image at (i + dy, j + dx), dy and dx ~ U(−α, α)
    drawn per pixel and shared by the channels (``COIN_trans`` in wxldragon/COIN @b91d145 ``train.py``: one H×W
    draw each, ``scipy.ndimage.map_coordinates(order=1, mode='wrap')``), α = ``alpha`` = 2.0 (``--severity 4``, the
    script's default: 'severity=4 denotes alpha=2.0'), then clipped to [0, 1] and truncated to 8 bits as its
    ``np.uint8`` does. It runs after the standard crop and flip, as the official ``transforms.Compose``
    (RandomCrop(32, 4), RandomHorizontalFlip, COIN, ToTensor). The border wraps as SciPy's ``'wrap'`` does: with a
    period of size − 1 (the first and last rows coincide), not SciPy's ``'grid-wrap'``; reproduced exactly.

    Draws come from a device generator seeded by the loop's (theirs: NumPy, per image). Read from the official
    code (MIT licence); the paper's method section and tables were not available here.
    """

    paper: ClassVar[str] = "Li, Wang et al. AAAI 2025 (COIN); wxldragon/COIN @b91d145 train.py COIN_trans (α = 2.0)"
    stages: ClassVar[frozenset[str]] = frozenset({"train"})
    alpha: float = 2.0

    def __post_init__(self) -> None:
        _ops.require(self.alpha > 0, self, "alpha > 0 (the displacement bound in pixels; 0 is the none countermeasure)")

    def train_hooks(self, num_classes: int, image_size: int) -> TrainHooks:
        def transform(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Batch:
            n, _, h, w = x.shape
            noise = torch.rand(2, n, h, w, generator=_ops.device_generator(gen, x.device), device=x.device)
            dy, dx = (2 * noise - 1) * self.alpha
            # np.uint8 truncates; the 1e-4 keeps exact 8-bit levels from dropping one by float rounding.
            return torch.floor(coin_resample(x, dy, dx).clamp(0, 1) * 255 + 1e-4) / 255, y

        return TrainHooks(batch_transform=transform)


def scipy_wrap(coordinate: torch.Tensor, size: int) -> torch.Tensor:
    """SciPy's ``mode='wrap'`` on a coordinate (ni_interpolation.c, NI_EXTEND_WRAP): period size − 1."""
    period = max(size - 1, 1)
    below = coordinate + period * (torch.trunc(-coordinate / period) + 1)
    above = coordinate - period * torch.trunc(coordinate / period)
    return torch.where(coordinate < 0, below, torch.where(coordinate > size - 1, above, coordinate))


def coin_resample(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of N×C×H×W ``x`` at (row + dy, column + dx), dy and dx N×H×W, SciPy-wrapped borders."""
    n, c, h, w = x.shape
    rows = scipy_wrap(torch.arange(h, device=x.device, dtype=x.dtype)[:, None] + dy, h)
    cols = scipy_wrap(torch.arange(w, device=x.device, dtype=x.dtype)[None, :] + dx, w)
    top, left = rows.floor(), cols.floor()
    fy, fx = (rows - top)[:, None], (cols - left)[:, None]
    top, left = top.long(), left.long()
    bottom, right = (top + 1).clamp(max=h - 1), (left + 1).clamp(max=w - 1)  # clamped only where the weight is 0
    flat = x.reshape(n, c, h * w)

    def at(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return flat.gather(2, (r * w + q).reshape(n, 1, h * w).expand(n, c, h * w)).reshape(n, c, h, w)

    upper = at(top, left) * (1 - fx) + at(top, right) * fx
    lower = at(bottom, left) * (1 - fx) + at(bottom, right) * fx
    return upper * (1 - fy) + lower * fy


@COUNTERMEASURES.register("rsk_ff")
class RskFf(Countermeasure):
    """RSK+FF, following aseriesof-tubes/RSK @911680e (``augments.py``: ``sharpen_image``, ``get_dct_image``;
    defaults from ``main.py`` and the README: centre mean 2.5, 30 %).

    RSK, per image and batch: centre c ~ N(``center_mean``, ``std``), four neighbours nᵢ ~ N((c − 1)/4, ``std``),
    kernel [[0, −n₁, 0], [−n₂, c, −n₃], [0, −n₄, 0]] (sum 1 in expectation), the same on every channel, applied
    without padding (H − 2 × W − 2, as the official unpadded ``conv2d``) and clipped to [0, 1]. ``std = 0`` is the
    fixed kernel (the code's SSK+FF). FF: per channel, the orthonormal 2-D DCT-II of that (H − 2)² image keeps its
    lowest ⌊size·``ff_percentage``/100⌋ rows and columns (a low-frequency square: 9 of 30 on CIFAR), inverse DCT,
    clipped to [0, 1].

    Deviation: the official transform sharpens and filters *before* RandomCrop(32, padding 4) and the flip, which
    bring the 30-px result back to 32 px; here the loop's crop and flip come first (a hook runs after them), and a
    1-px zero border restores the size. The flip commutes in distribution (the neighbours are i.i.d.); the crop's
    zero band is sharpened and filtered with the image, and the content shifts by −4…+4 px instead of −2…+4.
    Other sizes keep ⌊(size − 2)·p/100⌋ frequencies as the code does; its CIFAR-100 rotation is not
    added (a recipe's augmentation). Every step follows the code (the repository has no licence: read, not
    copied); of the paper only Table 1 was read (CIFAR-10, ResNet-18 on CUDA: 23.25 %, with RSK+FF 78.53 %).
    """

    paper: ClassVar[str] = "Kim & Sandoval-Segura 2024 (RSK+FF); aseriesof-tubes/RSK @911680e augments.py"
    stages: ClassVar[frozenset[str]] = frozenset({"train"})
    center_mean: float = 2.5
    std: float = 0.1
    ff_percentage: float = 30.0

    def __post_init__(self) -> None:
        _ops.require(self.center_mean >= 1 and self.std >= 0 and 0 < self.ff_percentage <= 100, self,
                     "center_mean ≥ 1 (a centre below 1 blurs), std ≥ 0 (0: the fixed SSK kernel) and ff_percentage "
                     "in (0, 100]")

    def train_hooks(self, num_classes: int, image_size: int) -> TrainHooks:
        keep = int((image_size - 2) * self.ff_percentage / 100)
        _ops.require(keep >= 1, self, f"ff_percentage high enough to keep a frequency of {image_size - 2} px")

        def transform(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Batch:
            sharp = sharpen(x, self.kernels(x.shape[0], gen).to(x.device, x.dtype)).clamp(0, 1)
            return F.pad(low_pass(sharp, keep).clamp(0, 1), (1, 1, 1, 1)), y

        return TrainHooks(batch_transform=transform)

    def kernels(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """N×3×3 kernels (CPU): the official draw order, centre then four neighbours, per image."""
        center = self.center_mean + self.std * torch.randn(n, generator=gen)
        neighbours = (center[:, None] - 1) / 4 + self.std * torch.randn(n, 4, generator=gen)
        kernel = torch.zeros(n, 3, 3)
        kernel[:, 1, 1] = center
        kernel[:, 0, 1], kernel[:, 1, 0], kernel[:, 1, 2], kernel[:, 2, 1] = (-neighbours).unbind(1)
        return kernel


def sharpen(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Each image's N×3×3 kernel on all its channels, unpadded: one grouped conv2d for the whole batch."""
    n, c, h, w = x.shape
    weight = kernels.repeat_interleave(c, 0)[:, None]
    return F.conv2d(x.reshape(1, n * c, h, w), weight, groups=n * c).reshape(n, c, h - 2, w - 2)


def dct_matrix(size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (D @ v is SciPy's ``dct(v, norm='ortho')``), written out because neither
    torch nor kornia has a DCT (the official code uses the ``torch_dct`` package, which bench does not depend on)."""
    k, i = torch.arange(size, dtype=torch.float64)[:, None], torch.arange(size, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * size)) * math.sqrt(2 / size)
    matrix[0] /= math.sqrt(2)
    return matrix.to(device, dtype)


def low_pass(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Keep the lowest ``keep`` × ``keep`` coefficients of each channel's 2-D DCT: the mask is separable, so the
    filter is P·x·Pᵀ per side with the projection P = D[:keep]ᵀ D[:keep] (one matmul pair on the device)."""
    h, w = x.shape[-2:]
    project = [(d[:keep].T @ d[:keep]) for d in (dct_matrix(s, x.device, x.dtype) for s in (h, w))]
    return project[0] @ x @ project[1].T

