"""Reading what bench wrote without trusting it: JSON lines parsed line by line, each damaged line (bad UTF-8, NUL
bytes, no JSON, a JSON value that is no object) reported once (file, line, what is wrong) and left out; and the check
of a dataclass instance against its fields' annotations, for values that came from JSON."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench.core.registry import BenchWarning, param_hints

T = TypeVar("T")
JSON_TYPES = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", type(None): "null"}


@dataclasses.dataclass(frozen=True)
class Damage:
    """A line of a record log that holds no valid record (``line`` 0: the whole file), what is wrong with it, and
    the cell key it names where it still shows one."""

    path: Path
    line: int
    problem: str
    cell: str | None = None

    def __str__(self) -> str:
        return f"{self.path}{f', line {self.line}' * bool(self.line)}: {self.problem}"


class DamagedLines(BenchWarning):
    """The warning ``report`` gives (a worker process may ignore it: its driver reports the same files)."""


_REPORTED: set[Damage] = set()


def report(damage: list[Damage]) -> None:
    """Warn (``DamagedLines``, on stderr) once per process about each damaged line, one warning per file."""
    for path in dict.fromkeys(d.path for d in damage if d not in _REPORTED):
        new = [d for d in damage if d.path == path and d not in _REPORTED]
        _REPORTED.update(new)
        lines = "; ".join(f"skipped line {d.line}: {d.problem}" if d.line else d.problem for d in new[:5])
        more = f"; and {len(new) - 5} more damaged lines" if len(new) > 5 else ""
        warnings.warn(f"{path}: {lines}{more}. Skipped lines count as not recorded (`bench run` trains their cells "
                      "again); delete them, or repair them, to silence this", DamagedLines, stacklevel=3)


def read_objects(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[Damage]]:
    """Each line's JSON object with its number, and the lines that hold none (a missing file: nothing). A last
    line without its newline that is a cut JSON object or NUL bytes is what a writer killed mid-line leaves (its
    cell is not recorded, so a rerun trains it): it is left out quietly."""
    try:
        data = path.read_bytes() if path.exists() else b""
    except OSError as err:
        return [], [Damage(path, 0, f"unreadable ({err.strerror or err})")]
    found, damage, chunks = [], [], data.split(b"\n")
    for number, chunk in enumerate(chunks, 1):
        if not chunk.strip():
            continue
        raw, problem = _parse(chunk)
        if problem is None:
            found.append((number, raw))
        elif number < len(chunks) or not _cut_short(chunk):  # a cut last line is skipped quietly
            cut = chunk.strip(b"\0") and _cut_short(chunk)  # a later append started a new line after it
            damage.append(Damage(path, number, "cut short (a writer killed mid-line; its cell was not recorded)"
                                 if cut else problem, _named_cell(chunk)))
    return found, damage


def read_checked(path: Path, parse: Callable[[dict[str, Any]], T]) -> tuple[list[T], list[Damage]]:
    """``parse`` of each line's JSON object (``read_objects``), in order, and the damaged lines: those that hold
    no object, and those whose object ``parse`` refuses (with its reason); nothing is reported."""
    objects, damage = read_objects(path)
    parsed = []
    for number, raw in objects:
        try:
            parsed.append(parse(raw))
        except Exception as err:  # noqa: BLE001 - whatever a line holds, it never stops a reader: it is reported
            cell = raw.get("cell")
            damage.append(Damage(path, number, f"not a valid record ({err})", cell if isinstance(cell, str) else None))
    return parsed, sorted(damage, key=lambda d: d.line)


def _parse(line: bytes) -> tuple[dict[str, Any], str | None]:
    """A line's JSON object, or what is wrong with it."""
    if b"\0" in line:
        return {}, f"{line.count(0)} NUL byte(s)"
    try:
        raw = json.loads(line.decode())
    except UnicodeDecodeError as err:
        return {}, f"invalid UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1})"
    except json.JSONDecodeError as err:
        return {}, f"not JSON ({err.msg}, column {err.colno})"
    except RecursionError:
        return {}, "not JSON (nested too deeply)"
    if not isinstance(raw, dict):
        text = line.decode().strip()
        text = text if len(text) <= 40 else text[:37] + "..."
        return {}, f"a JSON {JSON_TYPES.get(type(raw), 'value')} ({text}), not a record object"
    return raw, None


def _cut_short(line: bytes) -> bool:
    """Whether a damaged last line (no newline after it) is what a writer killed mid-line leaves: the start of a
    JSON object, or NUL bytes (the file grew but its data never reached the disk)."""
    if not line.strip(b"\0"):
        return True
    try:
        text = line.decode()
    except UnicodeDecodeError as err:
        if err.end < len(line):  # a bad byte inside, not a character cut at the end
            return False
        text = line[:err.start].decode(errors="replace")
    try:
        json.loads(text)
    except json.JSONDecodeError as err:  # cut inside a string, or in a token with nothing after it
        return text.lstrip().startswith("{") and err.msg != "Extra data" and (
            err.msg.startswith("Unterminated string") or not set(text[err.pos:]) & set(',:{}[]"'))
    except RecursionError:
        pass
    return False


def _named_cell(line: bytes) -> str | None:
    found = re.search(rb'"cell": ?"([0-9A-Za-z_.-]+)"', line)
    return found.group(1).decode() if found else None


def mistyped(instance: Any) -> list[str]:
    """The fields of a dataclass instance whose value does not fit the field's annotation (a nested dataclass
    checked alike; an int fits a float; ``Any`` fits anything). Not ``registry.coerce``: that converts TOML
    parameters and refuses None and NaN, which records hold (a value not measured, an epoch not evaluated)."""
    hints = param_hints(type(instance))
    return [f"{f.name} = {short(getattr(instance, f.name))} is not {_name(hints[f.name])}"
            for f in dataclasses.fields(instance) if not _fits(getattr(instance, f.name), hints[f.name])]


def _fits(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in args)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(k, args[0]) and _fits(v, args[1]) for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint) and not mistyped(value)
    if hint in (int, float) and isinstance(value, bool):  # JSON's true is no number
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def error_line(error: str | None) -> str:
    """A failure's one-line summary: the last line of its traceback (the exception), or ``no error text``."""
    lines = (error or "").strip().splitlines()
    return lines[-1] if lines else "no error text"
