"""ConfounderGAN (Mao et al., NeurIPS 2022): a generator of image-dependent confounder noise."""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import PROTECTIONS, Fitted, ImageSet, Models, Protection, pixel_steps
from bench.protections import _surrogate as S

LR = 0.025  # App. G.3: generator (cosine) and discriminator (constant)


def _descend(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def encrypt(generator: nn.Module, images: torch.Tensor, *, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """uint8 N×C×H×W → uint8 clip(x + G(x)) on the CPU, batch-wise in fp32. The change is rounded in integer
    pixel units and clamped to ±⌊ε⌋, so |x′ − x| ≤ ε holds exactly whatever the float arithmetic."""
    bound = math.floor(float(generator.arch["epsilon"]) + 1e-6)
    out = torch.empty_like(images, device="cpu")
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        delta = generator(batch.float().div(255))
        if not torch.isfinite(delta).all():
            raise RuntimeError("the generator produced non-finite noise; it is broken: retrain it")
        step = delta.mul(255).round().clamp(-bound, bound).to(torch.int16)
        out[start:start + batch_size] = (batch.to(torch.int16) + step).clamp(0, 255).to(torch.uint8).cpu()
    return out


def _block(conv: nn.Module) -> nn.Sequential:
    return nn.Sequential(conv, nn.InstanceNorm2d(conv.out_channels, affine=True), nn.ReLU(inplace=True))


class Generator(nn.Module):
    """G_θ: 4 conv layers (3×3, 4×4/2, 4×4/2, 3×3) and 4 mirrored transposed convs; G(x) = ε·tanh(·).
    Inputs are padded (replicate) to a multiple of 4 (≥ 8) and the output cropped back, so any size works."""

    def __init__(self, channels: int, size: int, width: int, epsilon: float) -> None:
        super().__init__()
        self.arch = {"channels": channels, "size": size, "width": width, "epsilon": epsilon}
        w = (width, 2 * width, 4 * width)
        self.net = nn.Sequential(
            _block(nn.Conv2d(channels, w[0], 3, 1, 1)), _block(nn.Conv2d(w[0], w[1], 4, 2, 1)),
            _block(nn.Conv2d(w[1], w[2], 4, 2, 1)), _block(nn.Conv2d(w[2], w[2], 3, 1, 1)),
            _block(nn.ConvTranspose2d(w[2], w[2], 3, 1, 1)), _block(nn.ConvTranspose2d(w[2], w[1], 4, 2, 1)),
            _block(nn.ConvTranspose2d(w[1], w[0], 4, 2, 1)), nn.ConvTranspose2d(w[0], channels, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        padded = F.pad(x, (0, max(8, -(-w // 4) * 4) - w, 0, max(8, -(-h // 4) * 4) - h), mode="replicate")
        return self.arch["epsilon"] / 255 * torch.tanh(self.net(padded)[..., :h, :w])


class Discriminator(nn.Module):
    """D_φ: 4 conv layers (3×3, stride 2, per-image GroupNorm(1) after all but the first, LeakyReLU) and a
    binary classifier on their pooled features."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        sizes = (channels, width, 2 * width, 4 * width, 8 * width)
        convs = [m for i, (a, b) in enumerate(zip(sizes, sizes[1:])) for m in (
            nn.Conv2d(a, b, 3, 2, 1), nn.GroupNorm(1, b) if i else nn.Identity(), nn.LeakyReLU(0.2))]
        self.net = nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(sizes[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)  # logit of "x is an original image"


@PROTECTIONS.register("confoundergan")
class ConfounderGAN(Protection):
    """ConfounderGAN (Mao et al., NeurIPS 2022, §4.3, Alg. 1, Eq. 2–5, App. G.3; ε from §5.1).

    f (victim ``surrogate``, pretrained ``surrogate_epochs`` on the clean train set) is frozen. For ``epochs``
    passes over shuffled minibatches (Alg. 1) D ascends Eq. 2, log D(x) + log(1 − D(x + G(x))), then G
    descends CE(f(G(x)), t) (Eq. 3: the noise alone, never x + G(x)) + α·max(0, ‖G(x)‖₂ − c) (Eq. 4, per
    image, batch mean) + ``adversarial_weight``·log(1 − D(x + G(x))) (Eq. 5). SGD momentum 0.9, lr 0.025:
    cosine for G, constant for D; α = 0.001. Published: clip(x + G(x)) as 8-bit pixels, labels not needed.

    L∞ and hinge: G ends in ε·tanh, so ‖G(x)‖∞ ≤ ε by construction, and the written change (rounded) is
    clamped to ±⌊ε⌋ levels (this module's ``encrypt``, shared with ``bench protect``). Inside that box the
    hinge pulls the noise energy towards c = ``hinge_ratio``·ε·√(C·H·W), the L2 norm of noise of RMS
    ``hinge_ratio``·ε. ε as §5.1: 8 for 32×32 sets (SVHN, CIFAR-10), 16 otherwise (ImageNet25, medical).
    ``epochs`` per App. G.3: 200 SVHN/CIFAR-10/Keratitis, 100 BloodMNIST, 400 ISIC, 5000 ImageNet25. ``fit``
    returns the generator (``fits = ("generator",)``); the harness saves it beside the poison (``bench.store.artifacts``)
    and ``encrypt`` protects unseen images with it, without labels (§4.3 Fig. 3(b): the ``ood`` mix of §5.2.2,
    ``bench protect``).

    Unstated in the paper, chosen here: c (``hinge_ratio``), widths (``width``), kernels, per-image norms
    (InstanceNorm in G, GroupNorm in D: an image's noise never depends on its batch), batch 128, no weight
    decay, f's recipe (``S.pretrain``: SGD 0.1, cosine, crop+flip; never downloaded, also for ImageNet).
    Deviation: Alg. 1 line 4 omits Eq. 5's GAN term; kept here in Eq. 5's saturating form
    (``adversarial_weight=0`` is Alg. 1 verbatim). D sees the clipped x + G(x), as published.

    Attributes:
        epsilon: L∞ budget in 1/255 pixel units.
        epochs: passes of Alg. 1 over the train set.
        alpha: weight of the hinge loss.
        hinge_ratio: c / (ε·√(C·H·W)).
        adversarial_weight: weight of G's GAN term.
        batch_size: minibatch size B.
        width: base channels of G and D.
        surrogate: the victim used as f.
        surrogate_epochs: f's pretraining epochs.

    ``info``: f's clean accuracy, its accuracy on G(x) alone (final, and per epoch measured on the fly) and
    on the published set, final-epoch mean losses, seconds.
    """

    paper: ClassVar[str] = "ConfounderGAN §4.3, Alg. 1, Eq. 2–5, App. G.3 (ε: §5.1)"
    test_params: ClassVar[dict[str, object]] = {"surrogate": "cnn", "surrogate_epochs": 1, "epochs": 1, "width": 8}
    fits: ClassVar[tuple[str, ...]] = ("generator",)
    encrypts_unseen: ClassVar[bool] = True
    surrogate_param: ClassVar[str | None] = "surrogate"
    paper_setting: ClassVar[tuple[str, ...]] = ("surrogate",)
    expensive_on_cpu: ClassVar[bool] = True
    epsilon: float = pixel_steps(8.0)
    epochs: int = 200
    alpha: float = 0.001
    hinge_ratio: float = 0.5
    adversarial_weight: float = 1.0
    batch_size: int = 128
    width: int = 32
    surrogate: str = "resnet18"
    surrogate_epochs: int = 40

    def __post_init__(self) -> None:
        if not self.epsilon <= 255:  # counts ≥ 1, weights ≥ 0: the registry checks them
            raise ValueError("confoundergan needs epsilon ≤ 255 (1/255 units)")

    @classmethod
    def build_model(cls, kind: str, arch: dict[str, Any]) -> Generator:
        if kind != "generator":
            raise ValueError(f"confoundergan fits a generator, not a {kind!r} model")
        return Generator(arch["channels"], arch["size"], arch["width"], arch["epsilon"])

    def encrypt(self, models: Models, images: torch.Tensor, *, device: torch.device) -> torch.Tensor:
        return encrypt(models["generator"], images, device=device, batch_size=max(self.batch_size, 256))

    def fit(self, train: ImageSet, *, seed: int, device: torch.device) -> Fitted:
        start = time.perf_counter()
        f, clean_accuracy = S.pretrain(self.surrogate, train, seed=seed, device=device, epochs=self.surrogate_epochs)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        x, y = S.to_float(train, device), train.labels.to(device)
        G = self.build_model("generator", {"channels": train.channels, "size": train.size, "width": self.width,
                                  "epsilon": self.epsilon}).to(device)
        D = Discriminator(train.channels, self.width).to(device)
        opt_g, opt_d = (torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9) for m in (G, D))
        per_epoch = math.ceil(len(x) / self.batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, max(1, self.epochs * per_epoch))
        c = self.hinge_ratio * self.epsilon / 255 * math.sqrt(x[0].numel())
        stream = S.shuffled_batches(len(x), self.batch_size, gen, device)
        history: list[float] = []
        totals = torch.zeros(5, device=device)
        for _ in range(self.epochs):
            totals.zero_()
            for _ in range(per_epoch):
                idx = next(stream)
                xb, yb, zeros = x[idx], y[idx], torch.zeros(len(idx), device=device)
                noise = G(xb)
                D.requires_grad_(True)  # Eq. 2, ascended = BCE descended
                loss_d = (F.binary_cross_entropy_with_logits(D(xb), zeros + 1)
                          + F.binary_cross_entropy_with_logits(D((xb + noise.detach()).clamp(0, 1)), zeros))
                _descend(opt_d, loss_d)
                D.requires_grad_(False)
                out = S.logits(f, noise)
                confounder = F.cross_entropy(out, yb)  # Eq. 3
                hinge = F.relu(noise.flatten(1).norm(dim=1) - c).mean()  # Eq. 4
                adversarial = -F.binary_cross_entropy_with_logits(D((xb + noise).clamp(0, 1)), zeros) \
                    if self.adversarial_weight else torch.zeros((), device=device)  # log(1 − D(x + G(x)))
                loss_g = confounder + self.alpha * hinge + self.adversarial_weight * adversarial
                _descend(opt_g, loss_g)
                schedule.step()
                totals += torch.stack([loss_g, loss_d, confounder, hinge, (out.argmax(1) == yb).sum() / len(x)]).detach()
            if not torch.isfinite(totals).all():
                raise RuntimeError(f"confoundergan: a loss became non-finite in epoch {len(history) + 1}: "
                                   f"{totals.tolist()}; the GAN diverged (try adversarial_weight=0 or a smaller width)")
            history.append(totals[4].item())
        G.eval()
        means = (totals[:4] / per_epoch).tolist() if self.epochs else [None] * 4
        published = self.encrypt(Models({"generator": G}), train.images, device=device)
        with torch.no_grad():
            noise = torch.cat([G(x[i]) for i in S.batches(len(x), 256, device)])  # f on G(x) alone, as Eq. 3
        info: dict[str, Any] = {
            "surrogate_clean_accuracy": clean_accuracy, "noise_accuracy": S.accuracy(f, noise, y),
            "noise_accuracy_per_epoch": history, "protected_accuracy": S.accuracy(f, S.to_float(
                train.with_images(published), device), y),
            **dict(zip(("generator_loss", "discriminator_loss", "confounder_loss", "hinge_loss"), means))}
        return Fitted(train.with_images(published, **info, seconds=time.perf_counter() - start), Models({"generator": G}))
