"""What bench knows, for ``bench list`` and ``bench show``: components, named matrices and recipes.

Listing stays cheap: components are imported (and with them torch), but nothing that trains, plots or reads
records, and named matrices are read as plain TOML; ``bench show MATRIX`` validates one and counts its cells.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import tomllib
from pathlib import Path
from typing import Any

from bench.core.registry import ConfigError, Registry, describe_params
from bench.core.units import units

COMPONENT_KINDS = ("protections", "countermeasures", "victims", "datasets")
KINDS = (*COMPONENT_KINDS, "matrices", "recipes")
TABLE_HEADER = "| kind | name | parameters (defaults) | capabilities | follows |"
SINGULAR = {"protections": "protection", "countermeasures": "countermeasure", "victims": "victim",
            "datasets": "dataset", "matrices": "matrix", "recipes": "recipe"}
# the folder of bench.plan.matrix.MATRIX_DIR, not imported from there: that module loads pandas for its layouts
MATRIX_DIR = Path(__file__).resolve().parents[1] / "matrices"
RECIPES_FILE = Path(__file__).resolve().parents[1] / "plan" / "recipes.py"


def registries() -> dict[str, Registry]:
    """The component registries by kind (importing them discovers every plugin)."""
    from bench.core.components import COUNTERMEASURES, PROTECTIONS, VICTIMS
    from bench.data.datasets import DATASETS

    return {"protections": PROTECTIONS, "countermeasures": COUNTERMEASURES, "victims": VICTIMS,
            "datasets": DATASETS}


def describe_capabilities(cls: type) -> str:
    """One line of what a component declares it needs and offers (``bench.core.components``)."""
    caps = cls.capabilities()
    parts = [f"stages: {'+'.join(caps['stages']) or 'none'}"] if "stages" in caps else []
    parts.append("needs labels" if caps["needs_labels"] else "no labels")
    if caps["surrogate_param"]:
        default = {f.name: f.default for f in dataclasses.fields(cls)}[caps["surrogate_param"]]
        parts.append(f"trains a surrogate victim (parameter {caps['surrogate_param']}, default {default})")
    if caps["pretrained"]:
        parts.append(f"pretrained weights: {', '.join(caps['pretrained'])}")
    if caps["fits"]:
        parts.append(f"fits models: {', '.join(caps['fits'])}")
    if caps.get("encrypts_unseen"):
        parts.append("encrypts unseen images " + ("for their labels" if caps["encrypt_needs_labels"] else
                                                  "without labels") + " (ood mix, bench protect)")
    if caps.get("needs_models"):
        parts.append(f"needs the protection's models: {', '.join(caps['needs_models'])}")
    if caps.get("uses_models"):
        parts.append(f"uses the protection's models where it fits them: {', '.join(caps['uses_models'])}")
    if caps.get("needs_attacker"):
        parts.append("adaptive attacker (natural images and the protection to run)")
    if caps.get("returns_subset"):
        parts.append("trains the victim on part of the train set")
    if caps.get("reports") == "best":
        parts.append("reports the best epoch")
    if caps.get("keeps_images"):
        parts.append("its data stage only fits models (images unchanged)")
    if "train" in caps.get("stages", ()) and not caps.get("hooks_draw", True):
        parts.append("train hooks draw no randomness")
    if caps["expensive_on_cpu"]:
        parts.append("expensive on CPU")
    return "; ".join(parts)


def component_table(registries: dict, kinds: list[str]) -> str:
    """The README's Markdown table of bench's own components (no plugin's): kind, name, parameters with defaults,
    capabilities, the paper each follows."""
    lines = [TABLE_HEADER, "|---|---|---|---|---|"]
    for kind in kinds:
        for name in registries[kind].names(builtin=True):
            cls = registries[kind].get(name)
            caps = describe_capabilities(cls) if kind != "datasets" else "—"
            lines.append(f"| {kind[:-1]} | `{name}` | {describe_params(cls) or '—'} | {caps} | {cls.paper or '—'} |")
    return "\n".join(lines)


def update_readme(path: Path, table: str) -> bool:
    """Replace the component table in the Markdown file at ``path`` (from its header line to the next blank line) with
    ``table``, atomically; whether it changed. A ConfigError where the file has no such table."""
    text = path.read_text()
    start = text.find(TABLE_HEADER)
    if start < 0:
        raise ConfigError(f"{path} has no component table (a line starting {TABLE_HEADER!r}) to update")
    end = text.find("\n\n", start)
    new = text[:start] + table + (text[end:] if end >= 0 else "\n")
    if new == text:
        return False
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(new)
    os.replace(tmp, path)
    return True


def listing(kind: str) -> str:
    """``bench list KIND``: every entry of one kind of ``KINDS``, a few lines each."""
    if kind == "matrices":
        return list_matrices()
    if kind == "recipes":
        return list_recipes()
    registry, lines = registries()[kind], [f"{kind}:"]
    for name in registry.names():
        cls = registry.get(name)
        params = ", ".join(f"{f.name}={field_default(f)!r}{unit_suffix(cls, f.name)}" for f in dataclasses.fields(cls))
        lines += [f"  {name}: {params or '(no parameters)'}", f"      follows: {cls.paper or '—'}"]
        if kind != "datasets":
            lines.append(f"      capabilities: {describe_capabilities(cls)}")
        if kind == "victims" and (count := parameter_count(cls)) is not None:
            lines.append(f"      parameters at 3×32×32, 10 classes: {count:,}")
    return "\n".join(lines)


def parameter_count(cls: type) -> int | None:
    """A victim's number of weights at 3×32×32 and 10 classes (None: one built from a protection's models), built
    on the meta device: no memory, no initialisation (every victim in 0.07 s; real builds took 0.4 s)."""
    if cls.needs_models:
        return None
    import torch

    try:
        with torch.device("meta"):
            model = cls().build(10, 3, 32)
    except Exception:  # e.g. a plugin victim that loads weights or reads a tensor's value while building
        model = cls().build(10, 3, 32)
    return sum(p.numel() for p in model.parameters())


def matrix_files() -> dict[str, Path]:
    """Named matrix → its file in ``bench/matrices/``."""
    return {path.stem: path for path in sorted(MATRIX_DIR.glob("*.toml"))}


def read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}; fix the file") from err


def list_matrices() -> str:
    """``bench list matrices``: each named matrix's description, recipe, reference table and CPU alternative."""
    lines = [f"matrices ({relative_path(MATRIX_DIR)}/; `bench show NAME` validates one and counts its cells):"]
    for name, path in matrix_files().items():
        raw = read_toml(path)
        recipe = raw.get("recipe", {}).get("name", "quick") if isinstance(raw.get("recipe"), dict) else "quick"
        lines += [f"  {name}: {raw.get('description') or '—'}",
                  f"      recipe: {recipe}; reference: {raw.get('reference') or '—'}; "
                  f"cpu_alternative: {raw.get('cpu_alternative') or '—'}"]
    return "\n".join(lines)


def list_recipes() -> str:
    """``bench list recipes``: each recipe's key settings, per-victim changes and source."""
    from bench.plan.recipes import RECIPES

    lines = [f"recipes ({relative_path(RECIPES_FILE)}; a matrix's [recipe] table overrides any field):"]
    for name, recipe in RECIPES.items():
        lines.append(f"  {name}: {recipe_settings(recipe)}")
        lines += [f"      for {victim}: {changes_text(changes)}" for victim, changes in recipe.victim_overrides]
        lines.append(f"      source: {recipe.source}")
    return "\n".join(lines)


def recipe_settings(recipe: Any) -> str:
    """Budget, batch, optimiser, schedule and augmentation of a ``Recipe`` in one line."""
    budget = f"{recipe.iterations:,} iterations" if recipe.iterations else f"{recipe.epochs} epochs"
    optimizer = f"{recipe.optimizer} lr {recipe.lr:g}"
    if recipe.optimizer == "sgd":
        optimizer += f" momentum {recipe.momentum:g}" + (" nesterov" if recipe.nesterov else "")
    schedule = {"step": f"step ×{recipe.gamma:g} at epochs {list(recipe.milestones)}",
                "triangle": f"triangle (warm-up {recipe.warmup:g})"}.get(recipe.schedule, recipe.schedule)
    parts = [budget, f"batch {recipe.batch_size}", f"{optimizer} wd {recipe.weight_decay:g}", schedule,
             f"augment {recipe.augment}"]
    parts += [f"label smoothing {recipe.label_smoothing:g}"] if recipe.label_smoothing else []
    parts += [f"test every {recipe.eval_every} epochs"] if recipe.eval_every > 1 else []
    parts += [f"precision {recipe.precision}"] if recipe.precision != "auto" else []
    return ", ".join(parts)


def field_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def unit_suffix(cls: type, field: str) -> str:
    unit = units(cls).get(field)
    return f" [{unit}]" if unit else ""


def changes_text(pairs: Any) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in pairs)


def defined_at(cls: type) -> str:
    """``file:line`` where a class is defined, relative to the working folder where it lies inside it."""
    try:
        return f"{relative_path(Path(inspect.getsourcefile(cls) or '?'))}:{inspect.getsourcelines(cls)[1]}"
    except (OSError, TypeError):  # defined in a notebook or from a string: no file to name
        return f"module {cls.__module__}"


def relative_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
