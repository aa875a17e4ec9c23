"""Error-minimising noise: EM (Huang et al. 2021) and its robust variant REM (Fu et al. 2022)."""

from __future__ import annotations

import logging
import time
from typing import ClassVar

import torch
import torch.nn.functional as F

from bench.api import PROTECTIONS, ImageSet, Protection, pixel_steps, standard_augment
from bench.protections import _surrogate as S

log = logging.getLogger(__name__)


@PROTECTIONS.register("em")
class ErrorMinimizingNoise(Protection):
    """EM / EMN (Huang et al., ICLR 2021, Alg. 1): bi-level min-min. Each round trains the surrogate for
    ``model_steps`` steps on x + δ, then lowers its loss over δ with ``steps`` signed-gradient steps of
    ``step_size`` per batch, projected to the L∞ ball of ``epsilon`` and to [0, 1]; rounds stop when the
    surrogate's error on the perturbed update set is below ``stop_error`` (or after ``max_rounds``).

    Defaults as the official code (HanxunH/Unlearnable-Examples @ f347155, ``perturbation.py`` and the CIFAR-10
    ``scripts/cifar10/min-min-noise/*/exp_setting.sh``): ε = 8/255 (``--epsilon 8``), 0.8/255 a step
    (``--step_size 0.8``), 20 steps sample-wise and 1 class-wise (``--num_steps``: ``steps`` unset picks these;
    ``steps`` ≥ 1, as zero steps would never move the noise from its start), 10 model steps a round
    (``--train_step 10``), SGD lr 0.1, momentum 0.9, wd 5e-4 and grad-norm clip 5 (``configs/cifar10/
    resnet18.yaml``, ``trainer.py``), stop error 0.01 (``--universal_stop_error 0.01``), ResNet-18. Batch 512
    (``--train_batch_size`` default 512; no script overrides it for CIFAR-10): one loader size governs both the
    surrogate's training batches and the perturbation batches (and the stop check), so one ``batch_size``.
    Zero start (``--random_start`` is off by default and in the CIFAR-10 scripts, README and QuickStart, so
    ``torch.zeros(noise_shape)``); ``random_start=True`` draws it uniformly in [−ε, ε] (``toolbox.random_noise``),
    as the ``cifar10-extension`` ε = 16, 24 sample-wise scripts do.

    ``mode="classwise"``: one δ per class, set to the class mean of the batch's updated δ after each step.
    Its noise updates and stop check use a stratified subset (``--use_subset``, ``--universal_train_portion
    0.2``, ``universal_train_target=train_subset``; the surrogate still trains on the whole set): ``subset``
    unset is that 0.2 class-wise and the whole set sample-wise (sample-wise noise is per image, so only 1.0
    is allowed there). The subset is drawn once per seed with bench's generator, round(subset · n_c) images
    of each class c (at least 1); the official draws it once with sklearn ``train_test_split(stratify=...)``
    under ``np.random.seed(seed)``: the same counts when subset · n_c is whole (CIFAR-10: 1,000 a class),
    at most one image a class apart otherwise. Class-wise update batches are reshuffled each pass, as the
    official loader (``train_shuffle=True``); sample-wise ones go in order (``train_shuffle=False``).

    Deviations: bench keeps last partial batches (the official class-wise loaders drop them, ``train_drop_last=
    True``: 272 random subset images a pass on CIFAR-10); the surrogate's batches are reshuffled each epoch
    in both modes (official sample-wise trains on them in file order); the stop error is the error over the
    update set (official: the mean of per-batch errors); x + δ is kept in [0, 1] everywhere (official
    class-wise trains and checks on unclamped x + δ). ConfounderGAN App. G.4's variant:
    ``step_size=0.765`` (lr 0.003 in [0, 1] units), ``model_lr=0.003``, 20/10 steps, stop 0.01. Avoids two
    pitfalls of the reference code: noise is added before clamping to [0, 1] (never after quantising), and
    sample-wise noise is indexed by sample. Budgets in 1/255 pixel units.
    """

    paper: ClassVar[str] = "Huang et al. 2021 (EM) Alg. 1; ConfounderGAN App. G.4; DH §IV-A (baseline)"
    test_params: ClassVar[dict[str, object]] = {"surrogate": "cnn", "max_rounds": 2, "steps": 2}
    version: ClassVar[int] = 2  # 2: official zero start, batch 512, class-wise 20 % update subset
    surrogate_param: ClassVar[str | None] = "surrogate"
    paper_setting: ClassVar[tuple[str, ...]] = ("surrogate",)
    expensive_on_cpu: ClassVar[bool] = True
    bounds: ClassVar[dict[str, str]] = {"step_size": "[0, inf)"}  # 0: the random start alone (random_start=True)
    mode: str = "samplewise"
    epsilon: float = pixel_steps(8.0)
    steps: int | None = None
    step_size: float = pixel_steps(0.8, budget=False)
    model_steps: int = 10
    model_lr: float = 0.1
    stop_error: float = 0.01
    max_rounds: int = 100
    batch_size: int = 512
    random_start: bool = False
    subset: float | None = None
    surrogate: str = "resnet18"

    def __post_init__(self) -> None:
        if self.mode not in ("samplewise", "classwise"):
            raise ValueError(f"em mode must be 'samplewise' or 'classwise', got {self.mode!r}")
        if not 0 <= self.epsilon <= 255 or self.max_rounds < 1 or self.batch_size < 1:
            raise ValueError("em needs 0 ≤ epsilon ≤ 255 (1/255 units), max_rounds ≥ 1 and batch_size ≥ 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"em needs steps ≥ 1, got {self.steps} (with no step the noise never leaves its "
                             "start); omit steps for the official 20 sample-wise, 1 class-wise")
        if self.subset is not None and not 0 < self.subset <= 1:
            raise ValueError(f"em subset is a fraction of each class in (0, 1], got {self.subset}; omit it for the "
                             "official 0.2 class-wise, the whole set sample-wise")
        if self.mode == "samplewise" and self.subset not in (None, 1.0):
            raise ValueError(f"sample-wise em updates every image's own noise: subset must be 1 or omitted, got "
                             f"{self.subset} (a subset is for mode='classwise')")

    def _update_set(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Sorted indices of the images whose noise is updated and scored: all of them sample-wise; class-wise a
        stratified ``subset`` (unset: the official 0.2), round(subset · n_c) of each class c, at least 1."""
        portion = (0.2 if self.mode == "classwise" else 1.0) if self.subset is None else self.subset
        if portion == 1.0:
            return torch.arange(len(labels))
        picked = []
        for c in labels.unique():
            members = torch.nonzero(labels == c).flatten()
            count = max(1, round(portion * len(members)))
            picked.append(members[torch.randperm(len(members), generator=gen)[:count]])
        return torch.cat(picked).sort().values

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        x, y = S.to_float(train, device), train.labels.to(device)
        eps, step = self.epsilon / 255, self.step_size / 255
        classwise = self.mode == "classwise"
        steps = (1 if classwise else 20) if self.steps is None else self.steps
        shape = (train.num_classes if classwise else len(train), *x.shape[1:])
        noise = (torch.rand(shape, generator=gen) * 2 - 1) * eps if self.random_start else torch.zeros(shape)
        noise = noise.to(device)
        delta = lambda idx: S.project(x[idx], noise[y[idx]] if classwise else noise[idx], eps)  # noqa: E731
        chosen = self._update_set(train.labels, gen).to(device)
        model = S.build(self.surrogate, train, device)
        optimizer = S.sgd(model, self.model_lr)
        stream = S.shuffled_batches(len(x), self.batch_size, gen, device)
        history: list[float] = []
        for _ in range(self.max_rounds):
            for _ in range(self.model_steps):
                idx = next(stream)
                S.train_step(model, optimizer, x[idx] + delta(idx), y[idx])
            model.eval()
            order = chosen[torch.randperm(len(chosen), generator=gen).to(device)] if classwise else chosen
            for part in S.batches(len(order), self.batch_size, device):
                idx = order[part]
                updated = S.signed_pgd(model, x[idx], y[idx], delta(idx), epsilon=eps, step_size=step, steps=steps,
                                       descend=True)
                if classwise:  # the class's noise becomes the batch mean of its images' updated noise
                    for c in y[idx].unique():
                        noise[c] = updated[y[idx] == c].mean(0).clamp(-eps, eps)
                else:
                    noise[idx] = updated
            history.append(1 - S.accuracy(model, x[chosen] + delta(chosen), y[chosen]))
            log.info("em round %d: surrogate error %.4f after %.0f s", len(history), history[-1],
                     time.perf_counter() - start)  # full-size generation takes hours: show progress
            if history[-1] < self.stop_error:
                break
        return S.publish(train, x, delta(torch.arange(len(x), device=device)), rounds=len(history),
                         surrogate_error=history, stopped=history[-1] < self.stop_error, update_images=len(chosen),
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
    test_params: ClassVar[dict[str, object]] = {"surrogate": "cnn", "train_steps": 2, "steps": 2, "samples": 1,
                                                "adv_steps": 1}
    surrogate_param: ClassVar[str | None] = "surrogate"
    paper_setting: ClassVar[tuple[str, ...]] = ("surrogate", "train_steps", "steps", "samples", "adv_steps")
    expensive_on_cpu: ClassVar[bool] = True
    epsilon: float = pixel_steps(8.0)
    steps: int = 10
    step_size: float = pixel_steps(1.6, budget=False)
    adv_epsilon: float = pixel_steps(4.0)
    adv_steps: int = 10
    adv_step_size: float = pixel_steps(0.8, budget=False)
    samples: int = 5
    train_steps: int = 5000
    model_lr: float = 0.1
    batch_size: int = 128
    surrogate: str = "resnet18"

    def __post_init__(self) -> None:
        if not (self.epsilon <= 255 and self.adv_epsilon <= 255):  # ≥ 0 and counts ≥ 1: the registry checks them
            raise ValueError("rem needs epsilon and adv_epsilon ≤ 255 (1/255 units)")

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
