"""Declarative experiment matrices (TOML): validation and pure expansion into cells.

A matrix names datasets, protections, countermeasures and victims (each a table of parameters, or a list of
names), seeds, poison ratios, train-set mixes (``mix``, see ``MIXES``) and a recipe. A list-valued parameter is a swept axis
(``quality = [10, 50]`` → ``jpeg[quality=10]``, ``jpeg[quality=50]``); ``[[exclude]]`` tables drop cells
whose labels match all their globs. Expansion is ``itertools.product`` over the axes, as Hydra's sweeper.

An optional ``[layout]`` table shapes the leaderboards (``bench.report.leaderboard.Layout``; default DH Table I's):
``rows``, a list of axes among protection, countermeasure and victim (default ``["protection"]``; several
join their labels with `` · ``); ``columns``, one of them not in rows (default ``"countermeasure"``);
``labels``, names shown for component labels of those axes (``{ none = "Normal" }``; each must be a label of
the matrix's cells); ``summary``, whether Mean and Max columns follow (default true). The axes it uses leave
the grouping into tables: ``columns = "victim"`` puts every victim in one table.

An optional top-level ``reference = "dh-table1"`` names the published table the matrix reproduces (a name in
``bench.report.references.TABLES``): ``bench leaderboard --compare paper`` sets its cells beside the paper's, joined on
the shown labels (``bench.report.compare``). An optional ``cpu_alternative = "full-cpu"`` names the matrix in
``bench/matrices/`` that ``bench run`` suggests when this one is estimated too long for a CPU (``bench.plan.estimate``).
An optional ``extends = "<matrix>"`` builds on another matrix (``bench.plan.extends``).
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import itertools
import math
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.core.components import COUNTERMEASURES, PROTECTIONS, VICTIMS
from bench.core.registry import ConfigError, Registry, param_hints
from bench.core.units import warn_small_budgets
from bench.data.datasets import DATASETS
from bench.data.mixes import MIXES
from bench.plan.extends import read_matrix_toml
from bench.plan.layout import Layout
from bench.plan.recipes import make_recipe
from bench.plan.validate import MATRIX_DIR, cpu_alternative, hint, layout, matrix_name, no_match, scalar_list, seeds
from bench.report import references

AXES: dict[str, Registry] = {"datasets": DATASETS, "protections": PROTECTIONS,
                             "countermeasures": COUNTERMEASURES, "victims": VICTIMS}
TOP_LEVEL = {"name", "description", "seeds", "poison_ratio", "mix", "recipe", "exclude", "layout", "reference",
             "cpu_alternative", *AXES}
CELL_KEYS = ("dataset", "protection", "countermeasure", "victim", "seed", "poison_ratio", "mix")
AXIS_KEYS = tuple((key, f"{key}s") for key in CELL_KEYS[:4])  # cell key → its component axis


@dataclasses.dataclass(frozen=True)
class Choice:
    """One concrete component of a cell: registered name, full parameters, and its label in tables."""

    name: str
    params: tuple[tuple[str, Any], ...]
    label: str

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One experiment: a victim trained on a dataset's protected, countermeasured train set."""

    dataset: Choice
    protection: Choice
    countermeasure: Choice
    victim: Choice
    seed: int
    poison_ratio: float
    mix: str = "protected"

    def labels(self) -> dict[str, str]:
        return {key: label_of(key, getattr(self, key)) for key in CELL_KEYS}


def label_of(key: str, value: Any) -> str:
    """The label of one value of a cell's ``key`` (as ``Cell.labels`` gives it, and filters match)."""
    return value.label if isinstance(value, Choice) else f"{value:g}" if key == "poison_ratio" else str(value)


@dataclasses.dataclass(frozen=True)
class Matrix:
    """A validated matrix: the axes' variants, seeds, poison ratios, recipe, exclusions, mixes, table layout."""

    name: str
    source: str
    description: str
    axes: dict[str, tuple[Choice, ...]]
    seeds: tuple[int, ...]
    poison_ratios: tuple[float, ...]
    recipe: dict[str, Any]
    exclude: tuple[dict[str, str], ...]
    mixes: tuple[str, ...] = ("protected",)
    layout: Layout = Layout()
    reference: str | None = None  # the published table it reproduces (bench.report.references.TABLES)
    cpu_alternative: str | None = None  # the named matrix sized for a CPU (bench.plan.estimate)


def axis_values(matrix: Matrix) -> dict[str, tuple]:
    """Cell key (``CELL_KEYS``) → the matrix's values along it."""
    return {**{key: matrix.axes[axis] for key, axis in AXIS_KEYS}, "seed": matrix.seeds,
            "poison_ratio": matrix.poison_ratios, "mix": matrix.mixes}


def resolved(matrix: Matrix, cells: list[str]) -> dict[str, Any]:
    """The matrix as ``runs/<matrix>/matrix.json`` saves it: every variant's full parameters, the layout, the
    reference, and the keys of its ``cells``."""
    return {"name": matrix.name, "source": matrix.source, "description": matrix.description, "seeds": matrix.seeds,
            "poison_ratio": matrix.poison_ratios, "mix": matrix.mixes, "recipe": matrix.recipe,
            "exclude": matrix.exclude, "layout": dataclasses.asdict(matrix.layout), "reference": matrix.reference,
            "axes": {axis: [{"label": c.label, "name": c.name, "params": c.kwargs} for c in choices]
                     for axis, choices in matrix.axes.items()}, "cells": cells}


def resolve_path(name_or_path: str) -> Path:
    """A matrix name in ``bench/matrices/`` or a path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"matrix file {path} does not exist")
        return path
    named = MATRIX_DIR / f"{name_or_path}.toml"
    if not named.is_file():
        known = sorted(p.stem for p in MATRIX_DIR.glob("*.toml"))
        close = difflib.get_close_matches(name_or_path, known, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"unknown matrix {name_or_path!r}{hint} (named matrices: {', '.join(known)}; or give a .toml path)")
    return named


def load_matrix(name_or_path: str) -> Matrix:
    """Read and validate a matrix; every error names the file and the key, and nothing has run yet."""
    path = resolve_path(name_or_path)
    raw = read_matrix_toml(path)
    try:
        return parse_matrix(raw, path.stem, str(path))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def parse_matrix(raw: dict[str, Any], default_name: str, source: str = "<dict>") -> Matrix:
    """Validate a parsed TOML document into a Matrix (pure; used by ``load_matrix`` and tests)."""
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(f"key {key!r}: unknown top-level key{hint(key, TOP_LEVEL)} (allowed: {', '.join(sorted(TOP_LEVEL))})")
    axes = {}
    for axis, registry in AXES.items():
        if axis not in raw:
            raise ConfigError(f"key {axis!r}: missing; name at least one {registry.kind}")
        axes[axis] = tuple(_axis_choices(axis, raw[axis], registry))
    ratios = scalar_list(raw.get("poison_ratio", [1.0]), "poison_ratio", float)
    if any(not 0 < r <= 1 for r in ratios):
        raise ConfigError(f"key 'poison_ratio': every ratio must be in (0, 1], got {list(ratios)}")
    mixes = raw.get("mix", ["protected"])
    mixes = tuple(mixes) if isinstance(mixes, list) and mixes else (mixes,)
    for mix in mixes:
        if not isinstance(mix, str) or mix not in MIXES:
            raise ConfigError(f"key 'mix': unknown mix {mix!r}{hint(str(mix), MIXES)}; known: "
                              + "; ".join(f"{k} = {v}" for k, v in MIXES.items()))
    recipe = raw.get("recipe", {"name": "quick"})
    if not isinstance(recipe, dict):
        raise ConfigError(f"key 'recipe': expected a table, got {recipe!r}; write [recipe] with name = "
                          f"{recipe if isinstance(recipe, str) else 'quick'!r} (and any field to change)")
    recipe = {"name": "quick", **recipe}
    try:
        make_recipe(**recipe)
    except ConfigError as err:
        raise ConfigError(f"key 'recipe': {err}") from err
    exclude = []
    rules = raw.get("exclude", [])
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ConfigError(f"key 'exclude': expected [[exclude]] tables of KEY = GLOB, got {rules!r}")
    for i, rule in enumerate(rules):
        for key in rule:
            if key not in CELL_KEYS:
                raise ConfigError(f"key 'exclude[{i}].{key}': unknown{hint(key, CELL_KEYS)} (allowed: {', '.join(CELL_KEYS)})")
        exclude.append({k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in rule.items()})
    reference = raw.get("reference")
    if reference is not None and (not isinstance(reference, str) or reference not in references.TABLES):
        raise ConfigError(f"key 'reference': unknown table {reference!r}{hint(str(reference), references.TABLES)} "
                          f"(tables: {', '.join(references.TABLES)}; leave the key out if it reproduces none)")
    matrix = Matrix(matrix_name(raw.get("name"), default_name), source, str(raw.get("description", "")), axes,
                    seeds(raw.get("seeds", [0])), ratios, recipe, tuple(exclude), mixes, reference=reference,
                    cpu_alternative=cpu_alternative(raw.get("cpu_alternative")))
    if "layout" not in raw:
        return matrix
    return dataclasses.replace(matrix, layout=layout(raw["layout"], (cell.labels() for cell in cells_of(matrix))))



def expand(matrix: Matrix) -> list[Cell]:
    """Every cell of the matrix in a stable order, exclusions dropped (pure)."""
    return list(cells_of(matrix))


def cells_of(matrix: Matrix) -> Iterator[Cell]:
    """``expand``, one cell at a time."""
    for d, v, p, c, s, r, m in itertools.product(
            matrix.axes["datasets"], matrix.axes["victims"], matrix.axes["protections"],
            matrix.axes["countermeasures"], matrix.seeds, matrix.poison_ratios, matrix.mixes):
        cell = Cell(d, p, c, v, s, r, m)
        if not any(_matches(cell, rule) for rule in matrix.exclude):
            yield cell


def filters(items: list[str], flag: str = "--only") -> list[tuple[str, str]]:
    """``KEY=GLOB`` cell filters as (key, glob) pairs; a ConfigError naming ``flag`` for a bad one."""
    rules = []
    for item in items:
        key, sep, pattern = item.partition("=")
        if not sep or key not in CELL_KEYS:
            raise ConfigError(f"{flag} {item!r}: expected KEY=GLOB with KEY one of {', '.join(CELL_KEYS)}")
        rules.append((key, pattern))
    return rules


def select(cells: list[Cell], only: list[str], flag: str = "--only") -> list[Cell]:
    """Keep cells matching every ``key=glob`` filter (``--only protection=cw*``); a ConfigError naming the filters
    and the labels there are where they keep none of ``cells``."""
    rules = filters(only, flag)
    kept = [cell for cell in cells if all(_matches(cell, {k: p}) for k, p in rules)]
    if cells and rules and not kept:
        key = next((k for k, p in rules if not any(_matches(c, {k: p}) for c in cells)), rules[-1][0])
        raise no_match(flag, [f"{k}={p}" for k, p in rules], key, (c.labels()[key] for c in cells))
    return kept


def narrow(matrix: Matrix, only: list[str]) -> Matrix:
    """The matrix with each axis reduced to the values that ``only`` keeps (``--only``): its cells are
    ``select(expand(matrix), only)``, and the cells dropped are never made. A ConfigError where an axis keeps none."""
    rules, kept = filters(only), {}
    for key, values in axis_values(matrix).items():
        patterns = [p for k, p in rules if k == key]
        kept[key] = tuple(v for v in values if all(fnmatch.fnmatchcase(label_of(key, v), p) for p in patterns))
        if not kept[key]:
            raise no_match("--only", [f"{key}={p}" for p in patterns], key, (label_of(key, v) for v in values))
    return dataclasses.replace(matrix, axes={axis: kept[key] for key, axis in AXIS_KEYS}, seeds=kept["seed"],
                               poison_ratios=kept["poison_ratio"], mixes=kept["mix"])


def size(matrix: Matrix) -> int:
    """The matrix's cells before its ``[[exclude]]`` rules (an upper bound, known without expanding)."""
    return math.prod(len(values) for values in axis_values(matrix).values())


def _matches(cell: Cell, rule: dict[str, str]) -> bool:
    labels = cell.labels()
    return all(fnmatch.fnmatchcase(labels[key], pattern) for key, pattern in rule.items())


def _axis_choices(axis: str, value: Any, registry: Registry) -> list[Choice]:
    names = isinstance(value, list) and all(isinstance(name, str) for name in value)
    entries = {name: {} for name in value} if names else value
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"key {axis!r}: expected a non-empty list of names or a table of parameter tables")
    choices = []
    for name, params in entries.items():
        where = f"{axis}.{name}"
        if not isinstance(name, str) or not isinstance(params, dict):
            raise ConfigError(f"key {where!r}: expected a table of parameters, got {params!r}")
        try:
            cls = registry.get(name)
            swept = {k: v for k, v in params.items() if _is_sweep(cls, k, v)}
            for key, values in swept.items():
                if not values:
                    raise ConfigError(f"parameter {key!r} sweeps an empty list")
            for combo in itertools.product(*swept.values()):
                chosen = {**params, **dict(zip(swept, combo))}
                component = registry.create(name, **chosen)
                warn_small_budgets(component, where)  # ε = 0.031 (8/255 in [0, 1] units) runs, almost unperturbed
                suffix = ",".join(f"{k}={v}" for k, v in zip(swept, combo))
                # a tuple parameter (dvae's kl_targets) stays a tuple: cells are hashable
                params_of = {f.name: getattr(component, f.name) for f in dataclasses.fields(component)}
                choices.append(Choice(name, tuple(sorted(params_of.items())),
                                      f"{name}[{suffix}]" if suffix else name))
        except ConfigError as err:
            raise ConfigError(f"key {where!r}: {err}") from err
    return choices



def _is_sweep(cls: type, key: str, value: Any) -> bool:
    """A list is a sweep, except a flat list given to a tuple-typed parameter (a single value)."""
    if not isinstance(value, list):
        return False
    declared = param_hints(cls).get(key)
    options = typing.get_args(declared) if typing.get_origin(declared) in (typing.Union, types.UnionType) else (declared,)
    tuple_typed = any(typing.get_origin(option) is tuple for option in options)  # also ``tuple[...] | None``
    return not tuple_typed or (bool(value) and all(isinstance(v, list) for v in value))
