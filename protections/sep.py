"""Self-Ensemble Protection (SEP, Chen et al., ICLR 2023): PGD on the ensemble of one training run's checkpoints."""

from __future__ import annotations

import time
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bench.api import PROTECTIONS, ImageSet, Protection, pixel_steps
from bench.protections import _surrogate as S

VARIANTS = ("sep", "sep-fa", "sep-vr", "sep-fa-vr")


def kept_epochs(epochs: int, count: int) -> list[int]:
    """The 1-based epochs whose end states form the ensemble: the last and every ``epochs // count`` before it."""
    return [epochs - k * (epochs // count) for k in range(count)][::-1]


def penultimate(model: nn.Module) -> list[torch.Tensor]:
    """A list that holds, after each forward of ``model``, the input of its last ``nn.Linear`` (the classifier's
    input: the penultimate features, as the official ``net.features`` of its ResNet)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("sep's feature alignment needs a surrogate whose classifier is an nn.Linear; use variant "
                         "'sep' or 'sep-vr', or another surrogate")
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        captured[:] = [inputs[0]]

    linears[-1].register_forward_hook(hook)
    return captured


class Checkpoint(nn.Module):
    """``model`` run with one checkpoint's weights and buffers (``state``, on the model's device)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model, self.state = model, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.state, (x,))


@PROTECTIONS.register("sep")
class SelfEnsembleProtection(Protection):
    """SEP (Chen et al., ICLR 2023, "Self-Ensemble Protection: Training Checkpoints Are Good Data Protectors"):
    a surrogate is trained once on the clean set; its states at ``checkpoints`` evenly spaced epochs form an
    ensemble, and each image of class y is pushed towards class (y + K/2) mod K by signed-gradient descent on the
    mean over the checkpoints of the loss (the gradient averaged over checkpoints), from a zero start, projected to
    the L∞ ball of ``epsilon`` (1/255 units) and [0, 1]; no augmentation, checkpoints in eval mode.

    The paper's abstract gives ε = 2/255 on CIFAR-10 with ResNet-18 (its body could not be read for this port);
    every default follows the official code (Sizhe-Chen/SEP @ 02519d8, README commands). ``ens.py --num_model=30
    --eps=2``: ε = 2/255, ``steps`` 30 (``--epoch 30``) of 1/255 (``--alpha 1``), cross-entropy to (y + 5) mod 10
    (``ens_feature_svre100.py``: (y + 50) mod 100, hence K/2). Surrogate (``vanilla.py``): ResNet-18, 120 epochs,
    SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128, crop + flip, lr × 0.1 at epochs 75 and 90 (scaled by
    ``surrogate_epochs`` / 120). Ensemble: ``len // num_model``-spaced checkpoints ending at the last
    (``kept_epochs``). ``variant``: ``sep-fa`` (``ens_feature.py``): feature alignment, a checkpoint's loss is
    the MSE between the penultimate features of x + δ and that checkpoint's mean clean feature of the target
    class; ``sep-fa-vr`` (``ens_feature_svre.py``, ``--num_model=15``, ``--msvrg 16``) adds variance reduction
    (SVRE): after the checkpoints' gradients g_k at x + δ and their mean ḡ, ``vr_steps`` inner steps each draw a
    checkpoint k, add g_k(x + δ_inner) − (g_k − ḡ) to a running sum G and step δ_inner by −α·sign(G); then δ
    steps by −α·sign(G). ``sep-vr`` (VR on the cross-entropy) has no official script. ``checkpoints`` unset: 30,
    or 15 with VR. ``batch_size`` (official 5000) only groups images: an image's result does not depend on it
    (eval mode, signs of per-image gradients) but for rounding (bf16 autocast: gradients near 0 may flip sign).

    Deviations: every epoch's state is a candidate (official: only those that raised the test accuracy, as it
    saves no other; bench has no test set at protection time), so the spacing is even in epochs; no first-epoch
    lr warm-up (official: linear from 0.001); class means in eval mode (official: the first checkpoint's in train
    mode); the VR inner loop aligns to the drawn checkpoint's class means (official: the last checkpoint's,
    ``fs[j]``); the draws come from ``seed``; 8-bit rounding when publishing (official truncates ``x * 255``).
    """

    paper: ClassVar[str] = "Chen et al. 2023 (SEP, ICLR), official code Sizhe-Chen/SEP ens.py, ens_feature*.py"
    test_params: ClassVar[dict[str, object]] = {"surrogate": "cnn", "surrogate_epochs": 2, "checkpoints": 2,
                                                "steps": 2, "vr_steps": 2}
    version: ClassVar[int] = 1
    surrogate_param: ClassVar[str | None] = "surrogate"
    paper_setting: ClassVar[tuple[str, ...]] = ("surrogate", "surrogate_epochs", "epsilon", "checkpoints")
    expensive_on_cpu: ClassVar[bool] = True
    bounds: ClassVar[dict[str, str]] = {"steps": "[0, inf)", "vr_steps": "[1, inf)"}
    epsilon: float = pixel_steps(2.0)
    step_size: float = pixel_steps(1.0, budget=False)
    steps: int = 30
    variant: str = "sep"
    checkpoints: int | None = None
    vr_steps: int = 16
    surrogate: str = "resnet18"
    surrogate_epochs: int = 120
    batch_size: int = 5000

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"sep variant must be one of {VARIANTS}, got {self.variant!r}")
        if not 0 <= self.epsilon <= 255 or self.step_size <= 0 or self.steps < 0:
            raise ValueError("sep needs 0 ≤ epsilon ≤ 255, step_size > 0 (1/255 units) and steps ≥ 0")
        if not 1 <= self.members <= self.surrogate_epochs:
            raise ValueError(f"sep needs 1 ≤ checkpoints ≤ surrogate_epochs, got {self.members} of "
                             f"{self.surrogate_epochs}; lower checkpoints or raise surrogate_epochs")

    @property
    def members(self) -> int:
        """The ensemble's size: ``checkpoints``, else the official 30 (15 with variance reduction)."""
        return self.checkpoints if self.checkpoints is not None else 15 if "vr" in self.variant else 30

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        start = time.perf_counter()
        epochs = kept_epochs(self.surrogate_epochs, self.members)
        saved: list[dict[str, torch.Tensor]] = []  # state dicts on the CPU: nothing is written to files

        def keep(epoch: int, model: nn.Module) -> None:
            if epoch in epochs:
                saved.append({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})

        scale = self.surrogate_epochs / 120
        net, clean_accuracy = S.pretrain(self.surrogate, train, seed=seed, device=device, epochs=self.surrogate_epochs,
                                         milestones=(round(75 * scale), round(90 * scale)), on_epoch=keep)
        members = [nn.Sequential(net[0], Checkpoint(net[1], {k: v.to(device) for k, v in state.items()})).eval()
                   for state in saved]
        aligned = "fa" in self.variant
        features = penultimate(net[1]) if aligned else []  # filled by each forward
        x, y = S.to_float(train, device), train.labels.to(device)
        target = (y + train.num_classes // 2) % train.num_classes
        centres = [self._centres(m, features, x, y, train.num_classes) for m in members] if aligned else []
        draws = torch.randint(len(members), (self.steps, self.vr_steps), generator=torch.Generator().manual_seed(seed))
        delta = torch.zeros_like(x)  # VR's draws are shared by all batches, as each official batch reseeds
        for idx in S.batches(len(x), self.batch_size, device):  # images are independent: the official's batches
            delta[idx] = self._attack(members, features, centres, x[idx], target[idx], draws.tolist())
        hits = [S.accuracy(m, x + delta, target) for m in members]
        return S.publish(train, x, delta, surrogate_clean_accuracy=clean_accuracy, checkpoint_epochs=epochs,
                         target_accuracy=sum(hits) / len(hits), seconds=time.perf_counter() - start)

    def _attack(self, members: list[nn.Module], features: list[torch.Tensor], centres: list[torch.Tensor],
                x: torch.Tensor, target: torch.Tensor, draws: list[list[int]]) -> torch.Tensor:
        """δ for one batch: ``steps`` signed descent steps on the checkpoints' mean loss (with VR's inner loop)."""
        eps, alpha = self.epsilon / 255, self.step_size / 255

        def grad(k: int, delta: torch.Tensor) -> torch.Tensor:
            inputs = (x + delta).detach().requires_grad_(True)
            out = S.logits(members[k], inputs)
            loss = F.mse_loss(features[0].float(), centres[k][target]) if centres else F.cross_entropy(out, target)
            return torch.autograd.grad(loss, inputs)[0]

        delta = torch.zeros_like(x)
        for step in range(self.steps):
            grads = [grad(k, delta) for k in range(len(members))]
            direction = mean = torch.stack(grads).mean(0)
            if "vr" in self.variant:
                direction, inner = torch.zeros_like(x), delta
                for k in draws[step]:
                    direction = direction + grad(k, inner) - (grads[k] - mean)
                    inner = S.project(x, inner - alpha * direction.sign(), eps)
            delta = S.project(x, delta - alpha * direction.sign(), eps)
        return delta

    @torch.no_grad()
    def _centres(self, member: nn.Module, features: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 classes: int) -> torch.Tensor:
        """Mean clean penultimate feature of each class under ``member`` (zero for a class with no image)."""
        sums: torch.Tensor | None = None
        for idx in S.batches(len(x), self.batch_size, x.device):
            S.logits(member, x[idx])
            feats = features[0].float()
            sums = (sums if sums is not None else feats.new_zeros(classes, feats.shape[1])).index_add_(0, y[idx], feats)
        assert sums is not None
        return sums / torch.bincount(y, minlength=classes).clamp(min=1)[:, None].to(sums)
