"""The one training loop: every victim trains here, whatever the countermeasure, and is evaluated on the
clean test set after every epoch (curves in every record, so early stopping needs no retraining).

The train set lives on the device as uint8; batches are normalised and augmented there, batch-wise, with
bf16 autocast (CUDA, and CPUs with native bf16) and channels_last, and an optional ``torch.compile``.
Train-stage countermeasures plug in through ``TrainHooks`` (batch transform, input attack, loss).
Deterministic on CPU for a seed and thread count.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.components import ImageSet, TrainHooks
from bench.execute.augment import standard_augment
from bench.plan.recipes import Recipe


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the cell stops with this error recorded."""


class Normalize(nn.Module):
    """Per-channel standardisation inside the model, so victims (and attacks on them) take [0, 1] images."""

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


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast is ~2.5× faster."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed activation buffers for reuse instead of handing them back to the OS.

    By default large blocks come from fresh mmap pages and the heap top is trimmed after frees, so each CPU
    forward/backward pays ~10× more page faults. Measured on a 2-core AVX2 CPU: one EM round (cnn surrogate,
    1,000 images) 20.9 → 29.8 images/s. The cost: the process keeps its peak heap. Returns False (no-op)
    where the C library is not glibc. Called once per process (CLI and each joblib worker).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 2**31 - 1))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32`` for this recipe setting on this device."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()) else "fp32"


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W → float [0, 1], channels_last."""
    return images.float().div_(255).contiguous(memory_format=torch.channels_last)


def evaluate(model: nn.Module, data: ImageSet, batch_size: int, precision: str = "fp32") -> float:
    """Top-1 accuracy of ``model`` on ``data`` (already on the model's device)."""
    model.eval()
    correct = 0
    with torch.no_grad(), autocast(data.images.device, precision):
        for start in range(0, len(data), batch_size):
            logits = model(to_input(data.images[start:start + batch_size]))
            correct += (logits.argmax(1) == data.labels[start:start + batch_size]).sum().item()
    return correct / len(data)


def train_and_evaluate(model: nn.Module, train: ImageSet, test: ImageSet, recipe: Recipe, *, seed: int,
                       device: torch.device, augment: str, hooks: TrainHooks | None = None,
                       evaluate_every_epoch: bool = True,
                       on_epoch: Callable[[int, float, float], None] | None = None) -> dict[str, Any]:
    """Train ``model`` with ``recipe`` and evaluate it on the clean ``test`` set.

    Args:
        augment: the resolved standard augmentation (see ``bench.execute.augment.KINDS``).
        hooks: a train-stage countermeasure's changes to the loop.
        evaluate_every_epoch: False evaluates only after the last epoch (for timing); else every
            ``recipe.eval_every`` epochs and after the last.
        on_epoch: called with (epoch, train accuracy, test accuracy) for progress display.

    Returns:
        ``train_acc``/``test_acc`` curves, ``final``/``best`` test accuracy and its epoch, ``images_per_s``
        (training only), ``precision``, ``steps`` and the trained ``model`` (normalisation included).
    """
    hooks = hooks or TrainHooks()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    precision = resolve_precision(recipe.precision, device)
    mean, std = channel_stats(train.images)
    net = nn.Sequential(Normalize(mean, std), model).to(device).to(memory_format=torch.channels_last)
    forward = torch.compile(net) if recipe.compile else net
    train, test = train.to(device), test.to(device)
    optimizer = _optimizer(recipe, net)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total_steps = recipe.iterations if recipe.iterations is not None else recipe.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe, total_steps, steps_per_epoch))
    curves: dict[str, list[float]] = {"train_acc": [], "test_acc": []}
    step, seen, train_seconds = 0, 0, 0.0
    for epoch in range(epochs):
        start = time.perf_counter()
        net.train()
        if hooks.epoch_start:
            hooks.epoch_start(epoch, epochs)
        order = torch.randperm(len(train), generator=gen).to(device)
        correct = 0
        for first in range(0, len(train), recipe.batch_size):
            if step == total_steps:
                break
            index = order[first:first + recipe.batch_size]
            x = standard_augment(to_input(train.images[index]), augment, gen)
            y = train.labels[index]
            if hooks.batch_transform:
                x, y = hooks.batch_transform(x, y, gen)
            if hooks.attack:
                with autocast(device, precision):
                    x = hooks.attack(forward, x, y, gen)
            with autocast(device, precision):
                loss, logits = hooks.loss(forward, x, y, gen) if hooks.loss else _cross_entropy(forward, x, y, recipe)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step, seen = step + 1, seen + len(index)
            hard = y.argmax(1) if y.dim() == 2 else y
            correct += (logits.argmax(1) == hard).sum().item()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds += time.perf_counter() - start
        curves["train_acc"].append(correct / min(len(train), (step - epoch * steps_per_epoch) * recipe.batch_size))
        last = epoch == epochs - 1
        due = evaluate_every_epoch and (epoch + 1) % recipe.eval_every == 0
        curves["test_acc"].append(evaluate(forward, test, recipe.eval_batch_size, precision)
                                  if due or last else float("nan"))
        if on_epoch:
            on_epoch(epoch + 1, curves["train_acc"][-1], curves["test_acc"][-1])
    tested = [a for a in curves["test_acc"] if not math.isnan(a)]
    return {**curves, "final": tested[-1], "best": max(tested), "best_epoch": curves["test_acc"].index(max(tested)) + 1,
            "images_per_s": seen / train_seconds, "precision": precision, "steps": step, "model": net}


def _cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    return F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing), logits


def _optimizer(recipe: Recipe, model: nn.Module) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                           weight_decay=recipe.weight_decay, nesterov=recipe.nesterov and recipe.momentum > 0)


def _schedule(recipe: Recipe, total: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The lr multiplier at each optimiser step."""
    if recipe.schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if recipe.schedule == "step":
        return lambda step: recipe.gamma ** sum(step >= m * steps_per_epoch for m in recipe.milestones)
    if recipe.schedule == "triangle":
        rise = max(1, round(recipe.warmup * total))
        return lambda step: step / rise if step < rise else max(0.0, (total - step) / max(1, total - rise))
    return lambda step: 1.0


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast on ``device`` when ``precision`` is bf16, else nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
