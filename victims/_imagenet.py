"""Victims fine-tuned from torchvision's ImageNet-1k weights (``weights = 'imagenet'``).

A victim with ``weights`` unset trains from scratch, as before (its cache keys are unchanged: ``spec`` leaves the
unset parameter out). With ``'imagenet'`` it is torchvision's architecture (ImageNet stem and strides, unchanged),
its ``IMAGENET1K_V1`` weights in every layer, and a new, randomly initialised last linear layer of ``num_classes``
outputs. Inputs are normalised with ImageNet's channel statistics (torchvision's ``ImageClassification`` preset),
a grey image is repeated to RGB, and every input is bilinearly resized to the weights' 224 px (torchvision's crop
size) inside the model, as ImageNet transfer studies fine-tune at the network's ImageNet input size (e.g. Kornblith
et al. 2019, "Do Better ImageNet Models Transfer Better?"); the papers that fine-tune on unlearnable data state no
resolution that bench could check. The small image keeps its own augmentation (crop, flip at 32 px) before it.

The weights file is read from ``$env`` (e.g. ``$BENCH_RESNET18``: a path to the file), else torch's hub cache
(``$TORCH_HOME/hub/checkpoints/<file>``), else downloaded there at run time where the dry run says so (never
offline: ``bench run --offline``/``HF_HUB_OFFLINE=1``; the planner then refuses the cell, naming the file). Every
read checks the file's SHA-256 against the prefix torchvision publishes in its name, and loads with
``torch.load(weights_only=True)``. The parameter is ``weights``, torchvision's own name for it: ``pretrained`` is
every component's declaration of the weights it may load (``pretrained_needed`` gives them per parameter set).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import Pretrained, Victim

IMAGENET = "imagenet"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision ImageClassification's defaults
SIZE = 224  # the crop size of every weight below (``weights.transforms().crop_size``)
LICENCE = "BSD-3-Clause (torchvision); trained on ImageNet (see https://www.image-net.org/download)"


@dataclasses.dataclass(frozen=True)
class TorchvisionWeights(Pretrained):
    """One torchvision weights enum: ``builder`` (a ``torchvision.models`` function) makes its network, ``head``
    (a dotted attribute path) is the last linear layer that is replaced."""

    enum: str = ""
    builder: str = ""
    head: str = ""

    @property
    def file(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        """The digest prefix in the file's name (torch.hub's ``<name>-<sha256 prefix>.<ext>`` convention)."""
        found = re.search(r"-([a-f0-9]+)\.", self.file)
        if not found:
            raise ValueError(f"{self.file} carries no sha256 prefix")
        return found.group(1)

    def cache_path(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / self.file

    def missing(self) -> str:
        return f"{super().missing()}; or copy the file to torch's hub cache: {self.cache_path()}"


def _weights(name: str, env: str, enum: str, url: str, builder: str, head: str, size_mb: float) -> TorchvisionWeights:
    file = url.rsplit("/", 1)[-1]
    return TorchvisionWeights(
        f"{name} (ImageNet)", env=env, url=url, size_mb=size_mb, licence=LICENCE, enum=enum, builder=builder,
        head=head, files=f"{file} (torchvision.models.{enum}, fetched from {url} on a connected machine)",
        alternative="leave weights unset (the victim trains from scratch)",
        source=f"torchvision {enum} (download.pytorch.org, torch's hub cache)")


# Victim name → its torchvision weights (URLs and sizes as torchvision 0.29's enums give them; the file name holds
# the SHA-256 prefix). V1 everywhere: the weights that torchvision's former ``pretrained=True`` loaded.
WEIGHTS: dict[str, TorchvisionWeights] = {
    "resnet18": _weights("ResNet-18", "BENCH_RESNET18", "ResNet18_Weights.IMAGENET1K_V1",
                         "https://download.pytorch.org/models/resnet18-f37072fd.pth", "resnet18", "fc", 45),
    "resnet50": _weights("ResNet-50", "BENCH_RESNET50", "ResNet50_Weights.IMAGENET1K_V1",
                         "https://download.pytorch.org/models/resnet50-0676ba61.pth", "resnet50", "fc", 98),
    "vgg11": _weights("VGG-11-BN", "BENCH_VGG11_BN", "VGG11_BN_Weights.IMAGENET1K_V1",
                      "https://download.pytorch.org/models/vgg11_bn-6002323d.pth", "vgg11_bn", "classifier.6", 507),
    "vgg19": _weights("VGG-19-BN", "BENCH_VGG19_BN", "VGG19_BN_Weights.IMAGENET1K_V1",
                      "https://download.pytorch.org/models/vgg19_bn-c79401a0.pth", "vgg19_bn", "classifier.6", 548),
    "densenet121": _weights("DenseNet-121", "BENCH_DENSENET121", "DenseNet121_Weights.IMAGENET1K_V1",
                            "https://download.pytorch.org/models/densenet121-a639ec97.pth", "densenet121",
                            "classifier", 31),
    "mobilenetv2": _weights("MobileNetV2", "BENCH_MOBILENET_V2", "MobileNet_V2_Weights.IMAGENET1K_V1",
                            "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth", "mobilenet_v2",
                            "classifier.1", 14),
    "shufflenetv2": _weights("ShuffleNetV2 1.0x", "BENCH_SHUFFLENET_V2", "ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1",
                             "https://download.pytorch.org/models/shufflenetv2_x1-5666bf0f80.pth", "shufflenet_v2_x1_0",
                             "fc", 9),
    "vit": _weights("ViT-B/16", "BENCH_VIT_B_16", "ViT_B_16_Weights.IMAGENET1K_V1",
                    "https://download.pytorch.org/models/vit_b_16-c867db91.pth", "vit_b_16", "heads.head", 330),
}


def verified_file(weights: TorchvisionWeights) -> Path:
    """The weights file, its SHA-256 checked against torchvision's prefix: ``$env``'s path, else torch's cache, else
    downloaded into that cache (only where ``resolve`` allows it: online and planned so)."""
    found = weights.resolve()
    if not found.available:
        raise FileNotFoundError(weights.missing())
    path = Path(found.where) if found.kind == "local" else weights.cache_path()
    if found.kind == "download":
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=weights.sha256_prefix, progress=False)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(weights.sha256_prefix):
        raise ValueError(f"{path}: sha256 {digest.hexdigest()[:16]}… is not torchvision's {weights.enum} "
                         f"({weights.sha256_prefix}…): replace it with {weights.file} from {weights.url}")
    return path


def _torchvision_keys(state: dict[str, torch.Tensor], builder: str) -> dict[str, torch.Tensor]:
    """DenseNet's published files name layers ``norm.1``; torchvision's modules are ``norm1`` (as its loader maps)."""
    if not builder.startswith("densenet"):
        return state
    return {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.", k): v for k, v in state.items()}


class ImageNetInput(nn.Module):
    """Grey → RGB and a bilinear resize to ``size`` px, then the pretrained network."""

    def __init__(self, net: nn.Module, size: int = SIZE) -> None:
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if x.shape[-2:] != (self.size, self.size):  # antialiased only where an image shrinks (no effect when enlarging)
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=max(x.shape[-2:]) > self.size)
        return self.net(x)


def build_pretrained(weights: TorchvisionWeights, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision's network with ``weights`` loaded (strictly: every key and shape) and a new ``num_classes`` head.
    On the meta device (FLOP counts, no values) nothing is read."""
    import torchvision

    if in_channels not in (1, 3):
        raise ValueError(f"ImageNet weights take 1 (repeated) or 3 channels, not {in_channels}: leave weights unset")
    net = getattr(torchvision.models, weights.builder)()
    if torch.get_default_device().type != "meta":
        state = torch.load(verified_file(weights), map_location="cpu", weights_only=True)
        net.load_state_dict(_torchvision_keys(state, weights.builder))
    parent, _, leaf = weights.head.rpartition(".")
    # a fresh head (nn.Linear's default initialisation, drawn from the cell's seeded generator)
    setattr(net.get_submodule(parent), leaf, nn.Linear(net.get_submodule(weights.head).in_features, num_classes))
    return ImageNetInput(net)


@dataclasses.dataclass(frozen=True)
class FromImageNet(Victim):
    """A victim that can start from torchvision's ImageNet weights of its architecture (``WEIGHTS[name]``).

    Attributes:
        weights: None (train from scratch, bench's CIFAR form) or 'imagenet' (torchvision's network and weights,
            a new head; see the module docstring).
    """

    weights: str | None = None

    def __post_init__(self) -> None:
        if self.weights is None:
            return
        if self.name not in WEIGHTS:
            raise ValueError(f"{self.name} has no ImageNet weights in torchvision: leave weights unset, or take a "
                             f"victim that has them ({', '.join(WEIGHTS)}) with weights = 'imagenet'")
        if self.weights != IMAGENET:
            raise ValueError(f"{self.name} weights = {self.weights!r}: 'imagenet' (torchvision's "
                             f"{WEIGHTS[self.name].enum}) or unset (from scratch)")

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        if self.weights is None:  # from scratch: the same key as before the parameter existed
            del spec["params"]["weights"]
        return spec

    def pretrained_needed(self) -> tuple[Pretrained, ...]:
        return (WEIGHTS[self.name],) if self.weights else ()

    def input_stats(self, **needs: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        # 3-channel statistics: a grey batch broadcasts to RGB in the harness's Normalize (grey repeated, then each
        # channel standardised), which is what the weights expect
        return (torch.tensor(MEAN), torch.tensor(STD)) if self.weights else None

    def build(self, num_classes: int, in_channels: int, image_size: int, **needs: Any) -> nn.Module:
        if self.weights:
            return build_pretrained(WEIGHTS[self.name], num_classes, in_channels)
        return self.scratch(num_classes, in_channels, image_size)

    def scratch(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        """Bench's own network, trained from scratch (the victim's default)."""
        raise NotImplementedError
