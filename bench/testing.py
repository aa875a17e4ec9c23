"""Run bench's component contracts (``bench.core.contracts``) as pytest tests over any registered component.

An out-of-tree author runs the checks bench's built-ins pass with one test module (no conftest needed)::

    from bench.testing import ContractTests

    class TestMine(ContractTests):
        components = ["countermeasure:invert", "protection:mine*"]   # FAMILY:fnmatch pattern, or the classes

Every contract that applies to a component runs (``ProtectionContracts``, ``CountermeasureContracts`` and
``VictimContracts`` hold one family's each), on real images: scikit-learn's digits (40 greyscale 16×16, 4 per
class) and 40 images of the CIFAR-10 JPEG copy where it is found (``$BENCH_CIFAR10_JPEG``, the data root or
../shared/data; those cases skip otherwise). A component's ``test_params`` make it run in seconds on a CPU;
``test_skip`` says why the contracts cannot run it. As a pytest plugin (``pytest_plugins = ["bench.testing"]`` in
a conftest.py) it adds the fixtures ``bench_digits`` and ``bench_rgb`` for the author's own tests and names the
data in pytest's header. Only tests import this module: it imports pytest, which bench does not need.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from bench.core.components import COUNTERMEASURES, DATA, PROTECTIONS, VICTIMS, ImageSet, Models
from bench.core.contracts import (CPU, assert_countermeasure_contract, assert_data_stage_changes_images,
                                  assert_image_set_contract, assert_linf_budget, assert_models_rebuild,
                                  assert_protection_contract, assert_reference_params, assert_subset_contract,
                                  assert_train_hooks, assert_victim_large_input, assert_victim_trains, run_hooks)
from bench.core.registry import Registry
from bench.core.units import PIXEL_STEPS
from bench.data import mixes
from bench.data.datasets import DATASETS, Cifar10Jpeg

__all__ = ["ContractTests", "CountermeasureContracts", "ProtectionContracts", "VictimContracts",  # the tests
           "builtin_names", "coloured", "create", "digits_set", "resolve", "rgb_set",  # data and components
           # the checks (bench.core.contracts), for an author's own tests
           "assert_countermeasure_contract", "assert_data_stage_changes_images", "assert_image_set_contract",
           "assert_linf_budget", "assert_models_rebuild", "assert_protection_contract", "assert_reference_params",
           "assert_subset_contract", "assert_train_hooks", "assert_victim_large_input", "assert_victim_trains",
           "run_hooks"]

FAMILIES: dict[str, Registry] = {"protection": PROTECTIONS, "countermeasure": COUNTERMEASURES, "victim": VICTIMS}
EPSILONS = (8.0, 3.0, 16.0, 0.0)  # a protection's ``epsilon`` is its L∞ budget in 1/255 steps
VICTIM_SHAPES = ((1, 28, 10), (3, 32, 10), (3, 32, 100), (3, 64, 200))  # channels, size, classes
CIFAR10_JPEG_MISSING = ("needs cifar10_jpeg75.npz (the CIFAR-10 JPEG q75 copy, ../shared/data/README.md): set "
                        "$BENCH_CIFAR10_JPEG to its path, or place it in the data root or ../shared/data/")


# ------------------------------------------------------------------ data and components


def cifar10_jpeg_path() -> Path | None:
    """The CIFAR-10 JPEG copy where the ``cifar10-jpeg`` dataset finds it, or None."""
    return next((path for path in Cifar10Jpeg().candidates() if path.is_file()), None)


@functools.cache
def _load(which: str) -> ImageSet:
    if which == "digits":
        return DATASETS.create("digits", per_class=4).load()[0]
    return DATASETS.create("cifar10-jpeg", path=str(cifar10_jpeg_path()), per_class=4, test_per_class=1).load()[0]


def _copy(data: ImageSet) -> ImageSet:  # a component that mutates its input spoils no other test's data
    return ImageSet(data.images.clone(), data.labels.clone(), data.num_classes)


def digits_set() -> ImageSet:
    """40 real greyscale images (4 per class), 1×16×16."""
    return _copy(_load("digits"))


def rgb_set() -> ImageSet:
    """40 real RGB images (4 per class) of the CIFAR-10 JPEG copy; skips the calling test without it."""
    if cifar10_jpeg_path() is None:
        pytest.skip(CIFAR10_JPEG_MISSING)
    return _copy(_load("rgb"))


def coloured(data: ImageSet) -> ImageSet:
    """Greyscale images as RGB with three different channels (for countermeasures that act on colour)."""
    x = data.images
    return ImageSet(torch.cat([x, x // 2, 255 - x], 1), data.labels, data.num_classes)


def family(cls: type) -> str:
    """``protection``, ``countermeasure`` or ``victim``."""
    if kind := next((kind for kind, registry in FAMILIES.items() if issubclass(cls, registry.base)), None):
        return kind
    raise ValueError(f"{cls.__name__} is no Protection, Countermeasure or Victim")


def create(cls: type, **params: Any) -> Any:
    """An instance of a registered class with its ``test_params``, then ``params``, validated as a matrix's."""
    return FAMILIES[family(cls)].create(cls.name, **{**cls.test_params, **params})


def builtin_names(registry: Any) -> list[str]:
    """The registered names whose class is bench's own (not a plugin's, nor a test's)."""
    return registry.names(builtin=True)


def resolve(specs: Iterable[str | type]) -> list[type]:
    """Component classes from ``family:pattern`` strings (fnmatch) or classes; an unmatched pattern is an error."""
    found: dict[tuple[str, str], type] = {}
    for spec in specs:
        if isinstance(spec, type):
            found[family(spec), spec.name] = spec
            continue
        kind, _, pattern = spec.partition(":")
        registry = FAMILIES.get(kind.rstrip("s"))
        if registry is None or not pattern:
            raise ValueError(f"{spec!r}: write FAMILY:PATTERN with FAMILY one of {', '.join(FAMILIES)}")
        if not (names := registry.names(pattern)):
            raise ValueError(f"{spec!r} matches no registered {registry.kind} (known: {', '.join(registry.names())})")
        found.update({(registry.kind, name): registry.get(name) for name in names})
    return [found[key] for key in sorted(found)]


def _needs(cls: type, batch: ImageSet, seed: int) -> dict[str, Any]:
    """A countermeasure's data-stage ``needs``: an adaptive attacker of ``batch`` protected by ``random_noise``
    (it runs the protection itself) where it ``needs_attacker``."""
    if not cls.needs_attacker:
        return {}
    noise = PROTECTIONS.create("random_noise")
    sets = mixes.TrainSet(batch, noise.protect(batch, seed=seed, device=CPU), torch.ones(len(batch), dtype=torch.bool))
    return {"attacker": mixes.attacker(noise, Models(), sets, seed=seed, device=CPU)}


# ------------------------------------------------------------------ the tests


def _contract(kind: str, applies: Callable[[type], bool | str] = lambda cls: True):
    """Mark a ContractTests method as the contract of ``kind`` components for which ``applies`` is True (a
    string: skip it, saying why)."""
    def mark(test: Callable) -> Callable:
        test.bench_contract = (kind, applies)  # type: ignore[attr-defined]
        return test
    return mark


def _needs_models(cls: type) -> bool | str:
    return f"needs the protection's models {cls.needs_models}: test it in a matrix" if cls.needs_models else True


def _has_epsilon(cls: type) -> bool:
    return "epsilon" in {f.name for f in dataclasses.fields(cls)}


class _Contracts:
    """Parametrizes each test marked by ``_contract`` over the ``components`` it applies to."""

    components: ClassVar[Sequence[str | type]] = ()

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        kind, applies = getattr(metafunc.function, "bench_contract", (None, None))
        if kind is None:
            return
        cases = []
        for cls in resolve(self.components):
            if family(cls) == kind and (why := applies(cls)) is not False:
                why = cls.test_skip or why
                cases.append(pytest.param(cls, id=cls.name, marks=[pytest.mark.skip(reason=why)] if why is not True
                                          else []))
        nothing = pytest.param(None, id="none", marks=[pytest.mark.skip(reason=f"no {kind} among the components")])
        metafunc.parametrize("component", cases or [nothing])

    @pytest.fixture(scope="class", params=["digits", "rgb"])
    @classmethod
    def contract_batch(cls, request: pytest.FixtureRequest) -> ImageSet:
        return digits_set() if request.param == "digits" else rgb_set()


class ProtectionContracts(_Contracts):
    """uint8 of the same shape, labels kept, input untouched, deterministic for a seed, fitted models that
    rebuild, images changed (kept by an identity), unseen images encrypted, the L∞ budget of ``epsilon``."""

    @_contract("protection")
    def test_protection_contract(self, component: type, contract_batch: ImageSet) -> None:
        assert_protection_contract(create(component), contract_batch)

    @_contract("protection", _has_epsilon)
    @pytest.mark.parametrize("epsilon", EPSILONS)
    def test_linf_budget(self, component: type, epsilon: float, contract_batch: ImageSet) -> None:
        field = {f.name: f for f in dataclasses.fields(component)}["epsilon"]
        assert field.metadata.get("unit") == PIXEL_STEPS and field.metadata.get("budget"), (
            f"{component.name}'s epsilon declares no unit: bench counts L∞ budgets in 1/255 steps; declare "
            "`epsilon: float = pixel_steps(8.0)` (bench.api) so that this test and a matrix's ε < 1 warning apply")
        assert_linf_budget(create(component, epsilon=epsilon), contract_batch)


class CountermeasureContracts(_Contracts):
    """The data stage's contract (whole set or subset), that it changes real images, and the train hooks."""

    @_contract("countermeasure", _needs_models)
    def test_countermeasure_contract(self, component: type, contract_batch: ImageSet) -> None:
        assert_countermeasure_contract(create(component), contract_batch, 2, _needs(component, contract_batch, 2))

    @_contract("countermeasure", lambda cls: DATA in cls.stages and not cls.keeps_images and not cls.returns_subset
               and _needs_models(cls))
    def test_data_stage_changes_images(self, component: type) -> None:
        data = coloured(digits_set())  # three different channels: colour-only countermeasures change them too
        assert_data_stage_changes_images(create(component), data, _needs(component, data, 0))

    @_contract("countermeasure", _needs_models)
    def test_train_hooks(self, component: type) -> None:
        assert_train_hooks(create(component), digits_set(), _needs(component, digits_set(), 0))


class VictimContracts(_Contracts):
    """Builds and trains a step for several channels, sizes and classes; ImageNet resolution; its reference size."""

    @_contract("victim", _needs_models)
    @pytest.mark.parametrize("channels, size, classes", VICTIM_SHAPES)
    def test_victim_trains(self, component: type, channels: int, size: int, classes: int) -> None:
        assert_victim_trains(create(component), channels, size, classes)

    @_contract("victim", _needs_models)
    def test_victim_imagenet_resolution(self, component: type) -> None:
        assert_victim_large_input(create(component), 224)

    @_contract("victim", lambda cls: cls.reference_params is not None and _needs_models(cls))
    def test_victim_reference_params(self, component: type) -> None:
        assert_reference_params(component())  # the defaults: the reference is the paper's architecture


class ContractTests(ProtectionContracts, CountermeasureContracts, VictimContracts):
    """Every contract of the three families, over ``components`` (set it in a subclass)."""


# ------------------------------------------------------------------ as a pytest plugin


@pytest.fixture(scope="session")
def bench_digits() -> ImageSet:
    """``digits_set()``: 40 real greyscale 16×16 images."""
    return digits_set()


@pytest.fixture(scope="session")
def bench_rgb() -> ImageSet:
    """``rgb_set()``: 40 real RGB 32×32 images; skips without the CIFAR-10 JPEG copy."""
    return rgb_set()


def pytest_report_header(config: pytest.Config) -> str:
    path = cifar10_jpeg_path()
    return f"bench contracts: digits, and {f'the CIFAR-10 JPEG copy at {path}' if path else 'no RGB set (skipped)'}"
