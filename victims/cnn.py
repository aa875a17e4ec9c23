"""Plain convolutional victims for small inputs and CPU runs."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from bench.api import VICTIMS, Victim


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
    cuda_nondeterministic: ClassVar[str] = "AdaptiveAvgPool2d(2)'s backward has no deterministic CUDA kernel"
    # Its own count at width 32 (no external reference): convs 93,024 + BN 448 + linear 133,898.
    reference_params: ClassVar[int] = 227_370
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


@VICTIMS.register("lenet")
class LeNet5(Victim):
    """LeNet-5 (LeCun et al. 1998) as in pytorch-cifar: 62 K parameters; a hacker network of UGE §4.

    conv 6@5×5, 2×2 max-pool, conv 16@5×5, 2×2 max-pool, FC 120, FC 84, FC classes, ReLU activations
    (pytorch-cifar's choice; the paper used scaled tanh and trainable subsampling). Below 32 px the first
    conv pads by 2, as the paper padded 28×28 digits to 32×32; a 5×5 adaptive average pool before the FC
    layers (the identity at 28 and 32 px) lets any resolution ≥ 16 px through with the same count.
    """

    paper: ClassVar[str] = "LeCun et al. 1998 (LeNet-5); victim of UGE §4 (LeNet)"
    cuda_nondeterministic: ClassVar[str] = "AdaptiveAvgPool2d(5)'s backward has no deterministic CUDA kernel"
    # pytorch-cifar's LeNet at 3×32×32, 10 classes: convs 456 + 2,416, FCs 48,120 + 10,164 + 850.
    reference_params: ClassVar[int] = 62_006

    def build(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2 if image_size < 32 else 0), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(5), nn.Flatten(),
            nn.Linear(16 * 25, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )
