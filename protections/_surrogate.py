"""Shared machinery of the surrogate-based protections (EM, REM, TAP, ConfounderGAN's frozen classifier).

A surrogate is any registered victim, named by the protection's ``surrogate`` field (so it enters the cache
key). Images are float [0, 1] tensors on the device; perturbations δ are kept so that x + δ stays in [0, 1]
(the noise is added before clamping, never after quantising: a known pitfall of the reference code), and
the published image is round(255 · (x + δ)).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import (VICTIMS, ImageSet, Normalize, Recipe, autocast, channel_stats, resolve_precision,
                       train_and_evaluate)

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build(name: str, data: ImageSet, device: torch.device) -> nn.Module:
    """Victim ``name`` for ``data``'s shape with its per-channel normalisation inside, on ``device``."""
    model = VICTIMS.create(name).build(data.num_classes, data.channels, data.size)
    mean, std = channel_stats(data.images)
    return nn.Sequential(Normalize(mean, std), model).to(device).to(memory_format=torch.channels_last)


def pretrain(name: str, data: ImageSet, *, seed: int, device: torch.device, epochs: int, augment: str = "crop_flip",
             lr: float = 0.1, milestones: tuple[int, ...] | None = None,
             on_epoch: Callable[[int, nn.Module], None] | None = None) -> tuple[nn.Module, float]:
    """A surrogate trained on clean ``data`` with the one training loop, then frozen in eval mode.

    ``milestones``: a step schedule (lr × 0.1 at each of these epochs) instead of cosine. ``on_epoch``: called
    after each epoch with its number (1-based) and the model being trained (without the normalisation), e.g. to
    keep checkpoints. Returns the model and its accuracy on ``data`` (no augmentation), which the protections report.
    """
    torch.manual_seed(seed)
    model = VICTIMS.create(name).build(data.num_classes, data.channels, data.size)
    schedule = {"schedule": "step", "milestones": milestones} if milestones is not None else {}
    recipe = Recipe("surrogate", "clean surrogate: SGD momentum 0.9, wd 5e-4, cosine or step", epochs=epochs, lr=lr,
                    nesterov=False, **schedule)
    report = (lambda epoch, *_: on_epoch(epoch, model)) if on_epoch else None
    train_and_evaluate(model, data, data, recipe, seed=seed, device=device, augment=augment,
                       evaluate_every_epoch=False, on_epoch=report)
    mean, std = channel_stats(data.images)
    net = nn.Sequential(Normalize(mean, std), model).to(device).to(memory_format=torch.channels_last).eval()
    net.requires_grad_(False)
    return net, accuracy(net, to_float(data, device), data.labels.to(device))


def to_float(data: ImageSet, device: torch.device) -> torch.Tensor:
    """uint8 images → float [0, 1] on ``device``."""
    return data.images.to(device).float().div_(255)


def publish(train: ImageSet, x: torch.Tensor, delta: torch.Tensor, **info: Any) -> ImageSet:
    """The protected set: round(255 · clamp(x + δ, 0, 1)) as uint8 on the CPU, with ``info``."""
    images = (x + delta).clamp_(0, 1).mul_(255).round_().to(torch.uint8).cpu()
    return train.with_images(images, **info)


def project(x: torch.Tensor, delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """δ clipped to the L∞ ball of radius ``epsilon`` (in [0, 1] units) and so that x + δ ∈ [0, 1]."""
    return (x + delta.clamp(-epsilon, epsilon)).clamp_(0, 1) - x


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fp32 logits of ``model`` on ``x``, computed under bf16 autocast where it pays (CUDA, bf16 CPUs)."""
    with autocast(x.device, resolve_precision("auto", x.device)):
        return model(x).float()


def signed_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, *, epsilon: float,
               step_size: float, steps: int, descend: bool, loss: Loss | None = None,
               transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``steps`` signed-gradient steps on δ (descent minimises the loss: error-minimising; ascent maximises
    it: adversarial), each projected by ``project``. ``transform`` (differentiable) is applied to x + δ."""
    sign = -1.0 if descend else 1.0
    for _ in range(steps):
        inputs = (x + delta).detach().requires_grad_(True)
        value = (loss or F.cross_entropy)(logits(model, transform(inputs) if transform else inputs), y)
        grad = torch.autograd.grad(value, inputs)[0]
        delta = project(x, delta + sign * step_size * grad.sign(), epsilon)
    return delta.detach()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on float images ``x``."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        correct += (logits(model, x[start:start + batch_size]).argmax(1) == y[start:start + batch_size]).sum().item()
    model.train(was_training)
    return correct / len(x)


def batches(n: int, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Index batches over 0..n-1 in order (each image's noise is updated once per pass)."""
    for start in range(0, n, batch_size):
        yield torch.arange(start, min(n, start + batch_size), device=device)


def shuffled_batches(n: int, batch_size: int, gen: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """An endless stream of shuffled index batches (new order each epoch) for surrogate training steps."""
    while True:
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


def sgd(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The surrogate optimiser of the reference codes: SGD, momentum 0.9, weight decay 5e-4."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               clip: float | None = 5.0) -> float:
    """One surrogate training step (gradient-norm clipping at 5 as EM's code); returns the loss."""
    model.train()
    loss = F.cross_entropy(logits(model, x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.item()
