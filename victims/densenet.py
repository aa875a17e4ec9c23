"""DenseNet-BC (Huang et al. 2017) with a CIFAR stem for small inputs."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from bench.api import VICTIMS
from bench.victims._imagenet import FromImageNet


def bn_relu_conv(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)]


class DenseLayer(nn.Module):
    """BN-ReLU-1×1 conv to ``bn_size``·growth, BN-ReLU-3×3 conv to ``growth``; output appended to the input."""

    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*bn_relu_conv(cin, bn_size * growth, 1), *bn_relu_conv(bn_size * growth, growth, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    """Dense blocks joined by transitions (BN-ReLU-1×1 conv halving the channels, 2×2 average pool).

    Stem at ≤ 64 px: 3×3 stride-1 conv to 2·growth channels + BN + ReLU, no pool; above: torchvision's 7×7
    stride-2 conv + BN + ReLU + 3×3 stride-2 max-pool. Head: BN, ReLU, global average pool, linear.
    """

    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int, image_size: int,
                 growth: int = 32, bn_size: int = 4) -> None:
        super().__init__()
        small = image_size <= 64
        channels = 2 * growth
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3 if small else 7, 1 if small else 2, 1 if small else 3, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Identity() if small else nn.MaxPool2d(3, 2, 1))
        layers: list[nn.Module] = []
        for i, count in enumerate(blocks):
            for _ in range(count):
                layers.append(DenseLayer(channels, growth, bn_size))
                channels += growth
            if i < len(blocks) - 1:
                layers += [*bn_relu_conv(channels, channels // 2, 1), nn.AvgPool2d(2)]
                channels //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.stem(x)))


@VICTIMS.register("densenet121")
class DenseNet121(FromImageNet):
    """DenseNet-121 (growth 32, blocks [6, 12, 24, 16], bottleneck 4·growth, compression 0.5); 6.96 M parameters.

    D121 of DH §IV-A / Table III; DenseNet121 of ConfounderGAN Table 1. CIFAR stem (3×3 stride 1, no pool)
    at ≤ 64 px, torchvision's ImageNet stem above (then the count equals torchvision's densenet121).
    ``weights = 'imagenet'``: torchvision's densenet121 with its DenseNet121_Weights.IMAGENET1K_V1
    weights and a new head, inputs resized to 224 px (``bench.victims._imagenet``).
    """

    paper: ClassVar[str] = ("Huang et al. 2017 (DenseNet-BC-121); victim of DH §IV-A Table III (D121), "
                            "ConfounderGAN Table 1")
    # torchvision densenet121(num_classes=10) = 6,964,106, minus its 7×7 stem conv (9,408) plus a 3×3 one
    # (1,728). pytorch-cifar's DenseNet121 has no stem BN: 128 fewer (6,956,298).
    reference_params: ClassVar[int] = 6_956_426

    def scratch(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return DenseNet((6, 12, 24, 16), num_classes, in_channels, image_size)
