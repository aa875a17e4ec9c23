"""ResNets (He et al. 2016) with a CIFAR stem for small inputs, as used by every paper's victim tables."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


from bench.components import VICTIMS, Victim


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with an identity (or 1×1 projection) shortcut."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Four stages of ``blocks``; a 3×3 stride-1 stem at ≤ 64 px (CIFAR), 7×7 stride 2 + max-pool above."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        small = image_size <= 64
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3 if small else 7, 1 if small else 2, 1 if small else 3, bias=False),
            nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.Identity() if small else nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for stage, count in enumerate(blocks):
            cout = 64 * 2 ** stage
            for i in range(count):
                layers.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


@VICTIMS.register("resnet18")
class ResNet18(Victim):
    """ResNet-18 (11.2 M parameters for CIFAR-10), the default victim of all three papers.

    ConfounderGAN App. G.5, DH §IV-A, UGE §4. CIFAR stem (3×3, stride 1, no max-pool) at ≤ 64 px.
    """

    paper: ClassVar[str] = "He et al. 2016; victim of ConfounderGAN G.5, DH §IV-A, UGE §4"

    def build(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return ResNet((2, 2, 2, 2), num_classes, in_channels, image_size)
