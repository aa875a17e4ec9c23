"""The stages of one cell, run in joblib worker processes (or in-process for one job).

protect (clean train set → protected set, cached) → purify (data-stage countermeasure on the train set with
``poison_ratio`` of each class protected, cached) → train and evaluate a victim on the clean test set
(→ one record). Jobs are plain dicts of names and parameters; components are rebuilt from the registries.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.cache import Cache, library_versions
from bench.components import COUNTERMEASURES, PROTECTIONS, VICTIMS, ImageSet
from bench.data import DATASETS
from bench.metrics import confidence_ascent_ratio, gradient_compression_ratio
from bench.records import perturbation_metrics
from bench.recipes import make_recipe
from bench.train import train_and_evaluate

def protect_job(job: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Protect the clean train set and cache the result."""
    cache = Cache(Path(job["cache"]))
    train = cache.load("dataset", f"{job['dataset_key']}-train")
    protection = PROTECTIONS.create(job["protection"].name, **job["protection"].kwargs)
    start = time.perf_counter()
    kind = getattr(protection, "artifact", None)  # a model the protection trains and saves beside its poison
    extra = {"artifacts": cache.path(kind, job["key"])} if kind else {}
    if job.get("fitted_on") is None:
        protected = protection.protect(train, seed=job["seed"], device=device, **extra)
    else:
        protected = _fit_on_subset(protection, train, job, device, extra)
    seconds = time.perf_counter() - start
    _check_output(train, protected, f"protection {job['protection'].label}")
    cache.save("protected", job["key"], protected, {"spec": protection.spec(), "seed": job["seed"],
                                                    "seconds": seconds, "device": str(device), "info": protected.info,
                                                    **perturbation_metrics(train.images, protected.images)})
    return {"seconds": seconds}


def purify_job(job: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Apply a data-stage countermeasure to the (partly) protected train set and cache the result."""
    cache = Cache(Path(job["cache"]))
    _, train, _ = training_set(cache, job)
    countermeasure = COUNTERMEASURES.create(job["countermeasure"].name, **job["countermeasure"].kwargs)
    start = time.perf_counter()
    purified = countermeasure.purify(train, seed=job["seed"], device=device)
    seconds = time.perf_counter() - start
    _check_output(train, purified, f"countermeasure {job['countermeasure'].label}")
    cache.save("purified", job["key"], purified, {"spec": countermeasure.spec(), "seconds": seconds,
                                                  "device": str(device), "info": purified.info})
    return {"seconds": seconds}


def train_job(job: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Train and evaluate one cell; always returns a record (status ``error`` with the traceback on failure)."""
    plan = job["plan"]
    record: dict[str, Any] = {**plan, "device": str(device), "threads": job["threads"], "status": "ok",
                              "error": None, "versions": library_versions(), "seconds": {}}
    try:
        if job["upstream_error"]:
            raise RuntimeError(f"an earlier stage failed:\n{job['upstream_error']}")
        cache = Cache(Path(job["cache"]))
        start = time.perf_counter()
        clean, train, mask = training_set(cache, job)
        if mask.any():  # clean vs protected, over the protected images
            record.update(perturbation_metrics(clean.images[mask], train.images[mask]))
        protected = train
        if job["purify_key"]:
            train = _require(cache, "purified", job["purify_key"])
        test = _require(cache, "dataset", f"{job['dataset_key']}-test")
        record["seconds"]["load"] = time.perf_counter() - start
        for stage, kind, key in (("protect", "protected", job["protection_key"]), ("purify", "purified", job["purify_key"])):
            if key:
                manifest = cache.manifest(kind, key)
                record["seconds"][stage] = manifest["seconds"]
                record[f"{stage}_info"] = manifest.get("info", {})
        victim = VICTIMS.create(plan["victim_name"], **plan["victim_params"])
        countermeasure = COUNTERMEASURES.create(plan["countermeasure_name"], **plan["countermeasure_params"])
        recipe = make_recipe(**job["recipe"]).for_victim(victim.name)
        record["recipe"], record["recipe_params"] = recipe.name, dataclasses.asdict(recipe)
        augment = DATASETS.get(plan["dataset_name"]).augment if recipe.augment == "dataset" else recipe.augment
        hooks = countermeasure.train_hooks(train.num_classes, train.size) if countermeasure.stage == "train" else None
        torch.manual_seed(plan["seed"])
        start = time.perf_counter()
        model = victim.build(train.num_classes, train.channels, train.size)
        with tqdm(total=None if recipe.iterations else recipe.epochs, desc="  epochs", leave=False,
                  file=sys.stderr, disable=not job["show_epochs"]) as bar:
            result = train_and_evaluate(model, train, test, recipe, seed=plan["seed"], device=device, augment=augment,
                                        hooks=hooks, on_epoch=lambda e, tr, te: (bar.update(), bar.set_postfix(test=f"{te:.3f}")))
        record["seconds"]["train"] = time.perf_counter() - start
        record.update({"test_acc_final": result["final"], "test_acc_best": result["best"],
                       "best_epoch": result["best_epoch"], "train_acc": result["train_acc"],
                       "test_acc": result["test_acc"], "images_per_s": result["images_per_s"], "augment": augment,
                       "precision": result["precision"], "steps": result["steps"]})
        if mask.any() and job["protection_key"]:
            record.update(gradient_metrics(result["model"], clean, protected, mask, device))
    except Exception:
        record.update(status="error", error=traceback.format_exc())
    record["finished_at"] = time.time()
    return record


def class_mask(data: ImageSet, ratio: float, seed: int) -> torch.Tensor:
    """A seeded random ``ratio`` of each class (the protected part of a cell's train set)."""
    mask = torch.zeros(len(data), dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    for c in range(data.num_classes):
        members = torch.nonzero(data.labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        mask[members[: round(ratio * len(members))]] = True
    return mask


def training_set(cache: Cache, job: dict[str, Any]) -> tuple[ImageSet, ImageSet, torch.Tensor]:
    """Clean train set, the cell's train set as its ``mix`` says (``bench.matrix.MIXES``), and the mask of the
    protected images in the clean set's indexing (for ``clean_only`` the train set is the clean rest)."""
    clean = _require(cache, "dataset", f"{job['dataset_key']}-train")
    mix = job.get("mix", "protected")
    mask = class_mask(clean, job["poison_ratio"], job["seed"])
    if mix == "clean_only":
        return clean, clean.subset(torch.nonzero(~mask).flatten()), torch.zeros(len(clean), dtype=torch.bool)
    if not job["protection_key"]:
        return clean, clean, torch.ones(len(clean), dtype=torch.bool)
    protected = _require(cache, "protected", job["protection_key"])
    if mix == "ood":  # the fitted part and the rest, encrypted out of distribution: all of it is changed
        return clean, clean.with_images(protected.images), torch.ones(len(clean), dtype=torch.bool)
    mixed = torch.where(mask[:, None, None, None], protected.images, clean.images)
    return clean, clean.with_images(mixed), mask


def _fit_on_subset(protection: Any, train: ImageSet, job: dict[str, Any], device: torch.device,
                   extra: dict[str, Any]) -> ImageSet:
    """Fit the protection on the ``fitted_on`` ratio of each class only (ConfounderGAN §5.2); a protection with a
    saved model also encrypts the rest without labels (out of distribution), others leave it clean."""
    mask = class_mask(train, job["fitted_on"], job["seed"])
    fitted = protection.protect(train.subset(torch.nonzero(mask).flatten()), seed=job["seed"], device=device, **extra)
    images = train.images.clone()
    images[mask] = fitted.images
    info = {**fitted.info, "fitted_on": int(mask.sum()), "encrypted_unseen": 0}
    if extra and (~mask).any():
        from bench.encrypt import encrypt, load_generator

        model, _ = load_generator(str(extra["artifacts"]), protection.name, Path(job["cache"]).parent, device)
        images[~mask] = encrypt(model, train.images[~mask], device=device)
        info["encrypted_unseen"] = int((~mask).sum())
    return train.with_images(images, **info)


def gradient_metrics(model: torch.nn.Module, clean: ImageSet, protected: ImageSet, mask: torch.Tensor,
                     device: torch.device, limit: int = 2000) -> dict[str, float]:
    """CAR and GCR (ConfounderGAN App. A) of the trained victim on (at most ``limit``, evenly spaced) protected
    train images against their clean originals."""
    index = torch.nonzero(mask).flatten()
    index = index[torch.linspace(0, len(index) - 1, min(limit, len(index))).long()]
    args = (model, clean.images[index], protected.images[index], clean.labels[index], device)
    return {"car": confidence_ascent_ratio(*args), "gcr": gradient_compression_ratio(*args)}


def _require(cache: Cache, kind: str, key: str) -> ImageSet:
    data = cache.load(kind, key)
    if data is None:
        raise RuntimeError(f"cache entry {kind}/{key} is missing or corrupted; rerun to rebuild it")
    return data


def _check_output(before: ImageSet, after: ImageSet, what: str) -> None:
    if after.images.shape != before.images.shape or not torch.equal(after.labels, before.labels):
        raise RuntimeError(f"{what} changed the shape or the labels of the train set")
