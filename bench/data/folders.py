"""Datasets of image files the user already has: ImageNet subsets, TinyImageNet, ISIC and a folder of their own.

Each lists its files in the release's layout, checks them against the release (missing files: a ``ConfigError``
naming the file, the source and the target folder, before any work; counts unlike the release's: a warning) and
decodes them once into the results cache (``bench.data.decoded``). The root is ``root``, else
``<data root>/<folder>`` (``--data-root``, ``$BENCH_DATA_ROOT``).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np

from bench.core.components import ImageSet
from bench.core.registry import BenchWarning, ConfigError
from bench.data.datasets import DATASETS, Dataset, Outline, data_root, location
from bench.data.decoded import Decoding, FileList, decode_splits
from bench.store.cache import Cache

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def class_files(folder: Path, classes: list[str], root: Path) -> tuple[list[str], list[int]]:
    """The image files in ``folder/<class>/`` (any depth) for each of ``classes``, sorted, relative to ``root``,
    with the class's index as label (torchvision's ImageFolder order)."""
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise ConfigError(f"no image files in {folder / name}: every class needs at least one")
        files += [str(p.relative_to(root)) for p in found]
        labels += [label] * len(found)
    return files, labels


def split_off(files: list[str], labels: list[int], fraction: float) -> tuple[list[int], list[int]]:
    """Positions of a class-stratified split: per class, a fixed permutation (seed 0) of its files, of which the
    first ``round(n · fraction)`` (at least one) go to the second part."""
    first, second, classes = [], [], np.asarray(labels)
    for label in np.unique(classes):
        members = np.flatnonzero(classes == label)
        order = np.random.default_rng(0).permutation(len(members))
        cut = max(1, round(len(members) * fraction))
        second += members[order[:cut]].tolist()
        first += members[order[cut:]].tolist()
    return sorted(first), sorted(second)


@dataclasses.dataclass(frozen=True)
class FileDataset(Dataset):
    """A dataset decoded from image files: ``listing`` says which, ``decoding`` how; shared loading and checks."""

    root: str = location()
    folder: ClassVar[str] = ""  # under the data root
    source: ClassVar[str] = ""  # where to get it
    layout: ClassVar[str] = ""  # what the folder must hold

    def folder_path(self) -> Path:
        return Path(self.root).expanduser() if self.root else data_root("") / self.folder

    def missing(self) -> str | None:
        root = self.folder_path()
        for path in (root, *self.required(root)):
            if not path.exists():
                return (f"{self.name}: {path} not found. Download {self.source} and place it so that {root} holds "
                        f"{self.layout}; or point root=... (or --data-root / $BENCH_DATA_ROOT) at its folder.")
        return None

    def required(self, root: Path) -> tuple[Path, ...]:
        """The files and folders the layout needs under ``root``."""
        return ()

    def listing(self, root: Path) -> dict[str, FileList]:
        raise NotImplementedError

    def decoding(self) -> Decoding:
        raise NotImplementedError

    def load_full(self, cache: Cache | None = None) -> tuple[ImageSet, ImageSet]:
        if problem := self.missing():
            raise ConfigError(problem)
        lists = self.listing(self.folder_path())
        spec = self.spec()
        spec["params"] = {k: v for k, v in spec["params"].items() if not k.endswith("per_class")}  # shared by subsets
        sets = decode_splits(lists, self.decoding(), spec, cache)
        return sets["train"], sets["test"]

    def expect(self, lists: dict[str, FileList], per_class: dict[str, int]) -> None:
        """Warn where a split's count per class is not the release's ``per_class[split]``."""
        for split, count in per_class.items():
            found = lists[split].per_class()
            if any(n != count for n in found):
                warnings.warn(f"{self.name}: {split} has {min(found)}–{max(found)} images per class, not the "
                              f"release's {count}: numbers will not be comparable to the papers'", BenchWarning,
                              stacklevel=3)


@DATASETS.register("image-folder")
class ImageFolder(FileDataset):
    """A folder of the user's own images in torchvision's ImageFolder layout: ``train/<class>/…`` and ``test/<class>/…``
    (or ``val/``), any size and mode, resized to ``size`` (see ``bench.data.decoded``: shorter side to
    ``size / crop``, centre crop). With one folder of classes (``<root>/<class>/…``, or ``train/`` alone), a fixed
    class-stratified ``test_fraction`` of each class is the test set. ``channels`` 1 reads greyscale."""

    paper: ClassVar[str] = "a folder of the user's images (torchvision ImageFolder layout)"
    source: ClassVar[str] = "your images"
    layout: ClassVar[str] = "train/<class>/*.jpg and test/<class>/*.jpg (or one folder per class)"
    size: int = 224
    crop: float = 1.0
    channels: int = 3
    test_fraction: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"image-folder: test_fraction must be in (0, 1), got {self.test_fraction}")

    def decoding(self) -> Decoding:
        return Decoding(self.size, self.crop, self.channels)

    def missing(self) -> str | None:
        if not self.root:
            return "image-folder needs root=... naming the folder that holds your images (train/<class>/… and test/)"
        return super().missing()

    def outline(self) -> Outline:
        """From the folder's listing (nothing decoded); no images where it is missing."""
        if self.missing():
            return Outline(1, 0, self.size, self.channels)
        train = self.listing(self.folder_path())["train"]
        return Outline(train.num_classes, len(train.files), self.size, self.channels)

    def listing(self, root: Path) -> dict[str, FileList]:
        test = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
        train = root / "train" if (root / "train").is_dir() else root
        classes = sorted(p.name for p in train.iterdir() if p.is_dir() and p.name not in ("test", "val"))
        if not classes:
            raise ConfigError(f"image-folder: {train} holds no class folders (<class>/image files)")
        files, labels = class_files(train, classes, root)
        if test is None:
            kept, held = split_off(files, labels, self.test_fraction)
            return {"train": _subset(root, files, labels, kept, len(classes)),
                    "test": _subset(root, files, labels, held, len(classes))}
        test_files, test_labels = class_files(test, classes, root)
        return {"train": FileList(root, tuple(files), tuple(labels), len(classes)),
                "test": FileList(root, tuple(test_files), tuple(test_labels), len(classes))}


def _subset(root: Path, files: list[str], labels: list[int], index: list[int], num_classes: int) -> FileList:
    return FileList(root, tuple(files[i] for i in index), tuple(labels[i] for i in index), num_classes)

