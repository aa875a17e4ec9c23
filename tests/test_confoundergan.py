"""ConfounderGAN: its networks, what it optimises, the saved generator and `bench protect` (fast encryption),
and the CAR/GCR metrics of App. A.

Generic protection contracts (shape, dtype, labels, no mutation, determinism, L∞ budget) also run in
test_components.py with cheap parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bench.cli import main
from bench.core.components import PROTECTIONS, VICTIMS, ImageSet
from bench.data.datasets import DATASETS
from bench.execute import metrics
from bench.execute.train import train_and_evaluate
from bench.plan.recipes import make_recipe
from bench.protections import _surrogate as S
from bench.protections.confoundergan import Discriminator, Generator, encrypt
from bench.store.artifacts import load_models
from bench.store.cache import Cache
from tests.conftest import require_cifar10_jpeg

CPU = torch.device("cpu")
CHEAP = dict(surrogate="cnn", surrogate_epochs=1, epochs=1, width=8, batch_size=64)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    """40 real greyscale images (4 per class), 1×16×16."""
    return DATASETS.create("digits", per_class=4).load()[0]


def halves(n: int = 256, seed: int = 0) -> ImageSet:
    """A two-class set where f can be fooled by small noise and G can tell the classes apart: grey images
    whose top half is brighter (class 0) or darker (class 1) than the bottom half (flip- and crop-proof)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = 0.3 + 0.4 * torch.rand(n, 1, 1, 1, generator=gen) + 0.05 * torch.randn(n, 1, 16, 16, generator=gen)
    sign = (1 - 2 * labels.float()).view(n, 1, 1, 1)
    x[:, :, :8] += 0.2 * sign
    x[:, :, 8:] -= 0.2 * sign
    return ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), labels, 2)


def change(out: ImageSet | torch.Tensor, before: ImageSet | torch.Tensor) -> torch.Tensor:
    a = out.images if isinstance(out, ImageSet) else out
    b = before.images if isinstance(before, ImageSet) else before
    return a.to(torch.int16) - b.to(torch.int16)


# ------------------------------------------------------------------ networks


@pytest.mark.parametrize("channels, size", [(1, 16), (3, 32), (3, 64), (3, 28), (1, 8), (3, 30)])
def test_generator_and_discriminator_fit_any_image_shape(channels, size):
    """G(x) has x's shape and ‖G(x)‖∞ ≤ ε for 1×16×16, 3×32×32, 3×64×64 and odd sizes; D gives one logit each."""
    x = torch.rand(3, channels, size, size)
    noise = Generator(channels, size, width=8, epsilon=8.0)(x)
    assert noise.shape == x.shape and noise.abs().max() <= 8 / 255 and noise.abs().max() > 0
    assert Discriminator(channels, width=8)(x).shape == (3,)


def test_generator_noise_is_per_image():
    """InstanceNorm: an image's noise does not depend on its batch mates (fast encryption of any batch)."""
    torch.manual_seed(0)
    generator = Generator(3, 32, width=8, epsilon=8.0).eval()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(generator(x)[2:3], generator(x[2:3]), atol=1e-6)


# ------------------------------------------------------------------ the protection


def test_protect_budget_labels_determinism_and_no_mutation(digits):
    images, labels = digits.images.clone(), digits.labels.clone()
    for epsilon in (8.0, 3.0, 0.0):
        protection = PROTECTIONS.create("confoundergan", **CHEAP, epsilon=epsilon)
        out = protection.protect(digits, seed=0, device=CPU)
        assert out.images.dtype == torch.uint8 and out.images.shape == digits.images.shape
        assert torch.equal(out.labels, labels) and out.num_classes == 10
        assert change(out, digits).abs().max() <= epsilon
        assert (epsilon == 0) == torch.equal(out.images, digits.images)
    again = protection.protect(digits, seed=0, device=CPU)
    assert torch.equal(again.images, out.images)
    assert torch.equal(digits.images, images) and torch.equal(digits.labels, labels)
    assert not torch.equal(PROTECTIONS.create("confoundergan", **CHEAP).protect(digits, seed=1, device=CPU).images,
                           PROTECTIONS.create("confoundergan", **CHEAP).protect(digits, seed=0, device=CPU).images)


def test_reports_losses_and_accuracies(digits):
    info = PROTECTIONS.create("confoundergan", **{**CHEAP, "epochs": 2}).protect(digits, seed=0, device=CPU).info
    assert len(info["noise_accuracy_per_epoch"]) == 2
    for key in ("surrogate_clean_accuracy", "noise_accuracy", "protected_accuracy"):
        assert 0 <= info[key] <= 1
    for key in ("generator_loss", "discriminator_loss", "confounder_loss", "hinge_loss", "seconds"):
        assert np.isfinite(info[key])
    json.dumps(info)  # goes into the cache manifest


def test_confounder_loss_is_on_the_noise_alone(monkeypatch):
    """Eq. 3: f is trained against G(x), never x + G(x): every input f sees with a gradient is within ε of 0."""
    seen: list[float] = []
    original = S.logits

    def spy(model, x):
        if x.requires_grad:
            seen.append(x.abs().max().item())
        return original(model, x)

    monkeypatch.setattr(S, "logits", spy)
    data = halves(64)
    PROTECTIONS.create("confoundergan", **{**CHEAP, "epsilon": 16.0}).protect(data, seed=0, device=CPU)
    assert len(seen) == 1 and max(seen) <= 16 / 255 + 1e-6  # one batch of 64, one generator step


def test_generator_learns_noise_that_f_classifies():
    """On a set where small noise can carry the class, training raises f's accuracy on G(x) alone from
    chance to near 1: the generator learns label-dependent noise from the image without its label."""
    data = halves()
    out = PROTECTIONS.create("confoundergan", surrogate="cnn", surrogate_epochs=3, epochs=4, width=8,
                             batch_size=32, epsilon=32.0).protect(data, seed=0, device=CPU)
    history = out.info["noise_accuracy_per_epoch"]
    print(out.info)
    assert out.info["surrogate_clean_accuracy"] > 0.95
    assert history[0] < 0.75 and history[-1] > 0.9 and out.info["noise_accuracy"] > 0.9
    assert change(out, data).abs().max() <= 32


def test_rejects_bad_parameters():
    for params in (dict(epsilon=-1.0), dict(epochs=-1), dict(batch_size=0), dict(surrogate_epochs=0)):
        with pytest.raises(Exception, match="confoundergan"):
            PROTECTIONS.create("confoundergan", **params)


# ------------------------------------------------------------------ the fitted generator and `bench protect`


def write_pngs(folder: Path, images: torch.Tensor, suffix: str = ".png") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        names.append(f"img{i:03d}{suffix}")
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / names[-1])
    return names


def read_pngs(folder: Path, names: list[str]) -> torch.Tensor:
    arrays = [np.asarray(Image.open(folder / name)) for name in names]
    stacked = torch.from_numpy(np.stack(arrays))
    return stacked[:, None] if stacked.dim() == 3 else stacked.permute(0, 3, 1, 2)


def trained(tmp_path: Path, data: ImageSet, key: str = "abc123", **params) -> tuple[ImageSet, Path]:
    """Fit on ``data`` and cache the protected set with its generator as the protect stage does (under ``key``);
    returns (protected set, results folder)."""
    results = tmp_path / "results"
    protection = PROTECTIONS.create("confoundergan", **{**CHEAP, **params})
    fitted = protection.fit(data, seed=0, device=CPU)
    Cache(results / "cache").save("protected", key, fitted.data, {"spec": protection.spec(), "seed": 0}, fitted.models)
    return fitted.data, results


@pytest.fixture(scope="module")
def rgb() -> ImageSet:
    """30 real CIFAR-10 photographs (3 per class)."""
    return DATASETS.create("cifar10-jpeg", path=str(require_cifar10_jpeg()), per_class=3, test_per_class=1).load()[0]


def test_fit_returns_the_generator_that_made_the_poison(digits):
    """``protect`` is ``fit``'s data; the returned generator re-encrypts the train set into the same bytes."""
    protection = PROTECTIONS.create("confoundergan", **CHEAP)
    fitted = protection.fit(digits, seed=0, device=CPU)
    assert list(fitted.models) == ["generator"] and fitted.models["generator"].arch["channels"] == 1
    assert torch.equal(protection.encrypt(fitted.models, digits.images, device=CPU), fitted.data.images)
    assert torch.equal(protection.protect(digits, seed=0, device=CPU).images, fitted.data.images)


@pytest.mark.parametrize("kind", ["rgb", "digits"])
def test_bench_protect_round_trip(kind, rgb, digits, tmp_path, capsys):
    """The saved generator re-encrypts the training images as PNGs like the protection did, within ε."""
    data = rgb if kind == "rgb" else digits
    out, results = trained(tmp_path, data)
    manifest = json.loads((results / "cache" / "protected" / "abc123" / "manifest.json").read_text())
    assert manifest["models"]["generator"]["arch"] == {"channels": data.channels, "size": data.size, "width": 8,
                                                       "epsilon": 8.0}
    assert manifest["spec"]["name"] == "confoundergan" and manifest["seed"] == 0
    assert manifest["sha256"]["generator.pt"]
    names = write_pngs(tmp_path / "in", data.images)
    code = main(["protect", "--model", "abc123", "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out"), "--results", str(results), "--device", "cpu", "--batch-size", "16"])
    assert code == 0 and "images/s" in capsys.readouterr().out
    protected = read_pngs(tmp_path / "out", names)
    assert protected.shape == data.images.shape
    assert change(protected, data).abs().max() <= 8 and change(protected, data).abs().max() > 0
    mismatch = change(protected, out).abs()
    assert mismatch.max() <= 1 and (mismatch > 0).float().mean() < 0.01  # batch-size rounding only


def test_bench_protect_reads_jpeg_and_paths(rgb, tmp_path, capsys):
    """JPEG inputs become PNGs of the same stem; --generator (--model's old name) also takes the entry's folder."""
    _, results = trained(tmp_path, rgb)
    names = write_pngs(tmp_path / "in", rgb.images[:5], suffix=".jpg")
    folder = results / "cache" / "protected" / "abc123"
    assert main(["protect", "--generator", str(folder), "--input", str(tmp_path / "in"), "--output",
                 str(tmp_path / "out"), "--device", "cpu"]) == 0
    capsys.readouterr()
    pngs = [Path(n).stem + ".png" for n in names]
    source = read_pngs(tmp_path / "in", names)  # decoded JPEG pixels are what was protected
    assert change(read_pngs(tmp_path / "out", pngs), source).abs().max() <= 8


def test_encrypt_holds_the_bound_exactly():
    """Whatever the generator outputs (even beyond ε), the written change is clamped to ±⌊ε⌋."""

    class Wild(nn.Module):
        arch = {"channels": 1, "size": 4, "epsilon": 3.5}

        def forward(self, x):
            return torch.full_like(x, 1.0) * torch.where(x > 0.5, -1, 1)

    images = torch.tensor([0, 100, 200, 255], dtype=torch.uint8).view(1, 1, 2, 2).expand(2, 1, 2, 2).contiguous()
    out = encrypt(Wild(), images, device=CPU)
    assert change(out, images).tolist() == [[[[3, 3], [-3, -3]]]] * 2


def test_generator_ignores_batch_size(digits, tmp_path):
    _, results = trained(tmp_path, digits)
    generator = load_models(results / "cache" / "protected" / "abc123", ("generator",), CPU)["generator"]
    full = encrypt(generator, digits.images, device=CPU, batch_size=64)
    assert (change(full, encrypt(generator, digits.images, device=CPU, batch_size=7)).abs() > 0).float().mean() < 0.01


def run_protect(tmp_path: Path, results: Path, source: Path, *extra: str, generator: str = "abc123") -> int:
    return main(["protect", "--model", generator, "--input", str(source), "--output", str(tmp_path / "out"),
                 "--results", str(results), "--device", "cpu", *extra])


def test_bench_protect_errors(digits, rgb, tmp_path, capsys):
    """Bad input exits with code 2 and a message naming the problem and the fix; nothing is written."""
    _, results = trained(tmp_path, digits)  # a 1×16×16 generator
    grey = tmp_path / "grey"
    write_pngs(grey, digits.images[:3])
    cases = {
        "missing": (tmp_path / "nowhere", (), "abc123", "no such folder"),
        "empty": (tmp_path / "empty", (), "abc123", "no .png/.jpg/.jpeg images"),
        "unknown key": (grey, (), "feedbeef", "no model entry 'feedbeef'"),
        "cannot encrypt": (grey, (), "cwn1", "'cwn' cannot encrypt unseen images"),
        "other protection": (grey, ("--protection", "em"), "abc123", "pass --protection confoundergan"),
        "device": (grey, ("--device", "tpu"), "abc123", "expected auto, cpu, cuda"),
    }
    cwn = PROTECTIONS.create("cwn")
    Cache(results / "cache").save("protected", "cwn1", cwn.protect(digits, seed=0, device=CPU), {"spec": cwn.spec()})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    mixed = tmp_path / "mixed"
    write_pngs(mixed, digits.images[:2])
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(mixed / "small.png")
    cases["mixed sizes"] = (mixed, (), "abc123", "mixes image sizes")
    colour = tmp_path / "colour"
    write_pngs(colour, rgb.images[:2])
    cases["other size"] = (colour, (), "abc123", "fitted on 1×16×16 images but")
    clash = tmp_path / "clash"
    write_pngs(clash, digits.images[:1])
    write_pngs(clash, digits.images[:1], suffix=".jpg")
    cases["name clash"] = (clash, (), "abc123", "would both be written as img000.png")
    for name, (source, extra, key, message) in cases.items():
        assert run_protect(tmp_path, results, source, *extra, generator=key) == 2, name
        assert message in capsys.readouterr().err, name
    assert not (tmp_path / "out").exists()
    assert main(["protect", "--generator", "abc123", "--input", str(grey), "--output", str(grey),
                 "--results", str(results)]) == 2
    assert "choose another folder" in capsys.readouterr().err


def test_corrupted_generator_is_refused(digits, tmp_path, capsys):
    _, results = trained(tmp_path, digits)
    weights = results / "cache" / "protected" / "abc123" / "generator.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    write_pngs(tmp_path / "in", digits.images[:2])
    assert run_protect(tmp_path, results, tmp_path / "in") == 2
    assert "checksum" in capsys.readouterr().err


def test_protect_stage_saves_the_generator_beside_its_poison(tmp_path):
    """A matrix cell's protect stage saves the generator in the protected set's cache entry (its key is the
    protection key), where load_models verifies it; a truncated model makes the entry invalid."""
    from bench.execute import stages
    from bench.plan.matrix import Choice
    from bench.plan.planner import prepare_dataset

    cache = Cache(tmp_path / "cache")
    dataset_key = prepare_dataset(cache, Choice("digits", (("per_class", 4),), "digits"))
    choice = Choice("confoundergan", tuple(CHEAP.items()), "confoundergan")
    stages.protect_job(stages.ProtectJob(cache.root, 1, "k1", dataset_key, choice, 0, None), CPU)
    assert cache.valid("protected", "k1", ("generator",)) and not cache.valid("protected", "k1", ("authorized",))
    assert cache.manifest("protected", "k1")["models"]["generator"]["file"] == "generator.pt"
    generator = load_models(cache.path("protected", "k1"), ("generator",), CPU)["generator"]
    assert not generator.training and not any(p.requires_grad for p in generator.parameters())
    weights = cache.path("protected", "k1") / "generator.pt"
    weights.write_bytes(weights.read_bytes()[:-4])
    assert not cache.valid("protected", "k1") and not cache.path("protected", "k1").exists()


# ------------------------------------------------------------------ CAR and GCR (App. A)


def linear_model(weight: list[list[float]]) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(len(weight[0]), len(weight), bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor(weight))
    return model


def test_car_counts_confidence_rises():
    """h(x) = softmax(W·x) with W = [[1, 0], [0, 1]]: class-0 confidence rises iff x₀ − x₁ grows."""
    model = linear_model([[1.0, 0.0], [0.0, 1.0]])
    clean = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1]]).view(4, 1, 1, 2)
    protected = torch.tensor([[0.6, 0.5], [0.4, 0.5], [0.2, 0.9], [0.9, 0.1]]).view(4, 1, 1, 2)
    labels = torch.tensor([0, 0, 1, 0])
    # rises: yes (0.1 more for class 0), no (less), yes (class 1 gains), no (unchanged)
    assert metrics.confidence_ascent_ratio(model, clean, protected, labels) == 0.5
    assert metrics.confidence_ascent_ratio(model, clean, protected, labels, batch_size=1) == 0.5


def test_gcr_by_hand():
    """W = 0: softmax is uniform, so ‖∇_W ℓ‖ = ‖p − e_t‖·‖x‖ = √0.5·‖x‖ and GCR = mean ‖x′‖/‖x‖."""
    model = linear_model([[0.0, 0.0], [0.0, 0.0]])
    clean = torch.tensor([[3.0, 4.0], [1.0, 0.0]]).view(2, 1, 1, 2)
    protected = torch.tensor([[0.6, 0.8], [2.0, 0.0]]).view(2, 1, 1, 2)
    labels = torch.tensor([0, 1])
    assert metrics.gradient_compression_ratio(model, clean, protected, labels) == pytest.approx((0.2 + 2.0) / 2)
    assert metrics.confidence_ascent_ratio(model, clean, protected, labels) == 0.0  # uniform: never rises


def brute_force_gcr(model: nn.Module, layer: nn.Linear, clean, protected, labels) -> float:
    def norm(x, t):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[None]), t[None]).backward()
        return layer.weight.grad.norm().item()

    return float(np.mean([norm(p, t) / norm(c, t) for c, p, t in zip(clean, protected, labels)]))


def test_gcr_matches_per_sample_autograd_on_a_victim():
    """On a real victim (eval mode, uint8 inputs), the batch-wise GCR equals the per-sample loop."""
    torch.manual_seed(0)
    model = VICTIMS.create("cnn", width=4).build(3, 1, 8).eval()
    clean = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    protected = (clean.short() + torch.randint(-8, 9, clean.shape)).clamp(0, 255).to(torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    expected = brute_force_gcr(model, model[-1], clean.float() / 255, protected.float() / 255, labels)
    assert metrics.gradient_compression_ratio(model, clean, protected, labels, batch_size=4) == pytest.approx(expected, rel=1e-4)


def test_gcr_with_token_inputs_matches_autograd():
    """A classifier applied to N×T×D features (per-sample gradient summed over tokens)."""
    torch.manual_seed(0)
    head = nn.Linear(4, 3)
    model = nn.Sequential(nn.Flatten(), nn.Unflatten(1, (2, 4)), head, nn.Flatten(), nn.Linear(6, 3))
    clean, protected = torch.rand(5, 1, 2, 4), torch.rand(5, 1, 2, 4)
    labels = torch.tensor([0, 1, 2, 1, 0])
    expected = brute_force_gcr(model, head, clean, protected, labels)
    assert metrics.gradient_compression_ratio(model, clean, protected, labels, layer=head) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="do not match"):
        metrics.confidence_ascent_ratio(model, clean, protected[:4], labels)


# ------------------------------------------------------------------ behaviour on real data


def victim_accuracy(train: ImageSet, test: ImageSet) -> float:
    torch.manual_seed(0)
    model = VICTIMS.create("cnn", width=16).build(train.num_classes, train.channels, train.size)
    return train_and_evaluate(model, train, test, make_recipe("quick"), seed=0, device=CPU, augment="crop")["final"]


@pytest.mark.slow
def test_victim_learns_less_from_protected_cifar():
    """1,000 real CIFAR-10 images: a victim trained on ConfounderGAN's output scores far below one trained on
    clean data and one trained on random noise of the same budget (the ε of §5.1 for non-32×32 sets, so
    that 20 generator epochs on a CPU suffice; measured: clean 0.34, random 0.32, confoundergan 0.12)."""
    train, test = DATASETS.create("cifar10-jpeg", path=str(require_cifar10_jpeg()), per_class=100, test_per_class=50).load()
    protected = PROTECTIONS.create("confoundergan", surrogate="cnn", surrogate_epochs=10, epochs=20, width=16,
                                   batch_size=64, epsilon=16.0).protect(train, seed=0, device=CPU)
    noisy = PROTECTIONS.create("random_noise", epsilon=16.0).protect(train, seed=0, device=CPU)
    clean_acc, noisy_acc, protected_acc = (victim_accuracy(data, test) for data in (train, noisy, protected))
    print(f"confoundergan: clean {clean_acc:.3f} random {noisy_acc:.3f} protected {protected_acc:.3f} {protected.info}")
    assert protected_acc < min(clean_acc, noisy_acc) - 0.1
