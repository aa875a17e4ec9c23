"""Image files decoded once into uint8 N×C×H×W arrays in the results cache, memory-mapped by every reader.

A dataset of image files (``bench.data.folders``) lists each split's files and labels; ``decode_splits`` decodes
them in parallel (joblib) straight into an entry of kind ``decoded`` of the results cache (``Cache.write``: atomic,
checksummed, shared by every cell and worker) and hands back sets whose images are copy-on-write memory maps of
it: a subset reads only its rows, and a set larger than memory is paged in as a batch reads it. The entry's key is
the dataset's decoding parameters with the files' fingerprint (each file's path under the root, size and
modification time: a file replaced or touched is decoded again). Without a cache (a library call) the files are
decoded into memory.

Decoding and resizing as torchvision's ImageFolder pipelines (PIL): ``convert("RGB")`` (or ``"L"``), the shorter
side to ``round(size / crop)`` (``Resize``: bilinear, antialiased), then the centre ``size``×``size`` square
(``CenterCrop``): ``crop = 0.875`` is the ImageNet evaluation transform, Resize(256) + CenterCrop(224); ``crop = 1``
keeps the whole shorter side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import torch

from bench.core.components import ImageSet
from bench.core.registry import ConfigError
from bench.store.cache import Cache
from bench.store.keys import make_key

KIND = "decoded"  # the cache kind of decoded datasets
CHUNK = 256  # files per decoding task
PARALLEL_FROM = 2 * CHUNK  # fewer files are decoded in this process (starting workers costs more)


@dataclasses.dataclass(frozen=True)
class FileList:
    """One split's image files, relative to ``root``, and their labels (0 … ``num_classes`` − 1)."""

    root: Path
    files: tuple[str, ...]
    labels: tuple[int, ...]
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")

    def per_class(self) -> list[int]:
        """How many files each class has."""
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=self.num_classes).tolist()


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How files become pixels: the side ``size``, the centre ``crop`` fraction (see the module) and ``channels``
    (1: greyscale by luma; 3: RGB, greyscale files replicated)."""

    size: int
    crop: float = 1.0
    channels: int = 3

    def __post_init__(self) -> None:
        if not 4 <= self.size <= 1024 or not 0 < self.crop <= 1 or self.channels not in (1, 3):
            raise ConfigError(f"decoding needs 4 ≤ size ≤ 1024, 0 < crop ≤ 1 and channels 1 or 3, got {self}")


def files_fingerprint(lists: Mapping[str, FileList]) -> str:
    """A hash of every split's file paths (relative to its root), sizes and modification times, and labels."""
    digest = hashlib.blake2b(digest_size=16)
    for split, listing in sorted(lists.items()):
        digest.update(f"{split}:{listing.num_classes}\n".encode())
        for name, label in zip(listing.files, listing.labels):
            stat = os.stat(listing.root / name)
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


def decode_splits(lists: Mapping[str, FileList], decoding: Decoding, spec: dict[str, Any],
                  cache: Cache | None, jobs: int | None = None) -> dict[str, ImageSet]:
    """Each split decoded: from the cache where an entry for ``spec`` (the dataset's decoding parameters) and these
    files is there, else decoded now (into the cache where one is given) with ``jobs`` processes (None: every
    core)."""
    if cache is None:
        return {split: _decode_to_memory(listing, decoding) for split, listing in lists.items()}
    key = make_key({"spec": spec, "decoding": dataclasses.asdict(decoding), "files": files_fingerprint(lists)})
    sets = {}
    for split, listing in lists.items():
        entry, started = f"{key}-{split}", time.perf_counter()
        loaded = cache.load(KIND, entry)  # verified once (a checksum pass over the file), then mapped
        if loaded is None:
            shape = [len(listing.files), decoding.channels, decoding.size, decoding.size]
            cache.write(KIND, entry, lambda folder, listing=listing, shape=shape: _decode_to_folder(
                folder, listing, decoding, shape, jobs), {"spec": spec, "split": split, "root": str(listing.root)})
            print(f"bench: decoded {len(listing.files):,} {spec['name']} {split} files at {decoding.size} px in "
                  f"{time.perf_counter() - started:.1f} s into {cache.path(KIND, entry)}", file=sys.stderr)
            loaded = cache.load(KIND, entry)
        if loaded is None:
            raise RuntimeError(f"the decoded entry {cache.path(KIND, entry)} did not verify right after writing")
        sets[split] = loaded
    return sets


def _decode_to_memory(listing: FileList, decoding: Decoding) -> ImageSet:
    images = np.empty((len(listing.files), decoding.channels, decoding.size, decoding.size), dtype=np.uint8)
    _decode_rows(images, listing.root, listing.files, 0, decoding)
    return ImageSet(torch.from_numpy(images), torch.tensor(listing.labels, dtype=torch.int64), listing.num_classes)


def _decode_to_folder(folder: Path, listing: FileList, decoding: Decoding, shape: list[int],
                      jobs: int | None) -> tuple[int, list[int]]:
    """Write ``images.npy`` (decoded in chunks by ``jobs`` processes, each into its rows of the file) and
    ``labels.npy`` in ``folder``."""
    path = folder / "images.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=tuple(shape)).flush()
    starts = range(0, len(listing.files), CHUNK)
    tasks = [joblib.delayed(_decode_chunk)(path, listing.root, listing.files[s:s + CHUNK], s, decoding) for s in starts]
    workers = 1 if len(listing.files) < PARALLEL_FROM else (jobs or joblib.cpu_count())
    joblib.Parallel(n_jobs=min(workers, len(tasks)) or 1)(tasks)
    np.save(folder / "labels.npy", np.asarray(listing.labels, dtype=np.int64))
    return listing.num_classes, shape


def _decode_chunk(path: Path, root: Path, files: tuple[str, ...], first: int, decoding: Decoding) -> None:
    """Decode ``files`` into rows ``first``… of the array file at ``path`` (a joblib task)."""
    images, threads = np.load(path, mmap_mode="r+"), torch.get_num_threads()
    torch.set_num_threads(1)  # one image at a time per process: the parallelism is across processes
    try:
        _decode_rows(images, root, files, first, decoding)
    finally:
        torch.set_num_threads(threads)
    images.flush()


def _decode_rows(images: np.ndarray, root: Path, files: tuple[str, ...], first: int, decoding: Decoding) -> None:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as TF

    side = round(decoding.size / decoding.crop)
    for row, name in enumerate(files, start=first):
        try:  # PIL, as torchvision's ImageFolder loader: the papers' pipelines decode and resize this way
            with Image.open(root / name) as file:
                image = file.convert("RGB" if decoding.channels == 3 else "L")
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise ConfigError(f"cannot decode the image file {root / name} ({type(err).__name__}: {err}): replace "
                              "or remove it") from err
        image = TF.center_crop(TF.resize(image, [side], antialias=True), [decoding.size, decoding.size])
        pixels = np.asarray(image, dtype=np.uint8)
        images[row] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
