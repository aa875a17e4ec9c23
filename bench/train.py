"""The one training loop: victims train here, whatever the countermeasure, and are evaluated every epoch.

The train set lives on the device as uint8; batches are normalised and augmented there, batch-wise
(no per-sample PIL), with bf16 autocast and channels_last on CUDA.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.components import ImageSet
from bench.registry import ConfigError


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training recipe: optimiser, schedule, budget and augmentation, with the source it follows.

    ``augment``: ``"dataset"`` (the dataset's standard augmentation), ``"crop_flip"``, ``"crop"``, ``"none"``.
    ``schedule``: ``"cosine"`` (no restart), ``"step"`` (lr × 0.5 at half the epochs) or ``"constant"``.
    """

    name: str = "quick"
    source: str = "bench: small budget for CPU runs and tests (not a paper's recipe)"
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    augment: str = "dataset"
    eval_batch_size: int = 1024

    schedules: ClassVar[tuple[str, ...]] = ("cosine", "step", "constant")
    augments: ClassVar[tuple[str, ...]] = ("dataset", "crop_flip", "crop", "none")

    def __post_init__(self) -> None:
        if self.schedule not in self.schedules:
            raise ValueError(f"recipe schedule {self.schedule!r} is not one of {self.schedules}")
        if self.augment not in self.augments:
            raise ValueError(f"recipe augment {self.augment!r} is not one of {self.augments}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("recipe needs epochs ≥ 1, batch_size ≥ 1 and lr > 0")


RECIPES: dict[str, Recipe] = {
    "quick": Recipe(),
    "confoundergan": Recipe("confoundergan", "ConfounderGAN App. G.5: SGD 0.9, lr 0.025, cosine, 90 epochs",
                            epochs=90, lr=0.025, nesterov=False),
}


def make_recipe(name: str, **overrides: Any) -> Recipe:
    """A named recipe with field overrides (the record keeps the overrides)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    fields = {f.name for f in dataclasses.fields(Recipe)} - {"name", "source"}
    unknown = set(overrides) - fields
    if unknown:
        raise ConfigError(f"unknown recipe field(s) {sorted(unknown)} (fields: {', '.join(sorted(fields))})")
    try:
        return dataclasses.replace(RECIPES[name], **overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad recipe override: {err}") from err


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Normalize(nn.Module):
    """Per-channel standardisation, so victims (and attacks on them) take images in [0, 1]."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    x = images.double().div(255).transpose(0, 1).flatten(1)
    return x.mean(1).float(), x.std(1).clamp_min(1e-3).float()


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, crop: bool, flip: bool) -> torch.Tensor:
    """Batch-wise random crop with zero padding of size/8 (4 px at 32×32) and horizontal flip."""
    n, _, h, w = x.shape
    if crop:
        pad = max(1, h // 8)
        padded = F.pad(x, (pad, pad, pad, pad))
        dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=gen) for _ in range(2))
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].to(x.device)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].to(x.device)
        x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                   torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def evaluate(model: nn.Module, data: ImageSet, batch_size: int) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (already on the model's device)."""
    model.eval()
    correct = 0
    with torch.no_grad(), _autocast(data.images.device):
        for start in range(0, len(data), batch_size):
            x = _to_input(data.images[start:start + batch_size])
            correct += (model(x).argmax(1) == data.labels[start:start + batch_size]).sum().item()
    return correct / len(data)


def train_and_evaluate(model: nn.Module, train: ImageSet, test: ImageSet, recipe: Recipe, *, seed: int,
                       device: torch.device, augment: str,
                       on_epoch: Callable[[int, float, float], None] | None = None) -> dict[str, Any]:
    """Train ``model`` with ``recipe`` and evaluate on the clean ``test`` set after every epoch.

    Args:
        augment: the resolved augmentation (``crop_flip``, ``crop`` or ``none``).
        on_epoch: called with (epoch, train accuracy, test accuracy) for progress display.

    Returns:
        ``train_acc`` and ``test_acc`` curves, ``final``/``best`` test accuracy, ``images_per_s``.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    mean, std = channel_stats(train.images)
    model = nn.Sequential(Normalize(mean, std), model).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    train, test = train.to(device), test.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=recipe.nesterov and recipe.momentum > 0)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    schedule = _schedule(recipe, recipe.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    curves: dict[str, list[float]] = {"train_acc": [], "test_acc": []}
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen).to(device)
        correct = 0
        for step in range(steps_per_epoch):
            index = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            x = random_crop_flip(train.images[index], gen, crop=augment != "none", flip=augment == "crop_flip")
            y = train.labels[index]
            with _autocast(device):
                logits = model(_to_input(x))
                loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            correct += (logits.argmax(1) == y).sum().item()
        curves["train_acc"].append(correct / len(train))
        curves["test_acc"].append(evaluate(model, test, recipe.eval_batch_size))
        if on_epoch:
            on_epoch(epoch + 1, curves["train_acc"][-1], curves["test_acc"][-1])
    seconds = time.perf_counter() - start
    return {**curves, "final": curves["test_acc"][-1], "best": max(curves["test_acc"]),
            "best_epoch": curves["test_acc"].index(max(curves["test_acc"])) + 1,
            "images_per_s": recipe.epochs * len(train) / seconds}


def _schedule(recipe: Recipe, total_steps: int) -> Callable[[int], float]:
    if recipe.schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if recipe.schedule == "step":
        return lambda step: 0.5 if step >= total_steps // 2 else 1.0
    return lambda step: 1.0


def _to_input(images: torch.Tensor) -> torch.Tensor:
    x = images.float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def _autocast(device: torch.device) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
