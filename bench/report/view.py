"""What a matrix's leaderboards, comparisons and report show: its records and how to lay them out.

The records are its own log's (``runs/<matrix>/records.jsonl``) and, found by cell key in any other matrix's log of
the results folder, those of the cells it plans (a matrix that copies or ``extends`` another reuses its records).
The layout comes from ``runs/<matrix>/matrix.json``, which ``bench run`` saves; for a named matrix without one (a
fresh clone's committed records), from its TOML, planned with the dataset keys its records name. Each record says
why it is stale (``bench.store.records.stale_reasons``): the tables mark such cells, never show them as current.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from bench.core.registry import ConfigError
from bench.plan.layout import Layout
from bench.store.records import Record, RecordLog, RecordStore, stale_reasons


@dataclasses.dataclass(frozen=True)
class MatrixView:
    """A matrix's records as rows (each record's fields and ``stale``: why it is stale, "" when current), the
    resolved matrix (``saved``: matrix.json's content), and the order of each axis's labels."""

    name: str
    rows: list[dict[str, Any]]
    saved: dict[str, Any]

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
    naming the command to run where it has no records."""
    run_dir = results / "runs" / name
    saved_path = run_dir / "matrix.json"
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
    else:
        saved = planned(results, name)
        name = saved["name"]
        run_dir = results / "runs" / name
    own = RecordLog(run_dir / "records.jsonl").read()
    cells = set(saved.get("cells", [])) - {r.cell for r in own}
    elsewhere = [r for r in RecordStore(results).read() if r.cell in cells and r.matrix != name]
    records = own + elsewhere
    if not records:
        raise ConfigError(f"no records for matrix {name!r} under {results / 'runs'}; run `bench run --matrix {name}` "
                          "first")
    return MatrixView(name, [row(r) for r in records], saved)


def run_name(results: Path, matrix: str) -> str:
    """The name records of ``matrix`` go under: a run's name under ``results/runs``, else that of the named matrix
    or TOML file (its ``name`` key, else its file's stem)."""
    if (results / "runs" / matrix).is_dir():
        return matrix
    from bench.plan.matrix import load_matrix

    return load_matrix(matrix).name


def row(record: Record) -> dict[str, Any]:
    """A record as a table row: its fields, and ``stale`` (why it no longer shows what bench computes; "")."""
    return {**record.to_json(), "stale": "; ".join(stale_reasons(record))}


def planned(results: Path, name: str) -> dict[str, Any]:
    """The resolved matrix of a named matrix or TOML path (as ``bench run`` saves it), with the keys of its cells
    planned on the dataset keys that the cache or the results folder's records know (nothing is loaded)."""
    from bench.plan.matrix import expand, load_matrix, resolved
    from bench.plan.planner import known_dataset_key, plan_cell
    from bench.store.cache import Cache

    try:
        matrix = load_matrix(name)
    except ConfigError as err:
        raise ConfigError(f"no records of a run named {name!r} under {results / 'runs'}, and it names no matrix to "
                          f"plan ({err})") from err
    cells, cache, records = expand(matrix), Cache(results / "cache"), RecordStore(results).read()
    keys = {choice: known_dataset_key(cache, choice, records).key for choice in {c.dataset for c in cells}}
    planned = []
    for cell in cells:
        try:
            planned.append(plan_cell(cell, keys[cell.dataset], matrix.recipe).cell_key)
        except ConfigError:  # a cell its components cannot serve (bench run refuses it): it has no records
            continue
    return resolved(matrix, planned)
