"""Every built-in victim: the victim contracts (builds at the shapes the datasets use, trains one step, the
parameter count of the reference architecture it follows) and torchvision's counts after the documented
differences."""

from __future__ import annotations

import pytest
import torch
import torchvision

from bench.core.components import VICTIMS
from bench.core.registry import ConfigError
from bench.testing import VictimContracts, builtin_names


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_params(cin: int, cout: int, kernel: int) -> int:
    return cin * cout * kernel * kernel


class TestBuiltinVictims(VictimContracts):
    """The victim contracts (``bench.testing``): builds and trains a step at the datasets' shapes, a forward at
    224 px, and its declared ``reference_params``."""

    components = [f"victim:{name}" for name in builtin_names(VICTIMS)]


def test_every_builtin_victim_names_its_reference_size():
    """bench's own victims each follow a reference architecture and say how large it is."""
    missing = [n for n in builtin_names(VICTIMS) if not VICTIMS.get(n).reference_params]
    assert not missing, f"set reference_params on {missing}"


CIFAR_STEM = conv_params(3, 64, 3) - conv_params(3, 64, 7)  # a 3×3 stride-1 stem conv instead of a 7×7 one


@pytest.mark.parametrize("name, reference, stem_change", [
    ("resnet18", torchvision.models.resnet18, CIFAR_STEM),
    ("resnet50", torchvision.models.resnet50, CIFAR_STEM),
    ("densenet121", torchvision.models.densenet121, CIFAR_STEM),
    ("mobilenetv2", torchvision.models.mobilenet_v2, 0),        # only strides change
    ("shufflenetv2", torchvision.models.shufflenet_v2_x1_0, 0),  # 3×3 stem either way; the max-pool goes
])
def test_victim_count_equals_torchvision(name, reference, stem_change):
    """Equal to torchvision's model (weights=None, 10 classes) once the CIFAR stem is accounted for at 32 px,
    and equal outright at 224 px, where the victim uses the ImageNet stem."""
    expected = count(reference(weights=None, num_classes=10))
    victim = VICTIMS.create(name)
    assert count(victim.build(10, 3, 32)) == expected + stem_change
    assert count(victim.build(10, 3, 224)) == expected
    assert abs(count(victim.build(10, 3, 32)) - expected) <= 0.02 * expected


@pytest.mark.parametrize("name, reference", [("vgg11", torchvision.models.vgg11_bn),
                                             ("vgg19", torchvision.models.vgg19_bn)])
def test_vgg_count_equals_torchvision_features_plus_one_linear(name, reference):
    """torchvision's vgg*_bn conv stack plus the CIFAR classifier (one 512→10 linear), at every resolution."""
    expected = count(reference(weights=None, num_classes=10).features) + 512 * 10 + 10
    for size in (32, 64, 224):
        assert count(VICTIMS.create(name).build(10, 3, size)) == expected


def test_cifar_resnets_follow_he_et_al():
    """ResNet-20/32: 6n+2 layers, option-A shortcuts (no projection parameters), 0.27 M / 0.46 M (Table 6)."""
    for name, n, millions in (("resnet20", 3, 0.27), ("resnet32", 5, 0.46)):
        model = VICTIMS.create(name).build(10, 3, 32)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) + 1 == 6 * n + 2 and all(c.kernel_size == (3, 3) for c in convs)
        assert {c.out_channels for c in convs} == {16, 32, 64}
        assert round(count(model) / 1e6, 2) == millions


def test_lenet_hand_count():
    """LeNet-5: conv 6@5×5, conv 16@5×5, FC 400→120→84→10."""
    convs = conv_params(3, 6, 5) + 6 + conv_params(6, 16, 5) + 16
    fcs = 400 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10
    assert count(VICTIMS.create("lenet").build(10, 3, 32)) == convs + fcs == 62_006


def test_vit_patch_size_and_positional_embedding():
    """Patch 4 up to 64 px (7×7, 8×8, 16×16 tokens), 16 above (14×14 at 224); other sizes are interpolated."""
    victim = VICTIMS.create("vit")
    for size, grid in ((28, 7), (32, 8), (64, 16), (224, 14)):
        model = victim.build(10, 3, size)
        assert model.pos.shape[1] == grid * grid + 1
    model = victim.build(10, 3, 32).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 48, 48)).shape == (1, 10)  # 12×12 tokens from the 8×8 embedding
    with pytest.raises(ConfigError, match="divisible"):
        VICTIMS.create("vit", dim=100, heads=8)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20", "densenet121", "mobilenetv2",
                                  "shufflenetv2", "vit"])
def test_stem_switches_above_64_px(name):
    """≤ 64 px keeps full resolution in the stem; above 64 px the first layer has stride > 1."""
    first = lambda model: next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))  # noqa: E731
    victim = VICTIMS.create(name)
    small, large = first(victim.build(10, 3, 64)), first(victim.build(10, 3, 224))
    if name == "vit":
        assert (small.stride, large.stride) == ((4, 4), (16, 16))
    else:
        assert small.stride == (1, 1) and large.stride == (2, 2)
