"""ShuffleNetV2 (Ma et al. 2018) with a CIFAR stem for small inputs."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from bench.api import VICTIMS
from bench.victims._imagenet import FromImageNet

# Ma et al. 2018 Table 5, width 1.0: stem 24 channels, stages of 4, 8, 4 units at 116, 232, 464, conv5 1024.
STAGE_REPEATS = (4, 8, 4)
STAGE_CHANNELS = (24, 116, 232, 464, 1024)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, depthwise: bool = False,
            act: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=cin if depthwise else 1, bias=False),
              nn.BatchNorm2d(cout)]
    return (layers + [nn.ReLU(inplace=True)]) if act else layers


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """Stride 1: split the channels in half, transform one half, concatenate, shuffle.

    Stride 2 (spatial down-sampling unit): both branches see the whole input and each yields half of ``cout``.
    The transforming branch is 1×1 conv-BN-ReLU, 3×3 depthwise conv-BN, 1×1 conv-BN-ReLU.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.stride = stride
        self.left = nn.Sequential(*conv_bn(cin, cin, 3, stride, depthwise=True, act=False),
                                  *conv_bn(cin, half, 1)) if stride > 1 else nn.Identity()
        right_in = cin if stride > 1 else half
        self.right = nn.Sequential(*conv_bn(right_in, half, 1),
                                   *conv_bn(half, half, 3, stride, depthwise=True, act=False),
                                   *conv_bn(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.right(b)], 1)
        else:
            out = torch.cat([self.left(x), self.right(x)], 1)
        return channel_shuffle(out)


class ShuffleNetV2Net(nn.Module):
    """3×3 stem (stride 1, no max-pool at ≤ 64 px; stride 2 + 3×3 stride-2 max-pool above), three stages
    whose first unit halves the resolution, 1×1 conv5, global average pool, linear."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        small = image_size <= 64
        stem = STAGE_CHANNELS[0]
        layers = [*conv_bn(in_channels, stem, 3, 1 if small else 2), nn.Identity() if small else nn.MaxPool2d(3, 2, 1)]
        cin = stem
        for repeats, cout in zip(STAGE_REPEATS, STAGE_CHANNELS[1:-1]):
            for i in range(repeats):
                layers.append(ShuffleUnit(cin, cout, 2 if i == 0 else 1))
                cin = cout
        layers += conv_bn(cin, STAGE_CHANNELS[-1], 1)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(STAGE_CHANNELS[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@VICTIMS.register("shufflenetv2")
class ShuffleNetV2(FromImageNet):
    """ShuffleNetV2 1.0×, 1.26 M parameters for CIFAR-10; a hacker network of UGE §4 / supp. Table 6.

    torchvision's shufflenet_v2_x1_0 layout with a CIFAR stem at ≤ 64 px (3×3 stride 1, no max-pool, as
    pytorch-cifar); the stem change moves no parameter, so the count equals torchvision's.
    ``weights = 'imagenet'``: torchvision's shufflenet_v2_x1_0 with its ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1
    weights and a new head, inputs resized to 224 px (``bench.victims._imagenet``).
    """

    paper: ClassVar[str] = "Ma et al. 2018 (1.0×); victim of UGE §4 (ShuffleNetV2)"
    # torchvision shufflenet_v2_x1_0(num_classes=10).
    reference_params: ClassVar[int] = 1_263_854

    def scratch(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return ShuffleNetV2Net(num_classes, in_channels, image_size)
