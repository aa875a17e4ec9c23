"""``bench show NAME``: everything about one component, named matrix or recipe (``KIND/NAME`` where kinds share a
name): docstring, parameters with types, defaults and units, capabilities, paper, version and the file it lives in."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import itertools

from bench.core.registry import ConfigError
from bench.core.units import units
from bench.report.catalog import (KINDS, RECIPES_FILE, SINGULAR, changes_text, defined_at, describe_capabilities,
                                  field_default, matrix_files, parameter_count, read_toml, registries, relative_path,
                                  unit_suffix)


def resolve(name: str) -> list[tuple[str, str]]:
    """The (kind, name) entries ``name`` picks: a ``.toml`` path, ``KIND/NAME``, or a bare name in any kind."""
    if name.endswith(".toml"):
        return [("matrices", name)]
    kind, sep, bare = name.partition("/")
    if sep:
        kind = next((k for k in KINDS if kind in (k, SINGULAR[k])), "")
        if not kind:
            raise ConfigError(f"{name!r}: unknown kind {name.partition('/')[0]!r}; write KIND/NAME with KIND one of "
                              f"{', '.join(KINDS)}")
        known = _names(kind)
        if bare not in known:
            close = difflib.get_close_matches(bare, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(f'{kind}/{c}' for c in close)}?" if close else ""
            raise ConfigError(f"unknown {SINGULAR[kind]} {bare!r}{hint} (`bench list {kind}` lists them)")
        return [(kind, bare)]
    found = [(kind, name) for kind in KINDS if name in _names(kind)]
    if not found:
        every = {f"{kind}/{n}": n for kind in KINDS for n in _names(kind)}
        close = [q for q, n in every.items() if n in difflib.get_close_matches(name, list(every.values()), 3, 0.5)]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown name {name!r}{hint} (`bench list` lists every component, matrix and recipe)")
    return found


def _names(kind: str) -> list[str]:
    if kind == "matrices":
        return list(matrix_files())
    if kind == "recipes":
        from bench.plan.recipes import RECIPES

        return list(RECIPES)
    return registries()[kind].names()


def show(name: str) -> str:
    """``bench show NAME``: everything about the entries ``name`` picks (all of them, and how to pick one,
    where a name is shared across kinds)."""
    found = resolve(name)
    pages = [show_matrix(n) if kind == "matrices" else show_recipe(n) if kind == "recipes" else
             show_component(kind, n) for kind, n in found]
    if len(found) > 1:
        picks = ", ".join(f"`bench show {kind}/{n}`" for kind, n in found)
        pages.insert(0, f"{name!r} names {len(found)} entries; each follows (show one with {picks})")
    return "\n\n".join(pages)


def show_component(kind: str, name: str) -> str:
    """A component's kind, version, file, paper, capabilities, parameters (types, defaults, units), docstring."""
    cls = registries()[kind].get(name)
    lines = [f"{kind}/{name} ({SINGULAR[kind]}, version {cls.version})", f"file: {defined_at(cls)}",
             f"follows: {cls.paper or '—'}"]
    if kind != "datasets":
        lines.append(f"capabilities: {describe_capabilities(cls)}")
    if kind == "victims" and (count := parameter_count(cls)) is not None:
        lines.append(f"model size at 3×32×32, 10 classes: {count:,} weights")
    fields = dataclasses.fields(cls)
    lines.append("parameters:" if fields else "parameters: none")
    lines += [f"  {f.name}: {f.type if isinstance(f.type, str) else getattr(f.type, '__name__', f.type)} = "
              f"{field_default(f)!r}{unit_suffix(cls, f.name)}" for f in fields]
    if units(cls):
        lines.append("  [1/255]: counted in 1/255 pixel steps (8 → 8/255 of the pixel range)")
    return "\n".join(lines + ["", inspect.cleandoc(cls.__doc__ or "(no docstring)")])


def show_matrix(name_or_path: str) -> str:
    """A matrix's file, description, recipe, cell count and axes (each variant with its non-default parameters)."""
    from bench.plan.matrix import expand, load_matrix, resolve_path

    path = resolve_path(name_or_path)
    matrix = load_matrix(str(path))
    raw, regs = read_toml(path), registries()
    recipe = dict(matrix.recipe)
    lines = [f"matrices/{matrix.name}", f"file: {relative_path(path)}", f"description: {matrix.description or '—'}",
             f"cells: {len(expand(matrix))}", f"recipe: {recipe.pop('name')}" + (f" ({changes_text(recipe.items())})"
                                                                                if recipe else ""),
             f"reference: {matrix.reference or '—'}; cpu_alternative: {matrix.cpu_alternative or '—'}",
             f"seeds: {list(matrix.seeds)}; poison_ratio: {list(matrix.poison_ratios)}; mix: {list(matrix.mixes)}"]
    for axis, choices in matrix.axes.items():
        lines.append(f"{axis} ({len(choices)}):")
        for choice in choices:
            defaults = {f.name: field_default(f) for f in dataclasses.fields(regs[axis].get(choice.name))}
            changed = [(k, v) for k, v in choice.params if v != defaults.get(k)]
            lines.append(f"  {choice.label}" + (f": {changes_text(changed)}" if changed else ""))
    lines += [f"exclude: {changes_text(rule.items())}" for rule in matrix.exclude]
    if "layout" in raw:
        lines.append(f"layout: {changes_text(raw['layout'].items())}")
    header = ["  " + line[1:].strip() for line in itertools.takewhile(lambda line: line.startswith("#"),
                                                                     path.read_text().splitlines())]
    return "\n".join(lines + (["notes (the file's header):", *header] if header else []))


def show_recipe(name: str) -> str:
    """Every field of a recipe."""
    from bench.plan.recipes import RECIPES

    recipe = RECIPES[name]
    lines = [f"recipes/{name}", f"file: {relative_path(RECIPES_FILE)}"]
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        if f.name == "victim_overrides":
            lines.append("victim_overrides:" + ("" if value else " none"))
            lines += [f"  {victim}: {changes_text(changes)}" for victim, changes in value]
        else:
            lines.append(f"{f.name}: {value!r}" if f.name != "source" else f"source: {value}")
    return "\n".join(lines)
