"""UEraser (Qin et al. 2023, 'Learning the Unlearnable: Adversarial Augmentations Suppress Unlearnable
Example Attacks'): strong augmentations and, for the first part of training, adversarial augmentation: the
loss is the per-image maximum over K augmented draws."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import COUNTERMEASURES, Countermeasure, TrainHooks
from bench.countermeasures import _ops
from bench.countermeasures._trivial import random_jpeg, ueraser_augment

# variant → fraction of the epochs with the max-over-K loss (APBench train.py --repeat_epoch 0 / 50 / 300 of
# its 200 epochs; UEraser-Max trains 300 epochs, all adversarial: set the epochs in the recipe).
VARIANTS = {"lite": 0.0, "standard": 0.25, "max": 1.0}


@COUNTERMEASURES.register("ueraser")
class UEraser(Countermeasure):
    """UEraser through ``TrainHooks.loss``, following APBench @9a6fb91 (``defense/ueraser.py``, ``train.py``).

    Augmentation (every draw): plasma brightness (p 1.0, roughness 0.3–0.7, intensity 0.5–1.0), plasma
    contrast (p 1.0, roughness 0.3–0.7), channel shuffle (p 0.5), TrivialAugment (kornia's default operations
    and ranges). ``jpeg``: APBench's ``UEraser_jpeg``, which its ``train.py`` selects for TAP and AR: each draw
    is first a JPEG round trip (one quality per batch, uniform in 10–99), then the augmentation with plasma p
    0.8. A train hook does not know the cell's protection, so the matrices set ``jpeg = true`` on the TAP and AR
    rows. Loss: while adversarial, mean over images of the maximum cross-entropy over ``repeats`` (K = 5)
    independent draws; afterwards, cross-entropy on one draw. ``variant``: ``lite`` (never adversarial: one
    draw per step), ``standard`` (adversarial for the first quarter of the epochs: APBench's 50 of 200),
    ``max`` (always adversarial: APBench's 300 of 300 epochs).

    Deviations: the operations are re-implemented on plain torch (``countermeasures._trivial``): the plasma
    maps are multi-octave value noise rather than diamond-square, and TrivialAugment picks an operation per
    image (kornia per batch). The authors' repository (lafeat/ueraser @6076a27) differs from the APBench commit
    followed here: plasma p 0.5, JPEG at quality 10 *after* the augmentations (``UEraserJPEG``), and 60 of 200
    adversarial epochs (30 %) in its README. The step's logits (for train accuracy) are those of the last draw,
    as in APBench. ``standard`` follows the schedule through ``TrainHooks.epoch_start``, which the loop calls
    before each epoch; a loss called before it raises instead of guessing.

    Small sets (measured on 500 clean cifar10-jpeg images, ``cpu`` recipe, 8 epochs of ``max``, at version 1:
    plasma p 0.5): the victim cannot fit the K draws and settles on a near-uniform output, which minimises the
    maximum cross-entropy (test 14.2 % cnn, 17.4 % resnet20; logit std over images 0.002 / 0.023, against 27.2 /
    28.8 % and 0.55 / 0.89 with ``lite``); one-draw epochs afterwards did not revive the cnn (``standard``:
    10.0 % after 80 epochs). So a ``ueraser`` column at chance on the CPU matrices is this collapse, not the
    protection. purification-cpu's TAP and AR rows (``standard``): 10.0 / 10.0 % at version 1, 15.7 / 10.0 % at
    version 2 without ``jpeg``, 10.0 / 10.0 % with it (DH Table II, ResNet-18 on CIFAR-10: 76.21 / 93.16). With
    ``lite``, which does not
    collapse, the JPEG step lifts TAP from 27.2 to 31.5 % and AR from 35.5 to 38.7 % (no countermeasure: 24.6 and
    13.4; cifar10-jpeg 50/class, cnn, ``cpu`` recipe, 2026-12-07).
    """

    paper: ClassVar[str] = "Qin et al. 2023 (UEraser); APBench @9a6fb91 defense/ueraser.py (K = 5; lite/standard/max)"
    version: ClassVar[int] = 2  # 2: plasma p 1.0 (APBench @9a6fb91, was 0.5) and the ``jpeg`` variant
    test_params: ClassVar[dict[str, object]] = {"repeats": 2}
    stages: ClassVar[frozenset[str]] = frozenset({"train"})
    variant: str = "standard"
    repeats: int = 5
    jpeg: bool = False

    def __post_init__(self) -> None:
        _ops.require(self.variant in VARIANTS and self.repeats >= 1, self,
                     f"variant in {sorted(VARIANTS)} and repeats ≥ 1")

    def train_hooks(self, num_classes: int, image_size: int) -> TrainHooks:
        loss = UEraserLoss(VARIANTS[self.variant], self.repeats, self.jpeg)
        return TrainHooks(loss=loss, epoch_start=loss.start_epoch)


class UEraserLoss:
    """The loss hook with its state: the training progress (from ``start_epoch``, called by the loop before
    each epoch)."""

    def __init__(self, fraction: float, repeats: int, jpeg: bool = False) -> None:
        self.fraction, self.repeats, self.jpeg = fraction, repeats, jpeg
        self.progress: float | None = None

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the loop before each epoch (0-based) with the number of epochs."""
        self.progress = epoch / epochs

    def adversarial(self) -> bool:
        if self.fraction in (0.0, 1.0):
            return self.fraction == 1.0
        if self.progress is None:
            raise RuntimeError("ueraser variant 'standard' needs TrainHooks.epoch_start called before the first "
                               "step (bench.execute.train does; a loop of your own must too), or use variant 'lite' or 'max'")
        return self.progress < self.fraction

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One draw: APBench's ``UEraser``, or with ``jpeg`` its ``UEraser_jpeg`` (JPEG copy, then plasma p 0.8)."""
        return ueraser_augment(random_jpeg(x, gen), gen, p_plasma=0.8) if self.jpeg else ueraser_augment(x, gen)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        draws = self.repeats if self.adversarial() else 1
        losses = []
        for _ in range(draws):
            logits = model(self.augment(x, gen))
            losses.append(F.cross_entropy(logits.float(), y, reduction="none"))
        return torch.stack(losses).amax(0).mean(), logits
