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
import types
import typing
from pathlib import Path
from typing import Any

from bench.core.components import COUNTERMEASURES, PROTECTIONS, VICTIMS
from bench.core.registry import ConfigError, Registry
from bench.core.units import warn_small_budgets
from bench.data.datasets import DATASETS
from bench.data.mixes import MIXES
from bench.plan.extends import read_matrix_toml
from bench.plan.layout import LAYOUT_AXES, Layout
from bench.plan.recipes import make_recipe
from bench.report import references

MATRIX_DIR = Path(__file__).resolve().parents[1] / "matrices"
AXES: dict[str, Registry] = {"datasets": DATASETS, "protections": PROTECTIONS,
                             "countermeasures": COUNTERMEASURES, "victims": VICTIMS}
TOP_LEVEL = {"name", "description", "seeds", "poison_ratio", "mix", "recipe", "exclude", "layout", "reference",
             "cpu_alternative", *AXES}
CELL_KEYS = ("dataset", "protection", "countermeasure", "victim", "seed", "poison_ratio", "mix")


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
        return {"dataset": self.dataset.label, "protection": self.protection.label,
                "countermeasure": self.countermeasure.label, "victim": self.victim.label,
                "seed": str(self.seed), "poison_ratio": f"{self.poison_ratio:g}", "mix": self.mix}


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
            raise ConfigError(f"key {key!r}: unknown top-level key{_hint(key, TOP_LEVEL)} (allowed: {', '.join(sorted(TOP_LEVEL))})")
    axes = {}
    for axis, registry in AXES.items():
        if axis not in raw:
            raise ConfigError(f"key {axis!r}: missing; name at least one {registry.kind}")
        axes[axis] = tuple(_axis_choices(axis, raw[axis], registry))
    seeds = _scalar_list(raw.get("seeds", [0]), "seeds", int)
    ratios = _scalar_list(raw.get("poison_ratio", [1.0]), "poison_ratio", float)
    if any(not 0 < r <= 1 for r in ratios):
        raise ConfigError(f"key 'poison_ratio': every ratio must be in (0, 1], got {list(ratios)}")
    mixes = raw.get("mix", ["protected"])
    mixes = tuple(mixes) if isinstance(mixes, list) and mixes else (mixes,)
    for mix in mixes:
        if not isinstance(mix, str) or mix not in MIXES:
            raise ConfigError(f"key 'mix': unknown mix {mix!r}{_hint(str(mix), MIXES)}; known: "
                              + "; ".join(f"{k} = {v}" for k, v in MIXES.items()))
    recipe = dict(raw.get("recipe", {"name": "quick"}))
    recipe.setdefault("name", "quick")
    try:
        make_recipe(**recipe)
    except ConfigError as err:
        raise ConfigError(f"key 'recipe': {err}") from err
    exclude = []
    for i, rule in enumerate(raw.get("exclude", [])):
        for key in rule:
            if key not in CELL_KEYS:
                raise ConfigError(f"key 'exclude[{i}].{key}': unknown{_hint(key, CELL_KEYS)} (allowed: {', '.join(CELL_KEYS)})")
        exclude.append({k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in rule.items()})
    reference = raw.get("reference")
    if reference is not None and (not isinstance(reference, str) or reference not in references.TABLES):
        raise ConfigError(f"key 'reference': unknown table {reference!r}{_hint(str(reference), references.TABLES)} "
                          f"(tables: {', '.join(references.TABLES)}; leave the key out if it reproduces none)")
    matrix = Matrix(str(raw.get("name", default_name)), source, str(raw.get("description", "")), axes, seeds,
                    ratios, recipe, tuple(exclude), mixes, reference=reference,
                    cpu_alternative=_cpu_alternative(raw.get("cpu_alternative")))
    return dataclasses.replace(matrix, layout=_layout(raw["layout"], expand(matrix))) if "layout" in raw else matrix


def _cpu_alternative(name: Any) -> str | None:
    """The ``cpu_alternative`` key: None, or a named matrix of ``bench/matrices/``."""
    known = sorted(p.stem for p in MATRIX_DIR.glob("*.toml"))
    if name is not None and (not isinstance(name, str) or name not in known):
        raise ConfigError(f"key 'cpu_alternative': {name!r} is not a named matrix{_hint(str(name), known)} "
                          f"(named matrices: {', '.join(known)}; leave the key out if there is none)")
    return name


def expand(matrix: Matrix) -> list[Cell]:
    """Every cell of the matrix in a stable order, exclusions dropped (pure)."""
    cells = [Cell(d, p, c, v, s, r, m) for d, v, p, c, s, r, m in itertools.product(
        matrix.axes["datasets"], matrix.axes["victims"], matrix.axes["protections"], matrix.axes["countermeasures"],
        matrix.seeds, matrix.poison_ratios, matrix.mixes)]
    return [cell for cell in cells if not any(_matches(cell, rule) for rule in matrix.exclude)]


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """Keep cells matching every ``key=glob`` filter (``--only protection=cw*``)."""
    rules = []
    for item in only:
        key, sep, pattern = item.partition("=")
        if not sep or key not in CELL_KEYS:
            raise ConfigError(f"--only {item!r}: expected KEY=GLOB with KEY one of {', '.join(CELL_KEYS)}")
        rules.append({key: pattern})
    return [cell for cell in cells if all(_matches(cell, rule) for rule in rules)]


def _matches(cell: Cell, rule: dict[str, str]) -> bool:
    labels = cell.labels()
    return all(fnmatch.fnmatchcase(labels[key], pattern) for key, pattern in rule.items())


def _axis_choices(axis: str, value: Any, registry: Registry) -> list[Choice]:
    entries = {name: {} for name in value} if isinstance(value, list) else value
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


def _layout(raw: Any, cells: list[Cell]) -> Layout:
    """``Layout.parse``, and every ``labels`` key a label of the layout's axes in the expanded cells."""
    layout = Layout.parse(raw)
    known = {axis: list(dict.fromkeys(cell.labels()[axis] for cell in cells))
             for axis in LAYOUT_AXES if axis in layout.axes}
    for label in layout.labels:
        if not any(label in labels for labels in known.values()):
            listing = "; ".join(f"{axis}: {', '.join(labels) or '(no cells)'}" for axis, labels in known.items())
            raise ConfigError(f"key 'layout.labels': unknown label {label!r}{_hint(label, sum(known.values(), []))} "
                              f"(labels of the rows' and columns' axes in this matrix's cells: {listing})")
    return layout


def _is_sweep(cls: type, key: str, value: Any) -> bool:
    """A list is a sweep, except a flat list given to a tuple-typed parameter (a single value)."""
    if not isinstance(value, list):
        return False
    hint = typing.get_type_hints(cls).get(key)
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    tuple_typed = any(typing.get_origin(option) is tuple for option in options)  # also ``tuple[...] | None``
    return not tuple_typed or (bool(value) and all(isinstance(v, list) for v in value))


def _scalar_list(value: Any, key: str, kind: type) -> tuple:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"key {key!r}: expected a number or a non-empty list of numbers, got {value!r}")
    if kind is int and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"key {key!r}: expected integers, got {value!r}")
    return tuple(kind(v) for v in values)


def _hint(key: str, options: Any) -> str:
    close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""
