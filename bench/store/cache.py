"""Content-addressed cache of uint8 image sets and the models fitted with them, with atomic writes and
checksummed manifests.

Keys are hashes of canonical JSON: dataset key → protection key → purification key → cell key. An entry is
a folder ``<root>/<kind>/<key>/`` holding ``images.npy``, ``labels.npy``, one ``<model kind>.pt`` state_dict
per fitted model (``bench.store.artifacts``) and ``manifest.json`` (spec, seed, library versions, sha256 of each
file, each model's ``arch``); it is written to a temporary folder and renamed into place, and a load that
finds a checksum mismatch deletes the entry so that it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.core.components import ImageSet, Models

FILES = ("images.npy", "labels.npy")


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
        """Whether a complete entry exists (checksums are verified on load, not here)."""
        return (self.path(kind, key) / "manifest.json").is_file()

    def manifest(self, kind: str, key: str) -> dict[str, Any]:
        return json.loads((self.path(kind, key) / "manifest.json").read_text())

    def save(self, kind: str, key: str, data: ImageSet, meta: dict[str, Any], models: Models | None = None,
             replace: bool = False) -> None:
        """Write atomically, with ``models`` (each with an ``arch`` dict) beside the images; if another process
        wrote the same key first, keep theirs, unless ``replace`` (a rebuild asked for: the old entry is moved aside
        and deleted)."""
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=final.parent))
        try:
            tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700 would lock other users of a shared results folder out
            np.save(tmp / "images.npy", data.images.cpu().numpy())
            np.save(tmp / "labels.npy", data.labels.cpu().numpy())
            saved = {name: save_model(tmp, name, model) for name, model in (models or {}).items()}
            files = [*FILES, *(m["file"] for m in saved.values())]
            manifest = {"kind": kind, "key": key, "num_classes": data.num_classes,
                        "shape": list(data.images.shape), "dtype": "uint8", "created": time.time(),
                        "versions": library_versions(), "sha256": {f: _sha256(tmp / f) for f in files},
                        "models": saved, **meta}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
            for f in (*files, "manifest.json"):
                _fsync(tmp / f)
            if replace and final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".old-{key}-", dir=final.parent))
                os.replace(final, old / "entry")
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(tmp, final)
            except OSError:  # the key exists already (a concurrent writer): identical content by construction
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def valid(self, kind: str, key: str, models: tuple[str, ...] = ()) -> bool:
        """Whether the entry exists, its checksums hold and it holds the ``models`` its component declares
        fitting; a corrupted entry is deleted (to be rebuilt). An entry without them (made before its
        component saved models) is rebuilt too."""
        manifest = self._verified(kind, key)
        return manifest is not None and set(models) <= set(manifest.get("models", {}))

    def _verified(self, kind: str, key: str) -> dict[str, Any] | None:
        folder = self.path(kind, key)
        if not self.has(kind, key):
            return None
        try:
            return verify(folder)
        except ValueError as err:
            self._discard(folder, err)
            return None

    def _discard(self, folder: Path, err: Exception) -> None:
        print(f"bench: cache entry {folder} is corrupted ({err}); rebuilding it", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)

    def load(self, kind: str, key: str) -> ImageSet | None:
        """The entry, or None if absent or corrupted (a corrupted entry is deleted so that it is rebuilt)."""
        folder = self.path(kind, key)
        manifest = self._verified(kind, key)
        if manifest is None:
            return None
        try:
            images = np.load(folder / "images.npy")
            labels = np.load(folder / "labels.npy")
            if images.dtype != np.uint8 or list(images.shape) != manifest["shape"]:
                raise ValueError("stored images do not match the manifest")
            return ImageSet(torch.from_numpy(images), torch.from_numpy(labels).long(), manifest["num_classes"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            self._discard(folder, err)
            return None


def verify(folder: Path) -> dict[str, Any]:
    """The manifest of the entry in ``folder`` once every file's sha256 matches it; ValueError otherwise."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        for name in (*FILES, *(m["file"] for m in manifest.get("models", {}).values())):
            if _sha256(folder / name) != manifest["sha256"][name]:
                raise ValueError(f"checksum mismatch in {name}")
        return manifest
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{type(err).__name__}: {err}") from err


def umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets while it reads, racing other threads)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        old = os.umask(0o022)
        os.umask(old)
        return old


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
