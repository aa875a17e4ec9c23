"""Content keys, the one place their formulas live: dataset key → protection key → purification key → cell key.

A key is a hash of canonical JSON holding exactly what determines a stage's output: the data's fingerprint, each
component's ``spec()`` (name, ``version``, parameters, and a plugin's code fingerprint), the seed, the train-set mix
and the training recipe's settings; never prose (a recipe's name or description) nor where files live. The planner
computes them for new cells and ``bench.store.records.upgrade`` recomputes them for records of an older schema.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Recipe fields that describe rather than determine training: renaming or rewording a recipe keeps its results.
RECIPE_PROSE = ("name", "source", "victim_overrides", "dataset_overrides")  # overrides: applied to the cell's recipe


def make_key(spec: Any) -> str:
    """A 24-hex-digit content key of a JSON-serialisable spec (key order does not matter)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def protection_key(dataset_key: str, protection: dict[str, Any], seed: int, fitted_on: float | None) -> str:
    """The protected set's key: the clean data, the protection's spec, the seed, and the ratio of each class it
    was fitted on where not the whole set (``bench.data.mixes.fitted_on``)."""
    return make_key({"dataset": dataset_key, "protection": protection, "seed": seed,
                     **({"fitted_on": fitted_on} if fitted_on is not None else {})})


def train_source(dataset_key: str, protection_key: str | None, poison_ratio: float, seed: int, mix: str,
                 unused_protection: dict[str, Any] | None) -> dict[str, Any]:
    """What a cell's train set is assembled from (shared by the purification and cell keys). ``clean_only`` uses no
    protection, yet each row of a table is its own cell: its ``unused_protection`` spec keeps them apart."""
    return {"dataset": dataset_key, "protection": protection_key, "poison_ratio": poison_ratio, "seed": seed,
            **({"mix": mix} if mix != "protected" else {}),
            **({"unused_protection": unused_protection} if unused_protection is not None else {})}


def purify_key(source: dict[str, Any], countermeasure: dict[str, Any]) -> str:
    """The purified set's key: its train source and the data-stage countermeasure's spec."""
    return make_key({**source, "countermeasure": countermeasure})


def recipe_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    """The fields of a victim's resolved recipe (``Recipe.for_dataset(…).for_victim(…)``, as a dict) that determine its training."""
    return {k: v for k, v in recipe.items() if k not in RECIPE_PROSE}


def cell_key(source: dict[str, Any], countermeasure: dict[str, Any], victim: dict[str, Any],
             recipe: dict[str, Any]) -> str:
    """A cell's key: its train source, countermeasure and victim specs, and the victim's recipe settings."""
    return make_key({**source, "countermeasure": countermeasure, "victim": victim,
                     "recipe": recipe_settings(recipe)})
