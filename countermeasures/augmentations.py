"""Train-stage augmentations of the papers' robustness tables: DH §IV-A5 / Table I (Vanilla, Cutout, Cutmix,
Mixup) and ConfounderGAN App. G.6 / Table 2 (RHF, RC, RHF+RC, CutOut, MixUp, CutMix, FA).

Each runs as ``TrainHooks.batch_transform`` on float batches in [0, 1] *after* the recipe's standard
augmentation (``bench.execute.augment``: crop + flip on CIFAR); where a table's baseline has no augmentation
(ConfounderGAN Table 2 'No augmentation') set the recipe's ``augment = "none"``. Random draws come from the
loop's generator; mixup and cutmix return soft labels N×K that sum to 1.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.api import COUNTERMEASURES, Countermeasure, TrainHooks, host_to_device, random_crop, random_flip
from bench.countermeasures import _ops

Batch = tuple[torch.Tensor, torch.Tensor]
_check, _mix = _ops.require, _ops.mix_labels

@COUNTERMEASURES.register("vanilla")
class Vanilla(Countermeasure):
    """The papers' basic augmentation: random crop after ``pad``-px zero padding (unset: size/8, i.e. 4 px on
    32×32: DH §IV-A5, ConfounderGAN G.6 'RC') and/or a horizontal flip with probability 1/2 ('RHF').

    ``crop = false`` gives ConfounderGAN's RHF, ``flip = false`` its RC, both (default) RHF+RC. ``pad`` ≥ 1: a
    crop without padding is the identity, so ``pad = 0`` is rejected (``crop = false`` says that). On CIFAR this
    *is* bench's standard augmentation, so DH Table I's 'Vanilla' column is the ``none`` countermeasure under
    ``augment = "dataset"``; ``vanilla`` on top of it would crop and flip twice. Use it with a recipe's
    ``augment = "none"`` (ConfounderGAN Table 2). DH's ImageNet vanilla is the standard ``rrc_flip``.
    """

    paper: ClassVar[str] = "DH §IV-A5 (Vanilla); ConfounderGAN App. G.6 (RHF, RC: pad 4)"
    stages: ClassVar[frozenset[str]] = frozenset({"train"})
    crop: bool = True
    flip: bool = True
    pad: int | None = None

    def __post_init__(self) -> None:
        _check(self.pad is None or self.pad >= 1, self,
               "pad ≥ 1 (omit it for size/8; a crop without padding is the identity: write crop = false)")

    def train_hooks(self, num_classes: int, image_size: int) -> TrainHooks:
        pad = max(1, image_size // 8) if self.pad is None else self.pad

        def transform(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Batch:
            x = random_crop(x, pad, gen) if self.crop else x
            return (random_flip(x, gen) if self.flip else x), y

        return TrainHooks(batch_transform=transform)


@COUNTERMEASURES.register("cutout")
class Cutout(Countermeasure):
    """Cutout (DeVries & Taylor 2017): a ``length``-sided square (unset: half the side: 16 px on 32×32, 112 on
    224×224, DH §IV-A5; 16 px in ConfounderGAN G.6) zeroed at a uniform centre per image, clipped at the border.
    ``length`` ≥ 1: a 0-px square cuts nothing (that is the ``none`` countermeasure), so 0 is rejected.
    Deviation: zero is black (the batch is not normalised yet); DeVries zeroed the normalised tensor (mean)."""

    paper: ClassVar[str] = "DeVries & Taylor 2017; DH §IV-A5 (16 / 112 px); ConfounderGAN App. G.6 (16 px)"
    stages: ClassVar[frozenset[str]] = frozenset({"train"})
    length: int | None = None

    def __post_init__(self) -> None:
        _check(self.length is None or self.length >= 1, self,
               "length ≥ 1 (omit it for half the side; a 0-px square cuts nothing: use the none countermeasure)")

    def train_hooks(self, num_classes: int, image_size: int) -> TrainHooks:
        length = max(1, image_size // 2) if self.length is None else self.length
        return TrainHooks(batch_transform=lambda x, y, gen: (_ops.cutout(x, length, gen), y))


@COUNTERMEASURES.register("cutmix")
class CutMix(Countermeasure):
    """CutMix (Yun et al. 2019, official code): λ ~ Beta(``beta``, ``beta``) once per batch (β = 1: uniform; DH
    §IV-A5 'size ranging from 0 to 1'), a box of side √(1 − λ)·size at a uniform centre, clipped, pasted from a
    random permutation of the batch; λ corrected to the pasted area mixes the labels (soft). Applied to a
    batch with probability ``prob`` (1 here and in APBench; Yun et al. used 0.5 on CIFAR)."""

    paper: ClassVar[str] = "Yun et al. 2019 (β = 1); DH §IV-A5; ConfounderGAN App. G.6"
    stages: ClassVar[frozenset[str]] = frozenset({"train"})
    beta: float = 1.0
    prob: float = 1.0

    def __post_init__(self) -> None:
        _check(self.beta > 0 and 0 <= self.prob <= 1, self, "beta > 0 and prob in [0, 1]")

    def train_hooks(self, num_classes: int, image_size: int) -> TrainHooks:
        def transform(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Batch:
            n, _, h, w = x.shape
            perm, lam = host_to_device(torch.randperm(n, generator=gen), x.device), _ops.beta(self.beta, gen)
            cy, cx, coin = (torch.randint(0, s, (1,), generator=gen).item() for s in (h, w, 2 ** 24))
            if coin / 2 ** 24 >= self.prob:
                return x, F.one_hot(y, num_classes).float()
            out, pasted = _ops.paste_box(x, perm, lam, cy, cx)
            return out, _mix(y, perm, 1 - pasted, num_classes)

        return TrainHooks(batch_transform=transform)


@COUNTERMEASURES.register("mixup")
class MixUp(Countermeasure):
    """Mixup (Zhang et al. 2018, official code): λ ~ Beta(``alpha``, ``alpha``) once per batch (α = 1:
    ConfounderGAN G.6, DH's 'weight ranging from 0 to 1'), x = λ·x + (1 − λ)·x[perm], labels mixed alike (soft).
    ``keep_label = true`` keeps the hard labels, as DH §IV-A5 words it ('we retain the original label')."""

    paper: ClassVar[str] = "Zhang et al. 2018 (α = 1); DH §IV-A5; ConfounderGAN App. G.6"
    stages: ClassVar[frozenset[str]] = frozenset({"train"})
    alpha: float = 1.0
    keep_label: bool = False

    def __post_init__(self) -> None:
        _check(self.alpha > 0, self, "alpha > 0")

    def train_hooks(self, num_classes: int, image_size: int) -> TrainHooks:
        def transform(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Batch:
            perm, lam = host_to_device(torch.randperm(x.shape[0], generator=gen), x.device), _ops.beta(self.alpha, gen)
            return lam * x + (1 - lam) * x[perm], (y if self.keep_label else _mix(y, perm, lam, num_classes))

        return TrainHooks(batch_transform=transform)


@COUNTERMEASURES.register("fastaa")
class FastAutoAugment(Countermeasure):
    """ConfounderGAN G.6 'FA': 'a fixed augmentation policy, which consists of change contrast, brightness,
    sharpness, rotations and cutout', without probabilities or magnitudes. Chosen: contrast, brightness,
    sharpness (Pillow enhance factors uniform in [0.1, 1.9]) and rotation (uniform in ±30°), each applied to an
    image with probability ``p`` (0.5), in that order (the ranges of Fast AutoAugment's search space, Lim et al.
    2019); then Cutout of ``cutout`` px (unset: half the side, 16 on 32×32) on every image, as Fast AutoAugment's
    CIFAR pipeline adds Cutout-16 after its policy; ``cutout = 0`` is the policy alone, without Cutout."""

    paper: ClassVar[str] = "ConfounderGAN App. G.6 (FA); Lim et al. 2019 (Fast AutoAugment) ranges"
    stages: ClassVar[frozenset[str]] = frozenset({"train"})
    p: float = 0.5
    cutout: int | None = None

    def __post_init__(self) -> None:
        _check(0 <= self.p <= 1 and (self.cutout is None or self.cutout >= 0), self,
               "p in [0, 1] and cutout ≥ 0 (omit it for half the side; 0: no Cutout)")

    def train_hooks(self, num_classes: int, image_size: int) -> TrainHooks:
        length = max(1, image_size // 2) if self.cutout is None else self.cutout
        ops = ((_ops.contrast, 0.1, 1.9), (_ops.brightness, 0.1, 1.9), (_ops.sharpness, 0.1, 1.9),
               (_ops.rotate, -30, 30))

        def transform(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> Batch:
            for op, low, high in ops:
                apply = _ops.per_image(_ops.draw(x.shape[0], gen, x.device) < self.p)
                x = torch.where(apply, op(x, _ops.draw(x.shape[0], gen, x.device, low, high)), x)
            return (_ops.cutout(x, length, gen) if length else x), y

        return TrainHooks(batch_transform=transform)
