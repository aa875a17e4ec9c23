"""The data types every stage exchanges: images with labels, a train-stage countermeasure's hooks, pretrained
weights a component loads, the models a stage fits, and what an adaptive attacker holds (``bench.core.components`` re-exports them for plugins)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


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
        """The same labels with other uint8 images (e.g. protected ones), reporting ``info`` about them, on the CPU
        (where the harness keeps every set between stages): images made on a GPU are copied back here.

        Never casts: float images in [0, 1] would become zeros and int16 values would wrap around.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"with_images takes uint8 images, got {images.dtype}: publish 8-bit pixels yourself, e.g. "
                            "x.mul(255).round().clamp(0, 255).to(torch.uint8) for floats in [0, 1], or "
                            "x.clamp(0, 255).to(torch.uint8) for integer pixel values")
        if images.shape != self.images.shape:
            raise ValueError(f"with_images got shape {tuple(images.shape)} for a set of {tuple(self.images.shape)}")
        return ImageSet(images.cpu().contiguous(), self.labels.cpu(), self.num_classes, info)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.num_classes)

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.num_classes, self.info)


Generator = torch.Generator  # the type of every hook's ``gen``


@dataclasses.dataclass(frozen=True)
class TrainHooks:
    """How a train-stage countermeasure changes the one training loop (``bench.execute.train``).

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
class Attacker:
    """What an adaptive attacker holds (ConfounderGAN App. D; Radiya-Dixit et al. 2022): the natural images of
    the train set it is given (``clean``, image for image), and the cell's protection to run on natural images
    of its own: ``protect`` (by the protection's fitted model where it encrypts unseen images, else by running
    the protection on them, with a seed other than the protector's); ``how`` says which."""

    clean: ImageSet
    protect: Callable[[ImageSet], ImageSet]
    how: str


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")  # `bench run --offline` sets them


def hub_offline() -> bool:
    """Whether the hub must not be reached: ``$HF_HUB_OFFLINE`` or ``$TRANSFORMERS_OFFLINE`` is true."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_VARIABLES)


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub would find it from the environment now: ``$HF_HUB_CACHE``, else
    ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub`` (default ~/.cache/huggingface/hub)."""
    home = os.environ.get("HF_HOME") or str(Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or str(Path(home) / "hub")
    return Path(os.path.expandvars(hub)).expanduser()


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where pretrained weights come from now (planned without touching the network): ``local`` ($env's path),
    ``hub-cache`` (the hub's or torch's cache holds them), ``download`` (fetched from ``where`` at run time) or
    ``missing``; ``where`` is the path, hub id or URL."""

    weights: Pretrained
    kind: str
    where: str = ""

    @property
    def available(self) -> bool:
        return self.kind != "missing"

    def describe(self) -> str:
        """E.g. "CLIP from hub openai/clip-vit-base-patch32 (download at run time)"."""
        origin = f"hub {self.where}" if self.where == self.weights.hub_id else self.where
        return {"local": f"{self.weights.name} from ${self.weights.env} = {self.where}",
                "hub-cache": f"{self.weights.name} from {origin} (cached)",
                "download": f"{self.weights.name} from {origin} (download at run time)"}.get(
            self.kind, f"{self.weights.name}: missing")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """Pretrained weights a component loads: from ``$env`` (a local path) where it is set, else from the hub
    (``hub_id``) or a direct ``url`` (torchvision's weights, into torch's hub cache): the local cache, or a
    download at run time unless offline (``hub_offline``). ``files`` says what to place at ``$env``; ``source``
    documents where weights without a hub id come from. ``probe``: a file whose presence in the hub cache marks
    the repository as cached; ``allow``: the files bench loads (``bench weights --download`` fetches only those).
    ``size_mb``: the approximate download. The planner refuses a cell only when ``resolve()`` finds nothing."""

    name: str
    env: str
    hub_id: str = ""
    files: str = ""
    alternative: str = ""  # the documented setting that runs without these weights
    size_mb: float = 0.0
    licence: str = ""
    url: str = ""
    source: str = ""
    probe: str = "config.json"
    allow: tuple[str, ...] = ()

    def locate(self) -> Path | None:
        """``$env``'s path where it is set and exists."""
        path = Path(os.environ.get(self.env, "")).expanduser() if self.env else None
        return path if path is not None and os.environ.get(self.env) and path.exists() else None

    def cached(self) -> str | None:
        """The hub cache's copy (its probe file) or torch's cached download of ``url``, without the network."""
        if self.url:
            import torch.hub

            path = Path(torch.hub.get_dir()) / "checkpoints" / Path(self.url).name
            return str(path) if path.is_file() else None
        if not self.hub_id:
            return None
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(self.hub_id, self.probe, cache_dir=hub_cache_dir())
        except (ImportError, ValueError):  # no huggingface_hub; not a valid repo id
            return None
        return found if isinstance(found, str) else None

    def resolve(self) -> WeightsSource:
        """Where these weights come from now: ``$env`` when set (missing if its path is absent: never another
        checkpoint silently), else the cache, else a download unless offline."""
        if self.env and os.environ.get(self.env):
            path = self.locate()
            return WeightsSource(self, "local", str(path)) if path else WeightsSource(self, "missing")
        if self.cached():
            return WeightsSource(self, "hub-cache", self.hub_id or self.url)
        if (self.hub_id or self.url) and not hub_offline():
            return WeightsSource(self, "download", self.hub_id or self.url)
        return WeightsSource(self, "missing")

    def load_from(self) -> str:
        """What to load: $env's path where it is set, else the hub id or URL (from_pretrained finds the cache)."""
        return os.environ.get(self.env, "") if self.env and os.environ.get(self.env) else self.hub_id or self.url

    def missing(self) -> str:
        given = os.environ.get(self.env, "") if self.env else ""
        where = (f"${self.env} = {given} does not exist: " if given else "") + (
            f"place {self.files or 'them'} at a path and set ${self.env} to it" if self.env else
            f"give {self.files or 'them'}")
        remote = self.hub_id or self.url
        return (f"{self.name} weights not found: {where}"
                + (f" (or fetch {remote} into the cache: `bench weights --matrix M --download` on a connected machine"
                   f"{'; offline now: HF_HUB_OFFLINE/--offline' if hub_offline() else ''})" if remote else "")
                + (f"; source: {self.source}" if self.source else "")
                + (f"; or ask for the documented alternative: {self.alternative}" if self.alternative else ""))


class Models(Mapping[str, nn.Module]):
    """Fitted models by kind (``generator``, ``authorized`` …), loaded and verified by the harness."""

    def __init__(self, models: Mapping[str, nn.Module] | None = None) -> None:
        self._models = dict(models or {})

    def __getitem__(self, kind: str) -> nn.Module:
        if kind not in self._models:
            raise KeyError(f"no {kind!r} model here (models: {', '.join(self._models) or 'none'}); declare it in "
                           "needs_models (the planner checks the cell's protection fits one), or in uses_models and "
                           "check `kind in models`")
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
