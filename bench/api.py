"""The public API of bench: what notebooks, scripts and plugins import (also re-exported as ``bench.<name>``).

Everything else under ``bench`` is internal and may change. A plugin (``bench list``'s components are built-in
plugins) imports only this module from the harness.

Add a countermeasure::

    from bench.api import COUNTERMEASURES, Countermeasure, ImageSet

    @COUNTERMEASURES.register("invert")
    class Invert(Countermeasure):
        \"\"\"Invert every pixel (a toy data-stage countermeasure).\"\"\"
        stages = frozenset({"data"})

        def purify(self, train: ImageSet, *, seed: int, device) -> ImageSet:
            return train.with_images(255 - train.images)
"""

from __future__ import annotations

from bench.core.components import (COUNTERMEASURES, DATA, PROTECTIONS, TRAIN, VICTIMS, Attacker, Countermeasure,
                                   Fitted, Generator, ImageSet, Models, Pretrained, Protection, TrainHooks, Victim)
from bench.core.registry import Component, ConfigError, Registry
from bench.core.units import pixel_steps
from bench.data.datasets import DATASETS, Dataset, fingerprint, train_images_like
from bench.data.mixes import ATTACKER_SEED, class_mask
from bench.execute.augment import KINDS as AUGMENTATIONS
from bench.execute.augment import random_crop, random_flip, standard_augment
from bench.execute.train import Normalize, autocast, channel_stats, resolve_precision, train_and_evaluate
from bench.plan.recipes import RECIPES, Recipe, make_recipe
from bench.store.cache import make_key

__all__ = [
    # component families, their registries and the types they exchange
    "COUNTERMEASURES", "DATA", "DATASETS", "PROTECTIONS", "TRAIN", "VICTIMS", "Attacker", "Component", "Countermeasure",
    "Dataset", "Fitted", "Generator", "ImageSet", "Models", "Pretrained", "Protection", "Registry", "TrainHooks",
    "Victim", "ConfigError",
    # helpers components use: training, augmentation, recipes, data, keys
    "AUGMENTATIONS", "ATTACKER_SEED", "Normalize", "RECIPES", "Recipe", "autocast", "channel_stats", "class_mask",
    "fingerprint", "make_key", "make_recipe", "pixel_steps", "random_crop", "random_flip", "resolve_precision",
    "standard_augment", "train_and_evaluate", "train_images_like",
]
