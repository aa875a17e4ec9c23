"""The contracts every protection, countermeasure and victim keeps, as checks (``bench.testing`` runs them as
pytest tests over any registered component; each takes a built component and real images).

Shape, dtype, labels and classes kept, input untouched, deterministic for a seed, the L∞ budget, fitted models
that rebuild from their ``arch``, train hooks reproducible per generator seed, victims that build and train for
any channels, classes and size. A failed check raises AssertionError saying what broke.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from bench.core.components import (DATA, TRAIN, VICTIMS, Countermeasure, Fitted, ImageSet, Models, Protection,
                                   TrainHooks, Victim)

__all__ = ["assert_countermeasure_contract", "assert_data_stage_changes_images", "assert_image_set_contract",
           "assert_linf_budget", "assert_models_rebuild", "assert_protection_contract", "assert_reference_params",
           "assert_subset_contract", "assert_train_hooks", "assert_victim_large_input", "assert_victim_trains",
           "run_hooks"]

CPU = torch.device("cpu")


def assert_image_set_contract(run: Callable[[], ImageSet], batch: ImageSet) -> ImageSet:
    """``run()`` returns uint8 of the same shape with labels and classes kept, leaves ``batch`` untouched and
    gives byte-identical output when called again; returns the first output."""
    images, labels = batch.images.clone(), batch.labels.clone()
    out = run()
    assert isinstance(out, ImageSet)
    assert out.images.dtype == torch.uint8 and out.images.shape == batch.images.shape
    assert torch.equal(out.labels, labels) and out.num_classes == batch.num_classes
    assert torch.equal(batch.images, images) and torch.equal(batch.labels, labels), "the input was mutated"
    assert out.images.numpy().tobytes() == run().images.numpy().tobytes(), "not deterministic for one seed"
    return out


def assert_subset_contract(run: Callable[[], ImageSet], batch: ImageSet) -> ImageSet:
    """As ``assert_image_set_contract`` for a stage that returns part of the set: uint8 images of the same C×H×W,
    fewer of them, every class kept, no label more often than in the input."""
    images, labels = batch.images.clone(), batch.labels.clone()
    out = run()
    assert out.images.dtype == torch.uint8 and out.images.shape[1:] == batch.images.shape[1:]
    assert 0 < len(out) < len(batch) and out.num_classes == batch.num_classes
    kept, given = (torch.bincount(x, minlength=batch.num_classes) for x in (out.labels, labels))
    assert (kept <= given).all(), f"more images of a class than it was given: {kept.tolist()} of {given.tolist()}"
    assert set(out.labels.tolist()) == set(labels.tolist()), "a class was dropped"
    assert torch.equal(batch.images, images) and torch.equal(batch.labels, labels), "the input was mutated"
    assert out.images.numpy().tobytes() == run().images.numpy().tobytes(), "not deterministic for one seed"
    return out


def assert_models_rebuild(cls: type, models: Models) -> None:
    """The fitted models are the declared kinds, each with a JSON ``arch`` from which ``build_model`` rebuilds
    it (what the harness does when it loads them from the cache)."""
    assert set(models) == set(cls.fits), f"fitted {sorted(models)}, declared fits = {cls.fits}"
    for kind, model in models.items():
        arch = getattr(model, "arch", None)
        assert isinstance(arch, dict), f"the fitted {kind!r} model has no `arch` dict"
        cls.build_model(kind, json.loads(json.dumps(arch))).load_state_dict(model.state_dict())


def assert_protection_contract(protection: Protection, batch: ImageSet, seed: int = 3) -> None:
    """The image-set contract; models rebuild; an identity returns the input, any other protection changes it;
    where it encrypts unseen images, those come back as uint8 of their shape (within ``epsilon`` if it has one)."""
    fits: list[Fitted] = []

    def run() -> ImageSet:  # the harness calls fit: keep its models for the checks below
        fits.append(protection.fit(batch, seed=seed, device=CPU))
        return fits[-1].data

    out = assert_image_set_contract(run, batch)
    assert_models_rebuild(type(protection), fits[0].models)
    assert torch.equal(out.images, batch.images) == protection.identity, \
        "an identity protection changed the images" if protection.identity else "the images were left unchanged"
    if protection.encrypts_unseen:
        unseen = batch.images[::5]
        labels = {"labels": batch.labels[::5]} if protection.encrypt_needs_labels else {}
        encrypted = protection.encrypt(fits[0].models, unseen.clone(), device=CPU, **labels)
        assert encrypted.dtype == torch.uint8 and encrypted.shape == unseen.shape, "encrypt: not uint8 of the shape"
        if (epsilon := getattr(protection, "epsilon", None)) is not None:
            linf = (encrypted.to(torch.int16) - unseen.to(torch.int16)).abs().max().item()
            assert linf <= epsilon, f"encrypt: L∞ {linf} over ε = {epsilon}"


def assert_linf_budget(protection: Protection, batch: ImageSet) -> None:
    """max |x′ − x| ≤ ε in integer pixel units (``epsilon`` in 1/255 steps); ε = 0 changes nothing."""
    out = protection.protect(batch, seed=1, device=CPU)
    change = (out.images.to(torch.int16) - batch.images.to(torch.int16)).abs()
    assert change.max().item() <= protection.epsilon, f"L∞ {change.max().item()} over ε = {protection.epsilon}"
    if protection.epsilon == 0:
        assert torch.equal(out.images, batch.images)


def assert_countermeasure_contract(countermeasure: Countermeasure, batch: ImageSet, seed: int = 2,
                                   needs: Mapping[str, Any] = {}) -> Fitted:
    """The data stage (given ``needs``: an ``attacker`` where ``needs_attacker``) keeps the image-set contract
    (the subset one where ``returns_subset``) and its models rebuild; without the data stage, or with
    ``keeps_images``, the images pass unchanged. Returns the first fit."""
    fits: list[Fitted] = []

    def run() -> ImageSet:
        fits.append(countermeasure.fit(batch, seed=seed, device=CPU, **needs))
        return fits[-1].data

    out = (assert_subset_contract if countermeasure.returns_subset else assert_image_set_contract)(run, batch)
    assert_models_rebuild(type(countermeasure), fits[0].models)
    if DATA not in countermeasure.stages or countermeasure.keeps_images:
        assert torch.equal(out.images, batch.images), "the images changed, though no data stage changes them"
    return fits[0]


def assert_data_stage_changes_images(countermeasure: Countermeasure, data: ImageSet,
                                     needs: Mapping[str, Any] = {}) -> None:
    """A data stage changes at least 5 % of the pixels of real images (registration only sees the override)."""
    out = countermeasure.fit(data, seed=0, device=CPU, **needs).data
    assert (out.images != data.images).any(1).float().mean() > 0.05, "fewer than 5 % of the pixels changed"


def run_hooks(hooks: TrainHooks, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int):
    """One step's hooks in the training loop's order, on one generator seeded ``seed``: (x, y, loss)."""
    gen = torch.Generator().manual_seed(seed)
    if hooks.epoch_start:
        hooks.epoch_start(0, 4)
    if hooks.batch_transform:
        x, y = hooks.batch_transform(x, y, gen)
    if hooks.attack:
        x = hooks.attack(model, x, y, gen)
    loss = hooks.loss(model, x, y, gen)[0] if hooks.loss else F.cross_entropy(model(x), y)
    return x, y, loss.detach()


def assert_train_hooks(countermeasure: Countermeasure, data: ImageSet, needs: Mapping[str, Any] = {}) -> None:
    """Without the train stage there are no hooks. With it, they change a real batch, its labels or its loss,
    identically for one generator seed; another seed changes the result unless ``hooks_draw = False``, and then
    it must change nothing. A countermeasure that ``fits`` gets its data stage's models back."""
    models = {"models": countermeasure.fit(data, seed=0, device=CPU, **needs).models} \
        if countermeasure.fits and TRAIN in countermeasure.stages else {}
    hooks = countermeasure.train_hooks(data.num_classes, data.size, **models)
    if TRAIN not in countermeasure.stages:
        assert hooks == TrainHooks(), "hooks without the 'train' stage are never called"
        return
    assert hooks != TrainHooks(), "the 'train' stage gives no hooks"
    torch.manual_seed(0)
    model = VICTIMS.create("cnn", width=8).build(data.num_classes, data.channels, data.size).eval()
    x, y = data.images.float() / 255, data.labels
    with torch.no_grad():
        plain = F.cross_entropy(model(x), y)
    first, again, other = (run_hooks(hooks, model, x, y, seed) for seed in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "not reproducible for one generator seed"
    same = all(torch.equal(a, b) for a, b in zip(first, other))
    assert same != countermeasure.hooks_draw, ("the generator's seed changes nothing: declare hooks_draw = False"
                                               if same else "hooks_draw = False, yet the generator's seed changes it")
    changed = not torch.equal(first[0], x) or not torch.equal(first[1], y) or not torch.equal(first[2], plain)
    assert changed, "the hooks leave batch, labels and loss as they are"


def assert_victim_trains(victim: Victim, channels: int, size: int, classes: int) -> None:
    """It builds for these channels, size and classes, gives finite logits N×classes in train and eval mode,
    and one SGD step changes its weights and keeps them finite."""
    torch.manual_seed(0)
    model = victim.build(classes, channels, size).train()
    x, y = torch.rand(2, channels, size, size), torch.tensor([0, classes - 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(x)
    assert logits.shape == (2, classes), f"logits of shape {tuple(logits.shape)}, not (2, {classes})"
    assert torch.isfinite(logits).all(), "logits not finite"
    F.cross_entropy(logits, y).backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters())), "the step changed nothing"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        logits = model.eval()(x)
    assert logits.shape == (2, classes), f"logits of shape {tuple(logits.shape)}, not (2, {classes})"
    assert torch.isfinite(logits).all(), "logits not finite"


def assert_victim_large_input(victim: Victim, size: int = 224) -> None:
    """At ImageNet resolution (its ImageNet stem where it has one): one eval forward of one image, finite logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        logits = victim.build(10, 3, size).eval()(torch.rand(1, 3, size, size))
    assert logits.shape == (1, 10) and torch.isfinite(logits).all(), f"logits {logits}"


def assert_reference_params(victim: Victim) -> None:
    """At 3×32×32 and 10 classes it is within 2 % of the ``reference_params`` it declares."""
    reference = victim.reference_params
    assert reference is not None, f"{victim.name} declares no reference_params"
    got = sum(p.numel() for p in victim.build(10, 3, 32).parameters())
    assert abs(got - reference) <= 0.02 * reference, f"{got:,} parameters vs reference {reference:,}"
