"""Small stand-ins written in the releases' own layouts (ImageNet, TinyImageNet, ISIC 2018, a MedMNIST ``.npz``), for
tests and for measuring the decoding and memory of large datasets without downloading one.

Each class's images are JPEGs of its own smooth random colour pattern with per-image variation, so a victim can
learn them. ``python -m bench.data.standins imagenet ROOT --classes 100 --per-class 260 --size 256`` writes the
ImageNet-layout folder that issue 37's memory check decodes (≈26,000 files).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

WNID_BASE = 1440764  # n01440764, ImageNet's first class: stand-in wnids count up from it


def wnids(classes: int) -> list[str]:
    return [f"n{WNID_BASE + c:08d}" for c in range(classes)]


def picture(label: int, index: int, size: int | tuple[int, int], seed: int = 0) -> Image.Image:
    """Image ``index`` of class ``label``: the class's 6×6 colour pattern, varied per image, upsampled."""
    width, height = (size, size) if isinstance(size, int) else size
    base = np.random.default_rng([seed, label]).integers(0, 256, (6, 6, 3))
    varied = base + np.random.default_rng([seed, label, index]).normal(0, 30, (6, 6, 3))
    return Image.fromarray(varied.clip(0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)


def write_imagenet(root: Path, classes: int, per_class: int, val_per_class: int, size: int = 64,
                   val_csv: bool = False) -> Path:
    """ILSVRC2012's layout: ``train/<wnid>/<wnid>_<i>.JPEG``; ``val/<wnid>/…`` or, with ``val_csv``, a flat
    ``val/ILSVRC2012_val_<n>.JPEG`` with Kaggle's ``LOC_val_solution.csv`` beside it."""
    rows = []
    for label, wnid in enumerate(wnids(classes)):
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            picture(label, i, (size + i % 7, size)).save(root / "train" / wnid / f"{wnid}_{i}.JPEG", quality=90)
        for i in range(val_per_class):
            image = f"ILSVRC2012_val_{label * val_per_class + i + 1:08d}"
            folder = root / "val" if val_csv else root / "val" / wnid
            folder.mkdir(parents=True, exist_ok=True)
            picture(label, 10_000 + i, size).save(folder / f"{image}.JPEG", quality=90)
            rows.append((image, f"{wnid} 1 1 10 10"))
    if val_csv:
        with open(root / "LOC_val_solution.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([("ImageId", "PredictionString"), *rows])
    return root


def write_tiny_imagenet(root: Path, classes: int, per_class: int, val_per_class: int) -> Path:
    """tiny-imagenet-200's layout: ``wnids.txt``, ``train/<wnid>/images/<wnid>_<i>.JPEG``, ``val/images/val_<n>.JPEG``
    and ``val/val_annotations.txt`` (file, wnid, box), 64×64."""
    names, lines = wnids(classes), []
    (root / "val" / "images").mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(reversed(names)) + "\n")  # not sorted in the release either
    for label, wnid in enumerate(names):
        (root / "train" / wnid / "images").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            picture(label, i, 64).save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG")
        for i in range(val_per_class):
            name = f"val_{label * val_per_class + i}.JPEG"
            picture(label, 10_000 + i, 64).save(root / "val" / "images" / name)
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def write_isic(root: Path, per_class: int, size: tuple[int, int] = (60, 45)) -> Path:
    """ISIC 2018 Task 3's layout: ``ISIC2018_Task3_Training_Input/ISIC_<n>.jpg`` and the one-hot ground truth CSV."""
    (root / "ISIC2018_Task3_Training_Input").mkdir(parents=True, exist_ok=True)
    (root / "ISIC2018_Task3_Training_GroundTruth").mkdir(parents=True, exist_ok=True)
    rows = [("image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")]
    for n in range(7 * per_class):
        label, name = n % 7, f"ISIC_{24306 + n:07d}"
        picture(label, n, size).save(root / "ISIC2018_Task3_Training_Input" / f"{name}.jpg")
        rows.append((name, *("1.0" if c == label else "0.0" for c in range(7))))
    with open(root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv", "w",
              newline="") as handle:
        csv.writer(handle).writerows(rows)
    return root


def write_medmnist(path: Path, per_class: dict[str, int], size: int = 28, classes: int = 8) -> Path:
    """A MedMNIST ``.npz``: ``<split>_images`` N×H×W×3 uint8 and ``<split>_labels`` N×1, for train, val and test."""
    arrays = {}
    for split, count in per_class.items():
        labels = np.repeat(np.arange(classes), count)
        arrays[f"{split}_images"] = np.stack([np.asarray(picture(int(c), i, size)) for i, c in enumerate(labels)])
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="write an ImageNet-layout stand-in folder")
    parser.add_argument("layout", choices=["imagenet"])
    parser.add_argument("root", type=Path)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--per-class", type=int, default=260)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    write_imagenet(args.root, args.classes, args.per_class, args.val_per_class, args.size)


if __name__ == "__main__":
    main()
