"""The data types every stage exchanges (``bench.core.exchange``), the contracts of the three plugin families, and what each declares.

Flow of one cell: dataset → ``Protection.fit`` (``protect``, plus any model it fits) → ``Countermeasure``'s data
stage (``purify``) → a victim from ``Victim.build`` trained by ``bench.execute.train`` (with the countermeasure's
train-stage ``TrainHooks``) → record.

Capabilities are typed class attributes: what a component needs (labels, a surrogate victim, pretrained weights,
a protection's model) and offers (models it fits, encryption of unseen images, the stages it changes). They are
checked against the methods a class overrides at registration, and against each cell by the planner.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, ClassVar

import torch
from torch import nn

from bench.core.exchange import Attacker, Fitted, Generator, ImageSet, Models, Pretrained, TrainHooks
from bench.core.registry import Component, ConfigError, Registry, coerce

__all__ = ["COUNTERMEASURES", "DATA", "PROTECTIONS", "TRAIN", "VICTIMS", "Attacker", "Countermeasure", "Fitted",
           "Generator",
           "ImageSet", "Models", "Pretrained", "Protection", "TrainHooks", "Victim"]

DATA, TRAIN = "data", "train"


class _Declared(Component):
    """Capabilities shared by every plugin family."""

    needs_labels: ClassVar[bool] = True  # uses the train labels
    surrogate_param: ClassVar[str | None] = None  # the parameter naming a surrogate victim it trains
    pretrained: ClassVar[tuple[Pretrained, ...]] = ()  # weights it loads (see ``pretrained_needed``)
    fits: ClassVar[tuple[str, ...]] = ()  # kinds of model its data stage fits, saved beside its output
    needs_models: ClassVar[tuple[str, ...]] = ()  # kinds of model of the cell's protection it requires (``models=``)
    uses_models: ClassVar[tuple[str, ...]] = ()  # kinds it takes where the cell's protection fits them, else goes without
    expensive_on_cpu: ClassVar[bool] = False  # the planner warns when such a cell will run on a CPU
    # why its CUDA work is not bitwise repeatable even under ``bench run --deterministic`` (an op with no deterministic
    # CUDA kernel: torch then only warns); the planner names it, "" when it can honour the flag
    cuda_nondeterministic: ClassVar[str] = ""
    model_methods: ClassVar[tuple[str, ...]] = ()  # the methods that take ``models`` when ``needs_models`` is set
    # parameters whose defaults are the paper's setting (weights, sources, surrogates, budgets): a cell at another
    # value is marked off the paper's setting beside the published table (``bench leaderboard --compare paper``)
    paper_setting: ClassVar[tuple[str, ...]] = ()
    # for the contract tests (``bench.testing``), never for runs: parameters that make it run in seconds on a CPU
    # (its defaults stay the paper's), and, where those tests cannot run it at all, why (they skip saying so)
    test_params: ClassVar[dict[str, object]] = {}
    test_skip: ClassVar[str] = ""

    def pretrained_needed(self) -> tuple[Pretrained, ...]:
        """The weights these parameters need (a documented alternative may need none)."""
        return self.pretrained

    @classmethod
    def build_model(cls, kind: str, arch: dict[str, Any]) -> nn.Module:
        """An untrained model of ``kind`` with ``arch`` (for the harness to load saved weights into)."""
        raise NotImplementedError(f"{cls.name} fits no model")

    @classmethod
    def check_declaration(cls) -> None:
        """Raise TypeError where the declared capabilities and the overridden methods disagree."""
        parameters = {f.name for f in dataclasses.fields(cls)}
        if cls.surrogate_param is not None and cls.surrogate_param not in parameters:
            raise TypeError(f"surrogate_param {cls.surrogate_param!r} is not a parameter")
        if unknown := set(cls.paper_setting) - parameters:
            raise TypeError(f"paper_setting names {sorted(unknown)}, which are not parameters")
        _check_test_params(cls, parameters)
        if bool(cls.fits) != _overrides(cls, "build_model"):
            raise TypeError(f"declares fits = {cls.fits} but does not override build_model, or the reverse")
        if issubclass(cls, (Protection, Countermeasure)) and bool(cls.fits) != _overrides(cls, "fit"):
            raise TypeError(f"overrides fit but declares no fits (or declares fits = {cls.fits} without fit)")
        takes = cls.needs_models + cls.uses_models
        if takes and not cls.model_methods:
            raise TypeError("only countermeasures and victims take a protection's models (needs_models, uses_models)")
        if set(cls.needs_models) & set(cls.uses_models):
            raise TypeError(f"a kind is either needed or used where present: {set(cls.needs_models) & set(cls.uses_models)}")
        for method in cls.model_methods:
            if takes and _overrides(cls, method) and not _takes_models(cls, method):
                raise TypeError(f"declares needs_models/uses_models = {takes}, so {method} must take a keyword 'models'")

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """The declared capabilities as a JSON-ready dict (``bench list``, records)."""
        return {"needs_labels": cls.needs_labels, "surrogate_param": cls.surrogate_param,
                "pretrained": [p.name for p in cls.pretrained], "fits": list(cls.fits),
                "needs_models": list(cls.needs_models), "uses_models": list(cls.uses_models),
                "expensive_on_cpu": cls.expensive_on_cpu, "paper_setting": list(cls.paper_setting)}


def _check_test_params(cls: type[_Declared], parameters: set[str]) -> None:
    """``test_params`` name parameters with values of their types (as a matrix's would be checked)."""
    if not isinstance(cls.test_params, dict) or not isinstance(cls.test_skip, str):
        raise TypeError("test_params must be a dict of parameters and test_skip a string")
    if unknown := set(cls.test_params) - parameters:
        raise TypeError(f"test_params names {sorted(unknown)}, which are not parameters")
    hints = typing.get_type_hints(cls) if cls.test_params else {}
    for key, value in cls.test_params.items():
        try:
            coerce(value, hints[key], f"test_params {key!r}")
        except ConfigError as err:
            raise TypeError(str(err)) from err


def _takes_models(cls: type, method: str) -> bool:
    return _takes(cls, method, "models")


def _takes(cls: type, method: str, keyword: str) -> bool:
    return keyword in inspect.signature(getattr(cls, method)).parameters


def _overrides(cls: type, method: str) -> bool:
    """Whether ``cls`` or a class between it and its family's base defines ``method``."""
    for klass in cls.__mro__:
        if klass in _FAMILIES:
            return False
        if method in klass.__dict__:
            return True
    return False


class Protection(_Declared):
    """Makes a training set unlearnable. Never mutates its input; randomness comes from ``seed``; returns CPU tensors
    (``ImageSet.with_images`` brings images made on ``device`` back to the CPU).

    Override ``protect``, or, for a protection that fits models (``fits``), ``fit``, which returns them with the
    protected set; the harness saves them beside it. ``encrypts_unseen``: its fitted models protect new images
    through ``encrypt`` (the ``ood`` mix, ``bench protect``), without labels unless ``encrypt_needs_labels`` (then
    ``encrypt`` takes a keyword ``labels``: DH hides its class's image). ``identity`` (``clean``): not cached.
    """

    identity: ClassVar[bool] = False
    encrypts_unseen: ClassVar[bool] = False
    encrypt_needs_labels: ClassVar[bool] = False

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        """The protected set (a protection that fits models returns it from ``fit``)."""
        return self.fit(train, seed=seed, device=device).data

    def fit(self, train: ImageSet, *, seed: int, device: torch.device) -> Fitted:
        """The protected set and the models fitted on the way (none unless overridden)."""
        return Fitted(self.protect(train, seed=seed, device=device))

    def encrypt(self, models: Models, images: torch.Tensor, *, device: torch.device) -> torch.Tensor:
        """uint8 N×C×H×W images, never seen in fitting, protected by ``models`` (a keyword ``labels`` too where
        ``encrypt_needs_labels``)."""
        raise NotImplementedError(f"{self.name} cannot encrypt unseen images")

    @classmethod
    def check_declaration(cls) -> None:
        super().check_declaration()
        if _overrides(cls, "protect") == _overrides(cls, "fit"):
            raise TypeError("must override exactly one of protect (no models) and fit (with models)")
        if cls.encrypts_unseen != _overrides(cls, "encrypt") or (cls.encrypts_unseen and not cls.fits):
            raise TypeError("encrypts_unseen = True needs fits (a model) and an encrypt override, and the reverse")
        takes_labels = "labels" in inspect.signature(cls.encrypt).parameters
        if cls.encrypt_needs_labels != takes_labels or (cls.encrypt_needs_labels and not cls.encrypts_unseen):
            raise TypeError("encrypt_needs_labels = True needs encrypts_unseen and an encrypt with a keyword 'labels', "
                            "and the reverse")

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {**super().capabilities(), "encrypts_unseen": cls.encrypts_unseen,
                "encrypt_needs_labels": cls.encrypt_needs_labels}


class Countermeasure(_Declared):
    """Tries to make a protected training set learnable again, in one or both ``stages``.

    ``"data"``: ``purify`` (or ``fit``, with models) preprocesses the train set once (cached) and returns CPU
    tensors, as protections do (``ImageSet.with_images`` moves them); ``"train"``:
    ``train_hooks`` changes training itself (augmentations, adversarial training …). Both may be declared; none
    (``none``, ``early_stop``) leaves data and training alone. ``needs_models``: kinds of model of the cell's
    protection it requires (``uses_models``: takes where present); ``purify``/``fit``/``train_hooks`` then take a
    keyword ``models`` (a ``Models``). A countermeasure that ``fits`` models in its data stage and also has the
    train stage gets them back in ``train_hooks``'s ``models`` (a distillation teacher, fitted and cached once).
    ``reports``: ``"final"`` or ``"best"`` (the leaderboard shows ``test_acc_best`` in its column: early_stop).
    ``needs_attacker``: an adaptive attack; its data stage takes a keyword ``attacker`` (an ``Attacker``: the
    natural images and the cell's protection to run). ``returns_subset``: its data stage returns part of the
    train set (the victim trains on the attacker's other half: ``dncnn``). ``keeps_images``: its data stage only
    fits models and hands the images on unchanged (``distill``'s teacher). ``hooks_draw = False``: its train hooks
    draw no randomness from the loop's generator (the contract tests then check that its seed changes nothing).
    """

    needs_labels: ClassVar[bool] = False  # its own work uses the labels (training the victim always does)
    stages: ClassVar[frozenset[str]] = frozenset()
    reports: ClassVar[str] = "final"
    needs_attacker: ClassVar[bool] = False
    returns_subset: ClassVar[bool] = False
    keeps_images: ClassVar[bool] = False
    hooks_draw: ClassVar[bool] = True
    model_methods: ClassVar[tuple[str, ...]] = ("purify", "fit", "train_hooks")

    def purify(self, train: ImageSet, *, seed: int, device: torch.device, **needs: Models | Attacker) -> ImageSet:
        """Data-stage preprocessing of the (protected) train set; the test set is never touched."""
        return self.fit(train, seed=seed, device=device, **needs).data if DATA in self.stages else train

    def fit(self, train: ImageSet, *, seed: int, device: torch.device, **needs: Models | Attacker) -> Fitted:
        """The purified set and the models fitted on the way (none unless overridden). ``needs`` holds
        ``models=`` where ``needs_models``/``uses_models`` are declared and ``attacker=`` where ``needs_attacker``."""
        return Fitted(self.purify(train, seed=seed, device=device, **needs))

    def train_hooks(self, num_classes: int, image_size: int, **needs: Models) -> TrainHooks:
        """Train-stage changes to the training loop (none unless ``"train"`` is a stage)."""
        return TrainHooks()

    @classmethod
    def check_declaration(cls) -> None:
        super().check_declaration()
        if not cls.stages <= {DATA, TRAIN}:
            raise TypeError(f"stages must be a subset of {{'data', 'train'}}, got {set(cls.stages)}")
        data = _overrides(cls, "purify") or _overrides(cls, "fit")
        if data != (DATA in cls.stages):
            raise TypeError("overrides purify/fit but 'data' is not in its stages" if data else
                            "declares the 'data' stage but overrides neither purify nor fit")
        if _overrides(cls, "train_hooks") != (TRAIN in cls.stages):
            raise TypeError("overrides train_hooks but 'train' is not in its stages" if TRAIN not in cls.stages
                            else "declares the 'train' stage but does not override train_hooks")
        if cls.fits and TRAIN in cls.stages and not _takes_models(cls, "train_hooks"):
            raise TypeError(f"fits {cls.fits} and has the train stage, so train_hooks must take a keyword 'models'")
        takes_attacker = any(_overrides(cls, m) and _takes(cls, m, "attacker") for m in ("purify", "fit"))
        if cls.needs_attacker != takes_attacker:
            raise TypeError("needs_attacker = True needs a purify or fit that takes a keyword 'attacker', and the reverse")
        if cls.returns_subset and DATA not in cls.stages:
            raise TypeError("returns_subset = True needs the 'data' stage")
        if cls.keeps_images and (not cls.fits or cls.returns_subset):
            raise TypeError("keeps_images = True needs a data stage that fits models (fits) and returns the whole set")
        if not cls.hooks_draw and TRAIN not in cls.stages:
            raise TypeError("hooks_draw = False describes train hooks, but 'train' is not in its stages")
        if cls.reports not in ("final", "best"):
            raise TypeError(f"reports must be 'final' or 'best', got {cls.reports!r}")

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {**super().capabilities(), "stages": sorted(cls.stages), "reports": cls.reports,
                "needs_attacker": cls.needs_attacker, "returns_subset": cls.returns_subset,
                "keeps_images": cls.keeps_images, "hooks_draw": TRAIN in cls.stages and cls.hooks_draw}


class Victim(_Declared):
    """A network architecture trained on the (protected, purified) train set. With ``needs_models`` (e.g. a
    victim that starts from a protection's authorized network), ``build`` takes a keyword ``models``.
    ``reference_params``: the parameter count, at 3×32×32 and 10 classes, of the reference architecture it
    follows (the contract tests hold its default build within 2 % of it)."""

    model_methods: ClassVar[tuple[str, ...]] = ("build",)
    reference_params: ClassVar[int | None] = None

    def build(self, num_classes: int, in_channels: int, image_size: int, **needs: Models) -> nn.Module:
        raise NotImplementedError

    def input_stats(self, **needs: Models) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The per-channel mean and std (in [0, 1] units) to normalise its inputs with; None (every victim but
        one that a protection fixed them for): the train set's own statistics, as any trainer computes them."""
        return None

    @classmethod
    def check_declaration(cls) -> None:
        super().check_declaration()
        if cls.reference_params is not None and (type(cls.reference_params) is not int or cls.reference_params <= 0):
            raise TypeError(f"reference_params must be a positive int (a count), got {cls.reference_params!r}")


_FAMILIES = (Component, _Declared, Protection, Countermeasure, Victim)
PROTECTIONS: Registry[Protection] = Registry("protection", Protection)
COUNTERMEASURES: Registry[Countermeasure] = Registry("countermeasure", Countermeasure)
VICTIMS: Registry[Victim] = Registry("victim", Victim)
