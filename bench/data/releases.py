"""The seed papers' other datasets, read from the releases' own layouts: ImageNet subsets, TinyImageNet, ISIC
(HAM10000) and BloodMNIST. Nothing is downloaded: a missing file is a ``ConfigError`` that says what to get from
where and where to put it."""

from __future__ import annotations

import csv
import hashlib
import re
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np

from bench.core.components import ImageSet
from bench.core.registry import BenchWarning, ConfigError
from bench.data.datasets import DATASETS, Dataset, Outline, array_set, data_root, location
from bench.data.decoded import Decoding, FileList
from bench.data.folders import FileDataset, class_files, split_off
from bench.store.cache import Cache

WNID = re.compile(r"n\d{8}")
VAL_CSV = "LOC_val_solution.csv"  # Kaggle's ImageNet release: ImageId,PredictionString ("n01751748 x y x y …")
# (classes, train fraction): ConfounderGAN App. G.2 (first 25 classes, all 1,300 train images a class); DH §IV-A
# (first 100 classes, 20 % of the train images). APBench's ImageNet-100 is a folder its code reads without
# publishing its class list (util.py: dataset/imagenet100/train), so it is no preset: pass its wnids.
PRESETS = {"imagenet25": (25, 1.0), "dh": (100, 0.2)}


@DATASETS.register("imagenet-subset")
class ImageNetSubset(FileDataset):
    """A subset of ImageNet-1k (ILSVRC2012) at ``size`` px: ``preset`` ``imagenet25`` (ConfounderGAN App. G.2: the
    first 25 classes, every train image) or ``dh`` (DH §IV-A: the first 100 classes, 20 % of the train images);
    ``classes`` (first K of the sorted wnids) or ``wnids`` (a named list) and ``train_fraction`` override it.

    The test set is every validation image of the chosen classes. Pixels: torchvision's ImageNet evaluation transform
    (Resize(size·8/7) + CenterCrop(size), bilinear; see ``bench.data.decoded``); training then augments with random
    resized crops and flips (DH §IV-A "random cropping, resizing … flipping"). The train fraction is a fixed
    per-class sample (seed 0): DH does not say which 20 %.
    """

    paper: ClassVar[str] = "ImageNet subsets (ConfounderGAN App. G.2; DH §IV-A)"
    augment: ClassVar[str] = "rrc_flip"
    folder: ClassVar[str] = "imagenet"
    source: ClassVar[str] = "ILSVRC2012 from https://image-net.org (or Kaggle's imagenet-object-localization-challenge)"
    layout: ClassVar[str] = f"train/<wnid>/*.JPEG and either val/<wnid>/*.JPEG or val/*.JPEG with {VAL_CSV} beside val/"
    preset: str = "imagenet25"
    classes: int | None = None
    wnids: tuple[str, ...] = ()
    train_fraction: float | None = None
    size: int = 224

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ConfigError(f"imagenet-subset: unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if bad := [w for w in self.wnids if not WNID.fullmatch(w)]:
            raise ConfigError(f"imagenet-subset: {bad} are not wnids (n followed by 8 digits, e.g. n01440764)")
        if self.classes is not None and self.classes < 1 or not 0 < self.chosen()[1] <= 1:
            raise ConfigError("imagenet-subset needs classes ≥ 1 and 0 < train_fraction ≤ 1")

    def chosen(self) -> tuple[int, float]:
        """The number of classes and the train fraction: the preset's where not given."""
        classes, fraction = PRESETS[self.preset]
        return (len(self.wnids) or self.classes or classes,
                fraction if self.train_fraction is None else self.train_fraction)

    def outline(self) -> Outline:
        classes, fraction = self.chosen()
        return Outline(classes, round(1_300 * classes * fraction), self.size)  # ≤ 1,300 train images a class

    def required(self, root: Path) -> tuple[Path, ...]:
        return root / "train", root / "val"

    def decoding(self) -> Decoding:
        return Decoding(self.size, 0.875)

    def listing(self, root: Path) -> dict[str, FileList]:
        present = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and WNID.fullmatch(p.name))
        count, fraction = self.chosen()
        names = list(self.wnids) or present[:count]
        absent = [w for w in names if w not in present]
        if absent or len(names) < count:
            raise ConfigError(f"imagenet-subset: {root / 'train'} lacks {absent or f'{count - len(names)} of the class folders'}"
                              f" ({len(present)} present): place ILSVRC2012's train/<wnid>/ folders there")
        if len(present) != 1000 and not self.wnids:
            warnings.warn(f"imagenet-subset: {root / 'train'} holds {len(present)} classes, not ImageNet's 1,000: "
                          f"'the first {count}' are the first of these", BenchWarning, stacklevel=2)
        files, labels = class_files(root / "train", names, root)
        if fraction < 1:
            index = split_off(files, labels, fraction)[1]
            files, labels = [files[i] for i in index], [labels[i] for i in index]
        lists = {"train": FileList(root, tuple(files), tuple(labels), len(names)),
                 "test": FileList(root, *self._validation(root, names), len(names))}
        self.expect(lists, {"test": 50})
        return lists

    def _validation(self, root: Path, names: list[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
        if all((root / "val" / w).is_dir() for w in names):
            files, labels = class_files(root / "val", names, root)
            return tuple(files), tuple(labels)
        table = root / VAL_CSV
        if not table.is_file():
            raise ConfigError(f"imagenet-subset: {root / 'val'} has no <wnid>/ folders and {table} is missing: get "
                              f"{VAL_CSV} (Kaggle's release) or sort val/ into class folders (ILSVRC2012's valprep.sh)")
        index = {w: i for i, w in enumerate(names)}
        with open(table, newline="") as handle:
            rows = [(r["ImageId"], r["PredictionString"].split()[0]) for r in csv.DictReader(handle)]
        kept = sorted((f"val/{image}.JPEG", index[w]) for image, w in rows if w in index)
        return tuple(f for f, _ in kept), tuple(c for _, c in kept)


@DATASETS.register("tiny-imagenet")
class TinyImageNet(FileDataset):
    """TinyImageNet (Stanford CS231n: 200 classes, 500 train and 50 validation 64×64 images each; the validation
    set is the test set, as UGE and the field use it). ``size`` resamples (UGE §4 trains at 256×256). Classes in
    sorted wnid order (torchvision's ImageFolder on train/)."""

    paper: ClassVar[str] = "TinyImageNet (UGE §4, Table 1)"
    folder: ClassVar[str] = "tiny-imagenet-200"
    source: ClassVar[str] = "tiny-imagenet-200.zip from http://cs231n.stanford.edu/tiny-imagenet-200.zip (unzipped)"
    layout: ClassVar[str] = "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt"
    size: int = 64

    def outline(self) -> Outline:
        return Outline(200, 100_000, self.size)

    def required(self, root: Path) -> tuple[Path, ...]:
        return root / "wnids.txt", root / "train", root / "val" / "images", root / "val" / "val_annotations.txt"

    def decoding(self) -> Decoding:
        return Decoding(self.size, 1.0)

    def listing(self, root: Path) -> dict[str, FileList]:
        names = sorted((root / "wnids.txt").read_text().split())
        files, labels = class_files(root / "train", names, root)
        index = {w: i for i, w in enumerate(names)}
        rows = [line.split("\t")[:2] for line in (root / "val" / "val_annotations.txt").read_text().splitlines() if line]
        if unknown := sorted({w for _, w in rows} - set(index)):
            raise ConfigError(f"tiny-imagenet: val_annotations.txt names classes not in wnids.txt: {unknown[:5]}")
        kept = sorted((f"val/images/{name}", index[w]) for name, w in rows)
        lists = {"train": FileList(root, tuple(files), tuple(labels), len(names)),
                 "test": FileList(root, tuple(f for f, _ in kept), tuple(c for _, c in kept), len(names))}
        self.expect(lists, {"train": 500, "test": 50})
        return lists


@DATASETS.register("isic")
class Isic(FileDataset):
    """ISIC 2018 Task 3 (HAM10000): 10,015 dermoscopic images in 7 classes, ConfounderGAN's ISIC (App. G: 8,005
    train + 2,010 test images, 7 classes, 224 px). Their split is not published: a fixed class-stratified 20 %
    (seed 0) is the test set (8,013 + 2,002). The whole shorter side is kept (centre crop) at ``size``."""

    paper: ClassVar[str] = "ISIC 2018 Task 3 / HAM10000 (ConfounderGAN App. G)"
    augment: ClassVar[str] = "rrc_flip"
    folder: ClassVar[str] = "isic2018"
    source: ClassVar[str] = ("ISIC2018_Task3_Training_Input.zip and ISIC2018_Task3_Training_GroundTruth.zip from "
                             "https://challenge.isic-archive.com/data/#2018 (unzipped)")
    images: ClassVar[str] = "ISIC2018_Task3_Training_Input"
    truth: ClassVar[str] = "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"
    layout: ClassVar[str] = f"{images}/*.jpg and {truth}"
    size: int = 224
    test_fraction: float = 0.2

    def outline(self) -> Outline:
        return Outline(7, round(10_015 * (1 - self.test_fraction)), self.size)

    def required(self, root: Path) -> tuple[Path, ...]:
        return root / self.images, root / self.truth

    def decoding(self) -> Decoding:
        return Decoding(self.size, 1.0)

    def listing(self, root: Path) -> dict[str, FileList]:
        with open(root / self.truth, newline="") as handle:
            rows = list(csv.reader(handle))
        header, classes = rows[0], rows[0][1:]
        files = [f"{self.images}/{r[0]}.jpg" for r in rows[1:]]
        labels = [int(np.argmax([float(v) for v in r[1:]])) for r in rows[1:]]
        if header[0] != "image" or len(classes) != 7:
            raise ConfigError(f"isic: {root / self.truth} is not the Task 3 ground truth (image + 7 classes)")
        if len(files) != 10015:
            warnings.warn(f"isic: {len(files)} images, not the release's 10,015", BenchWarning, stacklevel=2)
        kept, held = split_off(files, labels, self.test_fraction)
        return {split: FileList(root, tuple(files[i] for i in part), tuple(labels[i] for i in part), 7)
                for split, part in (("train", kept), ("test", held))}


# MedMNIST v2 (Zenodo record 6496656, medmnist's INFO): the 28-px file's MD5 and every size's split sizes
BLOODMNIST_MD5 = {28: "7053d0359d879ad8a5505303e11de1dc"}
BLOODMNIST_COUNTS = {"train": 11959, "val": 1712, "test": 3421}


@DATASETS.register("bloodmnist")
class BloodMnist(Dataset):
    """BloodMNIST (MedMNIST v2; ConfounderGAN App. G: 11,959 train and 3,421 test images, 8 classes, 28 px; the
    validation split unused): the release's ``.npz`` (``bloodmnist.npz``, or ``bloodmnist_<size>.npz`` for MedMNIST+
    sizes 64, 128, 224), read with ``allow_pickle=False``. Standard augmentation none, as MedMNIST's baselines."""

    paper: ClassVar[str] = "BloodMNIST (ConfounderGAN App. G; MedMNIST v2)"
    augment: ClassVar[str] = "none"
    size: int = 28
    root: str = location()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.size not in (28, 64, 128, 224):
            raise ConfigError(f"bloodmnist: size must be one of 28, 64, 128, 224 (MedMNIST's files), got {self.size}")

    def outline(self) -> Outline:
        return Outline(8, BLOODMNIST_COUNTS["train"], self.size)

    def path(self) -> Path:
        name = "bloodmnist.npz" if self.size == 28 else f"bloodmnist_{self.size}.npz"
        return (Path(self.root).expanduser() if self.root else data_root("") / "medmnist") / name

    def missing(self) -> str | None:
        path = self.path()
        return None if path.is_file() else (
            f"bloodmnist: {path} not found. Download {path.name} from https://zenodo.org/records/"
            f"{'6496656' if self.size == 28 else '10519652'} (or `pip install medmnist` and "
            f"`python -m medmnist download`) and place it in {path.parent}; or point root=... at its folder.")

    def load_full(self, cache: Cache | None = None) -> tuple[ImageSet, ImageSet]:
        if problem := self.missing():
            raise ConfigError(problem)
        path = self.path()
        digest = hashlib.md5(path.read_bytes()).hexdigest() if self.size in BLOODMNIST_MD5 else None
        with np.load(path, allow_pickle=False) as arrays:
            counts = {split: len(arrays[f"{split}_labels"]) for split in BLOODMNIST_COUNTS}
            sets = [array_set(arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1), 8)
                    for split in ("train", "test")]
        if digest not in (None, BLOODMNIST_MD5.get(self.size)) or counts != BLOODMNIST_COUNTS:
            warnings.warn(f"bloodmnist: {path} is not the published release (md5 {digest}, split sizes {counts}; "
                          f"expected {BLOODMNIST_MD5.get(self.size)}, {BLOODMNIST_COUNTS})", BenchWarning, stacklevel=2)
        if sets[0].size != self.size:
            raise ConfigError(f"bloodmnist: {path} holds {sets[0].size}-px images, not size = {self.size}")
        return sets[0], sets[1]

