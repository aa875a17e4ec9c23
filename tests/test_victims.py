"""Every registered victim: builds at the shapes the datasets use, trains one step, and has the parameter count
of the reference architecture it follows (and of torchvision's model, after the documented differences)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from bench.core.components import VICTIMS
from bench.core.registry import ConfigError

SHAPES = [(1, 28, 10), (3, 32, 10), (3, 32, 100), (3, 64, 200)]


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_params(cin: int, cout: int, kernel: int) -> int:
    return cin * cout * kernel * kernel


@pytest.mark.parametrize("in_channels, image_size, classes", SHAPES)
@pytest.mark.parametrize("name", VICTIMS.names())
def test_victim_forward_and_one_sgd_step(name, in_channels, image_size, classes):
    torch.manual_seed(0)
    model = VICTIMS.create(name).build(classes, in_channels, image_size)
    x = torch.rand(2, in_channels, image_size, image_size)
    y = torch.tensor([0, classes - 1])
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(x)
    assert logits.shape == (2, classes) and torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "the step changed nothing"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, classes) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", VICTIMS.names())
def test_victim_imagenet_resolution_forward(name):
    """224 px (ImageNet stem where the net has one): one eval forward of one image gives finite logits."""
    torch.manual_seed(0)
    model = VICTIMS.create(name).build(10, 3, 224).eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 224, 224))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", VICTIMS.names())
def test_victim_parameter_count_matches_its_reference(name):
    """At 3×32×32 and 10 classes every victim is within 2% of the reference it names in ``reference_params``."""
    cls = VICTIMS.get(name)
    reference = getattr(cls, "reference_params", None)
    assert isinstance(reference, int) and reference > 0, f"{name} sets no reference_params"
    got = count(cls().build(10, 3, 32))
    assert abs(got - reference) <= 0.02 * reference, f"{name}: {got:,} parameters vs reference {reference:,}"


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
