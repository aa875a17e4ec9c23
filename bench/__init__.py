"""bench: protections × countermeasures × victims grids for unlearnable-example research.

The public API is ``bench.api``; its names are available here too (``bench.run``, ``bench.records``,
``bench.Protection`` …), imported on first use so that ``import bench`` stays cheap. Every other module is
internal and may change between releases.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any

__version__ = "0.2.0"
BUILTIN_FAMILIES = ("protections", "countermeasures", "victims")


class _BuiltinFinder(importlib.abc.MetaPathFinder):
    """In a checkout, ``bench.protections`` (…) are the top-level ``protections/`` (…) folders, which the product
    fixes at the top of the repository; a wheel installs them inside the package (pyproject's package-dir), where
    this finder finds nothing to do."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        family = fullname.removeprefix("bench.")
        if fullname.startswith("bench.") and family in BUILTIN_FAMILIES:
            folder = self.root / family
            return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                          submodule_search_locations=[str(folder)])
        return None


_HERE = Path(__file__).resolve().parent
if not (_HERE / "protections").is_dir() and (_HERE.parent / "protections" / "__init__.py").is_file():
    sys.meta_path.insert(0, _BuiltinFinder(_HERE.parent))


def __getattr__(name: str) -> Any:
    api = importlib.import_module("bench.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *importlib.import_module("bench.api").__all__})
