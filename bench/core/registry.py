"""Registries of named components, parameter validation and the identity of a component's code.

A component is a frozen dataclass whose fields (all defaulted) are its parameters. Registries raise on
duplicate names (as torchvision's ``_api.py``), list names by fnmatch pattern (timm ``list_models``) and
create components by name, validating every parameter so that a bad matrix fails before anything runs: its type
(``coerce``: a float is finite), then the component's own ``__post_init__`` checks, then its range (``check_range``:
by the parameter's name, e.g. counts ≥ 1 and learning rates > 0, unless the class declares ``bounds``).
Plugin discovery (which modules register components) is ``bench.core.plugins``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import math
import re
import sys
import types
import typing
import weakref
from typing import Any, ClassVar, Generic, TypeVar

from bench.core.fingerprint import code_fingerprint, component_identity, is_builtin, origin  # noqa: F401  (public)


class ConfigError(ValueError):
    """A user-facing configuration error: the CLI prints it and exits with code 2."""


class BenchWarning(UserWarning):
    """A warning of bench's own, for the user (damaged record lines, a rewritten matrix.json): the CLI prints it as
    one ``bench: warning:`` line."""


@dataclasses.dataclass(frozen=True)
class Component:
    """Base of every registered component.

    Class attributes: ``name`` (set on registration), ``version`` (bump when outputs change so that
    cached results are invalidated), ``paper`` (the paper and section the component follows).
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    paper: ClassVar[str] = ""
    bounds: ClassVar[dict[str, str]] = {}  # parameter → interval where the default by name is wrong (check_range)

    @classmethod
    def check_declaration(cls) -> None:
        """Raise TypeError where a class's declared capabilities contradict its methods (checked on registration)."""

    def params(self) -> dict[str, Any]:
        """Parameters as a JSON-ready dict (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def spec(self) -> dict[str, Any]:
        """Everything that identifies this component's output: name, version, parameters and, for a component that is
        not built-in, ``code``: a fingerprint of its source (``code_fingerprint``), so that editing a plugin's code
        invalidates its cached results even where its ``version`` stays."""
        spec = {"name": self.name, "version": self.version, "params": self.params()}
        code = code_fingerprint(type(self))
        return spec if code is None else {**spec, "code": code}


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, (tuple, list)) else value


C = TypeVar("C", bound=Component)


class Registry(Generic[C]):
    """Name → component class, for one kind of component (protection, countermeasure …)."""

    def __init__(self, kind: str, base: type[C]) -> None:
        self.kind, self.base = kind, base
        self._classes: dict[str, type[C]] = {}
        _REGISTRIES.append(weakref.ref(self))

    def register(self, name: str):
        """Class decorator: make ``cls`` a frozen dataclass registered as ``name``."""

        def decorate(cls: type[C]) -> type[C]:
            # The same class source registering again (its module imported under a second name, a notebook cell
            # run again) replaces the first; two different classes may not share a name.
            if name in self._classes and origin(self._classes[name]) != origin(cls):
                raise ValueError(f"duplicate {self.kind} name {name!r}: {origin(self._classes[name])} and "
                                 f"{origin(cls)} both register it; rename one")
            if not issubclass(cls, self.base):
                raise TypeError(f"{self.kind} {name!r} must subclass {self.base.__name__}")
            cls = dataclasses.dataclass(frozen=True)(cls) if "__dataclass_fields__" not in cls.__dict__ else cls
            if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
                raise TypeError(f"{self.kind} {name!r} must be a frozen dataclass")
            missing = [f.name for f in dataclasses.fields(cls)
                       if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
            if missing:
                raise TypeError(f"{self.kind} {name!r}: parameters {missing} need defaults")
            for key, text in cls.bounds.items():  # a typo here fails on import, not in a user's run
                try:
                    interval(text)
                except ValueError as err:
                    raise TypeError(f"{self.kind} {name!r}: bounds[{key!r}]: {err}") from err
                if key not in {f.name for f in dataclasses.fields(cls)}:
                    raise TypeError(f"{self.kind} {name!r}: bounds name {key!r}, which is not a parameter")
            cls.name = name
            cls._bench_origin = origin(cls)  # type: ignore[attr-defined]  # kept by a class shipped by value
            try:
                cls.check_declaration()
            except TypeError as err:
                raise TypeError(f"{self.kind} {name!r} ({cls.__module__}): {err}") from err
            self._classes[name] = cls
            return cls

        return decorate

    def names(self, pattern: str = "*", *, builtin: bool = False) -> list[str]:
        """Registered names matching an fnmatch ``pattern``, sorted; with ``builtin``, bench's own only (no plugin's)."""
        discover()
        return sorted(n for n, cls in self._classes.items()
                      if fnmatch.fnmatchcase(n, pattern) and (is_builtin(cls) or not builtin))

    def __contains__(self, name: str) -> bool:
        discover()
        return name in self._classes

    def classes(self) -> dict[str, type[C]]:
        """Name → class of what is registered now (no discovery: for shipping the plugin set to workers)."""
        return dict(self._classes)

    def get(self, name: str) -> type[C]:
        """The class registered as ``name``; a ConfigError naming close matches otherwise."""
        discover()
        if name not in self._classes:
            close = difflib.get_close_matches(name, self._classes, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"unknown {self.kind} {name!r}{hint} (known: {', '.join(sorted(self._classes))})")
        return self._classes[name]

    def create(self, name: str, **params: Any) -> C:
        """Instantiate ``name`` with validated ``params`` (``None`` values mean 'use the default')."""
        cls = self.get(name)
        hints = param_hints(cls)
        fields = set(hints)
        clean: dict[str, Any] = {}
        for key, value in params.items():
            if value is None:
                continue
            if key not in fields:
                close = difflib.get_close_matches(key, fields, n=3, cutoff=0.5)
                hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
                raise ConfigError(f"unknown parameter {key!r} of {self.kind} {name!r}: {hint}"
                                  f"(parameters: {describe_params(cls) or 'none'})")
            clean[key] = coerce(value, hints[key], f"{self.kind} {name!r} parameter {key!r}")
        try:
            component = cls(**clean)  # the component's own checks first: their messages are the most specific
        except (ValueError, TypeError, ArithmeticError) as err:
            raise ConfigError(f"bad value for {self.kind} {name!r}: {err}") from err
        for key, value in clean.items():
            check_range(cls, key, value, f"{self.kind} {name!r} parameter {key!r}")
        return component


@functools.cache
def param_hints(cls: type) -> dict[str, Any]:
    """A dataclass's field name → resolved type hint (cached: ``typing.get_type_hints`` costs ~1 ms a call, which
    planning paid for every component of every cell)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a field's type hint, converting lists to tuples and ints to floats."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(coerce(v, inner, where) for v in value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if abs(value) > sys.float_info.max or not math.isfinite(value):  # (a huge int overflows float())
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


SEED_MAX = 2**63 - 1  # seeds: torch's manual_seed takes < 2**64 (with room for offsets: seed + k), numpy no negatives
# Ranges of numeric parameters by name (check_range): the first rule whose kind and name (whole, or its last words
# after an underscore: model_lr, train_batch_size) fit applies; a class's ``bounds`` overrides them.
NAMED_RANGES: tuple[tuple[type, tuple[str, ...], str], ...] = (
    (int, ("epochs", "steps", "iterations", "rounds", "restarts", "samples", "repeats", "networks", "variants",
           "batch_size", "per_class", "width", "depth", "blocks", "growth", "heads", "dim", "grid", "every"), "[1, inf)"),
    (int, ("seed",), f"[0, {SEED_MAX}]"),
    (float, ("lr", "step_size", "temperature", "tau"), "(0, inf)"),
    (float, ("dropout", "momentum", "label_smoothing"), "[0, 1)"),
    (int, (), "[0, inf)"),  # any other int: an index, a size, a kernel …
    (float, (), "[0, inf)"),  # any other float: a budget, a weight, a probability … (checked further by its class)
)
INT_MAX = 2**31 - 1  # the top of ``inf`` for an int: counts and sizes past it overflow int32 indices and any budget
_INTERVAL = re.compile(r"([\[(])\s*([-+]?(?:inf|[0-9.e+-]+))\s*,\s*([-+]?(?:inf|[0-9.e+-]+))\s*([\])])")


@functools.cache
def interval(text: str) -> tuple[float, float, bool, bool]:
    """``(low, high, low_open, high_open)`` of an interval written ``[1, inf)`` or ``(0, 1]``; ValueError otherwise."""
    match = _INTERVAL.fullmatch(text.strip())
    if not match:
        raise ValueError(f"bad interval {text!r}: write it as [low, high], (low, high), [low, high) … (inf allowed)")
    opening, low, high, closing = match.groups()
    number = (lambda x: float(x) if "inf" in x or "." in x or "e" in x else int(x))
    return number(low), number(high), opening == "(", closing == ")"


@functools.cache
def range_of(cls: type, key: str, kind: type) -> str:
    """The interval a value (of type ``kind``: int or float) of parameter ``key`` of ``cls`` lies in: the class's
    ``bounds``, else ``NAMED_RANGES``; for an int, an upper ``inf)`` means ``INT_MAX]``."""
    text = getattr(cls, "bounds", {}).get(key) or next(
        text for rule_kind, words, text in NAMED_RANGES
        if rule_kind is kind and (not words or any(key == w or key.endswith("_" + w) for w in words)))
    return text.replace("inf)", f"{INT_MAX}]") if kind is int and text.rstrip().endswith("inf)") else text


def check_range(cls: type, key: str, value: Any, where: str, fix: str | None = None) -> None:
    """Raise a ConfigError naming ``where``, the range and ``fix`` (default: omit it for the field's default) where a
    numeric ``value`` (or an element of a tuple) lies outside ``range_of(cls, key)``; other values pass."""
    for item in value if isinstance(value, tuple) else (value,):
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        text = range_of(cls, key, float if isinstance(item, float) else int)
        low, high, low_open, high_open = interval(text)
        if (item <= low if low_open else item < low) or (item >= high if high_open else item > high):
            if fix is None:
                default = next((f.default for f in dataclasses.fields(cls) if f.name == key), dataclasses.MISSING)
                fix = f"omit it for the default {default!r}" if default is not dataclasses.MISSING else "change it"
                fix += " (a component whose parameter takes other values declares them in its `bounds`)"
            raise ConfigError(f"{where}: must be in {text}, got {item!r}; {fix}")


def describe_params(cls: type[Component]) -> str:
    """``a=1, b='x'`` for a component class's parameters and defaults."""
    parts = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parts.append(f"{f.name}={default!r}")
    return ", ".join(parts)


_REGISTRIES: list[weakref.ref[Registry]] = []  # in creation order: the shared registries come first


def registries() -> list[Registry]:
    """Every live registry, oldest first."""
    return [r for r in (ref() for ref in _REGISTRIES) if r is not None]


class PluginImportError(ConfigError):
    """A plugin module failed to import: every later registry call raises it again (never a partial registry)."""


def discover() -> None:
    """Load the plugin set once per process (``bench.core.plugins.discover``; imported here lazily: it imports us)."""
    from bench.core import plugins

    plugins.discover()
