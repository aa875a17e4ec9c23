"""The data type every stage exchanges and the contracts of the three plugin families.

Flow of one cell: dataset → ``Protection.protect`` → ``Countermeasure.purify`` (data stage) → a victim
from ``Victim.build`` trained by ``bench.train`` (with the countermeasure's train-stage hooks) → record.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from bench.registry import Component, Registry


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Images as uint8 N×C×H×W (what a real published image is) with int64 labels.

    ``info`` is what the stage that made these images reports about it (a protection's surrogate rounds, an
    external source's sha256 …); it goes into the cache manifest and the record, never into keys.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    info: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise TypeError(f"ImageSet images must be uint8 N×C×H×W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> int:
        """Side length (images are square after loading)."""
        return self.images.shape[-1]

    def with_images(self, images: torch.Tensor, **info: Any) -> ImageSet:
        """The same labels with other images (e.g. protected ones), reporting ``info`` about them."""
        return ImageSet(images.to(torch.uint8).contiguous(), self.labels, self.num_classes, info)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.num_classes)

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.num_classes, self.info)


@dataclasses.dataclass(frozen=True)
class TrainHooks:
    """How a train-stage countermeasure changes the one training loop (``bench.train``).

    ``batch_transform(x, y, gen) -> (x, y)``: on float batches in [0, 1] after the standard augmentation;
    may return soft labels N×K (mixup, cutmix). ``attack(model, x, y) -> x``: a per-batch input attack (PGD
    for adversarial training). ``loss(model, x, y) -> (loss, logits)``: replaces cross-entropy (UEraser's
    max over augmented draws, distillation's KL to a teacher). ``epoch_start(epoch, epochs)``: called before
    each epoch (0-based) with the number of epochs, for hooks whose behaviour follows the schedule (UEraser's
    adversarial first part of training).
    """

    batch_transform: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None
    attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    epoch_start: Callable[[int, int], None] | None = None


class Protection(Component):
    """Makes a training set unlearnable. ``protect`` never mutates its input; randomness comes from ``seed``.

    ``identity`` protections (``clean``) are not cached: their output is the input.
    """

    identity: ClassVar[bool] = False

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        raise NotImplementedError


class Countermeasure(Component):
    """Tries to make a protected training set learnable again.

    ``stage`` is ``"data"`` for preprocessing done once on the train set (``purify``, cached) or
    ``"train"`` for changes to training itself (augmentations, adversarial training …).
    """

    stage: ClassVar[str] = "data"
    identity: ClassVar[bool] = False
    reports: ClassVar[str] = "final"  # "best": the leaderboard shows test_acc_best in its column (early_stop)

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        """Data-stage preprocessing of the (protected) train set; the test set is never touched."""
        return train

    def train_hooks(self, num_classes: int, image_size: int) -> TrainHooks:
        """Train-stage changes to the training loop (none by default)."""
        return TrainHooks()


class Victim(Component):
    """A network architecture trained on the (protected, purified) train set."""

    def build(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        raise NotImplementedError


PROTECTIONS: Registry[Protection] = Registry("protection", Protection)
COUNTERMEASURES: Registry[Countermeasure] = Registry("countermeasure", Countermeasure)
VICTIMS: Registry[Victim] = Registry("victim", Victim)
