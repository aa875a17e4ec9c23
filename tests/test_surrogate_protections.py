"""EM, REM and TAP: what each optimises, on real images, and that a victim learns less from their output.

Generic contracts (shape, dtype, labels, no mutation, determinism, L∞ budget) are in test_components.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.core.components import PROTECTIONS, VICTIMS, ImageSet
from bench.core.registry import ConfigError
from bench.data.datasets import DATASETS
from bench.execute.train import train_and_evaluate
from bench.plan.recipes import make_recipe
from bench.protections import _surrogate as S

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> tuple[ImageSet, ImageSet]:
    """500 real greyscale train images (50 per class) and 300 test images, 1×16×16."""
    return DATASETS.create("digits", per_class=50, test_per_class=30).load()


def change(out: ImageSet, before: ImageSet) -> torch.Tensor:
    return out.images.to(torch.int16) - before.images.to(torch.int16)


def test_project_keeps_the_ball_and_the_pixel_range():
    x = torch.tensor([0.0, 0.5, 1.0, 0.99])
    delta = S.project(x, torch.tensor([-0.2, 0.2, 0.1, 0.05]), 0.1)
    assert torch.allclose(delta, torch.tensor([0.0, 0.1, 0.0, 0.01]), atol=1e-6)
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()


def test_em_minimises_the_surrogate_error(digits):
    """EM stops once its surrogate fits the perturbed set (error < stop_error) and reports its rounds."""
    train = digits[0]
    out = PROTECTIONS.create("em", surrogate="cnn", max_rounds=15, stop_error=0.05).protect(train, seed=0, device=CPU)
    info = out.info
    assert info["stopped"] and info["rounds"] == len(info["surrogate_error"]) <= 15
    assert info["surrogate_error"][-1] < 0.05
    assert change(out, train).abs().max() <= 8


def test_em_stops_at_max_rounds():
    data = DATASETS.create("digits", per_class=4).load()[0]
    out = PROTECTIONS.create("em", surrogate="cnn", max_rounds=1, stop_error=0.0).protect(data, seed=0, device=CPU)
    assert out.info["rounds"] == 1 and not out.info["stopped"]


def test_em_samplewise_noise_follows_each_sample(digits):
    """Sample-wise noise is indexed by sample: two images of a class get different noise."""
    train = digits[0].subset(torch.arange(0, 40))
    out = PROTECTIONS.create("em", surrogate="cnn", max_rounds=1).protect(train, seed=0, device=CPU)
    d = change(out, train)
    same_class = torch.nonzero(train.labels == train.labels[0]).flatten()
    assert len(same_class) >= 2 and not torch.equal(d[same_class[0]], d[same_class[1]])


def test_em_classwise_is_one_pattern_per_class():
    """Class-wise EM on mid-grey images (nothing clips): identical change within a class, different across.
    From the official zero start every input of this constant set is the same, which the cnn maps to all-zero
    activations (ReLU'(0) = 0): the noise would never move, so the random start gives the inputs their spread."""
    images = torch.full((20, 1, 8, 8), 128, dtype=torch.uint8)
    data = ImageSet(images, torch.arange(20) % 4, 4)
    out = PROTECTIONS.create("em", mode="classwise", surrogate="cnn", max_rounds=2, random_start=True).protect(
        data, seed=0, device=CPU)
    d = change(out, data)
    for c in range(4):
        members = torch.nonzero(data.labels == c).flatten()
        assert all(torch.equal(d[members[0]], d[m]) for m in members[1:])
    assert not torch.equal(d[0], d[1])


def test_rem_respects_both_radii_and_reports(digits):
    train = digits[0].subset(torch.arange(0, 60))
    out = PROTECTIONS.create("rem", surrogate="cnn", train_steps=3, steps=3, samples=2, adv_steps=2,
                             batch_size=32).protect(train, seed=0, device=CPU)
    assert change(out, train).abs().max() <= 8 and out.info["train_steps"] == 3
    assert (change(out, train) != 0).float().mean() > 0.3


def test_tap_pushes_towards_the_target_class(digits):
    """Against its own surrogate, TAP's images are classified as (y + 1) mod K far more often than clean ones
    (under 10 %). Digits are coarse, high-contrast images: ε = 8/255 barely moves them, so ε = 32/255 here."""
    train = digits[0]
    out = PROTECTIONS.create("tap", surrogate="cnn", surrogate_epochs=5, steps=20, tau=0.1, epsilon=32,
                             restarts=1).protect(train, seed=0, device=CPU)
    assert out.info["surrogate_clean_accuracy"] > 0.6
    assert out.info["target_accuracy"] > 0.3
    assert change(out, train).abs().max() <= 32
    with pytest.raises(ValueError, match="shift"):
        PROTECTIONS.create("tap", shift=10, surrogate="cnn").protect(train, seed=0, device=CPU)


def fresh_surrogate(data: ImageSet, steps: int, seed: int = 5) -> tuple[torch.nn.Module, list[float]]:
    """A width-16 cnn trained here (not the protection's own surrogate: a seed and a loop of the test's) on ``data``
    for ``steps`` SGD steps of 64 images; the model and its training losses."""
    torch.manual_seed(seed)
    model = VICTIMS.create("cnn", width=16).build(data.num_classes, data.channels, data.size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, gen, losses = data.images.float() / 255, torch.Generator().manual_seed(seed), []
    for _ in range(steps):
        index = torch.randperm(len(x), generator=gen)[:64]
        loss = F.cross_entropy(model(x[index]), data.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), losses


def test_em_noise_makes_a_fresh_model_fit_faster(digits):
    """Judged by a model the test trains itself, not by EM's reported ``surrogate_error``: error-MINIMISING noise is
    a shortcut, so a fresh cnn's training loss on EM's images falls well below its loss on the clean images over
    the same steps. Noise that ascends the loss (mutation P02 of the audit) does the opposite."""
    train = digits[0].subset(torch.arange(0, 300))
    out = PROTECTIONS.create("em", surrogate="cnn", max_rounds=3, stop_error=0.0, epsilon=32).protect(
        train, seed=0, device=CPU)
    clean, protected = fresh_surrogate(train, 30)[1][15:], fresh_surrogate(out, 30)[1][15:]
    print(f"fresh cnn's mean loss, steps 15-30: clean {sum(clean) / 15:.3f}, EM {sum(protected) / 15:.3f}")
    assert sum(protected) < 0.5 * sum(clean)


def test_tap_target_accuracy_recomputed_on_the_published_images(digits):
    """TAP's reported ``target_accuracy`` is not trusted: the test rebuilds the clean-data surrogate TAP attacks
    (``_surrogate.pretrain``, same arch, epochs and seed) and classifies the published 8-bit images itself. They
    are classified as (y + 1) mod K far more often than as their true class or (y − 1) mod K; ``target = y``
    (mutation P03 of the audit) makes them the true class. A cnn trained independently is not fooled at this size
    (91 % true class, 4 % next): TAP's digits do not transfer, so the test judges against TAP's own victim. On 300
    digits this surrogate is weak (51 % on clean images) and ε = 32/255 reaches 30 %, so ε = 64/255: 61 % next
    class, 16 % true class."""
    train = digits[0].subset(torch.arange(0, 300))
    out = PROTECTIONS.create("tap", surrogate="cnn", surrogate_epochs=5, steps=20, tau=0.1, epsilon=64,
                             restarts=1).protect(train, seed=0, device=CPU)
    model = S.pretrain("cnn", train, seed=0, device=CPU, epochs=5)[0].eval()
    with torch.no_grad():
        predicted = model(out.images.float() / 255).argmax(1)
    y = train.labels
    shares = {shift: (predicted == (y + shift) % 10).float().mean().item() for shift in (0, 1, 9)}
    print(f"TAP's surrogate on the published images: share predicted as y + shift {shares}")
    assert shares[1] > 0.3 and shares[1] > 2 * max(shares[0], shares[9])


def victim_accuracy(train: ImageSet, test: ImageSet) -> float:
    torch.manual_seed(0)
    model = VICTIMS.create("cnn", width=16).build(train.num_classes, train.channels, train.size)
    augment = "crop_flip" if train.channels == 3 else "crop"
    return train_and_evaluate(model, train, test, make_recipe("quick"), seed=0, device=CPU, augment=augment)["final"]


def cifar_subset() -> tuple[ImageSet, ImageSet]:
    """1,000 real CIFAR-10 train images (JPEG copy, 100 per class) and 500 test images; skips without it."""
    try:
        return DATASETS.create("cifar10-jpeg", per_class=100, test_per_class=50).load()
    except ConfigError as err:
        pytest.skip(str(err))


CASES = [  # (protection, params, data, least drop in test accuracy); measured drops in the comments
    # Digits are coarse 17-level images that ε = 8/255 barely moves (EM's surrogate fits them cleanly in two
    # rounds and stops), so TAP runs at 32/255 there: 0.95 → 0.41.
    ("tap", dict(surrogate="cnn", surrogate_epochs=10, steps=30, tau=0.1, epsilon=32, restarts=1), "digits", 0.3),
    # Class-wise EM at the pre-issue-14 settings (batch 128, updates on the whole set, random start), which stop
    # in fewer, cheaper rounds here; the official ones (batch 512, 20 % subset, zero start) are the slow case.
    ("em", dict(surrogate="cnn", mode="classwise", batch_size=128, subset=1.0, random_start=True), "cifar", 0.08),
    # Measured on a loaded 2-core CPU: 0.37 → 0.23 in ~60 s (above); official class-wise 0.37 → 0.28 in ~110 s,
    # sample-wise 0.37 → 0.21 in ~270 s (at batch 128 and a random start it was 0.36 → 0.20 in ~50 s unloaded).
    pytest.param("em", dict(surrogate="cnn", mode="classwise"), "cifar", 0.08, marks=pytest.mark.slow),
    pytest.param("em", dict(surrogate="cnn"), "cifar", 0.08, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, params, data, drop", CASES)
def test_victim_learns_less_from_protected_data(name, params, data, drop, digits):
    """Behaviour on real data: a victim trained on the protected set scores well below one trained on clean."""
    train, test = digits if data == "digits" else cifar_subset()
    clean = victim_accuracy(train, test)
    protected = victim_accuracy(PROTECTIONS.create(name, **params).protect(train, seed=0, device=CPU), test)
    print(f"{name} {params}: clean {clean:.3f} protected {protected:.3f}")
    assert clean > 0.3 and protected < clean - drop


def test_logits_are_fp32_and_match_the_model(digits):
    model = S.build("cnn", digits[0], CPU).eval()
    x = S.to_float(digits[0], CPU)[:8]
    out = S.logits(model, x)
    assert out.dtype == torch.float32 and out.shape == (8, 10)
    assert F.cross_entropy(out, digits[0].labels[:8]).isfinite()
