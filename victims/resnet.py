"""ResNets (He et al. 2016) with a CIFAR stem for small inputs, as used by every paper's victim tables.

One ``ResNet`` class builds them all: the ImageNet-style four-stage nets (ResNet-18 with basic blocks,
ResNet-50 with bottlenecks, projection shortcuts) and the three-stage CIFAR nets of He et al. §4.2
(ResNet-20/32: 16/32/64 channels, option-A parameter-free shortcuts).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import VICTIMS
from bench.victims._imagenet import FromImageNet


class PadShortcut(nn.Module):
    """He et al. 2016 option A: identity with stride-``s`` subsampling and zero channels for the increase."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


def shortcut(cin: int, cout: int, stride: int, option: str) -> nn.Module:
    """Identity when shapes agree; else a 1×1 projection (option B) or zero padding (option A)."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    if option == "A":
        return PadShortcut(cin, cout, stride)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with an identity (or 1×1 projection / zero-pad) shortcut."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, option: str = "B") -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        self.shortcut = shortcut(cin, width, stride, option)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carrying the stride, as torchvision's 'v1.5'), 1×1 expand to 4·width."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, option: str = "B") -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = shortcut(cin, cout, stride, option)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Stages of ``blocks``; a 3×3 stride-1 stem at ≤ 64 px (CIFAR), 7×7 stride 2 + max-pool above.

    ``widths`` are the stages' block widths (the stem has ``widths[0]`` channels); each stage after the
    first halves the resolution in its first block.
    """

    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int, image_size: int,
                 block: type[BasicBlock | Bottleneck] = BasicBlock, widths: tuple[int, ...] = (64, 128, 256, 512),
                 option: str = "B") -> None:
        super().__init__()
        small = image_size <= 64
        stem = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3 if small else 7, 1 if small else 2, 1 if small else 3, bias=False),
            nn.BatchNorm2d(stem), nn.ReLU(inplace=True), nn.Identity() if small else nn.MaxPool2d(3, 2, 1))
        layers, cin = [], stem
        for stage, (count, width) in enumerate(zip(blocks, widths)):
            for i in range(count):
                layers.append(block(cin, width, 2 if stage > 0 and i == 0 else 1, option))
                cin = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


@VICTIMS.register("resnet18")
class ResNet18(FromImageNet):
    """ResNet-18 (11.2 M parameters for CIFAR-10), the default victim of all three papers.

    ConfounderGAN App. G.5, DH §IV-A, UGE §4. CIFAR stem (3×3, stride 1, no max-pool) at ≤ 64 px.
    ``weights = 'imagenet'``: torchvision's resnet18 with its ResNet18_Weights.IMAGENET1K_V1
    weights and a new head, inputs resized to 224 px (``bench.victims._imagenet``).
    """

    paper: ClassVar[str] = "He et al. 2016; victim of ConfounderGAN G.5, DH §IV-A, UGE §4"
    # torchvision resnet18(num_classes=10) = 11,181,642, minus its 7×7 stem conv (9,408) plus a 3×3 one
    # (1,728); also pytorch-cifar's ResNet18 (kuangliu/pytorch-cifar).
    reference_params: ClassVar[int] = 11_173_962

    def scratch(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return ResNet((2, 2, 2, 2), num_classes, in_channels, image_size)


@VICTIMS.register("resnet50")
class ResNet50(FromImageNet):
    """ResNet-50: bottleneck blocks [3, 4, 6, 3], 23.5 M parameters for CIFAR-10.

    R50 of DH §IV-A / Table III; ResNet50 of ConfounderGAN Table 1. CIFAR stem (3×3, stride 1, no max-pool)
    at ≤ 64 px, torchvision's 7×7 stride-2 stem and max-pool above (then the count equals torchvision's).
    ``weights = 'imagenet'``: torchvision's resnet50 with its ResNet50_Weights.IMAGENET1K_V1
    weights and a new head, inputs resized to 224 px (``bench.victims._imagenet``).
    """

    paper: ClassVar[str] = "He et al. 2016; victim of DH §IV-A Table III (R50), ConfounderGAN Table 1"
    # torchvision resnet50(num_classes=10) = 23,528,522, minus its 7×7 stem conv (9,408) plus a 3×3 one
    # (1,728); equals pytorch-cifar's ResNet50.
    reference_params: ClassVar[int] = 23_520_842

    def scratch(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return ResNet((3, 4, 6, 3), num_classes, in_channels, image_size, block=Bottleneck)


class _CifarResNet(FromImageNet):
    """He et al. 2016 §4.2 CIFAR ResNet-(6n+2); subclasses set ``n``. torchvision has no ImageNet weights for it:
    ``weights`` set raises, naming the victims that have them."""

    n: ClassVar[int] = 0

    def scratch(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return ResNet((self.n,) * 3, num_classes, in_channels, image_size, widths=(16, 32, 64), option="A")


@VICTIMS.register("resnet20")
class ResNet20(_CifarResNet):
    """ResNet-20 of He et al. 2016 §4.2 (ResNetC-20 of UGE §4, supplementary Table 6).

    3×3 conv to 16 channels, three stages of n = 3 basic blocks at 16/32/64 channels (the first block of
    stages 2 and 3 has stride 2), global average pool, linear. Option-A shortcuts (stride-2 subsampling
    plus zero-padded channels, parameter-free) as in the paper's CIFAR experiments. Above 64 px the stem is
    a 7×7 stride-2 conv (16 channels) + 3×3 max-pool, as the ImageNet ResNets.
    """

    paper: ClassVar[str] = "He et al. 2016 §4.2 (option-A shortcuts); victim of UGE §4 (ResNetC-20)"
    # He et al. 2016 Table 6: 0.27 M; exact option-A count 269,722 (as akamaster/pytorch_resnet_cifar10).
    reference_params: ClassVar[int] = 269_722
    n: ClassVar[int] = 3


@VICTIMS.register("resnet32")
class ResNet32(_CifarResNet):
    """ResNet-32 of He et al. 2016 §4.2 (ResNetC-32 of UGE §4, supplementary Table 6).

    As ``resnet20`` with n = 5 basic blocks per stage; option-A (parameter-free) shortcuts.
    """

    paper: ClassVar[str] = "He et al. 2016 §4.2 (option-A shortcuts); victim of UGE §4 (ResNetC-32)"
    # He et al. 2016 Table 6: 0.46 M; exact option-A count 464,154 (as akamaster/pytorch_resnet_cifar10).
    reference_params: ClassVar[int] = 464_154
    n: ClassVar[int] = 5
