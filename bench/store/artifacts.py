"""Models that stages hand on: one protocol for every fitted model (ConfounderGAN's generator today; UGE's
generator and authorized network, DH's hiding network, an attacker's denoiser next).

A component declares the kinds it fits (``fits``) and returns them from ``fit`` (``bench.core.components.Fitted``);
the stage saves them beside the data they came with, in the same atomic cache entry (``bench.store.cache``: one
``<kind>.pt`` state_dict each, checksummed, the ``arch`` in the manifest with the component's spec and seed).
``load_models`` is the one way back, for any later stage or cell (the ``ood`` mix, a countermeasure's
``needs_models``, ``bench protect``): it verifies the entry, rebuilds each model with the owner's
``build_model(kind, arch)`` and loads its weights. A model's reference is its entry's key (the protection
key for a protection's models: records carry it as ``protection_key``) or a path to the entry folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.core.components import COUNTERMEASURES, PROTECTIONS, Models
from bench.core.registry import ConfigError, Registry
from bench.store.cache import Cache, verify

OWNERS: dict[str, Registry] = {"protected": PROTECTIONS, "purified": COUNTERMEASURES}


def load_models(folder: Path, kinds: Sequence[str], device: torch.device) -> Models:
    """The models ``kinds`` of the cache entry in ``folder``, verified, in eval mode on ``device``."""
    try:
        manifest = verify(folder)
    except ValueError as err:
        raise ConfigError(f"cache entry {folder} did not verify ({err}): rerun the matrix that made it with `bench run "
                          "--matrix <its matrix> --rebuild-sets` (it moves the entry aside and rebuilds it)") from err
    saved = manifest.get("models", {})
    missing = [k for k in kinds if k not in saved]
    if missing:
        raise ConfigError(f"cache entry {folder} holds no {', '.join(missing)} model (it holds: "
                          f"{', '.join(saved) or 'none'}); it was made before its component fitted one: delete the "
                          "folder and rerun to rebuild it")
    owner = owner_class(manifest)
    models = {}
    for kind in kinds:
        model = owner.build_model(kind, saved[kind]["arch"])
        model.load_state_dict(torch.load(folder / saved[kind]["file"], map_location="cpu", weights_only=True))
        models[kind] = model.to(device).eval().requires_grad_(False)
    return Models(models)


def owner_class(manifest: dict[str, Any]) -> type:
    """The registered class whose spec made a cache entry."""
    return OWNERS[manifest["kind"]].get(manifest["spec"]["name"])


def resolve_entry(ref: str, results: Path, kind: str = "protected") -> Path:
    """The entry folder named by ``ref``: a key under ``<results>/cache/<kind>/``, a folder, or a file in it."""
    path = Path(ref).expanduser()
    if path.is_file():
        path = path.parent
    if path.is_dir() and (path / "manifest.json").is_file():
        return path
    cache = Cache(results / "cache")
    if ref and "/" not in ref and not ref.startswith(".") and os.path.lexists(cache.path(kind, ref)):
        return cache.path(kind, ref)  # load_models verifies it, and says so if it does not
    with_models = [key for key, manifest in cache.entries(kind) if manifest.get("models")]
    listing = f" (entries with models: {', '.join(with_models[:5])}{' …' if len(with_models) > 5 else ''})" \
        if with_models else ""
    raise ConfigError(f"no model entry {ref!r}: not a cache folder nor a key under {results / 'cache' / kind}"
                      f"{listing}; run a matrix with a protection that fits a model (e.g. confoundergan; its records "
                      "name the key as protection_key), pass --results where it ran, or give a path")
