"""Registries of named components, parameter validation and the identity of a component's code.

A component is a frozen dataclass whose fields (all defaulted) are its parameters. Registries raise on
duplicate names (as torchvision's ``_api.py``), list names by fnmatch pattern (timm ``list_models``) and
create components by name, validating every parameter so that a bad matrix fails before anything runs.
Plugin discovery (which modules register components) is ``bench.core.plugins``.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import types
import typing
import weakref
from typing import Any, ClassVar, Generic, TypeVar

from bench.core.fingerprint import code_fingerprint, component_identity, is_builtin, origin  # noqa: F401  (public)


class ConfigError(ValueError):
    """A user-facing configuration error: the CLI prints it and exits with code 2."""


@dataclasses.dataclass(frozen=True)
class Component:
    """Base of every registered component.

    Class attributes: ``name`` (set on registration), ``version`` (bump when outputs change so that
    cached results are invalidated), ``paper`` (the paper and section the component follows).
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    paper: ClassVar[str] = ""

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
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
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
            return cls(**clean)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"bad value for {self.kind} {name!r}: {err}") from err


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
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


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
