"""A matrix that builds on another: ``extends = "dh-table1-cpu"`` (a named matrix or a TOML path, relative to the
extending file) starts from that matrix and applies its own tables on top. Its cells that the other already has keep
their keys, so ``bench run`` trains only the new ones (records are found by key across the results folder).

Merging: an axis table (``[protections]`` …) adds its entries to the parent's, an entry of the same name replacing
the parent's; ``[recipe]`` and ``[layout]`` (and ``layout.labels``) merge key by key; ``[[exclude]]`` rules add
to the parent's; any other key replaces the parent's. ``name`` is never inherited: a matrix is named by its own
``name`` or its file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from bench.core.registry import ConfigError

AXES = ("datasets", "protections", "countermeasures", "victims")


def read_matrix_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The TOML document at ``path`` with its ``extends`` chain applied (a ConfigError naming the file on a cycle,
    an unknown parent or invalid TOML)."""
    from bench.plan.matrix import resolve_path

    if path.resolve() in seen:
        chain = " → ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"{path}: 'extends' makes a cycle ({chain}); remove one of the links")
    try:
        raw = tomllib.loads(path.read_bytes().decode())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at offset "
                          f"{err.start}); save the file as UTF-8") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or err}); check the path and its permissions") from err
    parent_name = raw.pop("extends", None)
    if parent_name is None:
        return raw
    if not isinstance(parent_name, str):
        raise ConfigError(f"{path}: key 'extends': expected a matrix name or a .toml path, got {parent_name!r}")
    relative = path.parent / parent_name
    try:
        parent_path = relative if relative.suffix == ".toml" and relative.is_file() else resolve_path(parent_name)
    except ConfigError as err:
        raise ConfigError(f"{path}: key 'extends': {err}") from err
    parent = read_matrix_toml(parent_path, (*seen, path.resolve()))
    parent.pop("name", None)
    try:
        return merge(parent, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def merge(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` applied on top of ``parent`` (see the module docstring)."""
    merged = dict(parent)
    for key, value in child.items():
        old = parent.get(key)
        if key in AXES and old is not None:
            merged[key] = {**_table(old, key), **_table(value, key)}
        elif key == "layout" and isinstance(old, dict) and isinstance(value, dict):
            merged[key] = {**old, **value, "labels": {**old.get("labels", {}), **value.get("labels", {})}}
        elif key == "recipe" and isinstance(old, dict) and isinstance(value, dict):
            merged[key] = {**old, **value}
        elif key == "exclude" and isinstance(old, list) and isinstance(value, list):
            merged[key] = [*old, *value]
        else:
            merged[key] = value
    return merged


def _table(value: Any, axis: str) -> dict[str, Any]:
    """An axis as a table of parameter tables (a list of names is the same as empty tables)."""
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return {name: {} for name in value}
    if not isinstance(value, dict):
        raise ConfigError(f"key {axis!r}: expected a table of components or a list of names, got {value!r}")
    return value
