"""Registry rules: registration checks, lookup with close matches, validated creation, describe_params.

Registration tests use a fresh ``Registry("thing", ...)`` so that the global registries are never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from bench.core.components import COUNTERMEASURES, PROTECTIONS, VICTIMS, Countermeasure, Protection
from bench.core.registry import Component, ConfigError, Registry, component_identity, describe_params
from bench.data.datasets import DATASETS


class Thing(Component):
    """Base of the components of the fresh test registries."""


def fresh() -> Registry:
    return Registry("thing", Thing)


# ------------------------------------------------------------------ registration


def test_register_makes_a_frozen_dataclass_and_sets_name():
    """A plain subclass becomes a frozen dataclass named after its registration."""
    registry = fresh()

    @registry.register("alpha")
    class Alpha(Thing):
        size: int = 3

    assert dataclasses.is_dataclass(Alpha) and Alpha.name == "alpha"
    assert registry.names() == ["alpha"] and "alpha" in registry and "beta" not in registry
    assert registry.get("alpha") is Alpha
    instance = registry.create("alpha", size=5)
    assert instance.size == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        instance.size = 6  # type: ignore[misc]


def test_duplicate_name_raises_value_error():
    registry = fresh()
    registry.register("alpha")(type("A1", (Thing,), {}))
    with pytest.raises(ValueError, match="duplicate thing name 'alpha'"):
        registry.register("alpha")(type("A2", (Thing,), {}))
    assert registry.names() == ["alpha"]


def test_duplicate_name_is_not_a_config_error():
    """A duplicate registration is a programming error, not a user's configuration error."""
    registry = fresh()
    registry.register("alpha")(type("A1", (Thing,), {}))
    with pytest.raises(ValueError) as info:
        registry.register("alpha")(type("A2", (Thing,), {}))
    assert not isinstance(info.value, ConfigError)


def test_non_frozen_dataclass_raises_type_error():
    """With a non-dataclass base, a plain ``@dataclass`` (not frozen) subclass is refused."""

    class PlainBase:
        name = ""

    registry = Registry("thing", PlainBase)  # type: ignore[type-var]

    @dataclasses.dataclass
    class Mutable(PlainBase):
        size: int = 1

    with pytest.raises(TypeError, match="frozen"):
        registry.register("mutable")(Mutable)
    assert "mutable" not in registry._classes


def test_field_without_default_raises_type_error():
    registry = fresh()
    cls = type("NoDefault", (Thing,), {"__annotations__": {"size": int, "other": int}, "other": 2})
    with pytest.raises(TypeError, match=r"\['size'\] need defaults"):
        registry.register("nodefault")(cls)
    assert "nodefault" not in registry._classes


def test_non_subclass_raises_type_error():
    registry = fresh()
    with pytest.raises(TypeError, match="must subclass Thing"):
        registry.register("stranger")(type("Stranger", (), {}))


def test_fresh_registries_are_independent():
    """Registering in one registry never shows up in another or in the global ones."""
    first, second = fresh(), fresh()
    first.register("only_here")(type("OnlyHere", (Thing,), {}))
    assert "only_here" in first and "only_here" not in second
    assert "only_here" not in PROTECTIONS and "only_here" not in COUNTERMEASURES


def test_names_pattern_is_fnmatch_and_sorted():
    registry = fresh()
    for name in ("zeta", "alpha", "alpine", "beta"):
        registry.register(name)(type(name.title(), (Thing,), {}))
    assert registry.names() == ["alpha", "alpine", "beta", "zeta"]
    assert registry.names("al*") == ["alpha", "alpine"]
    assert registry.names("?eta") == ["beta", "zeta"]
    assert registry.names("nothing*") == []


def test_global_registries_hold_the_shipped_components():
    assert set(PROTECTIONS.names()) >= {"clean", "random_noise", "cwn", "cwp"}
    assert set(COUNTERMEASURES.names()) >= {"none", "jpeg", "grayscale", "bdr", "median_filter"}
    assert set(VICTIMS.names()) >= {"cnn", "resnet18"}
    assert PROTECTIONS.names("cw*") == ["cwn", "cwp"]


# ------------------------------------------------------------------ lookup


@pytest.mark.parametrize("registry, typo, close", [
    (PROTECTIONS, "cwpp", "cwp"),
    (PROTECTIONS, "random-noise", "random_noise"),
    (COUNTERMEASURES, "jpg", "jpeg"),
    (COUNTERMEASURES, "median", "median_filter"),
    (VICTIMS, "resnt18", "resnet18"),
    (DATASETS, "digit", "digits"),
])
def test_get_unknown_name_suggests_close_match(registry, typo, close):
    with pytest.raises(ConfigError) as info:
        registry.get(typo)
    message = str(info.value)
    assert repr(typo) in message and "did you mean" in message
    hint = message.split("did you mean", 1)[1].split("?", 1)[0]
    assert repr(close) in hint


def test_get_unknown_name_without_close_match_lists_known():
    with pytest.raises(ConfigError) as info:
        PROTECTIONS.get("zzzzzzzz")
    assert "did you mean" not in str(info.value)
    for name in PROTECTIONS.names():
        assert name in str(info.value)


def test_config_error_is_a_value_error():
    with pytest.raises(ValueError):
        COUNTERMEASURES.get("nonexistent")


# ------------------------------------------------------------------ create and validation


def test_create_unknown_parameter_names_it_and_a_close_match():
    with pytest.raises(ConfigError) as info:
        COUNTERMEASURES.create("jpeg", qualty=50)
    message = str(info.value)
    assert "'qualty'" in message and "did you mean 'quality'" in message and "'jpeg'" in message


def test_create_unknown_parameter_of_parameterless_component():
    with pytest.raises(ConfigError, match="'strength'.*parameters: none"):
        COUNTERMEASURES.create("grayscale", strength=1)


@pytest.mark.parametrize("registry, name, params", [
    (COUNTERMEASURES, "jpeg", {"quality": "high"}),
    (COUNTERMEASURES, "jpeg", {"quality": 10.5}),
    (COUNTERMEASURES, "jpeg", {"quality": True}),
    (COUNTERMEASURES, "jpeg", {"quality": [10]}),
    (PROTECTIONS, "cwn", {"epsilon": "8"}),
    (PROTECTIONS, "cwn", {"epsilon": True}),
    (COUNTERMEASURES, "bdr", {"bits": 2.0}),
    (VICTIMS, "cnn", {"width": "wide"}),
])
def test_create_bad_type_raises_config_error(registry, name, params):
    with pytest.raises(ConfigError) as info:
        registry.create(name, **params)
    assert repr(next(iter(params))) in str(info.value)


@pytest.mark.parametrize("registry, name, params", [
    (COUNTERMEASURES, "jpeg", {"quality": 0}),
    (COUNTERMEASURES, "jpeg", {"quality": 96}),
    (COUNTERMEASURES, "bdr", {"bits": 0}),
    (COUNTERMEASURES, "bdr", {"bits": 9}),
    (COUNTERMEASURES, "median_filter", {"kernel": 4}),
    (COUNTERMEASURES, "median_filter", {"kernel": 0}),
    (PROTECTIONS, "cwn", {"epsilon": -1}),
    (PROTECTIONS, "random_noise", {"epsilon": 256}),
    (PROTECTIONS, "cwp", {"size_fraction": 0}),
    (PROTECTIONS, "cwp", {"size_fraction": 1.5}),
    (DATASETS, "digits", {"per_class": -1}),
    (DATASETS, "digits", {"size": 2}),
])
def test_create_out_of_range_raises_config_error(registry, name, params):
    with pytest.raises(ConfigError, match="bad value"):
        registry.create(name, **params)


@pytest.mark.parametrize("registry, name, params", [
    (COUNTERMEASURES, "jpeg", {"quality": 1}),
    (COUNTERMEASURES, "jpeg", {"quality": 95}),
    (COUNTERMEASURES, "bdr", {"bits": 8}),
    (PROTECTIONS, "cwn", {"epsilon": 0}),
    (PROTECTIONS, "cwn", {"epsilon": 255}),
    (PROTECTIONS, "cwp", {"size_fraction": 1}),
])
def test_create_accepts_boundary_values(registry, name, params):
    component = registry.create(name, **params)
    key, value = next(iter(params.items()))
    assert getattr(component, key) == value


@pytest.mark.parametrize("registry, name, field, value", [
    (PROTECTIONS, "cwn", "epsilon", 4),
    (PROTECTIONS, "random_noise", "epsilon", 16),
    (PROTECTIONS, "cwp", "size_fraction", 1),
])
def test_ints_are_accepted_for_float_fields(registry, name, field, value):
    component = registry.create(name, **{field: value})
    stored = getattr(component, field)
    assert type(stored) is float and stored == float(value)


def test_none_means_default():
    assert COUNTERMEASURES.create("jpeg", quality=None).quality == 10
    assert PROTECTIONS.create("cwn", epsilon=None).epsilon == 8.0


def test_tuple_and_optional_fields_are_coerced():
    """Lists become tuples (element types checked); optional fields accept None or their type."""
    registry = fresh()

    @registry.register("shaped")
    class Shaped(Thing):
        sizes: tuple[int, ...] = (1,)
        limit: int | None = None

    made = registry.create("shaped", sizes=[2, 3], limit=4)
    assert made.sizes == (2, 3) and made.limit == 4
    assert made.params() == {"sizes": [2, 3], "limit": 4}
    for bad in ({"sizes": 5}, {"sizes": ["a"]}, {"limit": "x"}, {"limit": 1.5}):
        with pytest.raises(ConfigError):
            registry.create("shaped", **bad)


def test_spec_names_version_and_parameters():
    spec = COUNTERMEASURES.create("jpeg", quality=50).spec()
    assert spec == {"name": "jpeg", "version": COUNTERMEASURES.get("jpeg").version, "params": {"quality": 50}}


def test_spec_of_a_component_outside_bench_holds_its_codes_fingerprint():
    """Not built-in: its module's file (this test file) is hashed into its keys, so editing it invalidates them."""
    registry = fresh()

    @registry.register("coded")
    class Coded(Thing):
        size: int = 1

    spec = Coded(size=2).spec()
    line = f"{Path(__file__).name}\0{hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}\n"
    assert spec == {"name": "coded", "version": 1, "params": {"size": 2},
                    "code": hashlib.sha256(line.encode()).hexdigest()}
    assert component_identity(Coded) == {"name": "coded", "version": 1, "code": spec["code"]}


# ------------------------------------------------------------------ describe_params


def test_describe_params():
    registry = fresh()

    @registry.register("described")
    class Described(Thing):
        a: int = 1
        b: str = "x"
        c: tuple[int, ...] = dataclasses.field(default_factory=lambda: (1, 2))

    assert describe_params(Described) == "a=1, b='x', c=(1, 2)"
    assert describe_params(registry.get("described")) == "a=1, b='x', c=(1, 2)"


@pytest.mark.parametrize("cls, expected", [
    (lambda: COUNTERMEASURES.get("jpeg"), "quality=10"),
    (lambda: COUNTERMEASURES.get("bdr"), "bits=2"),
    (lambda: COUNTERMEASURES.get("grayscale"), ""),
    (lambda: PROTECTIONS.get("cwn"), "epsilon=8.0"),
    (lambda: VICTIMS.get("cnn"), "width=32"),
])
def test_describe_params_of_shipped_components(cls, expected):
    assert describe_params(cls()) == expected


def test_shipped_components_are_frozen_with_defaults():
    """Every registered component can be created with no parameters and is immutable."""
    for registry, base in ((PROTECTIONS, Protection), (COUNTERMEASURES, Countermeasure)):
        for name in registry.names():
            component = registry.create(name)
            assert isinstance(component, base) and component.name == name
            assert dataclasses.is_dataclass(component)
            assert type(component).__dataclass_params__.frozen  # type: ignore[attr-defined]
