"""``bench protect``: fast encryption of a folder of new images with a protection's fitted models
(ConfounderGAN §4.3 Fig. 3(b), §5.2.2): one forward pass per batch, so new photos are protected in seconds.
No labels, except for a protection that ``encrypt_needs_labels`` (DH hides its class's image): ``label`` then
names the folder's class.

The models are those a matrix cell's protect stage saved beside its poison (``bench.store.artifacts``): the
reference is that protected set's key (records carry it as ``protection_key``) or its cache folder. The
protection is rebuilt from the entry's manifest (same parameters) and must declare ``encrypts_unseen``;
images must have the shape the models were fitted on.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.core.components import PROTECTIONS
from bench.core.registry import ConfigError
from bench.execute import devices
from bench.store.artifacts import load_models, owner_class, resolve_entry

EXTENSIONS = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def protect_folder(ref: str, source: Path, target: Path, *, results: Path, protection: str | None = None,
                   device: str = "auto", batch_size: int = 256, label: int | None = None) -> str:
    """Encrypt every PNG/JPEG directly in ``source`` into PNGs of the same stem in ``target``; returns a
    one-line report with images/s. Problems (no images, mixed or wrong sizes/channels) raise ConfigError
    before anything is written."""
    from PIL import Image

    if batch_size < 1:
        raise ConfigError("--batch-size must be ≥ 1")
    source, target = Path(source), Path(target)
    if not source.is_dir():
        raise ConfigError(f"--input {source}: no such folder; point it at a folder of .png/.jpg images")
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise ConfigError(f"--input {source}: no .png/.jpg/.jpeg images in this folder (subfolders are not read)")
    if target.resolve() == source.resolve():
        raise ConfigError("--output is the --input folder: choose another folder so that originals are kept")
    names: dict[str, Path] = {}
    for path in files:
        if path.stem + ".png" in names:
            raise ConfigError(f"{names[path.stem + '.png'].name} and {path.name} would both be written as "
                              f"{path.stem}.png; rename one of them")
        names[path.stem + ".png"] = path
    dev = devices.single(device)
    folder = resolve_entry(ref, results)
    manifest = json.loads((folder / "manifest.json").read_text())
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
    encryptor = PROTECTIONS.create(made_by.name, **manifest["spec"]["params"])
    models = load_models(folder, made_by.fits, dev)
    _, channels, size, _ = manifest["shape"]
    shapes = {}
    for path in files:
        with Image.open(path) as image:
            shapes.setdefault((1 if image.mode in GREY_MODES else 3, image.height, image.width), path)
    if len(shapes) > 1:
        (a, pa), (b, pb) = list(shapes.items())[:2]
        raise ConfigError(f"--input {source} mixes image sizes/channels: {pa.name} is {_shape(a)}, {pb.name} is "
                          f"{_shape(b)}; encrypt one size at a time (resize, or split the folder)")
    (found, path), = shapes.items()
    if found != (channels, size, size):
        raise ConfigError(f"the models were fitted on {_shape((channels, size, size))} images but {source} holds "
                          f"{_shape(found)} images (e.g. {path.name}); resize/convert them, or fit the protection on "
                          "such images")
    target.mkdir(parents=True, exist_ok=True)
    start, forward = time.perf_counter(), 0.0
    for first in range(0, len(files), batch_size):
        chunk = files[first:first + batch_size]
        arrays = [np.asarray(Image.open(p).convert("L" if channels == 1 else "RGB")) for p in chunk]
        batch = torch.from_numpy(np.stack(arrays)).reshape(len(chunk), size, size, channels).permute(0, 3, 1, 2)
        tick = time.perf_counter()
        labels = {"labels": torch.full((len(chunk),), label)} if made_by.encrypt_needs_labels else {}
        out = encryptor.encrypt(models, batch.contiguous(), device=dev, **labels)
        forward += time.perf_counter() - tick
        for p, image in zip(chunk, out.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image[..., 0] if channels == 1 else image).save(target / (p.stem + ".png"))
    total = time.perf_counter() - start
    return (f"encrypted {len(files)} images ({_shape((channels, size, size))}) into {target} on {dev}: "
            f"{len(files) / max(forward, 1e-9):.0f} images/s (encryption), {len(files) / max(total, 1e-9):.0f} images/s "
            f"with reading and writing")


def _shape(shape: tuple[int, int, int]) -> str:
    return "×".join(map(str, shape))
