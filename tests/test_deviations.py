"""The deviations table (bench/DEVIATIONS.md) has a row for every registered protection and countermeasure."""

from __future__ import annotations

import re
from pathlib import Path

from bench.core.components import COUNTERMEASURES, PROTECTIONS

TABLE = Path(__file__).resolve().parent.parent / "bench" / "DEVIATIONS.md"


def component_rows() -> dict[str, list[str]]:
    """Rows of the components table: name → its cells (component, differs from, what, why, changes numbers?)."""
    text = TABLE.read_text().split("## Components", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\| `([^`]+)` \|", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in line.strip().strip("|").split("|")]
    return rows


def test_every_protection_and_countermeasure_has_a_row():
    rows = component_rows()
    missing = sorted((set(PROTECTIONS.names()) | set(COUNTERMEASURES.names())) - set(rows))
    assert not missing, f"add a row to {TABLE.name} for {missing} (what differs, why, whether numbers change)"
    assert not set(rows) - set(PROTECTIONS.names()) - set(COUNTERMEASURES.names()), "a row names no component"


def test_every_row_says_whether_numbers_change():
    for name, cells in component_rows().items():
        assert len(cells) == 5 and all(cells), f"row {name!r} needs five non-empty cells, got {cells}"
