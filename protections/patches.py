"""Class-wise patches (CWP): a fixed colour patch per class in the lower-right corner."""

from __future__ import annotations

from typing import ClassVar

import torch

from bench.api import PROTECTIONS, ImageSet, Protection

# ConfounderGAN App. G.2, verbatim (classes 16–19 and 20–23 share colours as printed in the paper).
PAPER_COLOURS = ((220, 0, 0), (230, 0, 0), (240, 0, 0), (250, 0, 0), (0, 220, 0), (0, 230, 0), (0, 240, 0),
                 (0, 250, 0), (0, 0, 220), (0, 0, 230), (0, 0, 240), (0, 0, 250), (220, 220, 0), (230, 230, 0),
                 (240, 240, 0), (250, 250, 0), (220, 0, 220), (230, 0, 230), (240, 0, 240), (250, 0, 250),
                 (220, 0, 220), (230, 0, 230), (240, 0, 240), (250, 0, 250), (250, 250, 250))


@PROTECTIONS.register("cwp")
class ClassWisePatch(Protection):
    """CWP (ConfounderGAN §4.2, App. G.2): every image of class k gets the same solid patch in its
    lower-right corner, a different one per class.

    Settings: G.2 uses a 32×32 patch on 224×224 images (§4.2 says 36×36); ``size_fraction`` = 32/224 keeps
    that proportion at any resolution (5 px at 32×32), at least 1 px. Colours: the paper's per-class
    channel values for RGB with ≤ 25 classes. Deviations, where the paper gives nothing: other channel
    counts or more classes get evenly spaced grey levels (k + 1)·255 / K on every channel.
    """

    paper: ClassVar[str] = "ConfounderGAN §4.2, App. G.2"
    size_fraction: float = 32 / 224

    def __post_init__(self) -> None:
        if not 0 < self.size_fraction <= 1:
            raise ValueError(f"size_fraction must be in (0, 1], got {self.size_fraction}")

    def colours(self, num_classes: int, channels: int) -> torch.Tensor:
        """K×C patch colours (uint8)."""
        if channels == 3 and num_classes <= len(PAPER_COLOURS):
            return torch.tensor(PAPER_COLOURS[:num_classes], dtype=torch.uint8)
        levels = torch.arange(1, num_classes + 1, dtype=torch.float64) * 255 / num_classes
        return levels.round().to(torch.uint8)[:, None].expand(num_classes, channels)

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        side = max(1, round(train.size * self.size_fraction))
        images = train.images.clone()
        colours = self.colours(train.num_classes, train.channels)[train.labels]
        images[:, :, -side:, -side:] = colours[:, :, None, None]
        return train.with_images(images)
