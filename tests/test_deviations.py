"""The deviations table (bench/DEVIATIONS.md) has a row for every built-in protection and countermeasure (a plugin
documents its own: one installed here, or registered by another test, is not bench's to describe)."""

from __future__ import annotations

import re
from pathlib import Path

from bench.core.components import COUNTERMEASURES, PROTECTIONS, Protection
from bench.core.registry import Registry
from bench.testing import builtin_names

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


def test_every_builtin_protection_and_countermeasure_has_a_row():
    rows, builtins = component_rows(), set(builtin_names(PROTECTIONS)) | set(builtin_names(COUNTERMEASURES))
    missing = sorted(builtins - set(rows))
    assert not missing, f"add a row to {TABLE.name} for {missing} (what differs, why, whether numbers change)"
    assert not set(rows) - builtins, f"rows name no built-in component: {sorted(set(rows) - builtins)}"


def test_every_row_says_whether_numbers_change():
    for name, cells in component_rows().items():
        assert len(cells) == 5 and all(cells), f"row {name!r} needs five non-empty cells, got {cells}"


def test_a_component_registered_outside_bench_needs_no_row():
    """A plugin's or a test's component (its module is not bench's) is left to its author's docs."""
    registry = Registry("protection", Protection)

    @registry.register("outside_test")
    class Outside(Protection):
        def protect(self, train, *, seed, device):
            return train

    assert registry.names() == ["outside_test"] and builtin_names(registry) == []
