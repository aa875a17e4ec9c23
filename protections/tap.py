"""Targeted adversarial poisoning (TAP, Fowl et al. 2021)."""

from __future__ import annotations

import time
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.api import PROTECTIONS, ImageSet, Protection, channel_stats, pixel_steps
from bench.protections import _surrogate as S


def translate_flip(x: torch.Tensor, fill: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The official differentiable augmentation (``village/materials/diff_data_augmentation.py``,
    ``RandomTransform`` with ``shift = size // 4``, bilinear, ``align_corners=True``): each image is translated
    by a uniform sub-pixel offset in [−size/8, size/8] pixels on each axis (CIFAR-10: ±4 px), resampled
    bilinearly, and mirrored left-right with probability 1/2. Pixels from outside take ``fill`` (per channel):
    the official samples normalised images with zero padding, i.e. it fills with the data mean."""
    n, _, h, w = x.shape
    draws = torch.rand(n, 3, generator=gen).to(x.device, x.dtype)
    reach = torch.tensor([(w // 4) / (w - 1), (h // 4) / (h - 1)], device=x.device, dtype=x.dtype)  # grid units
    offset = (draws[:, :2] - 0.5) * 2 * reach
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).expand(n, h, w, 2) + offset[:, None, None, :]
    mirror = torch.where(draws[:, 2] > 0.5, -1.0, 1.0).to(x.dtype)
    grid = torch.stack([grid[..., 0] * mirror[:, None, None], grid[..., 1]], -1)
    fill = fill.view(1, -1, 1, 1).to(x.device, x.dtype)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=True) + fill


@PROTECTIONS.register("tap")
class TargetedAdversarialPoisoning(Protection):
    """TAP (Fowl et al., NeurIPS 2021, "Adversarial Examples Make Strong Poisons", §3): class-targeted
    adversarial examples against a surrogate trained on clean data. Each image of class y is pushed by
    signed PGD towards the target class (y + ``shift``) mod K, minimising cross-entropy to the target,
    within the L∞ ball of ``epsilon`` (in 1/255 units) and [0, 1].

    Defaults as the official code (lhfowl/adversarial_poisons @ a1d58d8, ``village/options.py``):
    ε = 8/255 (``--eps 8``), 250 attack iterations over the poison set (``--attackiter 250``), each a signed
    step of τ·ε per batch with τ = 0.05 (``--tau``, ``forgemaster_base._initialize_forge``), poison batches
    of 512 in file order (``--pbatch 512``, no ``--pshuffle``), random Gaussian start N(0, ε²) clipped to
    ±ε (``--init randn``), the differentiable augmentation of every poison batch (``--paugment``,
    ``translate_flip``), ResNet-18 surrogate trained 40 epochs on the clean train set (``surrogate_epochs``).
    ``restarts`` (``--restarts 8``): the attack is run that many times from fresh starts against the same
    surrogate, and the whole poison set of the run with the lowest target loss is kept
    (``forgemaster_base._forge``: ``argmin`` over runs, not per image); a run's loss is the mean over its
    batches of the batch's targeted cross-entropy on augmented images in the last iteration, each taken
    before that batch's step (``_run_trial``). ``info`` has each run's loss and the one kept.
    ``augment=False`` attacks without augmentation.

    Deviations: the start is also clipped to [0, 1] (official: only from the first step on); the
    translation's reach is size // 4 grid steps for every size (official: the same for CIFAR, Tiny ImageNet and
    ImageNet, 4 for MNIST's 28 px) and its fill is the train set's channel mean (official: the dataset's
    mean constants, equal up to rounding on CIFAR-10).
    """

    paper: ClassVar[str] = "Fowl et al. 2021 (TAP) §3, official defaults; DH §IV-A (baseline)"
    test_params: ClassVar[dict[str, object]] = {"surrogate": "cnn", "steps": 2, "surrogate_epochs": 1}
    version: ClassVar[int] = 2  # 2: official 8 restarts and sub-pixel translation augmentation
    surrogate_param: ClassVar[str | None] = "surrogate"
    paper_setting: ClassVar[tuple[str, ...]] = ("surrogate", "restarts")
    expensive_on_cpu: ClassVar[bool] = True
    cuda_nondeterministic: ClassVar[str] = "grid_sample's backward (the translation augmentation) has no deterministic CUDA kernel"
    bounds: ClassVar[dict[str, str]] = {"steps": "[0, inf)", "shift": "[1, inf)"}  # steps 0: the random start alone
    epsilon: float = pixel_steps(8.0)
    steps: int = 250
    tau: float = 0.05
    shift: int = 1
    augment: bool = True
    restarts: int = 8
    batch_size: int = 512
    surrogate: str = "resnet18"
    surrogate_epochs: int = 40

    def __post_init__(self) -> None:
        if not 0 <= self.epsilon <= 255 or self.steps < 0 or self.tau <= 0 or self.surrogate_epochs < 1:
            raise ValueError("tap needs 0 ≤ epsilon ≤ 255 (1/255 units), steps ≥ 0, tau > 0, surrogate_epochs ≥ 1")
        if self.restarts < 1 or self.batch_size < 1:
            raise ValueError(f"tap needs restarts ≥ 1 and batch_size ≥ 1, got {self.restarts} and "
                             f"{self.batch_size}; omit them for the official 8 restarts and batch 512")

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        start = time.perf_counter()
        if self.shift % train.num_classes == 0:
            raise ValueError(f"tap shift {self.shift} maps every class of {train.num_classes} onto itself")
        model, clean_accuracy = S.pretrain(self.surrogate, train, seed=seed, device=device,
                                           epochs=self.surrogate_epochs)
        gen = torch.Generator().manual_seed(seed)
        x, y = S.to_float(train, device), train.labels.to(device)
        target = (y + self.shift) % train.num_classes
        fill = channel_stats(train.images)[0]
        best, losses = torch.empty(0), []
        for run in range(self.restarts):  # keep only the best run so far (the official keeps all, then argmin)
            noise, loss = self._run(model, x, target, fill, gen)
            if not losses or loss < min(losses):
                best, kept = noise, run
            losses.append(loss)
        reached = S.accuracy(model, x + best, target)
        return S.publish(train, x, best, surrogate_clean_accuracy=clean_accuracy, target_accuracy=reached,
                         restarts=self.restarts, restart_losses=losses, restart_kept=kept,
                         seconds=time.perf_counter() - start)

    def _run(self, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, fill: torch.Tensor,
             gen: torch.Generator) -> tuple[torch.Tensor, float]:
        """One run of the attack from a fresh start: its noise and its loss (mean batch loss of the last pass;
        with ``steps=0``, of a pass over the start that changes nothing)."""
        eps = self.epsilon / 255
        noise = S.project(x, torch.randn(x.shape, generator=gen).to(x.device) * eps, eps)
        loss = 0.0
        for step in range(max(1, self.steps)):
            total, count = 0.0, 0
            for idx in S.batches(len(x), self.batch_size, x.device):
                inputs = (x[idx] + noise[idx]).requires_grad_(True)
                seen = translate_flip(inputs, fill, gen) if self.augment else inputs
                value = F.cross_entropy(S.logits(model, seen), target[idx])
                total, count = total + value.item(), count + 1
                if self.steps:
                    grad = torch.autograd.grad(value, inputs)[0]
                    noise[idx] = S.project(x[idx], noise[idx] - self.tau * eps * grad.sign(), eps)
            loss = total / count
        return noise, loss
