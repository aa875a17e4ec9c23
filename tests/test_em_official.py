"""EM and TAP follow their official code (issue 14): EM's zero start, batch 512 and class-wise 20 % update subset
(HanxunH/Unlearnable-Examples ``perturbation.py``); TAP's 8 restarts keeping the lowest-loss run and its sub-pixel
translation augmentation (lhfowl/adversarial_poisons ``village/``).

Each test fails on the old behaviour (uniform random start, batch 128, class-wise updates on the whole set, one
TAP restart with an integer crop). Real images throughout: sklearn's digits.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from bench.core.components import PROTECTIONS, ImageSet
from bench.core.registry import ConfigError
from bench.data.datasets import DATASETS
from bench.protections import _surrogate as S
from bench.protections import tap as T

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    """500 real greyscale train images (50 per class), 1×16×16."""
    return DATASETS.create("digits", per_class=50).load()[0]


def uneven(data: ImageSet) -> ImageSet:
    """``data`` with 50 − 3c images of class c (50, 47, …, 23): counts whose 20 % is mostly not whole."""
    keep = torch.cat([torch.nonzero(data.labels == c).flatten()[:50 - 3 * c] for c in range(10)]).sort().values
    return data.subset(keep)


def spy(monkeypatch, name: str, record) -> None:
    """Replace ``_surrogate.<name>`` by a wrapper that calls ``record(*args)`` and then the real function."""
    real = getattr(S, name)
    monkeypatch.setattr(S, name, lambda *a, **k: record(*a) or real(*a, **k))


def rows(images: torch.Tensor) -> list[bytes]:
    """Float [0, 1] clean images as hashable uint8 rows."""
    return [r.numpy().tobytes() for r in images.mul(255).round().to(torch.uint8)]


# ------------------------------------------------------------------ defaults


def test_defaults_are_the_official():
    """EM: ``--train_batch_size 512``, zero start (no ``--random_start``), class-wise 20 % subset; TAP: 8 restarts."""
    em, tap = PROTECTIONS.create("em"), PROTECTIONS.create("tap")
    assert em.batch_size == 512 and em.random_start is False and em.subset is None
    assert tap.restarts == 8 and tap.augment is True and tap.batch_size == 512


@pytest.mark.parametrize("params, match", [({"subset": 0.0}, "omit it"), ({"subset": 1.5}, "omit it"),
                                           ({"subset": 0.5}, "mode='classwise'"), ])
def test_em_bad_subset_is_rejected(params, match):
    with pytest.raises(ConfigError, match=match):
        PROTECTIONS.create("em", **params)


@pytest.mark.parametrize("restarts", [0, -1])
def test_tap_needs_a_restart(restarts):
    with pytest.raises(ConfigError, match="restarts ≥ 1.*omit them"):
        PROTECTIONS.create("tap", restarts=restarts)


# ------------------------------------------------------------------ EM: start and batch


@pytest.mark.parametrize("mode", ["samplewise", "classwise"])
def test_em_starts_from_zero(mode, digits, monkeypatch):
    """By default the first update starts from δ = 0, and with no step size the output is the input; the random
    start (``random_start=True``) starts inside [−ε, ε] and changes the images."""
    data = digits.subset(torch.arange(100))
    starts: list[torch.Tensor] = []
    spy(monkeypatch, "signed_pgd", lambda model, x, y, delta: starts.append(delta.clone()))
    em = dict(mode=mode, surrogate="cnn", max_rounds=1, model_steps=1)
    out = PROTECTIONS.create("em", step_size=0.0, **em).protect(data, seed=0, device=CPU)
    assert starts and torch.count_nonzero(starts[0]) == 0
    assert torch.equal(out.images, data.images)
    starts.clear()
    out = PROTECTIONS.create("em", step_size=0.0, random_start=True, **em).protect(data, seed=0, device=CPU)
    assert starts[0].abs().max() <= 8 / 255 + 1e-6 and (starts[0] != 0).float().mean() > 0.5
    assert not torch.equal(out.images, data.images)


def test_em_batch_is_512_for_training_and_updates(monkeypatch):
    """One batch size, 512, for the surrogate's training steps and the noise updates (600 images: 512 + 88)."""
    data = DATASETS.create("digits", per_class=60).load()[0]
    trained, updated = [], []
    spy(monkeypatch, "train_step", lambda model, optimizer, x, y: trained.append(len(x)))
    spy(monkeypatch, "signed_pgd", lambda model, x, y, delta: updated.append(len(x)))
    PROTECTIONS.create("em", surrogate="cnn", max_rounds=1, model_steps=2, steps=1).protect(data, seed=0, device=CPU)
    assert trained == [512, 88] and updated == [512, 88]


# ------------------------------------------------------------------ EM: class-wise update subset


def test_em_classwise_updates_and_stops_on_a_stratified_fifth(digits, monkeypatch):
    """Class-wise: noise updates and the stop check see the same round(0.2 · n_c) images of each class c, in
    every round; the surrogate trains on the whole set."""
    data = uneven(digits)
    counts = Counter(data.labels.tolist())
    clean = S.to_float(data, CPU)
    trained, updated, checked = [], [[], []], []
    spy(monkeypatch, "train_step", lambda model, optimizer, x, y: trained.append(Counter(y.tolist())))
    spy(monkeypatch, "signed_pgd", lambda model, x, y, delta: updated[len(checked)].extend(rows(x)))
    spy(monkeypatch, "accuracy", lambda model, x, y: checked.append((x.clone(), Counter(y.tolist()))))
    out = PROTECTIONS.create("em", mode="classwise", surrogate="cnn", max_rounds=2, stop_error=0.0, model_steps=1,
                             batch_size=len(data)).protect(data, seed=0, device=CPU)
    assert out.info["rounds"] == 2 and len(checked) == 2
    assert trained == [counts, counts]  # one step on the whole set each round
    index = {row: i for i, row in enumerate(rows(clean))}
    picked = [index[row] for row in updated[0]]
    expected = {c: round(0.2 * n) for c, n in counts.items()}
    assert Counter(data.labels[picked].tolist()) == expected and len(set(picked)) == len(picked)
    assert sorted(updated[1]) == sorted(updated[0]), "the subset is drawn once, not per round"
    for images, labels in checked:  # the stop check: the same images (with their noise), the same counts
        assert labels == expected
        nearest = torch.cdist(images.flatten(1), clean.flatten(1), p=float("inf")).min(1)
        assert (nearest.values <= 8 / 255 + 1e-5).all() and set(nearest.indices.tolist()) == set(picked)
    assert out.info["update_images"] == sum(expected.values())


def test_em_classwise_subset_is_seeded_and_settable(digits, monkeypatch):
    """The subset depends on the seed (same counts); ``subset=1.0`` updates on every image."""
    data = digits.subset(torch.arange(200))
    seen: list[list[bytes]] = []
    spy(monkeypatch, "signed_pgd", lambda model, x, y, delta: seen[-1].extend(rows(x)))
    em = dict(mode="classwise", surrogate="cnn", max_rounds=1, model_steps=1)
    for params, seed in (({}, 0), ({}, 0), ({}, 1), ({"subset": 1.0}, 0)):
        seen.append([])
        PROTECTIONS.create("em", **em, **params).protect(data, seed=seed, device=CPU)
    first, again, other, whole = (sorted(s) for s in seen)
    size = sum(round(0.2 * n) for n in Counter(data.labels.tolist()).values())
    assert first == again and first != other and len(other) == len(first) == size
    assert whole == sorted(rows(S.to_float(data, CPU)))


# ------------------------------------------------------------------ TAP: restarts and augmentation


def tap(**params) -> T.TargetedAdversarialPoisoning:
    cheap = dict(surrogate="cnn", surrogate_epochs=2, steps=3, tau=0.2, epsilon=32)
    return PROTECTIONS.create("tap", **{**cheap, **params})


def test_tap_keeps_the_restart_with_the_lowest_loss(digits, monkeypatch):
    """The kept poison set is the run whose target loss is lowest (the official argmin over runs)."""
    data = digits.subset(torch.arange(200))
    runs: list[torch.Tensor] = []
    fake = iter([3.0, 1.0, 2.0])
    real = T.TargetedAdversarialPoisoning._run

    def run(self, *args):
        noise, _ = real(self, *args)
        runs.append(noise.clone())
        return noise, next(fake)

    monkeypatch.setattr(T.TargetedAdversarialPoisoning, "_run", run)
    out = tap(restarts=3).protect(data, seed=0, device=CPU)
    assert out.info["restart_losses"] == [3.0, 1.0, 2.0] and out.info["restart_kept"] == 1
    assert len(runs) == 3 and not torch.equal(runs[0], runs[1])
    assert torch.equal(out.images, S.publish(data, S.to_float(data, CPU), runs[1]).images)


def test_tap_restarts_are_at_least_as_good_as_one(digits):
    """Same seed: the first of 4 runs is the single run, and the kept loss is the least of the 4."""
    data = digits.subset(torch.arange(200))
    one, four = (tap(restarts=r).protect(data, seed=0, device=CPU).info for r in (1, 4))
    assert len(four["restart_losses"]) == 4 and four["restart_losses"][0] == one["restart_losses"][0]
    assert four["restart_losses"][four["restart_kept"]] == min(four["restart_losses"]) <= one["restart_losses"][0]
    assert len(set(four["restart_losses"])) > 1, "every restart draws a fresh start"


def test_tap_translation_is_sub_pixel_within_an_eighth_and_fills_with_the_mean():
    """The official ``RandomTransform`` (CIFAR-10 size 32: shift 8, i.e. up to ±4 px): on a vertical ramp (which the
    left-right mirror leaves alone) each image moves by one uniform, mostly fractional offset of at most 4 px; a
    constant image of the fill value is unchanged; gradients reach the input."""
    ramp = torch.linspace(0, 1, 32).view(1, 1, 32, 1).expand(256, 1, 32, 32).clone().requires_grad_(True)
    fill = torch.tensor([0.3])
    out = T.translate_flip(ramp, fill, torch.Generator().manual_seed(0))
    moved = ((out - ramp) * 31)[:, 0, 5:27, 5:27].detach()  # away from the border: the offset in pixels
    offset = moved.mean((1, 2))
    assert torch.allclose(moved, offset.view(-1, 1, 1).expand_as(moved), atol=1e-4)
    assert offset.abs().max() <= 4 + 1e-4 and offset.abs().max() > 3.5 and offset.std() > 1.5
    assert ((offset - offset.round()).abs() > 0.05).float().mean() > 0.8, "offsets are sub-pixel, not integer"
    assert torch.autograd.grad(out.sum(), ramp)[0].abs().sum() > 0
    constant = torch.full((8, 1, 32, 32), 0.3)
    assert torch.allclose(T.translate_flip(constant, fill, torch.Generator().manual_seed(1)), constant, atol=1e-6)


def test_tap_attacks_through_the_translation(digits, monkeypatch):
    """``augment=True`` (default) feeds the surrogate translated images; ``augment=False`` the poisons themselves."""
    data = digits.subset(torch.arange(100))
    calls = []
    real = T.translate_flip
    monkeypatch.setattr(T, "translate_flip", lambda *a: calls.append(1) or real(*a))
    tap(restarts=1, steps=2).protect(data, seed=0, device=CPU)
    assert len(calls) == 2
    calls.clear()
    tap(restarts=1, steps=2, augment=False).protect(data, seed=0, device=CPU)
    assert not calls
