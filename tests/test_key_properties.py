"""Cache keys hold exactly what determines a stage's output, for every registered component (issue 39).

Planned without running (``plan_cell``; a dataset's key as the planner gives it before loading, ``known_dataset_key``):
each parameter of each built-in protection, countermeasure, victim and dataset, each recipe field and the seed is
changed alone to another valid value, and the keys it should change must change while the others stay:

* protection parameter → protection, purification and cell keys;
* dataset parameter, seed → all three;
* countermeasure parameter → cell key, and the purification key of a data-stage one; never the protection key;
* victim parameter, recipe field → cell key only.

The parameters a component declares out of its key (``NOT_IN_KEY``: where files live) must change no key. A
parameter for which no other valid value can be derived is skipped and listed, with why (``SKIPS``, printed).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.core.components import COUNTERMEASURES, DATA, PROTECTIONS, VICTIMS
from bench.core.registry import ConfigError, param_hints
from bench.data.datasets import DATASETS
from bench.plan.matrix import Cell, Choice
from bench.plan.planner import crafting, known_dataset_key, plan_cell, prepare_dataset
from bench.plan.recipes import Recipe, make_recipe
from bench.store.cache import Cache
from bench.store.keys import RECIPE_PROSE

BOGUS = "no-such-value"
EMPTY_CACHE = Cache(Path("/nonexistent/bench-key-properties"))  # nothing cached: keys as planned before loading
REGISTRIES = {"protection": PROTECTIONS, "countermeasure": COUNTERMEASURES, "victim": VICTIMS, "dataset": DATASETS}
# the base cell: digits, a seeded protection, a data-stage countermeasure (so a purification key exists), cnn
BASE = {"dataset": ("digits", {"per_class": 4}), "protection": ("random_noise", {}), "countermeasure": ("jpeg", {}),
        "victim": ("cnn", {})}
# parameters the component itself leaves out of its spec (``spec()`` overrides): where a model is kept
NOT_IN_KEY = {("countermeasure", "diffpure", "cache"), ("countermeasure", "eclipse", "cache")}
# parameters whose key is not their value, tested elsewhere or not derivable here
KNOWN_SKIPS = {("protection", "external", "path"): "its key is the source file's sha256 (spec()), not the path: "
                                                    "needs files (test_external)"}
SKIPS: dict[str, str] = {}  # filled while collecting, printed by test_skip_list_is_small_and_explained


def choice(name: str, **params: Any) -> Choice:
    return Choice(name, tuple(sorted(params.items())), name)


def cell_of(seed: int = 0, ratio: float = 1.0, **parts: tuple[str, dict[str, Any]]) -> Cell:
    axes = {key: choice(name, **params) for key, (name, params) in {**BASE, **parts}.items()}
    return Cell(axes["dataset"], axes["protection"], axes["countermeasure"], axes["victim"], seed, ratio)


def plan(cell: Cell, recipe: dict[str, Any] | None = None) -> tuple[str | None, str | None, str]:
    """(protection key, purification key, cell key) of ``cell`` as the planner makes them."""
    keys = {d: known_dataset_key(EMPTY_CACHE, d).key for d in (cell.dataset, crafting(cell.dataset)) if d}
    planned = plan_cell(cell, keys, recipe or {"name": "quick"})
    return planned.protection_key, planned.purify_key, planned.cell_key


# -- other valid values of a parameter ---------------------------------------------------------------------------

def _kinds(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(hint) if a is not type(None))
    return (hint,)


def _named_in(message: str) -> list[str]:
    """The values a rejection names: quoted ones, 'one of a, b', and '(a, b, c)' lists."""
    found = re.findall(r"'([^'\s]+)'", message)
    for listed in re.findall(r"(?:one of|known:) ([\w\-]+(?:, [\w\-]+)+)", message) + re.findall(r"\((?:\w+: )?([\w\-]+(?:, [\w\-]+)+)\)", message):
        found += listed.split(", ")
    return found


def candidates(registry: Any, name: str, field: str, default: Any, hint: Any, test_params: dict[str, Any]) -> list[Any]:
    """Values to try for ``field`` other than ``default``, most plausible first."""
    out = [test_params[field]] if field in test_params else []
    kinds = _kinds(hint)
    if bool in kinds:
        out.append(not default)
    elif int in kinds:
        out += [1, 2, 8] if default is None else [default + 1, default + 2, default * 2, default - 1]
    elif float in kinds:
        out += [0.5, 0.25, 2.0] if default is None else [default * 2 or 0.5, default / 2, default + 1, 0.5]
    elif str in kinds and registry is not None:
        try:
            registry.create(name, **{field: BOGUS})
        except ConfigError as err:
            out += _named_in(str(err))
    elif typing.get_origin(kinds[0]) is tuple:
        inner = typing.get_args(kinds[0])[0]
        if inner in (int, float):
            out += [(inner(1),), (inner(2),)] if not default else [(*default[:-1], default[-1] * 2), (*default, default[-1] * 2)]
    return [v for v in out if v != default and v != BOGUS]


def variations(kind: str) -> list[Any]:
    """pytest params (kind, name, base params, field, value) for every identity parameter of every built-in of ``kind``."""
    registry, out = REGISTRIES[kind], []
    for name in registry.names(builtin=True):
        cls = registry.get(name)
        test_params = dict(getattr(cls, "test_params", {}))
        bases = [{}, test_params] + ([{"per_class": 4}] if kind == "dataset" else [])
        for field in dataclasses.fields(cls):
            where = f"{kind} {name}.{field.name}"
            if (kind, name, field.name) in NOT_IN_KEY or field.metadata.get("location"):
                continue
            if (kind, name, field.name) in KNOWN_SKIPS:
                SKIPS[where] = KNOWN_SKIPS[kind, name, field.name]
                continue
            found = _first_valid(kind, name, field, bases, test_params)
            if isinstance(found, str):
                SKIPS[where] = found
            else:
                out.append(pytest.param(kind, name, *found, id=f"{kind}-{name}-{field.name}"))
    return out


def _first_valid(kind: str, name: str, field: dataclasses.Field, bases: list[dict], test_params: dict) -> Any:
    """(base, field, value) of the first value that builds and plans, else why none did. A refusal's message teaches
    more values (``size must be one of 28, 64``) and the setting a value goes with (``is for mode = 'sample'``)."""
    registry, hint = REGISTRIES[kind], param_hints(REGISTRIES[kind].get(name))[field.name]
    last, bases = "no documented set of values (a free-form string or path) nor a test_params value", list(bases)
    for base in bases:
        base = {k: v for k, v in base.items() if k != field.name}
        if not _valid(registry, name, base):
            continue
        default = getattr(registry.create(name, **base), field.name)
        values = candidates(registry, name, field.name, default, hint, test_params)
        for value in values:
            try:
                plan(cell_of(**{kind: (name, base)}))
                registry.create(name, **{**base, field.name: value})
                plan(cell_of(**{kind: (name, {**base, field.name: value})}))
            except ConfigError as err:
                last = f"{value!r} refused: {str(err)[:120]}"
                kinds = _kinds(hint)
                learnt = [int(n) for n in re.findall(r"\b\d+\b", str(err))] if int in kinds else \
                    _named_in(str(err)) if str in kinds else []
                # sorted: a message may list a set, whose order changes with the hash seed
                values += [v for v in sorted(set(learnt), key=str) if v != default and v not in values][:40]
                for key, setting in sorted(set(re.findall(r"(\w+) ?= ?'([^']*)'", str(err)))):
                    setting = {"<dataset>": "digits"}.get(setting, setting)
                    if key != field.name and not setting.startswith("<") and len(bases) < 8:
                        bases.append({**base, key: setting})
                continue
            return base, field.name, value
    return last


def _valid(registry: Any, name: str, params: dict) -> bool:
    try:
        registry.create(name, **params)
    except ConfigError:
        return False
    return True


# what each kind of change must change: (protection key, purification key, cell key); None: the countermeasure's stage
CHANGES = {"protection": (True, True, True), "dataset": (True, True, True), "countermeasure": (False, None, True),
           "victim": (False, False, True)}


@pytest.mark.parametrize("kind, name, base, field, value", [p for k in CHANGES for p in variations(k)])
def test_each_parameter_changes_exactly_its_keys(kind, name, base, field, value):
    before = plan(cell_of(**{kind: (name, base)}))
    after = plan(cell_of(**{kind: (name, {**base, field: value})}))
    should = list(CHANGES[kind])
    if kind == "countermeasure":
        should[1] = DATA in COUNTERMEASURES.get(name).stages
    for what, old, new, changes in zip(("protection", "purify", "cell"), before, after, should):
        if old is None and new is None:  # no such stage in this cell (an identity protection, a train-stage countermeasure)
            continue
        assert (old != new) == changes, f"{kind} {name}: {field} {base.get(field)!r} → {value!r}: the {what} key " \
                                        f"{'did not change' if changes else 'changed'}"


@pytest.mark.parametrize("kind, name, field", sorted(NOT_IN_KEY) + [
    ("dataset", name, f.name) for name in DATASETS.names(builtin=True) for f in dataclasses.fields(DATASETS.get(name))
    if f.metadata.get("location")])
def test_where_files_live_changes_no_key(kind, name, field):
    hint = param_hints(REGISTRIES[kind].get(name))[field]
    value = "/elsewhere/bench" if str in _kinds(hint) else not getattr(REGISTRIES[kind].get(name)(), field)
    base = {"per_class": 4} if kind == "dataset" else {}
    assert plan(cell_of(**{kind: (name, base)})) == plan(cell_of(**{kind: (name, {**base, field: value})}))


def recipe_variations() -> list[Any]:
    out = []
    for field in dataclasses.fields(Recipe):
        if field.name in RECIPE_PROSE:
            continue
        default, hint = getattr(Recipe(), field.name), param_hints(Recipe)[field.name]
        values = [c for c in Recipe.choices.get(field.name, ()) if c != default] or candidates(
            None, "", field.name, default, hint, {})
        for value in values:
            try:
                make_recipe("quick", **{field.name: value})
            except ConfigError:
                continue
            out.append(pytest.param(field.name, value, id=f"recipe-{field.name}"))
            break
        else:
            SKIPS[f"recipe {field.name}"] = "no valid other value"
    return out


@pytest.mark.parametrize("field, value", recipe_variations())
def test_each_recipe_field_changes_the_cell_key_only(field, value):
    protected, purified, cell = plan(cell_of())
    new = plan(cell_of(), {"name": "quick", field: value})
    assert new[:2] == (protected, purified), f"recipe {field} = {value!r} changed a data key"
    assert new[2] != cell, f"recipe {field} = {value!r} kept the cell key"


def test_a_recipes_dataset_table_changes_only_its_datasets_cells():
    plain = plan(cell_of())
    assert plan(cell_of(), {"name": "quick", "datasets": {"cifar10": {"epochs": 3}}}) == plain
    mine = plan(cell_of(), {"name": "quick", "datasets": {"digits": {"epochs": 3}}})
    assert mine[:2] == plain[:2] and mine[2] != plain[2]


def test_seed_and_poison_ratio_change_their_keys():
    base = plan(cell_of())
    seeded = plan(cell_of(seed=1))
    assert all(a != b for a, b in zip(base, seeded)), "a seed must change the protected, purified and cell keys"
    halved = plan(cell_of(ratio=0.5))
    assert halved[0] == base[0] and halved[1] != base[1] and halved[2] != base[2]


def test_labels_change_no_key():
    cell = cell_of()
    relabelled = dataclasses.replace(cell, protection=Choice("random_noise", (), "rn-table-row"),
                                     victim=Choice("cnn", (), "the plain CNN"))
    assert plan(cell) == plan(relabelled)


def test_skip_list_is_small_and_explained():
    print("\n".join(f"skipped {where}: {why}" for where, why in sorted(SKIPS.items())))
    assert len(SKIPS) <= 9, SKIPS  # 9 at writing: paths, free-form strings, weights a victim has none of
    assert all(why for why in SKIPS.values())


def test_two_seeds_of_random_noise_make_two_protected_sets(tmp_path):
    """End to end through the protect stage (K01): each seed its own key, its own entry, its own noise."""
    from bench.execute.stages import ProtectJob, protect_job

    cache = Cache(tmp_path)
    cells = [cell_of(seed=s) for s in (0, 1)]
    dataset_key = prepare_dataset(cache, cells[0].dataset)
    plans = [plan_cell(c, {c.dataset: dataset_key}, {"name": "quick"}) for c in cells]
    for c, p in zip(cells, plans):
        protect_job(ProtectJob(tmp_path, 1, p.protection_key, dataset_key, c.protection, c.seed, None), torch.device("cpu"))
    entries = sorted(k for k, _ in cache.entries("protected"))
    assert len(entries) == 2, entries
    first, second = (cache.load("protected", p.protection_key).images for p in plans)
    assert not torch.equal(first, second)
