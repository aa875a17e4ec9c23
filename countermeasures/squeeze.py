"""Image-shortcut squeezing: data-stage preprocessing that removes small perturbations.

Settings of DH §IV-A5 (BDR 2 bits, grayscale, JPEG quality 10 and 50), after Liu et al. 2023 (ISS), and ISS's
greyscale and JPEG composed (``jpeg_gray``).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from bench.api import COUNTERMEASURES, Countermeasure, ImageSet


@COUNTERMEASURES.register("jpeg")
class Jpeg(Countermeasure):
    """JPEG compression with a real codec (libjpeg through ``torchvision.io``: byte for byte Pillow's, the
    golden tests check it, and faster) on the 8-bit images, at ``quality`` (1–95).

    DH §IV-A5: JPEG10 and JPEG50. Greyscale sets are encoded as single-channel JPEG.
    """

    paper: ClassVar[str] = "DH §IV-A5 (JPEG10, JPEG50); Liu et al. 2023 (ISS)"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})
    quality: int = 10

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 95:
            raise ValueError(f"jpeg quality must be in 1..95, got {self.quality}")

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        from torchvision.io import decode_jpeg, encode_jpeg  # here: torchvision pulls torch._dynamo (~1 s)

        images = list(train.images.unbind())
        encoded = encode_jpeg(images, quality=self.quality) if images else []
        decoded = decode_jpeg(encoded) if encoded else []
        return train.with_images(torch.stack(decoded) if decoded else train.images.clone())


@COUNTERMEASURES.register("grayscale")
class Grayscale(Countermeasure):
    """Greyscale conversion with ITU-R 601-2 luma (Pillow's integer formula), replicated to every channel so
    that shapes are kept. DH §IV-A5 'Gray'. Identity on single-channel data."""

    paper: ClassVar[str] = "DH §IV-A5 (Gray); Liu et al. 2023 (ISS)"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        if train.channels != 3:
            return train
        rgb = train.images.to(torch.int64)
        luma = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16
        return train.with_images(luma[:, None].expand(-1, 3, -1, -1).to(torch.uint8))  # luma ≤ 255


@COUNTERMEASURES.register("jpeg_gray")
class JpegGray(Countermeasure):
    """ISS's greyscale and JPEG composed: ``grayscale`` then ``jpeg`` at ``quality``, each exactly as registered.

    Order and codec follow the official code (liuzrcc/ImageShortcutSqueezing @005d653, ``augmentations.py``
    ``aug_train``: with both ``--grayscale`` and ``--jpeg`` the ``Grayscale(3)`` transform is appended before the
    JPEG one), so the grey image is encoded as a 3-channel RGB JPEG (R = G = B; Pillow, ``optimize`` misspelt there,
    which only changes Huffman tables anyway). The paper is silent on a quality for the pair; 10 is its JPEG default
    (README table 'JPEG-10'). ``gray_first = False`` is DUNE's ``jpeggray`` defence (wxldragon/DUNE @a35cbb6,
    ``train.py``: JPEG-10 first, then ``Grayscale(3)``). Both apply once to the data (the official codes apply them
    per epoch, after ``RandomCrop``/flip in DUNE: crops shift JPEG's 8×8 grid). Single-channel sets: ``grayscale``
    is the identity there, so this is ``jpeg`` (single-channel JPEG)."""

    paper: ClassVar[str] = "Liu et al. 2023 (ISS) official code; DUNE (Wang et al. 2026) train.py 'jpeggray'"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})
    paper_setting: ClassVar[tuple[str, ...]] = ("quality", "gray_first")
    quality: int = 10
    gray_first: bool = True

    def __post_init__(self) -> None:
        Jpeg(self.quality)  # the same check and message as ``jpeg``'s

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        steps = (Grayscale(), Jpeg(self.quality))
        for step in steps if self.gray_first else steps[::-1]:
            train = step.purify(train, seed=seed, device=device)
        return train


@COUNTERMEASURES.register("bdr")
class BitDepthReduction(Countermeasure):
    """Bit-depth reduction to ``bits`` bits per channel: round(x·(2^b − 1)) / (2^b − 1), x in [0, 1].

    DH §IV-A5: BDR with 2 bits.
    """

    paper: ClassVar[str] = "DH §IV-A5 (BDR, 2 bits); Liu et al. 2023 (ISS)"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})
    bits: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bdr bits must be in 1..8, got {self.bits}")

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        levels = 2 ** self.bits - 1
        x = train.images.double() / 255
        return train.with_images(((x * levels).round() / levels * 255).round().to(torch.uint8))
