"""The data types every stage exchanges: images with labels, a train-stage countermeasure's hooks, pretrained
weights a component loads, the models a stage fits, and what an adaptive attacker holds (``bench.core.components`` re-exports them for plugins)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


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
        """The same labels with other uint8 images (e.g. protected ones), reporting ``info`` about them.

        Never casts: float images in [0, 1] would become zeros and int16 values would wrap around.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"with_images takes uint8 images, got {images.dtype}: publish 8-bit pixels yourself, e.g. "
                            "x.mul(255).round().clamp(0, 255).to(torch.uint8) for floats in [0, 1], or "
                            "x.clamp(0, 255).to(torch.uint8) for integer pixel values")
        if images.shape != self.images.shape:
            raise ValueError(f"with_images got shape {tuple(images.shape)} for a set of {tuple(self.images.shape)}")
        return ImageSet(images.contiguous(), self.labels, self.num_classes, info)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.num_classes)

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.num_classes, self.info)


Generator = torch.Generator  # the type of every hook's ``gen``


@dataclasses.dataclass(frozen=True)
class TrainHooks:
    """How a train-stage countermeasure changes the one training loop (``bench.execute.train``).

    Every hook that draws randomness gets the cell's generator ``gen`` (a CPU ``torch.Generator`` seeded by the
    cell's seed; derive a device generator from it for large draws). ``batch_transform(x, y, gen) -> (x, y)``: on
    float batches in [0, 1] after the standard augmentation; may return soft labels N×K (mixup, cutmix).
    ``attack(model, x, y, gen) -> x``: a per-batch input attack (PGD for adversarial training), run under the
    loop's autocast. ``loss(model, x, y, gen) -> (loss, logits)``: replaces cross-entropy (UEraser's max over
    augmented draws, distillation's KL to a teacher). ``epoch_start(epoch, epochs)``: called before each epoch
    (0-based) with the number of epochs, for hooks that follow the schedule (UEraser's adversarial first part).
    """

    batch_transform: Callable[[torch.Tensor, torch.Tensor, Generator], tuple[torch.Tensor, torch.Tensor]] | None = None
    attack: Callable[[nn.Module, torch.Tensor, torch.Tensor, Generator], torch.Tensor] | None = None
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, Generator], tuple[torch.Tensor, torch.Tensor]] | None = None
    epoch_start: Callable[[int, int], None] | None = None


@dataclasses.dataclass(frozen=True)
class Attacker:
    """What an adaptive attacker holds (ConfounderGAN App. D; Radiya-Dixit et al. 2022): the natural images of
    the train set it is given (``clean``, image for image), and the cell's protection to run on natural images
    of its own: ``protect`` (by the protection's fitted model where it encrypts unseen images, else by running
    the protection on them, with a seed other than the protector's); ``how`` says which."""

    clean: ImageSet
    protect: Callable[[ImageSet], ImageSet]
    how: str


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Pretrained weights a component loads: found at ``$env`` (a local path) or, where the hub is reachable,
    under ``hub_id``. ``files`` says what to place there; the planner refuses a cell whose weights are absent."""

    name: str
    env: str
    hub_id: str = ""
    files: str = ""
    alternative: str = ""  # the documented setting that runs without these weights

    def locate(self) -> Path | None:
        path = Path(os.environ.get(self.env, "")).expanduser()
        return path if os.environ.get(self.env) and path.exists() else None

    def missing(self) -> str:
        return (f"{self.name} weights not found: place {self.files or 'them'} at a path and set ${self.env} to it"
                + (f" (hub id {self.hub_id}, needs the hub)" if self.hub_id else "")
                + (f"; or ask for the documented alternative: {self.alternative}" if self.alternative else ""))


class Models(Mapping[str, nn.Module]):
    """Fitted models by kind (``generator``, ``authorized`` …), loaded and verified by the harness."""

    def __init__(self, models: Mapping[str, nn.Module] | None = None) -> None:
        self._models = dict(models or {})

    def __getitem__(self, kind: str) -> nn.Module:
        if kind not in self._models:
            raise KeyError(f"no {kind!r} model here (models: {', '.join(self._models) or 'none'}); declare it in "
                           "needs_models (the planner checks the cell's protection fits one), or in uses_models and "
                           "check `kind in models`")
        return self._models[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)


@dataclasses.dataclass(frozen=True)
class Fitted:
    """What a stage made: the image set and the models it fitted (each an ``nn.Module`` with an ``arch`` dict
    from which the component's ``build_model(kind, arch)`` rebuilds it)."""

    data: ImageSet
    models: Models = dataclasses.field(default_factory=Models)
