"""Datasets as uniform uint8 N×C×H×W train/test ImageSets, with class-balanced subsets for CPU runs.

Where files live never enters a cache key: fields with ``metadata={"location": True}`` are left out and
the loaded content's fingerprint is used instead, so two copies of the same data share their cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from bench.core.components import ImageSet
from bench.core.registry import Component, ConfigError, Registry

if TYPE_CHECKING:
    from bench.store.cache import Cache

DATA_ROOT_ENV = "BENCH_DATA_ROOT"
CIFAR10_JPEG_ENV = "BENCH_CIFAR10_JPEG"
REPO_ROOT = Path(__file__).resolve().parents[2]
FINGERPRINT_ROWS = 1024  # images hashed at a time


def location(default: Any = "") -> Any:  # pragma: no mutate block (called while the classes below are defined)
    """A field that says where data lives: not part of the cache key."""
    return dataclasses.field(default=default, metadata={"location": True})


def data_root(root: str) -> Path:
    """``root`` if given, else ``$BENCH_DATA_ROOT``, else ``~/.cache/bench/data``."""
    return Path(root or os.environ.get(DATA_ROOT_ENV) or Path.home() / ".cache" / "bench" / "data").expanduser()


@dataclasses.dataclass(frozen=True)
class Outline:
    """What a dataset holds, known without loading it (for the cost estimate): its classes, every train image, the
    images' side and channels."""

    classes: int
    train_images: int
    side: int = 32
    channels: int = 3

    def compute(self) -> float:
        """A victim's training work per image relative to a 32-px one: ∝ pixels up to 64 px (the victims keep the
        resolution there: CIFAR stems), ÷ 16 above (ImageNet stems: a stride-2 conv and a stride-2 pool)."""
        return (self.side / 32) ** 2 / (16 if self.side > 64 else 1)

    def image_bytes(self) -> int:
        return self.channels * self.side ** 2


def outline_of(name: str, params: dict[str, Any]) -> Outline:
    """A dataset's ``outline``, once per process for each spec (the estimate asks for it per cell and record, and
    ``image-folder``'s lists its folder); CIFAR-10's for a dataset (of an old record) that no longer builds."""
    return _outline(name, json.dumps(params, sort_keys=True, default=str))


@functools.lru_cache(maxsize=512)
def _outline(name: str, params: str) -> Outline:
    try:
        return DATASETS.create(name, **json.loads(params)).outline()
    except (ConfigError, KeyError, TypeError, ValueError):
        return Outline(10, 50_000)


def train_images(name: str, params: dict[str, Any], crafted: bool = False) -> int:
    """Train images of dataset ``name`` with ``params`` (``crafted``: those its protections are crafted on,
    ``protect_per_class``), from its outline: nothing loaded."""
    outline, per_class = outline_of(name, params), params.get("per_class")
    per_class = params.get("protect_per_class") or per_class if crafted else per_class
    return outline.train_images if per_class is None else min(outline.train_images, per_class * outline.classes)


@dataclasses.dataclass(frozen=True)
class Dataset(Component):
    """A dataset. ``per_class``/``test_per_class`` keep the first n ≥ 1 images of each class (unset: every image).

    ``protect_per_class`` (≥ ``per_class``): protections are crafted on the first n images of each class, and the
    cells train on the first ``per_class`` of them (the README's transfer protocol: a poison made on a large set,
    evaluated on a small one). ``augment`` names the standard train augmentation the papers use for it (see
    ``bench.execute.train``).
    """

    per_class: int | None = None
    test_per_class: int | None = None
    protect_per_class: int | None = None
    augment: ClassVar[str] = "crop_flip"

    def __post_init__(self) -> None:
        for key in ("per_class", "test_per_class", "protect_per_class"):
            _check_per_class(getattr(self, key), key)
        if self.protect_per_class is not None and (self.per_class is None or self.per_class > self.protect_per_class):
            raise ConfigError(f"protect_per_class = {self.protect_per_class} needs per_class ≤ it (got "
                              f"{self.per_class}): the cells train on the first per_class of the images protected")

    def outline(self) -> Outline:
        """Classes, train images, side and channels, without loading (this default: CIFAR-10's)."""
        return Outline(10, 50_000)

    def missing(self) -> str | None:
        """What is missing to load this dataset, with the fix (None: nothing); checked for every dataset of a run
        before any work."""
        return None

    def load_full(self, cache: Cache | None = None) -> tuple[ImageSet, ImageSet]:
        """Every train and test image; ``cache``: the results cache, where datasets of files keep them decoded."""
        raise NotImplementedError

    def load(self, cache: Cache | None = None) -> tuple[ImageSet, ImageSet]:
        train, test = self.load_full(cache)
        return balanced_subset(train, self.per_class), balanced_subset(test, self.test_per_class)

    def spec(self) -> dict[str, Any]:
        """Name, version and the parameters that change the content (location fields left out, and an unset
        ``protect_per_class``, so that the keys made before it existed still hold)."""
        located = {f.name for f in dataclasses.fields(self) if f.metadata.get("location")}
        located |= {"protect_per_class"} if self.protect_per_class is None else set()
        spec = super().spec()
        spec["params"] = {k: v for k, v in spec["params"].items() if k not in located}
        return spec


DATASETS: Registry[Dataset] = Registry("dataset", Dataset)


def _check_per_class(per_class: int | None, field: str = "per_class") -> None:
    if per_class is not None and per_class < 1:
        raise ValueError(f"{field} must be ≥ 1, got {per_class}: omit it to keep every image")


def balanced_subset(data: ImageSet, per_class: int | None, last: bool = False) -> ImageSet:
    """The first (``last``: the last) ``per_class`` images of every class, in dataset order (None keeps everything)."""
    _check_per_class(per_class)
    if per_class is None:
        return data
    pick = slice(-per_class, None) if last else slice(per_class)
    keep = torch.cat([torch.nonzero(data.labels == c).flatten()[pick] for c in range(data.num_classes)])
    return data.subset(keep.sort().values)


def nested_index(larger: ImageSet, smaller: ImageSet) -> torch.Tensor:
    """Where ``smaller``'s images sit in ``larger``, when each class of it is the first images of that class in
    ``larger`` (``protect_per_class``: the train set inside the crafting set); raises if it is not."""
    index = torch.empty(len(smaller), dtype=torch.long)
    for c in range(smaller.num_classes):
        mine, theirs = torch.nonzero(smaller.labels == c).flatten(), torch.nonzero(larger.labels == c).flatten()
        if len(theirs) < len(mine):
            raise RuntimeError(f"class {c} has {len(mine)} train images but only {len(theirs)} to protect")
        index[mine] = theirs[: len(mine)]
    if not torch.equal(larger.images[index], smaller.images):
        raise RuntimeError("the train set is not the first images of each class of the set its protections were "
                           "crafted on (protect_per_class): this dataset's subsets are not nested")
    return index


def train_images_like(name: str, per_class: int | None, like: ImageSet, last: bool = False) -> torch.Tensor:
    """uint8 train images of dataset ``name`` (the first ``per_class`` per class; ``last``: the last ones, disjoint
    from the first images a cell trains on) resized to ``like``'s size and converted to its channel count (greyscale
    by luma, or replicated): another dataset as material for a set's models."""
    from torchvision.transforms.v2 import functional as TF

    other = balanced_subset(DATASETS.create(name).load()[0], per_class, last) if last else \
        DATASETS.create(name, per_class=per_class).load()[0]
    images = TF.resize(other.images, [like.size, like.size], antialias=True)
    if other.channels != like.channels:
        images = TF.rgb_to_grayscale(images) if like.channels == 1 else images.expand(-1, 3, -1, -1).contiguous()
    return images


def fingerprint(*sets: ImageSet) -> str:
    """A content hash of images and labels."""
    digest = hashlib.blake2b(digest_size=16)
    for data in sets:
        digest.update(str(tuple(data.images.shape)).encode())
        rows = data.images.contiguous().numpy().reshape(len(data), -1)
        for first in range(0, len(data), FINGERPRINT_ROWS):  # in parts: no copy of a memory-mapped set
            digest.update(rows[first:first + FINGERPRINT_ROWS])
        digest.update(data.labels.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


def array_set(images: np.ndarray, labels: Any, num_classes: int, channels_last: bool = True) -> ImageSet:
    array = np.asarray(images, dtype=np.uint8)
    if array.ndim == 3:
        array = array[..., None] if channels_last else array[:, None]
    if channels_last:
        array = array.transpose(0, 3, 1, 2)
    return ImageSet(torch.from_numpy(np.ascontiguousarray(array)), torch.as_tensor(np.asarray(labels), dtype=torch.int64),
                    num_classes)


@DATASETS.register("digits")
class Digits(Dataset):
    """scikit-learn's bundled handwritten digits (real data, 1,797 8×8 greyscale images, 10 classes).

    The embedded default: needs no download. Pixels 0..16 are scaled to 0..255 and resized bilinearly to
    ``size``; a fixed stratified split keeps ``test_fraction`` of each class for testing. No flips in its
    standard augmentation (digits are not mirror-symmetric).
    """

    paper: ClassVar[str] = "embedded default data (scikit-learn load_digits)"
    augment: ClassVar[str] = "crop"
    size: int = 16
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 4 <= self.size <= 256 or not 0 < self.test_fraction < 1:
            raise ValueError("digits needs 4 ≤ size ≤ 256 and 0 < test_fraction < 1")

    def outline(self) -> Outline:
        return Outline(10, 1_438, self.size, 1)

    def load_full(self, cache: Cache | None = None) -> tuple[ImageSet, ImageSet]:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.from_numpy(bunch.images).float()[:, None] / 16.0
        if self.size != 8:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        labels = torch.from_numpy(bunch.target).long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        test = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(10):
            members = order[labels[order] == c]
            test[members[: round(len(members) * self.test_fraction)]] = True
        return (ImageSet(images[~test], labels[~test], 10), ImageSet(images[test], labels[test], 10))


@DATASETS.register("cifar10-jpeg")
class Cifar10Jpeg(Dataset):
    """CIFAR-10 re-encoded as JPEG q75, from an npz of JPEG bytes and offsets (../shared/data/README.md).

    Path: ``path``, else ``$BENCH_CIFAR10_JPEG``, else ``<data root>/cifar10_jpeg75.npz``, else
    ``../shared/data/cifar10_jpeg75.npz`` beside the repository. Only the kept subset is decoded.
    """

    paper: ClassVar[str] = "CIFAR-10 (JPEG q75 development copy)"
    path: str = location()
    root: str = location()

    def candidates(self) -> list[Path]:
        found = [self.path, os.environ.get(CIFAR10_JPEG_ENV, ""), data_root(self.root) / "cifar10_jpeg75.npz",
                 REPO_ROOT.parent / "shared" / "data" / "cifar10_jpeg75.npz"]
        return [Path(p).expanduser() for p in found if str(p)]

    def load(self, cache: Cache | None = None) -> tuple[ImageSet, ImageSet]:
        from PIL import Image

        if self.path and not Path(self.path).expanduser().is_file():
            raise ConfigError(f"cifar10-jpeg: path={self.path!r} is not a file; point it at cifar10_jpeg75.npz")
        path = next((p for p in self.candidates() if p.is_file()), None)
        if path is None:
            raise ConfigError("cifar10-jpeg: file cifar10_jpeg75.npz not found; looked at "
                              + ", ".join(map(str, self.candidates()))
                              + f". Pass path=... in the matrix or set ${CIFAR10_JPEG_ENV}.")
        arrays = np.load(path)
        sets = []
        for split, per_class in (("train", self.per_class), ("test", self.test_per_class)):
            labels = torch.from_numpy(arrays[f"{split}_labels"].astype(np.int64))
            index = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(10)]).sort().values
            blob, offsets = arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"]
            images = np.stack([np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
                               for i in index.tolist()])
            sets.append(array_set(images, labels[index], 10))
        return sets[0], sets[1]


from bench.data import folders, releases, standard  # noqa: F401  (they register the other datasets)
