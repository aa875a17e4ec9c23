"""MobileNetV2 (Sandler et al. 2018) with the CIFAR strides of pytorch-cifar for small inputs."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from bench.api import VICTIMS
from bench.victims._imagenet import FromImageNet

# Sandler et al. 2018 Table 2: expansion t, output channels c, repeats n, stride s of the first repeat.
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return (layers + [nn.ReLU6(inplace=True)]) if act else layers


class InvertedResidual(nn.Module):
    """1×1 expand (skipped at t = 1), 3×3 depthwise, linear 1×1 project; residual when shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.body = nn.Sequential(
            *(conv_bn(cin, hidden, 1) if expansion != 1 else []),
            *conv_bn(hidden, hidden, 3, stride, groups=hidden),
            *conv_bn(hidden, cout, 1, act=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2Net(nn.Module):
    """Width 1.0: 32-channel stem, the seven bottleneck stages, 1×1 conv to 1280, global pool, linear.

    At ≤ 64 px the stem and the second stage have stride 1 (pytorch-cifar's CIFAR change: total stride 8);
    above, the paper's strides (total 32).
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        small = image_size <= 64
        layers = conv_bn(in_channels, 32, 3, 1 if small else 2)
        cin = 32
        for i, (t, c, n, s) in enumerate(STAGES):
            for j in range(n):
                stride = (1 if small and i == 1 else s) if j == 0 else 1
                layers.append(InvertedResidual(cin, c, stride, t))
                cin = c
        layers += conv_bn(cin, 1280, 1)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@VICTIMS.register("mobilenetv2")
class MobileNetV2(FromImageNet):
    """MobileNetV2 (width 1.0), 2.24 M parameters for CIFAR-10; a hacker network of UGE §4 / supp. Table 6.

    The paper's blocks (torchvision's layout, no projection shortcuts) with pytorch-cifar's CIFAR strides at
    ≤ 64 px: stride-1 stem and second stage. No dropout before the classifier (torchvision has p = 0.2,
    pytorch-cifar none). Strides change no parameter, so the count equals torchvision's mobilenet_v2.
    ``weights = 'imagenet'``: torchvision's mobilenet_v2 (dropout 0.2 before the head) with its
    MobileNet_V2_Weights.IMAGENET1K_V1 weights and a new head, inputs resized to 224 px (``bench.victims._imagenet``).
    """

    paper: ClassVar[str] = "Sandler et al. 2018; victim of UGE §4 (MobileNetV2)"
    # torchvision mobilenet_v2(num_classes=10). pytorch-cifar's MobileNetV2 adds 1×1 projection shortcuts
    # where a stride-1 block changes channels (not in the paper): 2,296,922.
    reference_params: ClassVar[int] = 2_236_682

    def scratch(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return MobileNetV2Net(num_classes, in_channels, image_size)
