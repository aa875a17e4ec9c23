"""Train-set mixes (ConfounderGAN §5.2, Fig. 5): how a cell's train set combines the protected ``poison_ratio``
p of each class with the rest, everything about them in one place: what each needs (planning), how the
protection is fitted for it (protect stage) and how the train set is assembled (purify and train stages).
"""

from __future__ import annotations

import dataclasses

import torch

from bench.core.components import Attacker, Fitted, ImageSet, Models, Protection
from bench.data.datasets import nested_index
from bench.store.cache import Cache

MIXES = {
    "protected": "p protected (protection fitted on the whole train set) + (1 − p) clean",
    "fit_subset": "p protected by a protection fitted on that p only + (1 − p) clean (Fig. 5, Polylines 3–4)",
    "ood": "p protected as fit_subset + (1 − p) encrypted without labels by the fitted model (Fig. 5, Polyline 5)",
    "clean_only": "only the (1 − p) clean part; the protection is not used (Fig. 5, Polyline 2)",
}


@dataclasses.dataclass(frozen=True)
class TrainSource:
    """Where a cell's train set comes from: the dataset, the protected set (``None``: no protection ran), the
    protected ratio of each class, the seed that draws that ratio, the mix, and the dataset the protection was
    crafted on where it is a larger one (``protect_per_class``; ``None``: the train set)."""

    dataset_key: str
    protection_key: str | None
    poison_ratio: float
    seed: int
    mix: str = "protected"
    crafted_key: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainSet:
    """The clean train set, the cell's train set as its mix says, and the mask of the protected images in the
    clean set's indexing (for ``clean_only`` the train set is the clean rest and the mask is empty)."""

    clean: ImageSet
    train: ImageSet
    mask: torch.Tensor


def fits_part(mix: str) -> bool:
    """Whether ``mix`` fits the protection on part of each class only (``fitted_on``)."""
    return mix in ("fit_subset", "ood")


def fitted_on(mix: str, poison_ratio: float) -> float | None:
    """The ratio of each class the protection is fitted on, ``None`` for the whole train set."""
    return poison_ratio if fits_part(mix) else None


def uses_protection(mix: str) -> bool:
    return mix != "clean_only"


def missing_capability(mix: str, protection: type[Protection], crafted: bool = False) -> str | None:
    """Why ``protection`` cannot serve ``mix`` (``None`` if it can), on a dataset whose protections are ``crafted``
    on a larger set (``protect_per_class``) or not."""
    if crafted and fits_part(mix):
        return (f"mix {mix!r} fits the protection on part of the train set, but the dataset's protect_per_class "
                "crafts it on a larger set: use mix 'protected', or drop protect_per_class")
    if mix == "ood" and not protection.identity and not protection.encrypts_unseen:
        return (f"mix 'ood' needs a protection that encrypts unseen images (encrypts_unseen, e.g. "
                f"confoundergan); {protection.name} cannot")
    return None


def class_mask(data: ImageSet, ratio: float, seed: int) -> torch.Tensor:
    """A seeded random ``ratio`` of each class (the protected part of a cell's train set)."""
    mask = torch.zeros(len(data), dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    for c in range(data.num_classes):
        members = torch.nonzero(data.labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        mask[members[: round(ratio * len(members))]] = True
    return mask


def fit_protection(protection: Protection, train: ImageSet, ratio: float | None, *, seed: int,
                   device: torch.device) -> Fitted:
    """Fit ``protection`` on the whole train set, or on the ``ratio`` of each class only (ConfounderGAN §5.2); a
    protection that ``encrypts_unseen`` then protects the rest without labels with its fitted models, the others
    leave it clean (the ``fit_subset`` mix uses only the fitted part either way). One that ``encrypt_needs_labels``
    gets the rest's labels."""
    if ratio is None:
        return protection.fit(train, seed=seed, device=device)
    mask = class_mask(train, ratio, seed)
    fitted = protection.fit(train.subset(torch.nonzero(mask).flatten()), seed=seed, device=device)
    images = train.images.clone()
    images[mask] = fitted.data.images
    info = {**fitted.data.info, "fitted_on": int(mask.sum()), "encrypted_unseen": 0}
    if protection.encrypts_unseen and (~mask).any():
        labels = {"labels": train.labels[~mask]} if protection.encrypt_needs_labels else {}
        images[~mask] = protection.encrypt(fitted.models, train.images[~mask], device=device, **labels)
        info["encrypted_unseen"] = int((~mask).sum())
    return Fitted(train.with_images(images, **info), fitted.models)


ATTACKER_SEED = 7919  # added to the cell's seed: the attacker knows the method, not the protector's randomness


def attacker(protection: Protection, models: Models, sets: TrainSet, *, seed: int, device: torch.device) -> Attacker:
    """The adaptive attacker of a cell (ConfounderGAN App. D): the natural images of its train set, and the
    protection to run on natural images of its own, by the fitted models where the protection encrypts unseen
    images (ConfounderGAN, UGE, DH), else by running it afresh with a seed of its own."""
    clean = sets.clean if len(sets.clean) == len(sets.train) else sets.train  # clean_only: the train set is clean
    if protection.encrypts_unseen and models:
        def encrypt(natural: ImageSet) -> ImageSet:
            labels = {"labels": natural.labels} if protection.encrypt_needs_labels else {}
            return natural.with_images(protection.encrypt(models, natural.images, device=device, **labels))
        return Attacker(clean, encrypt, f"encrypts with {protection.name}'s fitted {', '.join(sorted(models))}")
    return Attacker(clean, lambda natural: protection.protect(natural, seed=seed + ATTACKER_SEED, device=device),
                    f"runs {protection.name} on its own images (seed {seed + ATTACKER_SEED})")


def assemble(cache: Cache, source: TrainSource) -> TrainSet:
    """The cell's train set from the cached clean and protected sets, as ``source.mix`` says."""
    clean = require(cache, "dataset", f"{source.dataset_key}-train")
    mask = class_mask(clean, source.poison_ratio, source.seed)
    if not uses_protection(source.mix):
        return TrainSet(clean, clean.subset(torch.nonzero(~mask).flatten()), torch.zeros(len(clean), dtype=torch.bool))
    if source.protection_key is None:
        return TrainSet(clean, clean, torch.ones(len(clean), dtype=torch.bool))
    protected = require(cache, "protected", source.protection_key)
    if source.crafted_key:  # crafted on a larger set: the train set's own images of it
        protected = protected.subset(nested_index(require(cache, "dataset", f"{source.crafted_key}-train"), clean))
    if source.mix == "ood":  # the fitted part and the rest, encrypted out of distribution: all of it is changed
        return TrainSet(clean, clean.with_images(protected.images), torch.ones(len(clean), dtype=torch.bool))
    mixed = torch.where(mask[:, None, None, None], protected.images, clean.images)
    return TrainSet(clean, clean.with_images(mixed), mask)


def require(cache: Cache, kind: str, key: str) -> ImageSet:
    """A cache entry that an earlier stage made; a clear error if it is gone."""
    data = cache.load(kind, key)
    if data is None:
        raise RuntimeError(f"cache entry {kind}/{key} is missing or corrupted; rerun to rebuild it")
    return data
