"""Training recipes: named presets with the source they follow. A record always names its recipe and its
full parameters, and leaderboards never put two recipes in one table unless asked (``--mix-recipes``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from bench.core.registry import ConfigError, check_range, coerce, param_hints

Override = tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Optimiser, schedule, budget, augmentation and precision of victim training.

    Budget: ``epochs``, or ``iterations`` ≥ 1 optimiser steps where set (DH counts iterations; unset: ``epochs``).
    ``schedule``: ``cosine`` (no restart), ``step`` (× ``gamma`` at each epoch in ``milestones``),
    ``triangle`` (linear warm-up over ``warmup`` of the steps, then linear decay to 0), ``constant``.
    ``augment``: ``dataset`` (the dataset's standard one), ``crop_flip``, ``crop``, ``flip``, ``rrc_flip``
    (random resized crop + flip), ``none``. ``precision``: ``auto`` (bf16 autocast on CUDA, and on CPUs with
    native bf16; fp32 elsewhere), ``bf16`` or ``fp32``. ``eval_every``: the clean test set is evaluated every
    that many epochs and after the last (the curve holds NaN between). ``victim_overrides``: per-victim changes;
    ``dataset_overrides``: per-dataset ones (a matrix's ``[recipe.datasets.<name>]`` tables: DH trains 8,000
    iterations on its ImageNet subset, 40,000 on CIFAR), applied first.
    """

    name: str = "quick"
    source: str = "bench: a small budget for CPU runs and tests (not a paper's recipe)"
    optimizer: str = "sgd"
    epochs: int = 10
    iterations: int | None = None
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup: float = 0.2
    label_smoothing: float = 0.0
    augment: str = "dataset"
    precision: str = "auto"
    compile: bool = False
    eval_batch_size: int = 1024
    eval_every: int = 1
    victim_overrides: tuple[tuple[str, Override], ...] = ()
    dataset_overrides: tuple[tuple[str, Override], ...] = ()

    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "optimizer": ("sgd", "adam"), "schedule": ("cosine", "step", "triangle", "constant"),
        "augment": ("dataset", "crop_flip", "crop", "flip", "rrc_flip", "none"), "precision": ("auto", "bf16", "fp32")}
    bounds: ClassVar[dict[str, str]] = {"gamma": "(0, inf)", "warmup": "[0, 1)"}  # the rest by name (check_range)

    def __post_init__(self) -> None:
        for field, allowed in self.choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"recipe {field} {getattr(self, field)!r} is not one of {allowed}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("recipe needs epochs ≥ 1, batch_size ≥ 1 and lr > 0")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"recipe iterations must be ≥ 1, got {self.iterations}: omit it to budget by epochs")
        if self.eval_every < 1:
            raise ValueError(f"recipe eval_every must be ≥ 1 (epochs between test evaluations), got {self.eval_every}")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.warmup < 1:
            raise ValueError("recipe label_smoothing and warmup must be in [0, 1)")

    def for_victim(self, victim: str) -> Recipe:
        """This recipe with the overrides the source gives for ``victim`` (e.g. UGE's plain CNN)."""
        changes = dict(dict(self.victim_overrides).get(victim, ()))
        return dataclasses.replace(self, **changes) if changes else self

    def for_dataset(self, dataset: str) -> Recipe:
        """This recipe with the matrix's overrides for ``dataset`` (a cell's recipe: ``.for_dataset(d).for_victim(v)``,
        so a victim's own overrides win)."""
        changes = dict(dict(self.dataset_overrides).get(dataset, ()))
        return dataclasses.replace(self, **changes) if changes else self


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe(),
    Recipe("cpu", "bench's CPU protocol, on the papers' principle that the victim trains to convergence: the plain "
           "CNN reaches ≥ 95 % train accuracy on 50 clean CIFAR-10 images per class (SGD-Nesterov 0.05, cosine, "
           "batch 64, 80 epochs, test set every 4 epochs), at no more compute than quick on 500 per class",
           epochs=80, batch_size=64, eval_every=4),
    Recipe("fast", "bench: large-batch short schedule in the spirit of airbench (Jordan 2024) for broad GPU "
           "sweeps; label smoothing 0.2, triangular lr; not a paper's recipe", epochs=16, batch_size=512, lr=0.4,
           schedule="triangle", warmup=0.25, label_smoothing=0.2),
    Recipe("confoundergan", "ConfounderGAN App. G.5: SGD, momentum 0.9, lr 0.025, cosine without restart, 90 "
           "epochs (weight decay and batch size not given: 5e-4 and 128 assumed)", epochs=90, lr=0.025,
           nesterov=False),
    Recipe("apbench", "APBench (Qin et al. 2023) train.py: SGD lr 0.1, momentum 0.9, wd 5e-4, batch 256, 200 "
           "epochs, lr halved at epoch 100", epochs=200, batch_size=256, lr=0.1, nesterov=False, schedule="step",
           milestones=(100,), gamma=0.5),
    Recipe("dh", "DH §IV-A3: 40,000 iterations on CIFAR (8,000 on the ImageNet subset: set iterations); "
           "optimiser not given: SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128, cosine assumed (EM's code)",
           iterations=40_000, lr=0.1, nesterov=False),
    Recipe("uge", "UGE supplementary Table 6 (CIFAR-10): lr 0.1, 160 epochs; plain CNN lr 1e-3, 100 epochs "
           "(optimiser not given: SGD momentum 0.9 wd 5e-4 cosine, and Adam for the CNN's 1e-3)", epochs=160,
           lr=0.1, nesterov=False,
           victim_overrides=(("cnn", (("optimizer", "adam"), ("lr", 1e-3), ("epochs", 100), ("weight_decay", 0.0))),)),
)}


def make_recipe(name: str, datasets: dict[str, dict[str, Any]] | None = None, **overrides: Any) -> Recipe:
    """A named recipe with validated field overrides (as a matrix's ``[recipe]`` table gives them) and per-dataset
    ones (its ``[recipe.datasets.<name>]`` tables)."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    if datasets is not None:
        if not isinstance(datasets, dict) or not all(isinstance(v, dict) for v in datasets.values()):
            raise ConfigError(f"recipe datasets: expected [recipe.datasets.<dataset>] tables of fields, got {datasets!r}")
        from bench.data.datasets import DATASETS

        for dataset, changes in datasets.items():
            if dataset not in DATASETS.names():
                raise ConfigError(f"recipe datasets: unknown dataset {dataset!r} (known: {', '.join(DATASETS.names())})")
            make_recipe(name, **{**overrides, **changes})  # each dataset's recipe must hold
        overrides["dataset_overrides"] = tuple(sorted((d, tuple(sorted(c.items()))) for d, c in datasets.items()))
    hints = param_hints(Recipe)
    fields = set(hints) - {"name", "source", "victim_overrides"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown recipe field(s) {unknown} (fields: {', '.join(sorted(fields))})")
    values = {k: v if k == "dataset_overrides" else coerce(v, hints[k], f"recipe field {k!r}") for k, v in overrides.items()}
    try:
        recipe = dataclasses.replace(RECIPES[name], **values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad recipe override: {err}") from err
    for key, value in values.items():
        check_range(Recipe, key, value, f"recipe field {key!r}",
                    f"omit it for recipe {name!r}'s {getattr(RECIPES[name], key)!r}")
    return recipe
