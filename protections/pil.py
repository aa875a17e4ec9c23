"""Perturbation-induced linearization (PIL, Liu et al., ICLR 2026): unlearnable examples from a linear surrogate."""

from __future__ import annotations

import time
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import PROTECTIONS, ImageSet, Protection, pixel_steps
from bench.protections import _surrogate as S


class LinearSurrogate(nn.Sequential):
    """PIL's bias-free linear classifier on flattened [0, 1] pixels, with no normalisation (an affine
    normalisation would be a bias). As the official ``models/linearmodel.py``: two bias-free maps, d → K → K,
    whose product is the paper's single linear map f(x) = xW."""

    def __init__(self, inputs: int, classes: int) -> None:
        super().__init__(nn.Flatten(), nn.Linear(inputs, classes, bias=False), nn.Linear(classes, classes, bias=False))


@PROTECTIONS.register("pil")
class PerturbationInducedLinearization(Protection):
    """PIL (Liu et al., ICLR 2026, arXiv 2601.19967, method section): (1) train a bias-free linear classifier f
    on the clean set; (2) for each image, lower λ·CE(f(δ), y) + (1 − λ)·KL(U ‖ softmax f(x − δ)) over δ in the
    L∞ ball of ``epsilon`` — δ alone is a linear shortcut to the label (shortcut learning), and x − δ carries no
    class evidence for f (semantic obfuscation; U: uniform over the K classes, KL averaged over the batch);
    (3) publish x − δ (the paper's threat model writes x + δ; the official subtracts, as here). Sample-wise, not
    alternating: the surrogate is trained once, then frozen. f is two bias-free maps d → K → K as the official
    ``models/linearmodel.py`` (the paper writes one matrix, f(x) = xW: the same family of maps).

    Where the paper gives no number, the official code (jinlinll/pil @ e3c0916) is followed. ``main.py``:
    ε = 8/255 (``--eps``), step 0.8/255 (``--alpha 8/2550``), 30 steps (``--attack_iter``), λ = 0.9
    (``--lmd``), surrogate trained 30 epochs (``--pretrain_iter``) at lr 0.003 (``--lr_train``), weight decay 0,
    no gradient clipping (``--gc_train`` unset), batches of 512, no augmentation or normalisation (``ToTensor``
    only). ``trainer.py``: SGD momentum 0.9, cosine annealing to 0 over the epochs, stepped each epoch.
    ``attacks.py``: δ starts uniform in [−ε, ε], each step is δ − α·sign(∇) clipped to [−ε, ε] only (x − δ may
    leave [0, 1] until it is published as clamp(x − δ, 0, 1)); surrogate in eval mode; batches of 512 (the steps
    are per image: the batch size changes nothing but memory). The step does not scale with ε: 30 steps of
    0.8/255 travel 24/255, so a larger ε wants a larger ``step_size`` (the defaults' ratio is α = ε/10).

    ``info``: the surrogate's clean train accuracy, how often f(δ) = y (the shortcut) and how often f(x − δ) = y
    on the published images. Deviations: the surrogate's batches are reshuffled each epoch (official: the file
    order of torchvision's CIFAR-10, ``shuffle=False``, which is not sorted by class; bench's sets may be, and
    class-sorted batches would wreck SGD); it trains under bench's autocast (bf16 on CUDA; the perturbation steps
    are fp32, as the official's everywhere); KL is computed from log-softmax (official: the log of the softmax).
    """

    paper: ClassVar[str] = "Liu et al. 2026 (PIL), ICLR; official defaults (jinlinll/pil main.py, attacks.py)"
    paper_setting: ClassVar[tuple[str, ...]] = ("epsilon", "steps", "lam", "model_epochs")
    bounds: ClassVar[dict[str, str]] = {"lam": "[0, 1]"}
    epsilon: float = pixel_steps(8.0)
    steps: int = 30
    step_size: float = pixel_steps(0.8, budget=False)
    lam: float = 0.9
    model_epochs: int = 30
    model_lr: float = 0.003
    batch_size: int = 512

    def __post_init__(self) -> None:
        if not self.epsilon <= 255:
            raise ValueError(f"pil epsilon is in 1/255 pixel steps and at most 255, got {self.epsilon}; "
                             "omit it for the official 8")

    def surrogate(self, train: ImageSet, *, seed: int, device: torch.device) -> nn.Module:
        """The linear classifier trained on clean ``train`` as the official ``trainer.train_model``, in eval mode."""
        torch.manual_seed(seed)  # the layers' initialisation
        model = LinearSurrogate(train.images[0].numel(), train.num_classes).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=self.model_lr, momentum=0.9, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.model_epochs, eta_min=0)
        x, y = S.to_float(train, device), train.labels.to(device)
        stream = S.shuffled_batches(len(x), self.batch_size, torch.Generator().manual_seed(seed), device)
        for _ in range(self.model_epochs):
            for _ in range(-(-len(x) // self.batch_size)):  # one epoch: each image once, in a new order
                idx = next(stream)
                S.train_step(model, optimizer, x[idx], y[idx], clip=None)
            schedule.step()
        return model.eval().requires_grad_(False)

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        start = time.perf_counter()
        model = self.surrogate(train, seed=seed, device=device)
        gen = torch.Generator().manual_seed(seed)
        x, y = S.to_float(train, device), train.labels.to(device)
        eps = self.epsilon / 255
        delta = ((torch.rand(x.shape, generator=gen) * 2 - 1) * eps).to(device)
        for idx in S.batches(len(x), self.batch_size, device):
            delta[idx] = self._steps(model, x[idx], y[idx], delta[idx], eps, train.num_classes)
        return S.publish(train, x, -delta, surrogate_clean_accuracy=S.accuracy(model, x, y),
                         shortcut_accuracy=S.accuracy(model, delta, y),
                         obfuscated_accuracy=S.accuracy(model, (x - delta).clamp(0, 1), y),
                         seconds=time.perf_counter() - start)

    def _steps(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, eps: float,
               classes: int) -> torch.Tensor:
        """``steps`` signed descent steps of PIL's loss on one batch's δ (fp32, clipped to ±ε only)."""
        uniform = torch.full((len(x), classes), 1 / classes, device=x.device)
        for _ in range(self.steps):
            delta = delta.detach().requires_grad_(True)
            shortcut = F.cross_entropy(model(delta), y)
            obfuscation = F.kl_div(F.log_softmax(model(x - delta), 1), uniform, reduction="batchmean")
            loss = self.lam * shortcut + (1 - self.lam) * obfuscation
            grad = torch.autograd.grad(loss, delta)[0]
            delta = (delta - self.step_size / 255 * grad.sign()).clamp(-eps, eps)
        return delta.detach()
