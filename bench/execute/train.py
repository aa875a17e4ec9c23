"""The one training loop: every victim trains here, whatever the countermeasure, and is evaluated on the
clean test set after every epoch (curves in every record, so early stopping needs no retraining).

The train set lives on the device as uint8 where it fits (else batches stream from pinned host memory); batches
are normalised and augmented there, batch-wise, with bf16 autocast (GPUs and CPUs with native bf16) and
channels_last, and an optional ``torch.compile``. Train-stage countermeasures plug in through ``TrainHooks``
(batch transform, input attack, loss). On CUDA the loop waits for the GPU only every ``CHECK_EVERY`` steps and at
epoch ends. Deterministic on CPU for a seed and thread count.
"""

from __future__ import annotations

import ctypes
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.components import ImageSet, TrainHooks
from bench.execute.augment import host_to_device, standard_augment
from bench.execute.precision import autocast, cpu_has_bf16, resolve_precision
from bench.plan.recipes import Recipe

__all__ = ["CHECK_EVERY", "EVAL_VALUES", "RESIDENT_FRACTION", "Normalize", "TrainingDiverged", "autocast",
           "capped_batch", "channel_stats", "cpu_has_bf16", "data_placement", "evaluate", "keep_freed_memory",
           "resolve_precision", "to_input", "train_and_evaluate"]

CHECK_EVERY = 50  # CUDA: optimiser steps between checks that the loss is finite (each check waits for the GPU)
RESIDENT_FRACTION = 0.25  # the train set stays on a GPU when its bytes are at most this share of free memory
STATS_CHUNK_BYTES = 16 << 20  # images per ``channel_stats`` chunk: this many uint8 bytes
EVAL_VALUES = 1024 * 3 * 32 * 32  # input values an evaluation batch holds at most: 1,024 CIFAR images, 20 at 224 px


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
    """Per-channel mean and (unbiased) std of uint8 images, in [0, 1] units, as float32.

    From exact per-channel histograms over chunks of ``STATS_CHUNK_BYTES`` (no float copy of the set), then one
    float64 division per channel: the float64 computation's result, to float32.
    """
    counts = torch.zeros(images.shape[1], 256, dtype=torch.int64, device=images.device)
    step = max(1, STATS_CHUNK_BYTES // max(1, math.prod(images.shape[1:])))
    for first in range(0, images.shape[0], step):
        chunk = images[first:first + step]
        for channel in range(images.shape[1]):
            counts[channel] += torch.bincount(chunk[:, channel].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.int64, device=images.device)
    n = images.shape[0] * images.shape[2] * images.shape[3]
    sums, squares = (counts * values).sum(1).tolist(), (counts * values * values).sum(1).tolist()
    mean = [s / (255 * n) if n else math.nan for s in sums]
    std = [math.sqrt((n * q - s * s) / (n * (n - 1))) / 255 if n > 1 else math.nan for s, q in zip(sums, squares)]
    as_tensor = functools.partial(torch.tensor, dtype=torch.float32, device=images.device)
    return as_tensor(mean), as_tensor(std).clamp_min(1e-3)


def data_placement(images: torch.Tensor, device: torch.device, fraction: float = RESIDENT_FRACTION) -> str:
    """Where a train set stays while training on ``device``: ``host`` (training on the CPU), ``device`` (its bytes
    at most ``fraction`` of the GPU's free memory), else ``host-pinned`` (batches gathered on the host into pinned
    memory and copied without blocking)."""
    if device.type == "cpu":
        return "host"
    if device.type != "cuda":
        return "device"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if images.numel() * images.element_size() <= fraction * free else "host-pinned"


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


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×C×H×W → float [0, 1], channels_last."""
    return images.float().div_(255).contiguous(memory_format=torch.channels_last)


def capped_batch(batch_size: int, images: torch.Tensor) -> int:
    """``batch_size``, or fewer where a batch of ``images`` would hold more than ``EVAL_VALUES`` input values."""
    return max(1, min(batch_size, EVAL_VALUES // math.prod(images.shape[1:])))


def evaluate(model: nn.Module, data: ImageSet, batch_size: int, precision: str = "fp32") -> float:
    """Top-1 accuracy of ``model`` on ``data`` (already on the model's device), ``batch_size`` images at a time, fewer
    where they would hold more than ``EVAL_VALUES`` input values (memory stays flat with the resolution)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=data.images.device)
    batch_size = capped_batch(batch_size, data.images)
    with torch.no_grad(), autocast(data.images.device, precision):
        for start in range(0, len(data), batch_size):
            logits = model(to_input(data.images[start:start + batch_size]))
            correct += (logits.argmax(1) == data.labels[start:start + batch_size]).sum()
    return correct.item() / len(data)


def train_and_evaluate(model: nn.Module, train: ImageSet, test: ImageSet, recipe: Recipe, *, seed: int,
                       device: torch.device, augment: str, hooks: TrainHooks | None = None,
                       evaluate_every_epoch: bool = True, stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                       on_epoch: Callable[[int, float, float], None] | None = None) -> dict[str, Any]:
    """Train ``model`` with ``recipe`` and evaluate it on the clean ``test`` set.

    Args:
        augment: the resolved standard augmentation (see ``bench.execute.augment.KINDS``).
        hooks: a train-stage countermeasure's changes to the loop.
        evaluate_every_epoch: False evaluates only after the last epoch (for timing); else every
            ``recipe.eval_every`` epochs and after the last.
        on_epoch: called with (epoch, train accuracy, test accuracy) for progress display.
        stats: per-channel mean and std to normalise with (``Victim.input_stats``); None: the train set's.

    Returns:
        ``train_acc``/``test_acc`` curves, ``final``/``best`` test accuracy and its epoch, ``images_per_s``
        (training only; with ``recipe.compile``, without the first step of each batch size, which compiles: its
        seconds are ``compile_seconds``, and the rate is None if every step compiled), the resolved ``precision``,
        ``steps``, ``data_placement`` (see ``data_placement``), ``tf32_conv`` (cuDNN may use TF32 for fp32
        convolutions: CUDA only) and the trained ``model`` (normalisation included).
    """
    hooks = hooks or TrainHooks()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    precision = resolve_precision(recipe.precision, device)
    mean, std = stats if stats is not None else channel_stats(train.images)
    net = nn.Sequential(Normalize(mean, std), model).to(device).to(memory_format=torch.channels_last)
    forward = torch.compile(net, dynamic=False) if recipe.compile else net
    placement = data_placement(train.images, device)
    images = train.images if placement == "host-pinned" else train.images.to(device)
    labels, test = train.labels.to(device), test.to(device)
    optimizer = _optimizer(recipe, net)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total_steps = recipe.iterations if recipe.iterations is not None else recipe.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe, total_steps, steps_per_epoch))
    curves: dict[str, list[float]] = {"train_acc": [], "test_acc": []}
    check_every = CHECK_EVERY if device.type == "cuda" else 1  # a check costs the CPU nothing
    step, seen, train_seconds = 0, 0, 0.0
    compiled: dict[int, float] = {}  # batch size → seconds of the step that compiled its graph
    for epoch in range(epochs):
        start = time.perf_counter()
        net.train()
        if hooks.epoch_start:
            hooks.epoch_start(epoch, epochs)
        order = torch.randperm(len(train), generator=gen)
        on_device = host_to_device(order, device)
        epoch_end = min(total_steps, (epoch + 1) * steps_per_epoch)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        losses, checked = torch.zeros((), device=device), step  # the sum of the losses since step ``checked``
        for first in range(0, len(train), recipe.batch_size):
            if step == total_steps:
                break
            index = on_device[first:first + recipe.batch_size]
            compiling = recipe.compile and len(index) not in compiled
            compile_start = _clock(device) if compiling else 0.0
            batch = _host_batch(images, order[first:first + recipe.batch_size], device) \
                if placement == "host-pinned" else images[index]
            x, y = standard_augment(to_input(batch), augment, gen), labels[index]
            if hooks.batch_transform:
                x, y = hooks.batch_transform(x, y, gen)
            if hooks.attack:
                with autocast(device, precision):
                    x = hooks.attack(forward, x, y, gen)
            with autocast(device, precision):
                loss, logits = hooks.loss(forward, x, y, gen) if hooks.loss else _cross_entropy(forward, x, y, recipe)
            losses = losses + loss.detach().float()
            if (step + 1) % check_every == 0 or step + 1 == epoch_end:
                _check_finite(losses, epoch, checked + 1, step + 1)
                losses, checked = torch.zeros((), device=device), step + 1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step, seen = step + 1, seen + len(index)
            hard = y.argmax(1) if y.dim() == 2 else y
            correct += (logits.argmax(1) == hard).sum()
            if compiling:
                compiled[len(index)] = _clock(device) - compile_start
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds += time.perf_counter() - start
        done = (step - epoch * steps_per_epoch) * recipe.batch_size
        curves["train_acc"].append(correct.item() / min(len(train), done))
        last = epoch == epochs - 1
        due = evaluate_every_epoch and (epoch + 1) % recipe.eval_every == 0
        curves["test_acc"].append(evaluate(forward, test, recipe.eval_batch_size, precision)
                                  if due or last else float("nan"))
        if on_epoch:
            on_epoch(epoch + 1, curves["train_acc"][-1], curves["test_acc"][-1])
    tested = [a for a in curves["test_acc"] if not math.isnan(a)]
    timed = seen - sum(compiled)  # images of the steps that compiled nothing
    rate = timed / (train_seconds - sum(compiled.values())) if timed else None
    return {**curves, "final": tested[-1], "best": max(tested), "best_epoch": curves["test_acc"].index(max(tested)) + 1,
            "images_per_s": rate, "precision": precision, "steps": step, "model": net, "data_placement": placement,
            "tf32_conv": device.type == "cuda" and torch.backends.cudnn.allow_tf32,
            "compile_seconds": sum(compiled.values()) if recipe.compile else None}


def _clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _host_batch(images: torch.Tensor, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-resident images ``index`` on ``device``: gathered straight into pinned memory on CUDA and copied
    without blocking the host."""
    if device.type != "cuda":
        return host_to_device(images[index], device)
    batch = torch.empty((len(index), *images.shape[1:]), dtype=images.dtype, pin_memory=True)
    return torch.index_select(images, 0, index, out=batch).to(device, non_blocking=True)


def _check_finite(losses: torch.Tensor, epoch: int, first: int, last: int) -> None:
    """Raise ``TrainingDiverged`` if the sum of the losses of steps ``first``..``last`` is NaN or infinite."""
    if not torch.isfinite(losses):
        steps = f"step {last}" if first == last else f"one of steps {first}-{last}"
        raise TrainingDiverged(f"loss became {losses.item()} at epoch {epoch + 1}, {steps}")


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
