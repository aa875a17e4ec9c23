"""``bench protect``: fast encryption of a folder of new images with a protection's fitted models
(ConfounderGAN §4.3 Fig. 3(b), §5.2.2): one forward pass per batch, so new photos are protected in seconds.
No labels, except for a protection that ``encrypt_needs_labels`` (DH hides its class's image): ``label`` then
names the folder's class.

The models are those a matrix cell's protect stage saved beside its poison (``bench.store.artifacts``): the
reference is that protected set's key (records carry it as ``protection_key``) or its cache folder. The
protection is rebuilt from the entry's manifest (same parameters) and must declare ``encrypts_unseen``;
images must have the shape the models were fitted on.

Integrity: every image is read and checked (``bench.execute.images``: one documented conversion per pixel mode)
before anything is written; outputs are staged as temporary files in ``--output`` and renamed into place only once
every batch is encrypted and within the protection's ε (its ``epsilon`` parameter, where it has one), so a failed
run leaves no output file. Nothing is written through a link, no file already in ``--output`` is replaced without
``overwrite`` (and an input file never is), and ``--output`` may not be, hold, or lie inside ``--input``.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.core.components import PROTECTIONS
from bench.core.registry import ConfigError
from bench.execute import devices
from bench.execute.images import EXTENSIONS, StagedPngs, read_image, with_path
from bench.store.artifacts import load_models, owner_class, resolve_entry
from bench.store.cache import verify

KEEP_BYTES = 512 << 20  # pixels kept from the checking pass for encryption; a larger folder is decoded twice


def protect_folder(ref: str, source: Path, target: Path, *, results: Path, protection: str | None = None,
                   device: str = "auto", batch_size: int = 256, label: int | None = None,
                   overwrite: bool = False) -> str:
    """Encrypt every PNG/JPEG directly in ``source`` into PNGs of the same stem in ``target``; returns a
    one-line report with images/s. Problems (no or unreadable images, mixed or wrong sizes/channels, outputs in the
    way, an L∞ over ε) raise ConfigError before any output is written; an OSError while writing names the path and
    leaves no output file."""
    if batch_size < 1:
        raise ConfigError("--batch-size must be ≥ 1")
    source, target = Path(source), Path(target)
    files, names = _inputs(source)
    originals = _check_folders(source, target, files)
    _check_targets(target, names, originals, overwrite)
    dev = devices.single(device)
    folder, manifest, made_by = _entry(ref, results, protection, label)
    encryptor = PROTECTIONS.create(made_by.name, **manifest["spec"]["params"])
    models = load_models(folder, made_by.fits, dev)
    _, channels, size, _ = manifest["shape"]
    start = time.perf_counter()
    kept = _read_all(files, source, (channels, size, size))
    epsilon = getattr(encryptor, "epsilon", None)  # the L∞ budget, in 1/255 steps, of a protection that has one
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise with_path(err, target) from err
    forward = 0.0
    with StagedPngs(target) as staged:
        for first in range(0, len(files), batch_size):
            chunk = files[first:first + batch_size]
            arrays = kept[first:first + batch_size] if kept is not None else [_again(p, channels, size) for p in chunk]
            batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
            tick = time.perf_counter()
            labels = {"labels": torch.full((len(chunk),), label)} if made_by.encrypt_needs_labels else {}
            out = encryptor.encrypt(models, batch, device=dev, **labels)
            forward += time.perf_counter() - tick
            linf = (out.to(torch.int16) - batch.to(torch.int16)).abs().max().item()
            if epsilon is not None and linf > float(epsilon) + 1e-6:
                raise ConfigError(f"the models of {folder} changed a pixel by {linf}/255, over {made_by.name}'s "
                                  f"ε = {epsilon:g}: the entry is inconsistent (edited?), nothing was written; delete "
                                  "the folder and rerun the matrix that made it")
            for name, image in zip(names[first:first + batch_size], out.permute(0, 2, 3, 1).numpy()):
                staged.add(name, image)
        _check_targets(target, names, originals, overwrite)  # again: a file may have appeared while encrypting
        staged.commit()
    total = time.perf_counter() - start
    return (f"encrypted {len(files)} images ({_shape((channels, size, size))}) into {target} on {dev}: "
            f"{len(files) / max(forward, 1e-9):.0f} images/s (encryption), {len(files) / max(total, 1e-9):.0f} images/s "
            f"with reading and writing")


def _entry(ref: str, results: Path, protection: str | None, label: int | None) -> tuple[Path, dict[str, Any], type]:
    """The verified entry named by ``ref``, its manifest and the protection class that made it, checked for use."""
    folder = resolve_entry(ref, results)
    try:
        manifest = verify(folder)
    except ValueError as err:
        raise ConfigError(f"cache entry {folder} did not verify ({err}): delete the folder and rerun the matrix that "
                          "made it (`bench run --matrix <its matrix> --rebuild-sets` moves it aside and rebuilds it)"
                          ) from err
    if manifest.get("kind") != "protected":
        raise ConfigError(f"{folder} is a {manifest.get('kind')!r} cache entry, not a protected set; pass the key "
                          "of a protected set (records: protection_key)")
    made_by = owner_class(manifest)
    if protection is not None and made_by.name != protection:
        raise ConfigError(f"{folder} was made by protection {made_by.name!r}, not {protection!r}; pass --protection "
                          f"{made_by.name} or leave it out")
    if not made_by.encrypts_unseen:
        raise ConfigError(f"protection {made_by.name!r} cannot encrypt unseen images (it does not declare "
                          "encrypts_unseen); only protections such as confoundergan work with `bench protect`")
    if made_by.encrypt_needs_labels and not (label is not None and 0 <= label < manifest["num_classes"]):
        raise ConfigError(f"protection {made_by.name!r} encrypts an image for its class: pass --label K with "
                          f"0 ≤ K < {manifest['num_classes']} (one class for the folder; split folders by class)")
    if label is not None and not made_by.encrypt_needs_labels:
        raise ConfigError(f"protection {made_by.name!r} encrypts without labels: leave --label out")
    return folder, manifest, made_by


def _inputs(source: Path) -> tuple[list[Path], list[str]]:
    """The images directly in ``source`` and their output names (stem + .png), checked for clashes."""
    if not source.is_dir():
        raise ConfigError(f"--input {source}: no such folder; point it at a folder of .png/.jpg images")
    files = sorted(p for p in source.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise ConfigError(f"--input {source}: no .png/.jpg/.jpeg images in this folder (subfolders are not read)")
    names: dict[str, Path] = {}
    for path in files:
        if path.stem + ".png" in names:
            raise ConfigError(f"{names[path.stem + '.png'].name} and {path.name} would both be written as "
                              f"{path.stem}.png; rename one of them")
        names[path.stem + ".png"] = path
    return files, list(names)


def _check_folders(source: Path, target: Path, files: list[Path]) -> set[tuple[int, int]]:
    """Refuse an ``--output`` that is a file, or is, holds or lies inside ``--input`` (links resolved); returns the
    (device, inode) of every input file."""
    if os.path.lexists(target) and not target.is_dir():
        raise ConfigError(f"--output {target} exists and is not a folder: name a folder (it is created if missing)")
    src, dst = source.resolve(), target.resolve()
    if dst == src or (target.is_dir() and os.path.samefile(source, target)):
        raise ConfigError("--output is the --input folder: choose another folder so that originals are kept")
    if src in dst.parents:
        raise ConfigError(f"--output {target} is inside --input {source}: choose another folder, outside it, so that "
                          "originals are kept apart from their protected copies")
    if dst in src.parents:
        raise ConfigError(f"--input {source} is inside --output {target}: choose another folder for the outputs, not "
                          "one that holds the originals")
    return {(s.st_dev, s.st_ino) for s in map(os.stat, files)}


def _check_targets(target: Path, names: list[str], originals: set[tuple[int, int]], overwrite: bool) -> None:
    """Refuse output names already taken in ``target`` (anything: file, link, folder) unless ``overwrite``; even
    then, refuse a folder and a name that is an input file (a hard or symbolic link to one)."""
    existing = [name for name in names if os.path.lexists(target / name)] if target.is_dir() else []
    if existing and not overwrite:
        more = f" and {len(existing) - 3:,} more" if len(existing) > 3 else ""
        raise ConfigError(f"--output {target} already holds {', '.join(existing[:3])}{more}: bench protect replaces "
                          "no file it did not write; pass --overwrite to replace them, or choose another folder")
    for name in existing:
        path = target / name
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise ConfigError(f"--output {target} holds a folder {name}: move it away or choose another folder")
        if path.exists() and (path.stat().st_dev, path.stat().st_ino) in originals:  # follows a symbolic link
            raise ConfigError(f"--output {path} is an --input file (a link to it): bench protect never replaces an "
                              "original, even with --overwrite; remove the link or choose another folder")


def _read_all(files: list[Path], source: Path, expected: tuple[int, int, int]) -> list[np.ndarray] | None:
    """Read and check every image (one size and channel count, that of the models); their pixels, or None where
    they take over KEEP_BYTES (they are read again, batch by batch)."""
    kept: list[np.ndarray] | None = []
    shapes: dict[tuple[int, int, int], Path] = {}
    held = 0
    for path in files:
        pixels = read_image(path)
        shapes.setdefault((pixels.shape[2], pixels.shape[0], pixels.shape[1]), path)
        held += pixels.nbytes
        if kept is not None:
            kept.append(pixels)
            if held > KEEP_BYTES:
                kept = None
    if len(shapes) > 1:
        (a, pa), (b, pb) = list(shapes.items())[:2]
        raise ConfigError(f"--input {source} mixes image sizes/channels: {pa.name} is {_shape(a)}, {pb.name} is "
                          f"{_shape(b)}; encrypt one size at a time (resize, or split the folder)")
    (found, path), = shapes.items()
    if found != expected:
        raise ConfigError(f"the models were fitted on {_shape(expected)} images but {source} holds "
                          f"{_shape(found)} images (e.g. {path.name}); resize/convert them, or fit the protection on "
                          "such images")
    return kept


def _again(path: Path, channels: int, size: int) -> np.ndarray:
    """``path``'s pixels read a second time; a ConfigError if they no longer have the checked shape."""
    pixels = read_image(path)
    if pixels.shape != (size, size, channels):
        raise ConfigError(f"--input file {path} changed while bench protect ran; rerun it")
    return pixels


def _shape(shape: tuple[int, int, int]) -> str:
    return "×".join(map(str, shape))
