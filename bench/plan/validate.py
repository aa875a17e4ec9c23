"""Checks of a matrix's scalar keys (``bench.plan.matrix`` parses with them, so this module imports it only when
called) and of the cells a run plans, each a ConfigError naming the key or flag, the value and the fix."""

from __future__ import annotations

import difflib
import math
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.core.registry import SEED_MAX, ConfigError
from bench.plan.layout import LAYOUT_AXES, Layout

if TYPE_CHECKING:
    from bench.plan.matrix import Cell, Matrix

# A matrix's name is a folder under --results (runs/<name>, leaderboards/<name>, reports/<name>): one path component,
# never ``.``/``..``, never an option (``-x``), short enough for any file system with the file names added to it.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MATRIX_DIR = Path(__file__).resolve().parents[1] / "matrices"
MAX_CELLS = 100_000  # cells a run plans unless --max-cells says more (planning takes ~1 ms and a few kB a cell)
PROGRESS_CELLS = 2_000  # from this many cells on, planning reports each step on stderr


def matrix_name(value: Any, default: str) -> str:
    """The matrix's ``name`` key, else ``default`` (its file's stem), if it matches ``NAME``."""
    name = default if value is None else value
    if isinstance(name, str) and NAME.fullmatch(name):
        return name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-._")[:100] or "my-matrix"
    where = "key 'name'" if value is not None else f"no key 'name', and the file name {default!r}"
    raise ConfigError(f"{where}: {name!r} is not a valid matrix name: it names folders under --results, so it must "
                      "be 1–100 letters, digits, '.', '_' or '-', starting with a letter or digit; write e.g. "
                      f"name = {safe!r}")


def scalar_list(value: Any, key: str, kind: type) -> tuple:
    """A number or a non-empty list of numbers (``kind``: int or float) as a tuple."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"key {key!r}: expected a number or a non-empty list of numbers, got {value!r}")
    if kind is int and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"key {key!r}: expected integers, got {value!r}")
    if kind is float and not all(abs(v) <= sys.float_info.max and math.isfinite(v) for v in values):
        raise ConfigError(f"key {key!r}: expected finite numbers, got {value!r}")
    return tuple(kind(v) for v in values)


def seeds(value: Any) -> tuple[int, ...]:
    """The ``seeds`` key: integers in [0, SEED_MAX] (torch and numpy generators take them all, offsets added)."""
    found = scalar_list(value, "seeds", int)
    bad = [s for s in found if not 0 <= s <= SEED_MAX]
    if bad:
        raise ConfigError(f"key 'seeds': {bad[0]} is out of range; seeds are integers from 0 to {SEED_MAX}")
    return found


def cpu_alternative(name: Any) -> str | None:
    """The ``cpu_alternative`` key: None, or a named matrix of ``bench/matrices/``."""
    known = sorted(p.stem for p in MATRIX_DIR.glob("*.toml"))
    if name is not None and (not isinstance(name, str) or name not in known):
        raise ConfigError(f"key 'cpu_alternative': {name!r} is not a named matrix{hint(str(name), known)} "
                          f"(named matrices: {', '.join(known)}; leave the key out if there is none)")
    return name


def layout(raw: Any, cells: Iterable[dict[str, str]]) -> Layout:
    """``Layout.parse``, and every ``labels`` key a label of the layout's axes among ``cells`` (each cell's labels),
    read only until every label is seen (a large matrix is not expanded for it)."""
    parsed = Layout.parse(raw)
    axes = [axis for axis in LAYOUT_AXES if axis in parsed.axes]
    known: dict[str, dict[str, None]] = {axis: {} for axis in axes}
    missing = set(parsed.labels)
    for labels in cells if missing else ():
        for axis in axes:
            known[axis][labels[axis]] = None
            missing.discard(labels[axis])
        if not missing:
            break
    for label in (label for label in parsed.labels if label in missing):
        listing = "; ".join(f"{axis}: {', '.join(labels) or '(no cells)'}" for axis, labels in known.items())
        every = [seen for labels in known.values() for seen in labels]
        raise ConfigError(f"key 'layout.labels': unknown label {label!r}{hint(label, every)} (labels of the rows' and "
                          f"columns' axes in this matrix's cells: {listing})")
    return parsed


def plan_cells(matrix: Matrix, only: list[str], max_cells: int,
               progress: Callable[[int], Callable[[str], None]]) -> list[Cell]:
    """The cells a run plans: the matrix's, narrowed to ``only`` (``--only``) before expanding, its ``[[exclude]]``
    rules applied; a ConfigError before any is made where they would be over ``max_cells`` (counted from the axes),
    and where none is left. ``progress(cells)`` gives the printer of planning steps."""
    from bench.plan.matrix import expand, narrow, size

    narrowed = narrow(matrix, only)
    upper = size(narrowed)
    selected = f" (selected by --only {' '.join(only)})" if only else ""
    if upper > max_cells:
        raise ConfigError(f"matrix {matrix.name}: {upper:,} cells{selected} before its [[exclude]] rules, over the "
                          f"--max-cells bound of {max_cells:,}; pass --max-cells {upper} to plan them anyway, or "
                          "plan fewer: fewer seeds or swept values, or --only")
    progress(upper)(f"expanding {matrix.name}")
    cells = expand(narrowed)
    if not cells:
        raise ConfigError(f"matrix {matrix.name}: its [[exclude]] rules drop every one of its {upper:,} cells"
                          f"{selected}; loosen a rule (each drops the cells matching all of its globs)")
    return cells


def progress(cells: int) -> Callable[[str], None]:
    """A printer of planning steps on stderr (with the time since the first), silent below ``PROGRESS_CELLS``."""
    start = time.perf_counter()

    def step(what: str) -> None:
        if cells >= PROGRESS_CELLS:
            print(f"bench: planning {cells:,} cells: {what} … ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)
    return step


def no_match(flag: str, rules: list[str], key: str, labels: Iterable[str]) -> ConfigError:
    """The error for cell filters (``--only``, ``--rerun``) that keep no cell: the filters and the labels of ``key``."""
    shown = list(dict.fromkeys(labels))
    listing = ", ".join(shown[:8]) + (f" … ({len(shown)} in all)" if len(shown) > 8 else "")
    return ConfigError(f"{flag} {' '.join(rules)} matches no cell; the {key} labels here are: {listing or '(none)'}"
                       f"{hint(rules[-1].partition('=')[2], shown)} (a GLOB matches a whole label: '*' any text, '?' one character)")


def hint(key: str, options: Any) -> str:
    """``; did you mean …?`` with close matches of ``key`` among ``options``, else ``""``."""
    close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""
