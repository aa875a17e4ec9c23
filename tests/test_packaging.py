"""The package's shape: the wheel's package list is whole, built-in components import only ``bench.api`` from the
harness, and ``import bench`` is cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
FAMILIES = ("protections", "countermeasures", "victims")


def package_folders() -> dict[str, Path]:
    """Every folder with an ``__init__.py`` that the wheel must hold, by its package name."""
    found = {}
    for init in sorted(REPO.glob("bench/**/__init__.py")):
        found[".".join(init.parent.relative_to(REPO).parts)] = init.parent
    for family in FAMILIES:
        for init in sorted((REPO / family).glob("**/__init__.py")):
            found[".".join(("bench", *init.parent.relative_to(REPO).parts))] = init.parent
    return found


def test_the_wheel_lists_every_package_and_installs_no_generic_top_level_name():
    listed = PYPROJECT["tool"]["setuptools"]["packages"]
    assert sorted(listed) == sorted(package_folders()), "pyproject's [tool.setuptools] packages must list these"
    assert all(name == "bench" or name.startswith("bench.") for name in listed)
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {f"bench.{f}": f for f in FAMILIES}


def test_package_data_globs_match_files():
    for pattern in PYPROJECT["tool"]["setuptools"]["package-data"]["bench"]:
        assert list((REPO / "bench").glob(pattern)), f"package-data {pattern!r} matches no file"


def harness_imports(path: Path) -> list[str]:
    """The ``bench.*`` modules a file imports, relative imports left out."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name == "bench" or name.startswith("bench.")]


@pytest.mark.parametrize("path", [p for family in FAMILIES for p in sorted((REPO / family).rglob("*.py"))],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_built_in_components_import_only_the_public_api(path):
    """bench's own components are plugins: from the harness they import bench.api (and other components)."""
    allowed = ("bench.api", *(f"bench.{family}" for family in FAMILIES))
    bad = [name for name in harness_imports(path) if not name.startswith(allowed)]
    assert not bad, f"{path.name} imports {bad}: import from bench.api (add a public name there if one is missing)"


def test_import_bench_is_cheap_and_the_api_is_lazy():
    code = ("import sys, bench; assert 'torch' not in sys.modules, 'import bench loaded torch'; "
            "assert callable(bench.run) and bench.Protection.__name__ == 'Protection'; "
            "import bench.protections.em; assert bench.protections.__file__.endswith('protections/__init__.py')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_tests_import_builtin_components_through_the_package():
    """`from countermeasures import colour` would import the checkout's folder as a second module, re-register its
    classes outside bench and make them look like plugins to every later test in that worker (it failed
    test_deviations and test_readme in one xdist order)."""
    import re
    from pathlib import Path

    pattern = re.compile(r"^\s*(from|import) (protections|countermeasures|victims)\b", re.M)
    offenders = [p.name for p in Path(__file__).parent.glob("*.py") if pattern.search(p.read_text())]
    assert not offenders, f"import bench.protections / bench.countermeasures / bench.victims instead in {offenders}"
