"""The README stays true to the code."""

from __future__ import annotations

from pathlib import Path

from bench.cli import component_table
from bench.core.components import COUNTERMEASURES, PROTECTIONS, VICTIMS
from bench.data.datasets import DATASETS
from bench.testing import builtin_names

README = Path(__file__).resolve().parent.parent / "README.md"


class BuiltIn:
    """A registry seen through bench's own components only (plugins installed here are not in the README)."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def names(self) -> list[str]:
        return builtin_names(self.registry)

    def get(self, name: str) -> type:
        return self.registry.get(name)


def test_readme_component_table_is_current():
    """The README's component table is `bench list --markdown` of the built-ins: regenerate it when adding one."""
    registries = {"protections": PROTECTIONS, "countermeasures": COUNTERMEASURES, "victims": VICTIMS,
                  "datasets": DATASETS}
    table = component_table({kind: BuiltIn(registry) for kind, registry in registries.items()}, list(registries))
    assert table in README.read_text()


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
