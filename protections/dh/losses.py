"""DH's training losses (§III-B1 Eq. 7–8, §III-B2 Eq. 9–11) and the feature extractor of the concentration loss.

The extractor 𝒢 is "a pre-trained ResNet-18", its latent features "the output [of the] final convolution layer"
(§III-B2): ``imagenet`` loads torchvision's ImageNet ResNet-18 (from $BENCH_RESNET18, else torchvision's
``ResNet18_Weights.IMAGENET1K_V1`` through torch's hub cache) and keeps it up to ``layer4``;
``classifier`` is the documented alternative without those weights: one of bench's ResNets (ResNet-18 by default)
trained on the protector's own clean set, up to its last stage. The paper does not say how the perturbation maps enter 𝒢; each enters
standardised (``concentration_loss``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import ImageSet, Pretrained
from bench.protections import _surrogate as S
from bench.protections.dh.hinet import dwt, low_band

Features = Callable[[torch.Tensor], torch.Tensor]
RESNET18 = Pretrained("ResNet-18 (ImageNet)", env="BENCH_RESNET18",
                      files="torchvision's ImageNet resnet18 state dict (resnet18-f37072fd.pth: "
                            "torchvision.models.ResNet18_Weights.IMAGENET1K_V1, fetched on a connected machine)",
                      alternative="extractor = 'classifier' (a ResNet-18 trained on the clean set; recorded)",
                      size_mb=45, licence="BSD-3-Clause (torchvision); trained on ImageNet (see "
                                          "https://www.image-net.org/download)",
                      url="https://download.pytorch.org/models/resnet18-f37072fd.pth",  # ResNet18_Weights.IMAGENET1K_V1
                      source="torchvision ResNet18_Weights.IMAGENET1K_V1 (download.pytorch.org, torch's hub cache)")
EXTRACTORS = ("imagenet", "classifier")
RESNETS = ("resnet18", "resnet20", "resnet32", "resnet50")  # bench's ResNets: the head pools the last stage


def hide_loss(stego: torch.Tensor, cover: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Eq. 7: max(MSE(x_ue, x_c), ε²): no pull below the budget's RMS."""
    return torch.clamp(F.mse_loss(stego, cover), min=epsilon ** 2)


def frequency_loss(stego: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """Eq. 8's L_freq: mean squared distance of the low-frequency (LL) sub-bands (hiding stays in high bands)."""
    return F.mse_loss(low_band(dwt(stego)), low_band(dwt(cover)))


def standardise(maps: torch.Tensor) -> torch.Tensor:
    """Each map to zero mean and unit standard deviation over its pixels and channels (bench's choice; see
    ``concentration_loss``). ``layer_norm``'s ε = 1e-6 floors the std at 1e-3 (0.26/255), far below the budget's:
    the near-identity initial network's tiny maps would otherwise get gradients ≈ 1/std, and Adam's second moments
    keep the spike (3 iterations moved the published digits 0.035 levels with ε = 1e-12, 0.15 with 1e-6 or raw)."""
    return F.layer_norm(maps.float(), maps.shape[1:], eps=1e-6)


def concentration_loss(features: Features, perturbation: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 10: Σ over same-class ordered pairs (i, j) of the cosine distance of 𝒢(x_pm^i) and 𝒢(x_pm^j).

    Each map is standardised first (``standardise``), a deviation: the paper does not say how x_pm enters 𝒢. Raw
    ±8/255 maps are far below the scale of 𝒢's (normalised) training images, so its eval-mode batch-norm offsets
    dominate and any two maps share a feature direction: 1 − cos of independent maps was 2.6e-5 to 3e-4 and
    L_conc ≈ 0.002, nowhere near §IV-F3's "1000 times larger" than the other terms. Standardised, independent maps
    are 0.24–0.49 apart. Per image (not 𝒢's channel statistics of x_pm/‖x_pm‖∞): one rule for both extractors,
    inputs at the scale both were trained on, and L_conc independent of the perturbation's size, so that it pulls
    the maps' patterns together and never just their amplitude down. 𝒢 may run under bf16 autocast; the cosines are
    taken in fp32 (in bf16, 1 − cos of near-collinear features comes out below 0)."""
    f = F.normalize(features(standardise(perturbation)).flatten(1).float(), dim=1)
    same = (labels[:, None] == labels[None, :]).float()
    with torch.autocast(f.device.type, enabled=False):
        return ((1 - f @ f.T) * same).sum()


def extractor(kind: str, train: ImageSet, *, arch: str = "resnet18", epochs: int, seed: int,
              device: torch.device) -> tuple[Features, str]:
    """𝒢 and what ran (for the record). ``classifier``: bench's ResNet ``arch`` trained ``epochs`` on ``train``."""
    if kind == "imagenet":
        found = RESNET18.resolve()  # $BENCH_RESNET18, else torchvision's weights (torch's cache, or downloaded)
        if not found.available:
            raise FileNotFoundError(RESNET18.missing())
        if train.channels not in (1, 3):
            raise ValueError(f"the ImageNet ResNet-18 takes 1 or 3 channels, not {train.channels}: use "
                             "extractor = 'classifier'")
        import torchvision

        net = torchvision.models.resnet18()
        if found.kind == "local":
            net.load_state_dict(torch.load(found.where, map_location="cpu", weights_only=True))
            ran = f"${RESNET18.env} = {found.where}"
        else:  # check_hash: the file's sha256 starts with the name's f37072fd
            net.load_state_dict(torch.hub.load_state_dict_from_url(RESNET18.url, map_location="cpu", progress=False,
                                                                   check_hash=True, weights_only=True))
            ran = (f"torchvision ResNet18_Weights.IMAGENET1K_V1, {'cached' if found.kind == 'hub-cache' else 'downloaded'}"
                   f" from {RESNET18.url}")
        body = nn.Sequential(*list(net.children())[:-2]).to(device).eval().requires_grad_(False)
        return (lambda x: body(x.expand(-1, 3, -1, -1))), f"imagenet resnet18 ({ran})"
    if kind != "classifier":
        raise ValueError(f"dh extractor {kind!r}: one of {EXTRACTORS}")
    if arch not in RESNETS:
        raise ValueError(f"dh extractor_arch {arch!r}: one of {RESNETS}")
    net, accuracy = S.pretrain(arch, train, seed=seed, device=device, epochs=epochs)
    body = net[1]  # the ResNet without the input normalisation; its head pools the last stage's output
    captured: list[torch.Tensor] = []
    body.head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))

    def features(x: torch.Tensor) -> torch.Tensor:
        captured.clear()
        body(x)
        return captured[0]
    return features, f"classifier {arch} trained {epochs} epochs on the clean set (train accuracy {accuracy:.3f})"
