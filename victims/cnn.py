"""Plain convolutional victims for small inputs and CPU runs."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from bench.components import VICTIMS, Victim


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@VICTIMS.register("cnn")
class PlainCNN(Victim):
    """A plain CNN (the 'plain CNN' hacker network of UGE §4 / supplementary Table 6).

    Three 3×3 conv-BN-ReLU stages of ``width``, 2·width, 4·width channels, the last two followed by 2×2
    max-pooling, then a 2×2 adaptive average pool and a two-layer classifier. Works at any channels,
    classes and resolution ≥ 4 px.
    """

    paper: ClassVar[str] = "UGE §4, supplementary Table 6 (plain CNN)"
    width: int = 32

    def build(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        w = self.width
        return nn.Sequential(
            *conv_bn_relu(in_channels, w),
            *conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),
            *conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(16 * w, 8 * w), nn.ReLU(inplace=True), nn.Linear(8 * w, num_classes),
        )
