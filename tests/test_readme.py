"""The README stays true to the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.core.registry import ConfigError
from bench.report.catalog import TABLE_HEADER, component_table, registries, update_readme

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_component_table_is_current():
    """The README's component table is `bench list --markdown` (built-ins only): `make docs` regenerates it."""
    table = component_table(registries(), list(registries()))
    assert table in README.read_text(), "run `make docs` (bench list --markdown --update README.md)"
    assert "invert_test" not in table


def test_make_docs_updates_the_table_in_place(tmp_path):
    page = tmp_path / "README.md"
    page.write_text(f"# x\n\n{TABLE_HEADER}\n|---|\n| old | row |\n\nafter\n")
    table = component_table(registries(), ["victims"])
    assert update_readme(page, table) and page.read_text() == f"# x\n\n{table}\n\nafter\n"
    assert not update_readme(page, table)
    other = tmp_path / "other.md"
    other.write_text("no table here\n")
    with pytest.raises(ConfigError, match="no component table"):
        update_readme(other, table)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    block = README.read_text().split("```")[1]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("sh")]
    assert commands == ["make run", "make test"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))] == ["make test"]


def test_readme_lists_every_shipped_matrix():
    """Each file in bench/matrices/ is named in the README's named-matrix table."""
    text = README.read_text()
    shipped = sorted(p.stem for p in (README.parent / "bench" / "matrices").glob("*.toml"))
    listed = [name for name in shipped if f"`{name}`" in text]
    assert listed == shipped, f"add {sorted(set(shipped) - set(listed))} to the README's named-matrix table"
