"""Content-addressed cache of uint8 image sets and the models fitted with them, with atomic writes and entries
verified as a whole.

Keys are hashes of canonical JSON: dataset key → protection key → purification key → cell key. An entry is a
folder ``<root>/<kind>/<key>/``: ``images.npy``, ``labels.npy``, one ``<model kind>.pt`` state_dict per fitted
model (``bench.store.artifacts``), ``manifest.json`` (spec, seed, library versions, sha256 of each file, each model's
``arch``) and ``manifest.sha256`` (manifest.json's sha256, as ``sha256sum`` writes it: one checksum over the whole
entry). It is written to a temporary folder named after its writer (``bench.store.tempdirs``) and renamed into
place. What does not verify at an entry's path (a damaged file, an edited or missing manifest, an entry older than
``manifest.sha256``, a file) is moved aside to ``<root>/<kind>/.damaged/``, named on stderr, and rebuilt; saves
remove the temporary folders of writers that died. Images are read as copy-on-write memory maps.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from bench.core.components import ImageSet, Models
from bench.store.atomic import umask
from bench.store.tempdirs import sweep, temp_folder

__all__ = ["FILES", "Cache", "checked_manifest", "library_versions", "read_entry", "save_model", "umask", "verify"]

FILES = ("images.npy", "labels.npy")
MANIFEST, CHECKSUM = "manifest.json", "manifest.sha256"
DAMAGED = ".damaged"  # where entries that do not verify are moved, under their kind's folder
_CLASH = {errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR}  # a rename onto something in the way
T = TypeVar("T")


def library_versions() -> dict[str, str]:
    """Versions that can change numbers: recorded in manifests and records."""
    import sklearn
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "scikit-learn": sklearn.__version__}  # sklearn draws LSP's patterns


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class Cache:
    """Image sets under ``root``, by kind (``dataset``, ``protected``, ``purified``) and key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        """Whether an entry whose manifest checks out is at the key (``valid`` and ``load`` verify its files too,
        and move aside what does not verify; this only reads)."""
        try:
            self.manifest(kind, key)
        except ValueError:
            return False
        return True

    def manifest(self, kind: str, key: str) -> dict[str, Any]:
        """The entry's manifest, matching ``manifest.sha256`` and naming this kind and key; ValueError otherwise."""
        return _named(checked_manifest(self.path(kind, key)), kind, key)

    def entries(self, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """(key, manifest) of each entry of ``kind`` whose manifest checks out, by key; anything else is skipped."""
        for folder in sorted((self.root / kind).glob("[!.]*")):
            try:
                yield folder.name, self.manifest(kind, folder.name)
            except ValueError:
                continue

    def save(self, kind: str, key: str, data: ImageSet, meta: dict[str, Any], models: Models | None = None,
             replace: bool = False) -> None:
        """Write ``data`` atomically, with ``models`` (each with an ``arch`` dict) beside the images (see ``write``)."""

        def fill(tmp: Path) -> tuple[int, list[int]]:
            np.save(tmp / "images.npy", data.images.cpu().numpy())
            np.save(tmp / "labels.npy", data.labels.cpu().numpy())
            return data.num_classes, list(data.images.shape)

        self.write(kind, key, fill, meta, models, replace)

    def write(self, kind: str, key: str, fill: Callable[[Path], tuple[int, list[int]]], meta: dict[str, Any],
              models: Models | None = None, replace: bool = False) -> None:
        """Write atomically the entry whose ``images.npy`` and ``labels.npy`` ``fill(folder)`` writes (returning the
        number of classes and the images' shape: a set too large for memory is written in parts). A valid entry
        with these models already at the key (a concurrent writer's) is kept, unless ``replace`` (a rebuild asked
        for: it is deleted); anything else there is moved aside."""
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep(final.parent)
        tmp = temp_folder(final.parent, f".tmp-{key}")
        try:
            tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700 would lock other users of a shared results folder out
            num_classes, shape = fill(tmp)
            saved = {name: save_model(tmp, name, model) for name, model in (models or {}).items()}
            files = [*FILES, *(m["file"] for m in saved.values())]
            manifest = {"kind": kind, "key": key, "num_classes": num_classes, "shape": shape, "dtype": "uint8",
                        "created": time.time(), "versions": library_versions(),
                        "sha256": {f: _sha256(tmp / f) for f in files}, "models": saved, **meta}
            raw = json.dumps(manifest, indent=1, default=str).encode()
            (tmp / MANIFEST).write_bytes(raw)
            (tmp / CHECKSUM).write_text(f"{hashlib.sha256(raw).hexdigest()}  {MANIFEST}\n")
            for f in (*files, MANIFEST, CHECKSUM):
                _fsync(tmp / f)
            if replace:
                _delete(final)
            self._put(tmp, kind, key, saved)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _put(self, tmp: Path, kind: str, key: str, models: Collection[str]) -> None:
        """Rename ``tmp`` to the key's path. What is in the way is kept if it verifies with ``models`` (a concurrent
        writer's entry: identical content by construction), else moved aside, and the rename is tried once more."""
        for _ in range(2):
            try:
                os.rename(tmp, self.path(kind, key))
                return
            except OSError as err:
                if err.errno not in _CLASH:
                    raise
                clash = err
            if self._verified(kind, key, models) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return
        raise OSError(clash.errno, f"cannot put cache entry {self.path(kind, key)} in place: something that does not "
                      "verify keeps reappearing there; remove it and rerun")

    def valid(self, kind: str, key: str, models: tuple[str, ...] = ()) -> bool:
        """Whether a verified entry is at the key with the ``models`` its component declares fitting (one made
        before its component saved them is rebuilt: ``save`` replaces it); what does not verify is moved aside."""
        manifest = self._verified(kind, key)
        return manifest is not None and set(models) <= set(manifest.get("models", {}))

    def load(self, kind: str, key: str) -> ImageSet | None:
        """The entry, or None if absent or if it does not verify (then it is moved aside, to be rebuilt)."""
        def image_set(folder: Path) -> ImageSet:
            manifest, images, labels = read_entry(folder)
            _named(manifest, kind, key)
            return ImageSet(torch.from_numpy(images), torch.from_numpy(labels).long(), manifest["num_classes"])

        return self._checked(kind, key, image_set)

    def _verified(self, kind: str, key: str, models: Collection[str] = ()) -> dict[str, Any] | None:
        """The entry's verified manifest; None if nothing is there, or if it does not verify or lacks one of
        ``models`` (then it is moved aside)."""
        def check(folder: Path) -> dict[str, Any]:
            manifest = _named(verify(folder), kind, key)
            if missing := sorted(set(models) - set(manifest.get("models", {}))):
                raise ValueError(f"it holds no {', '.join(missing)} model, which its rebuild has")
            return manifest

        return self._checked(kind, key, check)

    def _checked(self, kind: str, key: str, check: Callable[[Path], T]) -> T | None:
        """``check(folder)`` of the key's entry; None if nothing is there, or if ``check`` raises ValueError: then
        what is there is moved aside."""
        folder = self.path(kind, key)
        try:
            seen = os.lstat(folder)
        except FileNotFoundError:
            return None
        try:
            return check(folder)
        except ValueError as err:
            _set_aside(folder, seen, str(err))
            return None


def _set_aside(folder: Path, seen: os.stat_result, why: str) -> None:
    """Move what is at ``folder`` (``seen`` when it was checked) into ``.damaged/`` beside it, and say so. Several
    processes may do it at once: one moves it, the others find it gone; a valid entry renamed into place since the
    check (another inode) is put back."""
    aside = folder.parent / DAMAGED / f"{folder.name}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    try:
        aside.parent.mkdir(exist_ok=True)
        os.rename(folder, aside)
    except FileNotFoundError:
        return  # another process moved it first
    except OSError as err:
        print(f"bench: cache entry {folder} did not verify ({why}) and cannot be moved aside ({err}); move it away "
              "by hand", file=sys.stderr)
        return
    moved = os.lstat(aside)
    if (moved.st_dev, moved.st_ino) != (seen.st_dev, seen.st_ino):
        try:
            os.rename(aside, folder)
        except OSError:
            pass  # yet another one is in place: this one stays aside
        return
    print(f"bench: cache entry {folder} did not verify ({why}): moved to {aside}, kept for inspection (corrupted, "
          "incomplete or outdated); rebuilding it", file=sys.stderr)


def _delete(folder: Path) -> None:
    """Delete the entry at ``folder`` (if any) after an atomic move into a folder of this writer, which ``sweep``
    removes if the deletion is cut short."""
    old = temp_folder(folder.parent, f".old-{folder.name}")
    try:
        os.replace(folder, old / "entry")
    except FileNotFoundError:
        pass
    shutil.rmtree(old, ignore_errors=True)


def checked_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the entry in ``folder`` once its bytes match ``manifest.sha256`` (the files it lists are not
    read: ``verify`` reads them); ValueError saying what is wrong otherwise."""
    if not folder.is_dir():
        raise ValueError("not a folder" if os.path.lexists(folder) else "nothing there")
    try:
        raw = (folder / MANIFEST).read_bytes()
    except OSError as err:
        raise ValueError(f"{MANIFEST} unreadable: {err.strerror}") from err
    try:
        recorded = (folder / CHECKSUM).read_text(errors="replace").split()[:1]
    except OSError as err:
        raise ValueError(f"no {CHECKSUM}: an entry of a bench older than checksummed manifests, or damaged") from err
    if recorded != [hashlib.sha256(raw).hexdigest()]:
        raise ValueError(f"{MANIFEST} does not match {CHECKSUM}: edited or damaged")
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{MANIFEST} is not JSON: {err}") from err
    if not (isinstance(manifest, dict) and isinstance(manifest.get("sha256"), dict)
            and isinstance(manifest.get("models", {}), dict)):
        raise ValueError(f"{MANIFEST} is not an entry's manifest")  # noqa: TRY004  (verify's contract: ValueError)
    return manifest


def verify(folder: Path) -> dict[str, Any]:
    """The manifest of the entry in ``folder`` once the whole entry checks out: ``manifest.sha256`` against the
    manifest's bytes, the manifest's ``sha256`` against each data and model file; ValueError otherwise."""
    manifest = checked_manifest(folder)
    try:
        for name in (*FILES, *(m["file"] for m in manifest.get("models", {}).values())):
            if not isinstance(name, str) or Path(name).name != name:
                raise ValueError(f"{MANIFEST} names a file {name!r} outside the entry")
            if _sha256(folder / name) != manifest["sha256"][name]:
                raise ValueError(f"checksum mismatch in {name}")
        return manifest
    except (OSError, KeyError, TypeError) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from err


def read_entry(folder: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The verified manifest, images and labels of the entry in ``folder``; ValueError if any does not match."""
    manifest = verify(folder)
    try:
        images, labels = np.load(folder / "images.npy", mmap_mode="c"), np.load(folder / "labels.npy")
    except (OSError, EOFError) as err:  # EOFError: an empty .npy; a pickled (object) array is a ValueError already
        raise ValueError(f"{type(err).__name__}: {err}") from err
    if (images.dtype != np.uint8 or list(images.shape) != manifest.get("shape") or labels.dtype.kind not in "iu"
            or labels.shape != images.shape[:1] or not isinstance(manifest.get("num_classes"), int)):
        raise ValueError("stored images or labels do not match the manifest")
    return manifest, images, labels


def _named(manifest: dict[str, Any], kind: str, key: str) -> dict[str, Any]:
    """``manifest`` if it is the one of entry ``kind``/``key``; ValueError otherwise (an entry copied elsewhere)."""
    if (manifest.get("kind"), manifest.get("key")) != (kind, key):
        raise ValueError(f"its manifest is the one of {manifest.get('kind')}/{manifest.get('key')}")
    return manifest


def save_model(folder: Path, kind: str, model: torch.nn.Module) -> dict[str, Any]:
    """Write ``model``'s state_dict (CPU tensors) as ``<kind>.pt`` in ``folder``; its manifest part (file, arch)."""
    arch = getattr(model, "arch", None)  # the Fitted contract: every fitted model carries its arch
    if not isinstance(arch, dict):
        raise TypeError(f"the fitted {kind!r} model ({type(model).__name__}) has no `arch` dict; give it one, from "
                        "which the component's build_model(kind, arch) rebuilds it")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / f"{kind}.pt")
    return {"file": f"{kind}.pt", "arch": arch}


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
