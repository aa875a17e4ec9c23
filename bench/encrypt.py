"""Fast encryption with a trained generator (ConfounderGAN §4.3 Fig. 3(b), §5.2.2): one forward pass per
batch, no labels, so a folder of new photos is protected in seconds.

A protection that trains a generator (``confoundergan``) declares ``artifact = "generator"`` and receives
``artifacts=<cache root>/generator/<protection key>`` from the protect stage; it saves its generator there
with ``save_generator`` (atomic: a temporary folder renamed into place). The key is the protected set's key
(dataset key, protection spec, seed: ``bench.scheduler.plan_cell``), so ``bench protect --generator KEY``
finds the generator of the matrix cell that made the poison; records show it as ``protect_info.generator``.

Generator contract: an ``nn.Module`` with an ``arch`` dict (``channels``, ``size``, ``epsilon`` in 1/255 pixel
units, plus what its protection's ``build_generator(arch)`` needs to rebuild it) whose forward maps float
[0, 1] images N×C×H×W to a perturbation δ with ‖δ‖∞ ≤ ε/255.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.registry import ConfigError

KIND = "generator"
WEIGHTS = "generator.pt"
EXTENSIONS = (".png", ".jpg", ".jpeg")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def save_generator(folder: Path, generator: nn.Module, meta: dict[str, Any]) -> None:
    """Write ``generator``'s state_dict (CPU tensors) and a manifest (arch, sha256, versions, ``meta``) to
    ``folder`` atomically (temporary folder, then rename). An existing entry is replaced: the protect stage
    only reruns when its poison is missing, and the generator must be the one that made the new poison."""
    from bench.cache import library_versions

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        torch.save({k: v.detach().cpu() for k, v in generator.state_dict().items()}, tmp / WEIGHTS)
        manifest = {"kind": KIND, "key": folder.name, "arch": generator.arch, "created": time.time(),
                    "versions": library_versions(), "sha256": _sha256(tmp / WEIGHTS), **meta}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        for name in (WEIGHTS, "manifest.json"):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        if folder.exists():
            old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
            os.rename(folder, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_generator(ref: str, protection: str, results: Path, device: torch.device) -> tuple[nn.Module, dict]:
    """The generator named by ``ref`` (a key under ``<results>/cache/generator/`` or a path to its folder or
    its ``generator.pt``) in eval mode on ``device``, and its manifest."""
    from bench.components import PROTECTIONS

    folder = _resolve(ref, Path(results))
    manifest = json.loads((folder / "manifest.json").read_text())
    made_by = manifest.get("protection", {}).get("name")
    if made_by != protection:
        raise ConfigError(f"generator {folder} was trained by protection {made_by!r}, not {protection!r}; "
                          f"pass --protection {made_by}")
    if _sha256(folder / WEIGHTS) != manifest["sha256"]:
        raise ConfigError(f"generator {folder}: {WEIGHTS} does not match its manifest's checksum (corrupted); "
                          "delete the folder and rerun the protection to retrain it")
    cls = PROTECTIONS.get(protection)
    if not hasattr(cls, "build_generator"):
        raise ConfigError(f"protection {protection!r} has no generator: only generator-based protections "
                          "(confoundergan) encrypt with `bench protect`")
    generator = cls.build_generator(manifest["arch"])
    generator.load_state_dict(torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True))
    return generator.to(device).eval(), manifest


def _resolve(ref: str, results: Path) -> Path:
    path = Path(ref).expanduser()
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    if path.is_dir() and (path / "manifest.json").is_file():
        return path
    cached = results / "cache" / KIND / ref
    if "/" not in ref and (cached / "manifest.json").is_file():
        return cached
    known = sorted(p.name for p in (results / "cache" / KIND).glob("*") if (p / "manifest.json").is_file())
    listing = f" (cached: {', '.join(known[:5])}{' …' if len(known) > 5 else ''})" if known else ""
    raise ConfigError(f"no generator {ref!r}: not a generator folder nor a key under {results / 'cache' / KIND}"
                      f"{listing}; run a matrix with the confoundergan protection (its records name the key as "
                      "protect_info.generator), or pass --results where it ran, or a path")


@torch.no_grad()
def encrypt(generator: nn.Module, images: torch.Tensor, *, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """uint8 N×C×H×W → uint8 clip(x + G(x)) on the CPU, batch-wise in fp32. The change is rounded in integer
    pixel units and clamped to ±⌊ε⌋, so |x′ − x| ≤ ε holds exactly whatever the float arithmetic."""
    bound = math.floor(float(generator.arch["epsilon"]) + 1e-6)
    out = torch.empty_like(images, device="cpu")
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        delta = generator(batch.float().div(255))
        if not torch.isfinite(delta).all():
            raise RuntimeError("the generator produced non-finite noise; it is broken: retrain it")
        step = delta.mul(255).round().clamp(-bound, bound).to(torch.int16)
        out[start:start + batch_size] = (batch.to(torch.int16) + step).clamp(0, 255).to(torch.uint8).cpu()
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    return torch.device(name)


def protect_folder(protection: str, ref: str, source: Path, target: Path, *, results: Path, device: str = "auto",
                   batch_size: int = 256) -> str:
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
    dev = resolve_device(device)
    generator, _ = load_generator(ref, protection, results, dev)
    channels, size = generator.arch["channels"], generator.arch["size"]
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
        raise ConfigError(f"the generator was trained on {_shape((channels, size, size))} images but {source} holds "
                          f"{_shape(found)} images (e.g. {path.name}); resize/convert them, or train a generator on "
                          "such images")
    target.mkdir(parents=True, exist_ok=True)
    start, forward = time.perf_counter(), 0.0
    for first in range(0, len(files), batch_size):
        chunk = files[first:first + batch_size]
        arrays = [np.asarray(Image.open(p).convert("L" if channels == 1 else "RGB")) for p in chunk]
        batch = torch.from_numpy(np.stack(arrays)).reshape(len(chunk), size, size, channels).permute(0, 3, 1, 2)
        tick = time.perf_counter()
        out = encrypt(generator, batch.contiguous(), device=dev, batch_size=batch_size)
        forward += time.perf_counter() - tick
        for p, image in zip(chunk, out.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image[..., 0] if channels == 1 else image).save(target / (p.stem + ".png"))
    total = time.perf_counter() - start
    return (f"encrypted {len(files)} images ({_shape((channels, size, size))}) into {target} on {dev}: "
            f"{len(files) / max(forward, 1e-9):.0f} images/s (generator), {len(files) / max(total, 1e-9):.0f} images/s "
            f"with reading and writing")


def _shape(shape: tuple[int, int, int]) -> str:
    return "×".join(map(str, shape))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
