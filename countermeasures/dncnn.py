"""The adaptive attacker's denoiser (ConfounderGAN App. D Table 3, after Radiya-Dixit et al. 2022): DnCNN
trained on pairs the attacker makes itself, protected → natural, then run on the images it was given."""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from torch import nn

from bench.api import (ATTACKER_SEED, COUNTERMEASURES, DATA, Attacker, Countermeasure, Fitted, ImageSet, Models,
                       class_mask)
from bench.countermeasures import _ops


class DnCNN(nn.Module):
    """DnCNN (Zhang et al. 2017; cszn/DnCNN ``TrainingCodes/dncnn_pytorch``): conv+ReLU, ``depth − 2`` ×
    conv+BN(eps 1e-4, momentum 0.95)+ReLU, conv; predicts the residual (output x − f(x)); orthogonal init (with
    ``identity_start``, the last conv zeroed)."""

    def __init__(self, channels: int, depth: int = 17, width: int = 64, identity_start: bool = False) -> None:
        super().__init__()
        self.arch = {"channels": channels, "depth": depth, "width": width, "identity_start": identity_start}
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width, eps=1e-4, momentum=0.95),
                       nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers, nn.Conv2d(width, channels, 3, padding=1, bias=False))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.orthogonal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if identity_start:  # bench's option: the untrained network is the identity, so a short budget starts there
            nn.init.zeros_(self.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)


def halves(train: ImageSet, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the attacker's half D′ (natural images it holds) and of the victim's half (seeded, class-balanced;
    a seed of its own, so that the halves are not a cell's protected part at poison_ratio 0.5)."""
    own = class_mask(train, 0.5, seed + ATTACKER_SEED)
    return torch.nonzero(own).flatten(), torch.nonzero(~own).flatten()


def dihedral(x: torch.Tensor, mode: int) -> torch.Tensor:
    """One of the 8 flips/rotations of DnCNN's ``data_aug`` (square images)."""
    return torch.rot90(x.flip(-2) if mode >= 4 else x, mode % 4, dims=(-2, -1))


@COUNTERMEASURES.register("dncnn")
class DnCNNDenoiser(Countermeasure):
    """The adaptive denoiser of ConfounderGAN App. D: the train set is split in two seeded class-balanced halves;
    the attacker holds the natural images of one (D′_nat), protects them itself (``Attacker.protect``: the
    protection's fitted model where it has one, ConfounderGAN, UGE, DH; else a fresh run of the protection on
    D′ with the attacker's own seed), trains DnCNN to map protected → natural, and denoises the other half,
    which is what the victim trains on (Table 3: Natural 87.4, Denoised 77.9, Encrypted 11.9 on CIFAR-10;
    ``dncnn_reference`` gives the other two columns). The denoiser is a model artifact (``denoiser``).

    DnCNN per its official training code: ``depth`` 17, ``width`` 64, BN, residual output, orthogonal init,
    loss ½·Σ squared error per batch, Adam ``lr`` 1e-3, batch 128 (last partial batch dropped), lr × 0.2 at
    epochs 30, 60, 90 of 180 (``milestones`` ``None``: those fractions of ``epochs``). Its 40×40 patches do not
    apply to 32×32 images: whole images train, each batch under one of the 8 flips/rotations of its
    ``data_aug``. fp32 (the residuals are a few 1/255). ``identity_start`` (bench's, off by default): zero the last
    conv, so that the untrained denoiser is the identity; from the official orthogonal start a few hundred steps
    (a CPU budget) leave it worse than no denoising, which the paper's budget (180 epochs of patches) does not. The record gives the MSE to the natural images of the
    victim's half before and after denoising (an oracle figure: the attacker cannot compute it).
    """

    paper: ClassVar[str] = "ConfounderGAN App. D Table 3 (adaptive denoiser); DnCNN (cszn/DnCNN, PyTorch training)"
    test_params: ClassVar[dict[str, object]] = {"epochs": 1, "depth": 3, "width": 8, "batch_size": 8}
    stages: ClassVar[frozenset[str]] = frozenset({DATA})
    fits: ClassVar[tuple[str, ...]] = ("denoiser",)
    paper_setting: ClassVar[tuple[str, ...]] = ("epochs", "depth", "width")
    needs_attacker: ClassVar[bool] = True
    returns_subset: ClassVar[bool] = True
    expensive_on_cpu: ClassVar[bool] = True
    epochs: int = 180
    milestones: tuple[int, ...] | None = None
    depth: int = 17
    width: int = 64
    lr: float = 1e-3
    batch_size: int = 128
    identity_start: bool = False

    def __post_init__(self) -> None:
        _ops.require(self.epochs >= 1 and self.depth >= 3 and self.width >= 1 and self.lr > 0 and self.batch_size >= 1,
                     self, "epochs ≥ 1, depth ≥ 3, width ≥ 1, lr > 0 and batch_size ≥ 1")
        _ops.require(self.milestones is None or list(self.milestones) == sorted(set(self.milestones)), self,
                     "milestones in increasing order (None: 1/6, 1/3, 1/2 of epochs, as 30, 60, 90 of 180)")

    @classmethod
    def build_model(cls, kind: str, arch: dict[str, Any]) -> DnCNN:
        if kind != "denoiser":
            raise ValueError(f"dncnn fits a denoiser, not a {kind!r} model")
        return DnCNN(**arch)

    def fit(self, train: ImageSet, *, seed: int, device: torch.device, attacker: Attacker) -> Fitted:
        start = time.perf_counter()
        own, victims = halves(train, seed)
        natural = attacker.clean.subset(own)
        protected = attacker.protect(natural)
        torch.manual_seed(seed)
        net = DnCNN(train.channels, self.depth, self.width, self.identity_start).to(device).to(memory_format=torch.channels_last)
        losses = self._train(net, protected.images.to(device), natural.images.to(device), seed)
        denoised = denoise(net, train.images[victims], device)
        clean = attacker.clean.images[victims].float()
        info = {"attacker": attacker.how, "attacker_images": len(own), "victim_images": len(victims),
                "denoiser_loss_first": losses[0], "denoiser_loss_last": losses[-1],
                "mse_encrypted_vs_natural": float(((train.images[victims].float() - clean) / 255).pow(2).mean()),
                "mse_denoised_vs_natural": float(((denoised.float() - clean) / 255).pow(2).mean()),
                "seconds": time.perf_counter() - start}
        return Fitted(ImageSet(denoised, train.labels[victims], train.num_classes, info),
                      Models({"denoiser": net.eval().requires_grad_(False)}))

    def _train(self, net: DnCNN, noisy: torch.Tensor, target: torch.Tensor, seed: int) -> list[float]:
        """Adam + step decay on (protected, natural) pairs; the mean per-image loss of each epoch."""
        milestones = self.milestones or tuple(max(1, round(self.epochs * f)) for f in (1 / 6, 1 / 3, 1 / 2))
        optimizer = torch.optim.Adam(net.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma=0.2)
        gen, losses = torch.Generator().manual_seed(seed), []
        batch = min(self.batch_size, len(noisy))
        net.train()
        for _ in range(self.epochs):
            order, total = torch.randperm(len(noisy), generator=gen).to(noisy.device), 0.0
            for first in range(0, len(noisy) - batch + 1, batch):
                mode = int(torch.randint(8, (), generator=gen))
                pick = order[first:first + batch]
                x, y = (dihedral(t[pick].float().div(255), mode) for t in (noisy, target))
                loss = (net(x.contiguous(memory_format=torch.channels_last)) - y).pow(2).sum() / 2
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
            schedule.step()
            losses.append(total / (len(noisy) // batch * batch))
        return losses


@torch.no_grad()
def denoise(net: DnCNN, images: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """uint8 images through the trained denoiser (eval mode), clamped to [0, 1] and rounded to 8 bits."""
    net.eval()
    out = [net(images[i:i + batch_size].to(device).float().div(255).contiguous(memory_format=torch.channels_last))
           .clamp(0, 1).mul(255).round().to(torch.uint8).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else images.clone()


@COUNTERMEASURES.register("dncnn_reference")
class DnCNNReference(Countermeasure):
    """The reference columns of ConfounderGAN App. D Table 3: the victim trains on the same half as ``dncnn``'s
    (seeded, class-balanced), as ``images`` = ``natural`` (its natural images: an oracle, 87.4 on CIFAR-10) or
    ``encrypted`` (the protected images as given, 11.9)."""

    paper: ClassVar[str] = "ConfounderGAN App. D Table 3 (Natural and Encrypted columns)"
    stages: ClassVar[frozenset[str]] = frozenset({DATA})
    needs_attacker: ClassVar[bool] = True
    returns_subset: ClassVar[bool] = True
    images: str = "natural"

    def __post_init__(self) -> None:
        _ops.require(self.images in ("natural", "encrypted"), self, "images = 'natural' or 'encrypted'")

    def purify(self, train: ImageSet, *, seed: int, device: torch.device, attacker: Attacker) -> ImageSet:
        victims = halves(train, seed)[1]
        source = attacker.clean if self.images == "natural" else train
        return ImageSet(source.images[victims].clone(), train.labels[victims], train.num_classes,
                        {"images": self.images, "victim_images": len(victims)})
