"""A leaderboard's layout (a matrix's ``[layout]`` table): which axes are rows and columns, the names shown for
labels, and whether Mean and Max follow. The default is DH Table I's: rows = protections, columns = countermeasures.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from bench.core.registry import ConfigError

LAYOUT_AXES = ("protection", "countermeasure", "victim")
LAYOUT_KEYS = ("rows", "columns", "labels", "summary")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A table layout: row axes (a row's label joins theirs with `` · ``), the column axis, names shown for
    component labels, and whether Mean and Max columns follow. The default is DH Table I's."""

    rows: tuple[str, ...] = ("protection",)
    columns: str = "countermeasure"
    labels: dict[str, str] = dataclasses.field(default_factory=dict, hash=False)
    summary: bool = True

    @property
    def axes(self) -> tuple[str, ...]:
        return (*self.rows, self.columns)

    def name(self, label: str) -> str:
        """The name shown for a component label."""
        return self.labels.get(label, label)

    @classmethod
    def parse(cls, raw: Any) -> Layout:
        """Validate a ``[layout]`` table (from TOML or matrix.json); a ConfigError names the key and the fix."""
        if not isinstance(raw, dict):
            raise ConfigError(f"key 'layout': expected a table of {', '.join(LAYOUT_KEYS)}, got {raw!r}")
        for key in raw:
            if key not in LAYOUT_KEYS:
                raise ConfigError(f"key 'layout.{key}': unknown{_hint(key, LAYOUT_KEYS)} (allowed: {', '.join(LAYOUT_KEYS)})")
        rows, columns = raw.get("rows", list(cls.rows)), raw.get("columns", cls.columns)
        labels, summary = raw.get("labels", {}), raw.get("summary", True)
        if not isinstance(rows, (list, tuple)) or not rows or not all(isinstance(r, str) for r in rows):
            raise ConfigError(f"key 'layout.rows': expected a non-empty list of axes, e.g. rows = [\"protection\"], "
                              f"got {rows!r}")
        if not isinstance(columns, str):
            raise ConfigError(f"key 'layout.columns': expected one axis name, e.g. columns = \"victim\", got {columns!r}")
        for key, axis in [*(("rows", r) for r in rows), ("columns", columns)]:
            if axis not in LAYOUT_AXES:
                raise ConfigError(f"key 'layout.{key}': unknown axis {axis!r}{_hint(axis, LAYOUT_AXES)} "
                                  f"(axes: {', '.join(LAYOUT_AXES)})")
        if len(set(rows)) < len(rows):
            raise ConfigError(f"key 'layout.rows': an axis appears twice in {list(rows)}; name each axis once")
        if columns in rows:
            free = [a for a in LAYOUT_AXES if a not in rows]
            fix = f"set columns to {' or '.join(map(repr, free))}" if free else "leave one axis out of rows for columns"
            default = "" if "columns" in raw else " (columns defaults to 'countermeasure')"
            raise ConfigError(f"key 'layout.columns': axis {columns!r} is also in rows {list(rows)}{default}; {fix}")
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ConfigError(f"key 'layout.labels': expected a table of label = \"shown name\" strings, e.g. "
                              f"{{ none = \"Normal\" }}, got {labels!r}")
        if not isinstance(summary, bool):
            raise ConfigError(f"key 'layout.summary': expected true or false, got {summary!r}")
        return cls(tuple(rows), columns, dict(labels), summary)


def _hint(key: str, options: Any) -> str:
    close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""
