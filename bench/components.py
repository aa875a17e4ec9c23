"""The data type every stage exchanges, the contracts of the three plugin families, and what each declares.

Flow of one cell: dataset → ``Protection.fit`` (``protect``, plus any model it fits) → ``Countermeasure``'s data
stage (``purify``) → a victim from ``Victim.build`` trained by ``bench.train`` (with the countermeasure's
train-stage ``TrainHooks``) → record.

Capabilities are typed class attributes: what a component needs (labels, a surrogate victim, pretrained weights,
a protection's model) and offers (models it fits, encryption of unseen images, the stages it changes). They are
checked against the methods a class overrides at registration, and against each cell by the planner.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from bench.registry import Component, Registry

DATA, TRAIN = "data", "train"


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """Images as uint8 N×C×H×W (what a real published image is) with int64 labels.

    ``info`` is what the stage that made these images reports about it (a protection's surrogate rounds, an
    external source's sha256 …); it goes into the cache manifest and the record, never into keys.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    info: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise TypeError(f"ImageSet images must be uint8 N×C×H×W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> int:
        """Side length (images are square after loading)."""
        return self.images.shape[-1]

    def with_images(self, images: torch.Tensor, **info: Any) -> ImageSet:
        """The same labels with other uint8 images (e.g. protected ones), reporting ``info`` about them.

        Never casts: float images in [0, 1] would become zeros and int16 values would wrap around.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"with_images takes uint8 images, got {images.dtype}: publish 8-bit pixels yourself, e.g. "
                            "x.mul(255).round().clamp(0, 255).to(torch.uint8) for floats in [0, 1], or "
                            "x.clamp(0, 255).to(torch.uint8) for integer pixel values")
        if images.shape != self.images.shape:
            raise ValueError(f"with_images got shape {tuple(images.shape)} for a set of {tuple(self.images.shape)}")
        return ImageSet(images.contiguous(), self.labels, self.num_classes, info)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.num_classes)

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.num_classes, self.info)


Generator = torch.Generator  # the type of every hook's ``gen``


@dataclasses.dataclass(frozen=True)
class TrainHooks:
    """How a train-stage countermeasure changes the one training loop (``bench.train``).

    Every hook that draws randomness gets the cell's generator ``gen`` (a CPU ``torch.Generator`` seeded by the
    cell's seed; derive a device generator from it for large draws). ``batch_transform(x, y, gen) -> (x, y)``: on
    float batches in [0, 1] after the standard augmentation; may return soft labels N×K (mixup, cutmix).
    ``attack(model, x, y, gen) -> x``: a per-batch input attack (PGD for adversarial training), run under the
    loop's autocast. ``loss(model, x, y, gen) -> (loss, logits)``: replaces cross-entropy (UEraser's max over
    augmented draws, distillation's KL to a teacher). ``epoch_start(epoch, epochs)``: called before each epoch
    (0-based) with the number of epochs, for hooks that follow the schedule (UEraser's adversarial first part).
    """

    batch_transform: Callable[[torch.Tensor, torch.Tensor, Generator], tuple[torch.Tensor, torch.Tensor]] | None = None
    attack: Callable[[nn.Module, torch.Tensor, torch.Tensor, Generator], torch.Tensor] | None = None
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, Generator], tuple[torch.Tensor, torch.Tensor]] | None = None
    epoch_start: Callable[[int, int], None] | None = None


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Pretrained weights a component loads: found at ``$env`` (a local path) or, where the hub is reachable,
    under ``hub_id``. ``files`` says what to place there; the planner refuses a cell whose weights are absent."""

    name: str
    env: str
    hub_id: str = ""
    files: str = ""

    def locate(self) -> Path | None:
        path = Path(os.environ.get(self.env, "")).expanduser()
        return path if os.environ.get(self.env) and path.exists() else None

    def missing(self) -> str:
        return (f"{self.name} weights not found: place {self.files or 'them'} at a path and set ${self.env} to it"
                + (f" (hub id {self.hub_id}, needs the hub)" if self.hub_id else ""))


class Models(Mapping[str, nn.Module]):
    """Fitted models by kind (``generator``, ``authorized`` …), loaded and verified by the harness."""

    def __init__(self, models: Mapping[str, nn.Module] | None = None) -> None:
        self._models = dict(models or {})

    def __getitem__(self, kind: str) -> nn.Module:
        if kind not in self._models:
            raise KeyError(f"no {kind!r} model here (models: {', '.join(self._models) or 'none'}); declare it in "
                           "needs_models so that the planner checks the cell's protection fits one")
        return self._models[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._models)

    def __len__(self) -> int:
        return len(self._models)


@dataclasses.dataclass(frozen=True)
class Fitted:
    """What a stage made: the image set and the models it fitted (each an ``nn.Module`` with an ``arch`` dict
    from which the component's ``build_model(kind, arch)`` rebuilds it)."""

    data: ImageSet
    models: Models = dataclasses.field(default_factory=Models)


class _Declared(Component):
    """Capabilities shared by every plugin family."""

    needs_labels: ClassVar[bool] = True  # uses the train labels
    surrogate_param: ClassVar[str | None] = None  # the parameter naming a surrogate victim it trains
    pretrained: ClassVar[tuple[Pretrained, ...]] = ()  # weights it loads (see ``pretrained_needed``)
    fits: ClassVar[tuple[str, ...]] = ()  # kinds of model its data stage fits, saved beside its output
    needs_models: ClassVar[tuple[str, ...]] = ()  # kinds of model of the cell's protection it takes (``models=``)
    expensive_on_cpu: ClassVar[bool] = False  # the planner warns when such a cell will run on a CPU
    model_methods: ClassVar[tuple[str, ...]] = ()  # the methods that take ``models`` when ``needs_models`` is set

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
        if cls.surrogate_param is not None and cls.surrogate_param not in {f.name for f in dataclasses.fields(cls)}:
            raise TypeError(f"surrogate_param {cls.surrogate_param!r} is not a parameter")
        if bool(cls.fits) != _overrides(cls, "build_model"):
            raise TypeError(f"declares fits = {cls.fits} but does not override build_model, or the reverse")
        if issubclass(cls, (Protection, Countermeasure)) and bool(cls.fits) != _overrides(cls, "fit"):
            raise TypeError(f"overrides fit but declares no fits (or declares fits = {cls.fits} without fit)")
        if cls.needs_models and not cls.model_methods:
            raise TypeError("only countermeasures and victims take a protection's models (needs_models)")
        for method in cls.model_methods:
            if cls.needs_models and _overrides(cls, method) and \
                    "models" not in inspect.signature(getattr(cls, method)).parameters:
                raise TypeError(f"declares needs_models = {cls.needs_models}, so {method} must take a keyword 'models'")

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """The declared capabilities as a JSON-ready dict (``bench list``, records)."""
        return {"needs_labels": cls.needs_labels, "surrogate_param": cls.surrogate_param,
                "pretrained": [p.name for p in cls.pretrained], "fits": list(cls.fits),
                "needs_models": list(cls.needs_models), "expensive_on_cpu": cls.expensive_on_cpu}


def _overrides(cls: type, method: str) -> bool:
    """Whether ``cls`` or a class between it and its family's base defines ``method``."""
    for klass in cls.__mro__:
        if klass in _FAMILIES:
            return False
        if method in klass.__dict__:
            return True
    return False


class Protection(_Declared):
    """Makes a training set unlearnable. Never mutates its input; randomness comes from ``seed``.

    Override ``protect``, or, for a protection that fits models (``fits``), ``fit``, which returns them with the
    protected set; the harness saves them beside it. ``encrypts_unseen``: its fitted models protect new images
    without labels through ``encrypt`` (the ``ood`` mix, ``bench protect``). ``identity`` (``clean``): not cached.
    """

    identity: ClassVar[bool] = False
    encrypts_unseen: ClassVar[bool] = False

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        """The protected set (a protection that fits models returns it from ``fit``)."""
        return self.fit(train, seed=seed, device=device).data

    def fit(self, train: ImageSet, *, seed: int, device: torch.device) -> Fitted:
        """The protected set and the models fitted on the way (none unless overridden)."""
        return Fitted(self.protect(train, seed=seed, device=device))

    def encrypt(self, models: Models, images: torch.Tensor, *, device: torch.device) -> torch.Tensor:
        """uint8 N×C×H×W images, never seen in fitting, protected by ``models`` without labels."""
        raise NotImplementedError(f"{self.name} cannot encrypt unseen images")

    @classmethod
    def check_declaration(cls) -> None:
        super().check_declaration()
        if _overrides(cls, "protect") == _overrides(cls, "fit"):
            raise TypeError("must override exactly one of protect (no models) and fit (with models)")
        if cls.encrypts_unseen != _overrides(cls, "encrypt") or (cls.encrypts_unseen and not cls.fits):
            raise TypeError("encrypts_unseen = True needs fits (a model) and an encrypt override, and the reverse")

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {**super().capabilities(), "encrypts_unseen": cls.encrypts_unseen}


class Countermeasure(_Declared):
    """Tries to make a protected training set learnable again, in one or both ``stages``.

    ``"data"``: ``purify`` (or ``fit``, with models) preprocesses the train set once (cached); ``"train"``:
    ``train_hooks`` changes training itself (augmentations, adversarial training …). Both may be declared; none
    (``none``, ``early_stop``) leaves data and training alone. ``needs_models``: kinds of model of the cell's
    protection it uses; ``purify``/``fit``/``train_hooks`` then take a keyword ``models`` (a ``Models``).
    ``reports``: ``"final"`` or ``"best"`` (the leaderboard shows ``test_acc_best`` in its column: early_stop).
    """

    needs_labels: ClassVar[bool] = False  # its own work uses the labels (training the victim always does)
    stages: ClassVar[frozenset[str]] = frozenset()
    reports: ClassVar[str] = "final"
    model_methods: ClassVar[tuple[str, ...]] = ("purify", "fit", "train_hooks")

    def purify(self, train: ImageSet, *, seed: int, device: torch.device, **needs: Models) -> ImageSet:
        """Data-stage preprocessing of the (protected) train set; the test set is never touched."""
        return self.fit(train, seed=seed, device=device, **needs).data if DATA in self.stages else train

    def fit(self, train: ImageSet, *, seed: int, device: torch.device, **needs: Models) -> Fitted:
        """The purified set and the models fitted on the way (none unless overridden). ``needs`` is
        ``models=`` for a countermeasure that declares ``needs_models``, and empty otherwise."""
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
        if cls.reports not in ("final", "best"):
            raise TypeError(f"reports must be 'final' or 'best', got {cls.reports!r}")

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {**super().capabilities(), "stages": sorted(cls.stages), "reports": cls.reports}


class Victim(_Declared):
    """A network architecture trained on the (protected, purified) train set. With ``needs_models`` (e.g. a
    victim that starts from a protection's authorized network), ``build`` takes a keyword ``models``."""

    model_methods: ClassVar[tuple[str, ...]] = ("build",)

    def build(self, num_classes: int, in_channels: int, image_size: int, **needs: Models) -> nn.Module:
        raise NotImplementedError


_FAMILIES = (Component, _Declared, Protection, Countermeasure, Victim)
PROTECTIONS: Registry[Protection] = Registry("protection", Protection)
COUNTERMEASURES: Registry[Countermeasure] = Registry("countermeasure", Countermeasure)
VICTIMS: Registry[Victim] = Registry("victim", Victim)
