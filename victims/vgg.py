"""VGG with batch norm (Simonyan & Zisserman 2015) in the CIFAR form of pytorch-cifar and APBench."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from bench.api import VICTIMS
from bench.victims._imagenet import FromImageNet

# Simonyan & Zisserman 2015 Table 1: configuration A (11 weight layers) and E (19); "M" is a 2×2 max-pool.
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
    """3×3 conv (with bias) + BN + ReLU stacks and five max-pools, then global average pool and one linear.

    At 32 px the five pools leave 1×1×512, so the average pool is the identity and this is exactly
    pytorch-cifar's VGG; at other sizes it makes the 512→classes classifier resolution-independent. The
    pools use ``ceil_mode`` so that 28 px (28→14→7→4→2→1) and 16 px inputs keep a non-empty map.
    """

    def __init__(self, config: tuple[int | str, ...], num_classes: int, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(cin, int(item), 3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
                cin = int(item)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@VICTIMS.register("vgg11")
class VGG11(FromImageNet):
    """VGG-11 with batch norm (configuration A), CIFAR form: one 512→classes linear layer; 9.2 M parameters.

    VGG11 of ConfounderGAN Table 1. The same network at every resolution (VGG has no stem to swap); an
    adaptive average pool before the linear layer keeps the count independent of the input size.
    ``weights = 'imagenet'``: torchvision's vgg11_bn (7×7 pool, two 4096-wide layers, dropout 0.5) with its
    VGG11_BN_Weights.IMAGENET1K_V1 weights and a new head, inputs resized to 224 px (``bench.victims._imagenet``).
    """

    paper: ClassVar[str] = "Simonyan & Zisserman 2015 (config A, BN); victim of ConfounderGAN Table 1"
    # pytorch-cifar's VGG('VGG11') (the form APBench's nets/ follow) = torchvision vgg11_bn(num_classes=10).features
    # (9,225,984) + a 512→10 linear (5,130).
    reference_params: ClassVar[int] = 9_231_114

    def scratch(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return VGG(CONFIGS["A"], num_classes, in_channels)


@VICTIMS.register("vgg19")
class VGG19(FromImageNet):
    """VGG-19 with batch norm (configuration E), CIFAR form: one 512→classes linear layer; 20.0 M parameters.

    V19 of DH §IV-A / Table III. The same network at every resolution; an adaptive average pool before the
    linear layer keeps the count independent of the input size.
    ``weights = 'imagenet'``: torchvision's vgg19_bn (7×7 pool, two 4096-wide layers, dropout 0.5) with its
    VGG19_BN_Weights.IMAGENET1K_V1 weights and a new head, inputs resized to 224 px (``bench.victims._imagenet``).
    """

    paper: ClassVar[str] = "Simonyan & Zisserman 2015 (config E, BN); victim of DH §IV-A Table III (V19)"
    # pytorch-cifar's VGG('VGG19') (the form APBench's nets/ follow) = torchvision vgg19_bn(num_classes=10).features
    # (20,035,392) + a 512→10 linear (5,130).
    reference_params: ClassVar[int] = 20_040_522

    def scratch(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return VGG(CONFIGS["E"], num_classes, in_channels)
