"""Spatial filters applied to the train set before training (DH §IV-A5)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.components import COUNTERMEASURES, Countermeasure, ImageSet


@COUNTERMEASURES.register("median_filter")
class MedianFilter(Countermeasure):
    """Median filter over a ``kernel``×``kernel`` window per channel, edges replicated (as Pillow's
    ``MedianFilter``). DH §IV-A5 'MedianF' (k = 3)."""

    paper: ClassVar[str] = "DH §IV-A5 (MedianF, k = 3)"
    kernel: int = 3

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"median_filter kernel must be odd and ≥ 1, got {self.kernel}")

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        pad = self.kernel // 2
        x = train.images.to(device).float()
        n, c, h, w = x.shape
        padded = F.pad(x.reshape(n * c, 1, h, w), (pad, pad, pad, pad), mode="replicate")
        windows = F.unfold(padded, self.kernel)  # (n·c, k², h·w)
        median = windows.median(dim=1).values.reshape(n, c, h, w)
        return train.with_images(median.cpu())
