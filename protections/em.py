"""Error-minimising noise: EM (Huang et al. 2021) and its robust variant REM (Fu et al. 2022)."""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.augment import standard_augment
from bench.components import PROTECTIONS, ImageSet, Protection
from protections import _surrogate as S

log = logging.getLogger(__name__)


@PROTECTIONS.register("em")
class ErrorMinimizingNoise(Protection):
    """EM / EMN (Huang et al., ICLR 2021, Alg. 1): bi-level min-min. Each round trains the surrogate for
    ``model_steps`` steps on x + δ, then lowers its loss over δ with ``steps`` signed-gradient steps of
    ``step_size`` per batch, projected to the L∞ ball of ``epsilon`` and to [0, 1]; rounds stop when the
    surrogate's error on the perturbed train set is below ``stop_error`` (or after ``max_rounds``).

    Defaults as the official code (HanxunH/Unlearnable-Examples): ε = 8/255, 20 steps of 0.8/255, 10 model
    steps (SGD lr 0.1, momentum 0.9, wd 5e-4, grad-norm clip 5), stop error 0.01, ResNet-18, uniform random
    start. ``mode="classwise"``: one δ per class, updated to the class mean of the batch's δ after each step
    (official scripts use 1 step per batch: ``steps`` unset picks 20 sample-wise, 1 class-wise; ``steps`` ≥ 1,
    as zero steps would never update the noise from its random start). ConfounderGAN
    App. G.4's variant: ``step_size=0.765`` (lr 0.003 in [0, 1] units), ``model_lr=0.003``, 20/10 steps,
    stop 0.01. Avoids two pitfalls of the reference code: noise is added before clamping to [0, 1] (never
    after quantising), and sample-wise noise is indexed by sample. Budgets in 1/255 pixel units.
    """

    paper: ClassVar[str] = "Huang et al. 2021 (EM) Alg. 1; ConfounderGAN App. G.4; DH §IV-A (baseline)"
    surrogate_param: ClassVar[str | None] = "surrogate"
    expensive_on_cpu: ClassVar[bool] = True
    mode: str = "samplewise"
    epsilon: float = 8.0
    steps: int | None = None
    step_size: float = 0.8
    model_steps: int = 10
    model_lr: float = 0.1
    stop_error: float = 0.01
    max_rounds: int = 100
    batch_size: int = 128
    surrogate: str = "resnet18"

    def __post_init__(self) -> None:
        if self.mode not in ("samplewise", "classwise"):
            raise ValueError(f"em mode must be 'samplewise' or 'classwise', got {self.mode!r}")
        if not 0 <= self.epsilon <= 255 or self.max_rounds < 1 or self.batch_size < 1:
            raise ValueError("em needs 0 ≤ epsilon ≤ 255 (1/255 units), max_rounds ≥ 1 and batch_size ≥ 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"em needs steps ≥ 1, got {self.steps} (with no step the noise never leaves its random "
                             "start); omit steps for the official 20 sample-wise, 1 class-wise")

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        x, y = S.to_float(train, device), train.labels.to(device)
        eps, step = self.epsilon / 255, self.step_size / 255
        classwise = self.mode == "classwise"
        steps = (1 if classwise else 20) if self.steps is None else self.steps
        rows = train.num_classes if classwise else len(train)
        noise = ((torch.rand((rows, *x.shape[1:]), generator=gen) * 2 - 1) * eps).to(device)
        delta = lambda idx: S.project(x[idx], noise[y[idx]] if classwise else noise[idx], eps)  # noqa: E731
        model = S.build(self.surrogate, train, device)
        optimizer = S.sgd(model, self.model_lr)
        stream = S.shuffled_batches(len(x), self.batch_size, gen, device)
        history: list[float] = []
        for _ in range(self.max_rounds):
            for _ in range(self.model_steps):
                idx = next(stream)
                S.train_step(model, optimizer, x[idx] + delta(idx), y[idx])
            model.eval()
            for idx in S.batches(len(x), self.batch_size, device):
                updated = S.signed_pgd(model, x[idx], y[idx], delta(idx), epsilon=eps, step_size=step, steps=steps,
                                       descend=True)
                if classwise:  # the class's noise becomes the batch mean of its images' updated noise
                    for c in y[idx].unique():
                        noise[c] = updated[y[idx] == c].mean(0).clamp(-eps, eps)
                else:
                    noise[idx] = updated
            all_idx = torch.arange(len(x), device=device)
            history.append(1 - S.accuracy(model, x + delta(all_idx), y))
            log.info("em round %d: surrogate error %.4f after %.0f s", len(history), history[-1],
                     time.perf_counter() - start)  # full-size generation takes hours: show progress
            if history[-1] < self.stop_error:
                break
        return S.publish(train, x, delta(torch.arange(len(x), device=device)), rounds=len(history),
                         surrogate_error=history, stopped=history[-1] < self.stop_error,
                         seconds=time.perf_counter() - start)


@PROTECTIONS.register("rem")
class RobustErrorMinimizingNoise(Protection):
    """REM (Fu et al., ICLR 2022, Eq. 4–6): min over the defensive noise δᵤ (L∞ ``epsilon``) of the
    expectation over augmentations T of max over an adversarial δₐ (L∞ ``adv_epsilon``) of the loss of
    f(T(x + δᵤ) + δₐ), with the surrogate trained adversarially on the same objective.

    Each of ``train_steps`` steps draws a batch, computes its δᵤ (``steps`` signed steps of ``step_size``
    from a uniform random start; each step averages the gradient over ``samples`` draws of T = random crop
    (pad 4) + flip, with δₐ from ``adv_steps`` PGD steps of ``adv_step_size`` held fixed, Danskin), then
    trains the surrogate on T(x + δᵤ) + δₐ (SGD lr 0.1 decayed × 0.1 every 40 % of the steps). The final
    noise is computed for every image with the trained surrogate. Defaults as the official code
    (fshp971/robust-unlearnable-examples, CIFAR-10): ρᵤ = 8/255, 10 steps of 1.6/255, ρₐ = 4/255, 10 steps
    of 0.8/255, 5 samples, 5,000 steps (lr decay every 2,000), batch 128, ResNet-18.
    """

    paper: ClassVar[str] = "Fu et al. 2022 (REM) Eq. 4–6, official defaults; DH §IV-A (baseline)"
    surrogate_param: ClassVar[str | None] = "surrogate"
    expensive_on_cpu: ClassVar[bool] = True
    epsilon: float = 8.0
    steps: int = 10
    step_size: float = 1.6
    adv_epsilon: float = 4.0
    adv_steps: int = 10
    adv_step_size: float = 0.8
    samples: int = 5
    train_steps: int = 5000
    model_lr: float = 0.1
    batch_size: int = 128
    surrogate: str = "resnet18"

    def __post_init__(self) -> None:
        if not (0 <= self.epsilon <= 255 and 0 <= self.adv_epsilon <= 255) or self.samples < 1 or self.train_steps < 0:
            raise ValueError("rem needs epsilon and adv_epsilon in [0, 255] (1/255 units), samples ≥ 1, train_steps ≥ 0")

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        x, y = S.to_float(train, device), train.labels.to(device)
        model = S.build(self.surrogate, train, device)
        optimizer = S.sgd(model, self.model_lr)
        decay = max(1, round(0.4 * self.train_steps))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, decay, gamma=0.1)
        stream = S.shuffled_batches(len(x), self.batch_size, gen, device)
        for _ in range(self.train_steps):
            idx = next(stream)
            defended = (x[idx] + self._defend(model, x[idx], y[idx], gen)).clamp(0, 1)
            augmented = standard_augment(defended, "crop_flip", gen)
            S.train_step(model, optimizer, augmented + self._attack(model, augmented, y[idx]), y[idx], clip=None)
            scheduler.step()
        noise = torch.cat([self._defend(model, x[idx], y[idx], gen) for idx in S.batches(len(x), self.batch_size, device)])
        return S.publish(train, x, noise, train_steps=self.train_steps, seconds=time.perf_counter() - start)

    def _attack(self, model: torch.nn.Module, inputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """δₐ: PGD ascent from a uniform random start (model in eval mode), as an offset to ``inputs``."""
        model.eval()
        eps = self.adv_epsilon / 255
        start = S.project(inputs, (torch.rand_like(inputs) * 2 - 1) * eps, eps)
        return S.signed_pgd(model, inputs, y, start, epsilon=eps, step_size=self.adv_step_size / 255,
                            steps=self.adv_steps, descend=False)

    def _defend(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """δᵤ for one batch: signed descent on E_T[max_δₐ loss], gradients summed over ``samples`` draws."""
        eps = self.epsilon / 255
        delta = S.project(x, (torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1) * eps, eps)
        for _ in range(self.steps):
            grad = torch.zeros_like(x)
            for _ in range(self.samples):
                inputs = (x + delta).detach().requires_grad_(True)
                augmented = standard_augment(inputs, "crop_flip", gen)
                offset = self._attack(model, augmented.detach(), y)
                loss = F.cross_entropy(S.logits(model, augmented + offset), y)
                grad += torch.autograd.grad(loss, inputs)[0]
            delta = S.project(x, delta - self.step_size / 255 * grad.sign(), eps)
        return delta.detach()
