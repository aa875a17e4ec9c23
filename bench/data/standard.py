"""torchvision's datasets (CIFAR-10, CIFAR-100, SVHN): local files first, then a download, else a clear error."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from bench.core.components import ImageSet
from bench.core.registry import ConfigError
from bench.data.datasets import DATASETS, Dataset, Outline, array_set, data_root, location
from bench.store.cache import Cache


@dataclasses.dataclass(frozen=True)
class _Torchvision(Dataset):
    """Shared loading for torchvision's datasets: local files first, then a download, else a clear error."""

    root: str = location()
    download: bool = location(True)
    tv_class: ClassVar[str] = ""
    files: ClassVar[str] = ""
    splits: ClassVar[tuple[dict[str, Any], dict[str, Any]]] = ({"train": True}, {"train": False})
    num_classes: ClassVar[int] = 10
    train_count: ClassVar[int] = 50_000

    def outline(self) -> Outline:
        return Outline(self.num_classes, self.train_count)

    def load_full(self, cache: Cache | None = None) -> tuple[ImageSet, ImageSet]:
        root = data_root(self.root)
        sets = []
        for split in self.splits:
            ds = self._fetch(split, root)
            if hasattr(ds, "labels"):  # SVHN: N×C×H×W array and .labels
                sets.append(array_set(ds.data, ds.labels, self.num_classes, channels_last=False))
            else:
                sets.append(array_set(ds.data, ds.targets, self.num_classes))
        return sets[0], sets[1]

    def _fetch(self, split: dict[str, Any], root: Path) -> Any:
        import torchvision

        cls = getattr(torchvision.datasets, self.tv_class)
        try:
            return cls(str(root), **split, download=False)
        except Exception as missing:  # torchvision raises RuntimeError when files are absent or corrupt
            if not self.download:
                raise ConfigError(self._missing(root, missing)) from missing
        try:
            return cls(str(root), **split, download=True)
        except Exception as err:
            raise ConfigError(self._missing(root, err)) from err

    def _missing(self, root: Path, err: Exception) -> str:
        return (f"{self.name}: data not found in {root} and could not be downloaded ({type(err).__name__}: {err}). "
                f"Place {self.files} in {root}, or pass --data-root / root=... naming the folder that holds them.")


@DATASETS.register("cifar10")
class Cifar10(_Torchvision):
    """CIFAR-10 via torchvision (50,000/10,000 32×32 RGB, 10 classes)."""

    paper: ClassVar[str] = "CIFAR-10 (torchvision)"
    tv_class: ClassVar[str] = "CIFAR10"
    files: ClassVar[str] = "cifar-10-python.tar.gz (or its extracted folder cifar-10-batches-py/)"


@DATASETS.register("cifar100")
class Cifar100(_Torchvision):
    """CIFAR-100 via torchvision (50,000/10,000 32×32 RGB, 100 classes)."""

    paper: ClassVar[str] = "CIFAR-100 (torchvision)"
    tv_class: ClassVar[str] = "CIFAR100"
    files: ClassVar[str] = "cifar-100-python.tar.gz (or its extracted folder cifar-100-python/)"
    num_classes: ClassVar[int] = 100


@DATASETS.register("svhn")
class Svhn(_Torchvision):
    """SVHN via torchvision (73,257/26,032 32×32 RGB, 10 classes); no flips or crops, as the papers."""

    paper: ClassVar[str] = "SVHN (torchvision)"
    augment: ClassVar[str] = "none"
    tv_class: ClassVar[str] = "SVHN"
    files: ClassVar[str] = "train_32x32.mat and test_32x32.mat"
    splits: ClassVar[tuple[dict[str, Any], dict[str, Any]]] = ({"split": "train"}, {"split": "test"})
    train_count: ClassVar[int] = 73_257

