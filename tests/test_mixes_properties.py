"""Properties of the train-set mixes (bench.data.mixes): how a protection is fitted on part of a set and encrypts
the rest, what an adaptive attacker holds, what a cell's train set is assembled from, and the errors naming a fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bench.core.components import Fitted, ImageSet, Models, Protection
from bench.data.datasets import DATASETS
from bench.data.mixes import (
    ATTACKER_SEED,
    TrainSet,
    TrainSource,
    assemble,
    attacker,
    class_mask,
    fit_protection,
    missing_capability,
    require,
)
from bench.store.cache import Cache

CPU = torch.device("cpu")


def digits(per_class: int = 10) -> ImageSet:
    return DATASETS.create("digits", per_class=per_class).load()[0]


class Inverting(Protection):
    """Protects by inverting the images; records every call (its arguments) in ``calls``."""

    name = "inverting"

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        self.calls.append(("protect", {"n": len(train), "seed": seed, "device": device}))
        return train.with_images(255 - train.images, rounds=3)


class Fitting(Protection):
    """Fits a "generator" (inverts the images) and encrypts unseen ones by halving them."""

    name = "fitting"
    fits = ("generator",)
    encrypts_unseen = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def fit(self, train: ImageSet, *, seed: int, device: torch.device) -> Fitted:
        self.calls.append(("fit", {"n": len(train), "seed": seed, "device": device}))
        return Fitted(train.with_images(255 - train.images, rounds=3),
                      Models({"generator": nn.Identity(), "authorized": nn.Identity()}))

    def encrypt(self, models: Models, images: torch.Tensor, *, device: torch.device) -> torch.Tensor:
        self.calls.append(("encrypt", {"n": len(images), "models": sorted(models), "device": device}))
        return images // 2


class Labelled(Fitting):
    """Encrypts an image into its label (DH-like: ``encrypt_needs_labels``)."""

    name = "labelled"
    encrypt_needs_labels = True

    def encrypt(self, models: Models, images: torch.Tensor, *, device: torch.device,  # type: ignore[override]
                labels: torch.Tensor) -> torch.Tensor:
        self.calls.append(("encrypt", {"n": len(images), "device": device}))
        return labels.to(torch.uint8)[:, None, None, None].expand_as(images).clone()


def calls(protection: Inverting | Fitting, what: str) -> list[dict[str, Any]]:
    return [args for name, args in protection.calls if name == what]


# ------------------------------------------------------------------ fit_protection


def test_whole_set_fit_gets_the_set_seed_and_device():
    """Without a ratio the protection is fitted once on the whole train set, with the cell's seed and device."""
    data, protection = digits(), Fitting()
    fitted = fit_protection(protection, data, None, seed=5, device=CPU)
    assert calls(protection, "fit") == [{"n": 100, "seed": 5, "device": CPU}] and not calls(protection, "encrypt")
    assert torch.equal(fitted.data.images, 255 - data.images) and set(fitted.models) == {"generator", "authorized"}


def test_part_fit_encrypts_the_rest_and_reports_counts():
    """fit_subset/ood: fitted on the seeded ratio of each class only, the rest encrypted by the fitted models on the
    cell's device; info reports both counts beside the protection's own."""
    data, protection = digits(), Fitting()
    fitted = fit_protection(protection, data, 0.3, seed=4, device=CPU)
    mask = class_mask(data, 0.3, 4)
    assert calls(protection, "fit") == [{"n": 30, "seed": 4, "device": CPU}]
    assert calls(protection, "encrypt") == [{"n": 70, "models": ["authorized", "generator"], "device": CPU}]
    assert torch.equal(fitted.data.images[mask], 255 - data.images[mask])
    assert torch.equal(fitted.data.images[~mask], data.images[~mask] // 2)
    assert fitted.data.info == {"rounds": 3, "fitted_on": 30, "encrypted_unseen": 70}
    assert torch.equal(fitted.data.labels, data.labels)


def test_part_fit_without_encryption_leaves_the_rest_clean():
    """A protection that cannot encrypt unseen images is never asked to; the rest stays clean, 0 encrypted."""
    data, protection = digits(), Inverting()
    fitted = fit_protection(protection, data, 0.5, seed=1, device=CPU)
    mask = class_mask(data, 0.5, 1)
    assert calls(protection, "protect") == [{"n": 50, "seed": 1, "device": CPU}]
    assert torch.equal(fitted.data.images[~mask], data.images[~mask])
    assert torch.equal(fitted.data.images[mask], 255 - data.images[mask])
    assert fitted.data.info == {"rounds": 3, "fitted_on": 50, "encrypted_unseen": 0}


def test_full_ratio_leaves_nothing_to_encrypt():
    """Fitted on all of each class (ratio 1): encrypt is not called on an empty rest."""
    protection = Fitting()
    fitted = fit_protection(protection, digits(), 1.0, seed=0, device=CPU)
    assert not calls(protection, "encrypt")
    assert fitted.data.info["fitted_on"] == 100 and fitted.data.info["encrypted_unseen"] == 0


def test_encrypt_needing_labels_gets_the_rests_own_labels():
    """A protection that encrypt_needs_labels gets the labels of the images it encrypts (the unfitted rest)."""
    data, protection = digits(), Labelled()
    fitted = fit_protection(protection, data, 0.5, seed=2, device=CPU)
    mask = class_mask(data, 0.5, 2)
    rest = fitted.data.images[~mask]
    assert torch.equal(rest, data.labels[~mask].to(torch.uint8)[:, None, None, None].expand_as(rest))
    assert calls(protection, "encrypt") == [{"n": 50, "device": CPU}]


# ------------------------------------------------------------------ attacker


def sets_of(data: ImageSet, clean_only: bool = False) -> TrainSet:
    """A cell's sets: protected (the train set inverted, all of it), or clean_only (the clean first half)."""
    if clean_only:
        return TrainSet(data, data.subset(torch.arange(50)), torch.zeros(len(data), dtype=torch.bool))
    return TrainSet(data, data.with_images(255 - data.images), torch.ones(len(data), dtype=torch.bool))


def test_attacker_with_fitted_models_encrypts_natural_images():
    """A protection that encrypts unseen images: the attacker holds the clean train set and encrypts natural images
    with the fitted models on the device; its description names them, sorted."""
    data, protection = digits(), Fitting()
    models = Models({"generator": nn.Identity(), "authorized": nn.Identity()})
    attack = attacker(protection, models, sets_of(data), seed=3, device=CPU)
    assert attack.clean is data
    assert attack.how == "encrypts with fitting's fitted authorized, generator"
    natural = digits(5)
    out = attack.protect(natural)
    assert torch.equal(out.images, natural.images // 2) and torch.equal(out.labels, natural.labels)
    assert calls(protection, "encrypt") == [{"n": 50, "models": ["authorized", "generator"], "device": CPU}]


def test_attacker_encrypt_with_labels_gets_the_natural_labels():
    """encrypt_needs_labels: the attacker passes its natural images' own labels."""
    natural = digits(5)
    attack = attacker(Labelled(), Models({"generator": nn.Identity()}), sets_of(digits()), seed=0, device=CPU)
    out = attack.protect(natural)
    assert torch.equal(out.images, natural.labels.to(torch.uint8)[:, None, None, None].expand_as(natural.images))


@pytest.mark.parametrize("protection, models", [(Fitting(), Models()), (Inverting(), Models({"g": nn.Identity()}))],
                         ids=["no-models", "no-encrypt"])
def test_attacker_otherwise_runs_the_protection_with_its_own_seed(protection: Protection, models: Models):
    """Without fitted models, or for a protection that cannot encrypt unseen images, the attacker runs the protection
    afresh on the device with the cell's seed + ATTACKER_SEED (not the protector's randomness), saying so."""
    data = digits()
    protection.calls.clear()  # type: ignore[attr-defined]
    attack = attacker(protection, models, sets_of(data), seed=11, device=CPU)
    assert attack.clean is data
    assert attack.how == f"runs {protection.name} on its own images (seed {11 + 7919})" and ATTACKER_SEED == 7919
    natural = digits(5)
    out = attack.protect(natural)
    assert torch.equal(out.images, 255 - natural.images)
    first = protection.calls[0][1]
    assert first["n"] == 50 and first["seed"] == 11 + ATTACKER_SEED and first["device"] == CPU


def test_clean_only_attacker_holds_the_train_set_itself():
    """clean_only: the train set is the clean rest, so the attacker's natural images are that train set."""
    data = digits()
    sets = sets_of(data, clean_only=True)
    attack = attacker(Inverting(), Models(), sets, seed=0, device=CPU)
    assert attack.clean is sets.train and len(attack.clean) == 50


# ------------------------------------------------------------------ assemble, require


def cached(tmp_path: Path, **sets: ImageSet) -> Cache:
    """A cache holding ``dataset/<key>-train`` for each ``key=set`` (``protected_<key>`` → ``protected/<key>``)."""
    cache = Cache(tmp_path)
    for key, data in sets.items():
        kind, _, name = key.rpartition("_")
        cache.save(kind or "dataset", name if kind else f"{key}-train", data, {})
    return cache


def test_clean_only_train_set_is_the_clean_rest(tmp_path):
    """clean_only: the clean set, the unprotected (1 − p) of each class as the train set, and an empty bool mask."""
    data = digits()
    sets = assemble(cached(tmp_path, small=data), TrainSource("small", None, 0.3, 1, "clean_only"))
    mask = class_mask(data, 0.3, 1)
    assert torch.equal(sets.clean.images, data.images) and torch.equal(sets.clean.labels, data.labels)
    assert torch.equal(sets.train.images, data.images[~mask]) and len(sets.train) == 70
    assert sets.mask.dtype == torch.bool and sets.mask.shape == (100,) and not sets.mask.any()


def test_crafted_protection_contributes_the_train_sets_own_images(tmp_path):
    """protect_per_class: the protected set was crafted on a larger set; the train set takes, image for image,
    the protected versions of its own images inside it."""
    small, large = digits(10), digits(20)
    cache = cached(tmp_path, small=small, large=large, protected_pk=large.with_images(255 - large.images))
    sets = assemble(cache, TrainSource("small", "pk", 0.5, 3, "protected", crafted_key="large"))
    mask = class_mask(small, 0.5, 3)
    assert torch.equal(sets.mask, mask) and len(sets.train) == 100
    assert torch.equal(sets.train.images[mask], 255 - small.images[mask])
    assert torch.equal(sets.train.images[~mask], small.images[~mask])


def test_missing_cache_entry_names_it_and_the_fix(tmp_path):
    """A cache entry an earlier stage made but that is gone: the error names kind/key and says to rerun."""
    with pytest.raises(RuntimeError, match=r"cache entry dataset/gone-train is missing or corrupted; rerun"):
        require(Cache(tmp_path), "dataset", "gone-train")


# ------------------------------------------------------------------ missing_capability


def test_crafted_dataset_refuses_part_fitting_mixes_naming_the_fix():
    """protect_per_class crafts on a larger set, so fit_subset/ood cannot fit on part of the train set: the reason
    names the mix and both fixes; mix 'protected' is fine; by default a dataset is not crafted."""
    for mix in ("fit_subset", "ood"):
        reason = missing_capability(mix, Fitting, crafted=True)
        assert reason == (f"mix {mix!r} fits the protection on part of the train set, but the dataset's "
                          "protect_per_class crafts it on a larger set: use mix 'protected', or drop protect_per_class")
        assert missing_capability(mix, Fitting) is None
    assert missing_capability("protected", Inverting, crafted=True) is None
