"""Protected train images made elsewhere (official EM, TAP, AR … releases), loaded from files and measured."""

from __future__ import annotations

import hashlib
import time
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from bench.api import PROTECTIONS, ConfigError, ImageSet, Protection

ORDER = "one protected image per train image in the dataset's train order (after its per_class subsetting)"
# spec() runs once per cell while planning: hash an unchanged source (same names, sizes, mtimes) only once.
_DIGESTS: dict[tuple[Any, ...], str] = {}


@PROTECTIONS.register("external")
class External(Protection):
    """Protected train images made elsewhere, e.g. the official releases of EM, TAP or AR poisons.

    The source is a folder of PNGs named by train index (``0.png``, ``1.png`` … or ``00000.png`` …) or an
    ``.npz`` of uint8 images (key ``images``, or its only array besides ``labels``), N×H×W×C as numpy/PIL
    store them or N×C×H×W. The index is the position in the train set as bench loads it, i.e. after the
    dataset's ``per_class`` subsetting (a file made for all of CIFAR-10 fits ``per_class = 0`` only); npz
    ``labels``, if present, must equal the train labels. No budget is assumed: ``info`` has the source's
    sha256 and the change measured against the clean images (``linf``: max |x′ − x| in pixel units; ``l2``:
    mean per-image L2 in [0, 1] units; ``changed_fraction``: share of pixel values changed). Seed ignored.

    Attributes:
        path: the PNG folder or ``.npz`` file; the cache key holds its content's sha256 instead.
    """

    paper: ClassVar[str] = "images made elsewhere (e.g. official EM/TAP/AR releases); budget measured, not assumed"
    test_skip: ClassVar[str] = "needs images made elsewhere for the train set: tests/test_external.py covers its contract"
    needs_labels: ClassVar[bool] = False
    path: str = ""

    def spec(self) -> dict[str, Any]:
        """Name, version and the sha256 of the source (checked and hashed only when ``path`` is set)."""
        spec = super().spec()
        if self.path:  # content, not place: a copy elsewhere shares the cache, an edited file gets a new key
            spec["params"] = {"source_sha256": _digest(self._source(), _files(self._source()))}
        return spec

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        path = self._source()
        files = _files(path, len(train))
        if path.is_dir():
            array, labels = _read_pngs(files), None
        else:
            with np.load(path, allow_pickle=False) as arrays:
                array, labels = arrays[_npz_member(path)], arrays.get("labels")
        if len(array) != len(train):
            raise ConfigError(f"external: {len(array):,} images in {path} but the train set has {len(train):,}; "
                              f"the file must hold {ORDER}")
        images = _to_nchw(array, train, path)
        if labels is not None and not np.array_equal(labels.reshape(-1), train.labels.numpy()):
            raise ConfigError(f"external: the labels in {path} differ from the train labels; it must hold {ORDER}")
        change = images.to(torch.int16) - train.images.to(torch.int16)
        return train.with_images(images, source=str(path), source_sha256=_digest(path, files),
                                 linf=int(change.abs().max()),
                                 l2=float((change.float() / 255).flatten(1).norm(dim=1).mean()),
                                 changed_fraction=float((change != 0).float().mean()))

    def _source(self) -> Path:
        if not self.path:
            raise ConfigError('external: no source given; set path = "..." to a folder of PNGs named by train '
                              f"index or an .npz of uint8 images, holding {ORDER}")
        path = Path(self.path).expanduser()
        if not path.exists():
            raise ConfigError(f"external: path {path} does not exist; point path at the PNG folder or .npz file")
        return path


def _files(path: Path, count: int | None = None) -> list[Path]:
    """The npz, or the PNGs in index order (without ``count``, while planning, only gaps are refused)."""
    if path.is_file():
        _npz_member(path)  # refuse a malformed file while planning, before anything runs
        return [path]
    indexed: dict[int, Path] = {}
    for file in sorted(path.glob("*.[pP][nN][gG]")):
        if not file.stem.isdigit() or int(file.stem) in indexed:
            raise ConfigError(f"external: {file.name} in {path} is not named by a train index of its own "
                              "(0.png, 1.png … or 00000.png …)")
        indexed[int(file.stem)] = file
    expected = (max(indexed, default=0) + 1) if count is None else count
    missing, extra = [i for i in range(expected) if i not in indexed], [i for i in sorted(indexed) if i >= expected]
    if missing or extra:
        raise ConfigError(f"external: {len(indexed):,} PNGs in {path} for {expected:,} train images (missing "
                          f"indices: {missing[:5]}, extra: {extra[:5]}); it must hold {ORDER}, named by index")
    return [indexed[i] for i in range(expected)]


def _read_pngs(files: list[Path]) -> np.ndarray:
    from PIL import Image  # here, not at the top, so that listing components does not load it

    arrays = []
    for file in files:
        with Image.open(file) as image:
            if image.mode not in ("L", "RGB"):  # 16-bit, alpha, palette …: not plain 8-bit pixels
                raise ConfigError(f"external: {file} is a {image.mode} PNG; save 8-bit greyscale (L) or RGB PNGs")
            arrays.append(np.asarray(image))
        if arrays[-1].shape != arrays[0].shape:
            raise ConfigError(f"external: {file} is {arrays[-1].shape} but {files[0]} is {arrays[0].shape}")
    return np.stack(arrays)


def _npz_member(path: Path) -> str:
    """The images array's name in an npz, its dtype read from the header (no pixels loaded)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted(n.removesuffix(".npy") for n in archive.namelist())
            key = "images" if "images" in names else next((n for n in names if n != "labels"), "")
            with archive.open(key + ".npy") as member:
                version = np.lib.format.read_magic(member)
                _, _, dtype = getattr(np.lib.format, "read_array_header_%d_%d" % version)(member)
    except (OSError, KeyError, AttributeError, zipfile.BadZipFile, ValueError) as err:
        raise ConfigError(f"external: cannot read images from {path} ({type(err).__name__}: {err}); it must be "
                          "an .npz as numpy.savez(path, images=..., labels=...) writes") from err
    if "images" not in names and len(set(names) - {"labels"}) > 1:
        raise ConfigError(f"external: {path} holds arrays {names}; name the images array 'images'")
    if dtype != np.uint8:
        raise ConfigError(f"external: the images in {path} are {dtype}, not uint8; save the published 8-bit "
                          "pixels, e.g. (x * 255).round().clip(0, 255).astype(numpy.uint8) for x in [0, 1]")
    return key


def _to_nchw(array: np.ndarray, train: ImageSet, path: Path) -> torch.Tensor:
    c, h, w = train.images.shape[1:]
    found, array = array.shape, array[:, None] if array.ndim == 3 else array  # greyscale without a channel axis
    array = array.transpose(0, 3, 1, 2) if array.shape[1:] == (h, w, c) != (c, h, w) else array  # numpy/PIL layout
    if array.shape[1:] != (c, h, w):
        raise ConfigError(f"external: images of shape {found} in {path} do not fit the train set's {c}×{h}×{w} "
                          f"(expected N×{h}×{w}×{c} or N×{c}×{h}×{w}); was the file made for this dataset?")
    return torch.from_numpy(np.ascontiguousarray(array))


def _digest(path: Path, files: list[Path]) -> str:
    stats = tuple((f.name, s.st_size, s.st_mtime_ns, s.st_ino) for f in files for s in [f.stat()])
    if (key := (str(path.resolve()), stats)) not in _DIGESTS:
        digest = hashlib.sha256()
        for file, (name, size, *_) in zip(files, stats):
            if path.is_dir():  # names too: the same bytes under other indices are another source
                digest.update(f"{name}\0{size}\0".encode())
            digest.update(file.read_bytes())
        _DIGESTS[key] = digest.hexdigest()
    # A file written in the last seconds can change again within one clock tick, unseen (as racy git): rehash it.
    return _DIGESTS[key] if time.time_ns() - max((s[2] for s in stats), default=0) > 2e9 else _DIGESTS.pop(key)
