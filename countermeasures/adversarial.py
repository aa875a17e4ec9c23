"""Adversarial training (Madry et al. 2018) as a train-stage countermeasure: every batch is replaced by its
PGD adversarial examples before the optimiser step (DH §IV-A5 'AT', REM's settings)."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import COUNTERMEASURES, Countermeasure, TrainHooks
from bench.countermeasures import _ops

DEFAULT_EPSILON = {"linf": 8 / 255, "l2": 1.0}


@COUNTERMEASURES.register("adv_training")
class AdversarialTraining(Countermeasure):
    """PGD adversarial training, through ``TrainHooks.attack``.

    DH §IV-A5 (after REM, Fu et al. 2022): L∞ ε = 8/255 and L2 ε = 1, PGD-10 with step 2/255, random start.
    Images are in [0, 1] (DH's [−0.5, 0.5] has the same scale). Parameters: ``norm`` ("linf" or "l2");
    ``epsilon`` (unset: the paper's 8/255 for linf, 1.0 for l2; in [0, 1] image units, so a linf budget of 4/255
    is written 0.0157; 0 is a zero budget: the batch is trained on as it is, with no attack passes);
    ``steps`` (10); ``step_size`` (unset: 2.5·ε/steps, the rule of Madry Lab's robustness library, giving DH's
    2/255 for linf and 0.25 = ε/4 for l2, where DH's literal 2/255 could move an L2 example by at most 0.08 of
    its budget of 1 in ten steps; if given, > 0: a zero step would leave the examples at their random start);
    ``random_start`` (uniform in the L∞ ball; for L2 a Gaussian direction scaled to a uniform fraction of ε, as
    torchattacks' PGDL2).

    As in REM's and Madry's code the model is put in eval mode for the attack (batch-norm statistics are
    neither used per batch nor updated) and restored after it; the inner loss is cross-entropy against the
    (possibly soft) labels. The attack runs under the loop's autocast (bf16 where the recipe's precision resolves
    to it; the loss is taken in fp32).
    DH trains AT for 100 epochs: set that in the recipe. Cost: steps + 1 forward/backward passes per batch.
    """

    paper: ClassVar[str] = "Madry et al. 2018; DH §IV-A5 (AT L∞ 8/255, L2 1, PGD-10, step 2/255); REM settings"
    test_params: ClassVar[dict[str, object]] = {"steps": 2}
    stages: ClassVar[frozenset[str]] = frozenset({"train"})
    paper_setting: ClassVar[tuple[str, ...]] = ("steps",)
    needs_labels: ClassVar[bool] = True  # the PGD attack ascends the loss of the true labels
    norm: str = "linf"
    epsilon: float | None = None
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True

    def __post_init__(self) -> None:
        _ops.require(self.norm in DEFAULT_EPSILON and (self.epsilon is None or self.epsilon >= 0) and self.steps >= 1
                     and (self.step_size is None or self.step_size > 0), self,
                     "norm 'linf' or 'l2', epsilon ≥ 0, steps ≥ 1 and step_size > 0 (omit epsilon or step_size for "
                     "the paper's)")

    def budget(self) -> tuple[float, float]:
        """(ε, step) in [0, 1] image units, the paper's defaults filled in where unset."""
        epsilon = DEFAULT_EPSILON[self.norm] if self.epsilon is None else self.epsilon
        return epsilon, 2.5 * epsilon / self.steps if self.step_size is None else self.step_size

    def train_hooks(self, num_classes: int, image_size: int) -> TrainHooks:
        def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return self.perturb(model, x, y, _ops.device_generator(gen, x.device))  # the cell's generator

        return TrainHooks(attack=attack)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """PGD examples for ``x`` (float [0, 1]) against ``model``: within ε of ``x`` in ``norm``, in [0, 1]."""
        epsilon, step = self.budget()
        x = x.detach()
        if epsilon == 0:  # a zero budget: the input itself, without spending steps + 1 passes to find it
            return x
        delta = torch.zeros_like(x)
        if self.random_start:
            if self.norm == "linf":
                delta = (torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) * 2 - 1) * epsilon
            else:
                direction = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
                radius = torch.rand(x.shape[0], generator=gen, device=x.device, dtype=x.dtype) * epsilon
                delta = direction / _norms(direction).clamp_min(1e-12) * _ops.per_image(radius)
        delta = (x + delta).clamp(0, 1) - x
        was_training = model.training
        model.eval()
        try:
            for _ in range(self.steps):
                delta.requires_grad_(True)
                logits = model(x + delta)
                loss = F.cross_entropy(logits.float(), y)
                grad, = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    if self.norm == "linf":
                        delta = (delta + step * grad.sign()).clamp(-epsilon, epsilon)
                    else:
                        delta = _project_l2(delta + step * grad / _norms(grad).clamp_min(1e-12), epsilon)
                    delta = (x + delta).clamp(0, 1) - x
        finally:
            model.train(was_training)
        return (x + delta).detach()


def _norms(v: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norms, shaped N×1×1×1."""
    return _ops.per_image(v.flatten(1).norm(dim=1))


def _project_l2(v: torch.Tensor, radius: float) -> torch.Tensor:
    """Scale images whose L2 norm exceeds ``radius`` back onto the ball."""
    return v * (radius / _norms(v).clamp_min(1e-12)).clamp(max=1.0)
