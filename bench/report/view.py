"""What a matrix's leaderboards, comparisons and report show: its records and how to lay them out.

The records are its own log's (``runs/<matrix>/records.jsonl``) and, found by cell key in any other matrix's log of
the results folder, those of the cells it plans (a matrix that copies or ``extends`` another reuses its records).
The layout comes from ``runs/<matrix>/matrix.json``, which ``bench run`` saves; for a named matrix without one (a
fresh clone's committed records), from its TOML, planned with the dataset keys its records name. Each record says
why it is stale (``bench.store.records.stale_reasons``): the tables mark such cells, never show them as current.
Damaged record lines are reported on stderr and skipped (``bench.store.integrity``), and listed with the tables
(``skipped``); a damaged matrix.json is a ConfigError that says how to rewrite it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from bench.core.registry import ConfigError
from bench.plan.layout import Layout
from bench.store.integrity import Damage, report
from bench.store.records import Record, RecordLog, RecordStore, stale_reasons


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """A matrix's records as rows (each record's fields and ``stale``: why it is stale, "" when current), the
    resolved matrix (``saved``: matrix.json's content), the order of each axis's labels, and the damaged record
    lines left out (``skipped``: those of its own log, and those of other logs that name one of its cells)."""

    name: str
    rows: list[dict[str, Any]]
    saved: dict[str, Any]
    skipped: tuple[str, ...] = ()

    @property
    def order(self) -> dict[str, list[str]]:
        return {axis: [c["label"] for c in choices] for axis, choices in self.saved.get("axes", {}).items()}

    @property
    def layout(self) -> Layout:
        return Layout.parse(self.saved.get("layout", {}))

    @property
    def reference(self) -> str | None:
        return self.saved.get("reference")


def matrix_view(results: Path, name: str) -> MatrixView:
    """The view of matrix ``name`` (a run's name, a named matrix or a TOML path) over ``results``; a ConfigError
    naming the command to run where it has no records, or how to rewrite its matrix.json where that is damaged."""
    run_dir = results / "runs" / name
    saved_path = run_dir / "matrix.json"
    if saved_path.is_file():
        saved = saved_matrix(saved_path, name)
    else:
        saved = planned(results, name)
        name = saved["name"]
        run_dir = results / "runs" / name
    own, damaged = RecordLog(run_dir / "records.jsonl").checked()
    everywhere, damaged_elsewhere = RecordStore(results).checked()
    planned_cells = set(saved.get("cells", []))
    cells = planned_cells - {r.cell for r in own}
    records = own + [r for r in everywhere if r.cell in cells and r.matrix != name]
    report(list(dict.fromkeys(damaged + damaged_elsewhere)))
    skipped = tuple(_shown(d, results) for d in dict.fromkeys(
        damaged + [d for d in damaged_elsewhere if d.cell in planned_cells]))
    if not records:
        raise ConfigError(f"no records for matrix {name!r} under {results / 'runs'}"
                          + (f" ({len(skipped)} damaged line(s) skipped: {skipped[0]})" if skipped else "")
                          + f"; run `bench run --matrix {name}` first")
    recipe = saved.get("recipe") if isinstance(saved.get("recipe"), dict) else {}
    return MatrixView(name, [row(r, recipe.get("name")) for r in records], saved, skipped)


def saved_matrix(path: Path, name: str) -> dict[str, Any]:
    """matrix.json's content (``bench.plan.matrix.resolved``), checked where the views read it; a ConfigError that
    names what is wrong and the fix where it is damaged."""
    try:
        saved, problem = json.loads(path.read_bytes()), None
    except (OSError, ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        saved, problem = None, f"is not JSON ({err})"
    if problem is None:
        problem = _damage(saved)
    if problem is not None:
        source = saved.get("source") if isinstance(saved, dict) else None
        raise ConfigError(f"{path} {problem}: it is damaged; rerun `bench run --matrix "
                          f"{source if isinstance(source, str) else name}` to rewrite it (recorded cells are not "
                          "trained again)")
    return saved


def _damage(saved: Any) -> str | None:
    """What makes matrix.json's content unusable, or None."""
    if not isinstance(saved, dict):
        return f"holds a JSON {type(saved).__name__}, not the matrix's object"
    axes = saved.get("axes")
    if not isinstance(axes, dict) or not all(
            isinstance(choices, list) and all(isinstance(c, dict) and isinstance(c.get("label"), str) for c in choices)
            for choices in axes.values()):
        return "has no 'axes' table of labelled choices" if axes is None else f"has malformed 'axes' ({axes!r:.60})"
    cells, reference = saved.get("cells", []), saved.get("reference")
    if not isinstance(cells, list) or not all(isinstance(c, str) for c in cells):
        return f"has malformed 'cells' ({cells!r:.60}): expected a list of cell keys"
    if reference is not None and not isinstance(reference, str):
        return f"has malformed 'reference' ({reference!r:.60})"
    try:
        Layout.parse(saved.get("layout", {}))
    except ConfigError as err:
        return f"has a malformed layout ({err})"
    return None


def _shown(damage: Damage, results: Path) -> str:
    """A damaged line as the tables list it, its file under ``results``."""
    return str(dataclasses.replace(damage, path=damage.path.relative_to(results))
               if damage.path.is_relative_to(results) else damage)


def run_name(results: Path, matrix: str) -> str:
    """The name records of ``matrix`` go under: a run's name under ``results/runs``, else that of the named matrix
    or TOML file (its ``name`` key, else its file's stem)."""
    if (results / "runs" / matrix).is_dir():
        return matrix
    from bench.plan.matrix import load_matrix

    return load_matrix(matrix).name


def row(record: Record, recipe: str | None = None) -> dict[str, Any]:
    """A record as a table row: its fields, and ``stale`` (why it no longer shows what bench computes; ""); a
    cell that failed before its recipe was made gets ``recipe``, its matrix's (the cell key holds the recipe), so
    that it shows as ``error`` in its table rather than in a table of its own."""
    return {**record.to_json(), "recipe": record.recipe or recipe, "stale": "; ".join(stale_reasons(record))}


def planned(results: Path, name: str) -> dict[str, Any]:
    """The resolved matrix of a named matrix or TOML path (as ``bench run`` saves it), with the keys of its cells
    planned on the dataset keys that the cache or the results folder's records know (nothing is loaded)."""
    from bench.plan.matrix import expand, load_matrix, resolved
    from bench.plan.planner import dataset_choices, known_dataset_key, plan_cell
    from bench.store.cache import Cache

    try:
        matrix = load_matrix(name)
    except ConfigError as err:
        raise ConfigError(f"no records of a run named {name!r} under {results / 'runs'}, and it names no matrix to "
                          f"plan ({err})") from err
    cells, cache, records = expand(matrix), Cache(results / "cache"), RecordStore(results).read()
    keys = {choice: known_dataset_key(cache, choice, records).key for choice in dataset_choices(cells)}
    planned = []
    for cell in cells:
        try:
            planned.append(plan_cell(cell, keys, matrix.recipe).cell_key)
        except ConfigError:  # a cell its components cannot serve (bench run refuses it): it has no records
            continue
    return resolved(matrix, planned)
