"""The stages of one cell, each a function of one frozen job, run by a backend (``bench.execute.backends``: joblib worker
processes or in-process, Slurm array tasks, Ray tasks).

protect (clean train set → protected set and its fitted models, cached) → purify (data-stage countermeasure on
the train set as the cell's mix assembles it, cached) → train and evaluate a victim on the clean test set
(→ one record). Components are named by their ``Choice`` and rebuilt from the registries in the worker. A job
runs under its key's claim (``bench.execute.claimed``), so that runs sharing a results folder compute it once.
"""

from __future__ import annotations

import dataclasses
import errno
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.core.components import COUNTERMEASURES, PROTECTIONS, TRAIN, Fitted, ImageSet, Models
from bench.data import mixes
from bench.data.datasets import DATASETS
from bench.execute import devices
from bench.execute.metrics import confidence_ascent_ratio, gradient_compression_ratio, perturbation_metrics
from bench.execute.train import train_and_evaluate
from bench.plan.matrix import Choice
from bench.plan.planner import Components, Plan
from bench.plan.recipes import Recipe, make_recipe
from bench.store.artifacts import load_models
from bench.store.cache import Cache, library_versions
from bench.store.records import Made, Record


@dataclasses.dataclass(frozen=True)
class ProtectJob:
    """Protect a dataset's clean train set (on ``fitted_on`` of each class only, when set) into ``key``."""

    cache: Path
    threads: int
    key: str
    dataset_key: str
    protection: Choice
    seed: int
    fitted_on: float | None
    fits: tuple[str, ...] = ()  # the models the protection declares fitting (its cache entry holds them)
    redo: bool = False  # rebuild even where cached (--rerun, --force)


@dataclasses.dataclass(frozen=True)
class PurifyJob:
    """Apply the plan's data-stage countermeasure to its assembled train set, into ``plan.purify_key``."""

    cache: Path
    threads: int
    plan: Plan
    redo: bool = False  # rebuild even where cached (--rerun, --force)

    @property
    def key(self) -> str:
        return self.plan.purify_key or ""


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """Train and evaluate the plan's victim; ``upstream_error`` is an earlier stage's traceback, if it failed."""

    cache: Path
    threads: int
    plan: Plan
    matrix: str
    recipe: dict[str, Any]
    upstream_error: str | None
    show_epochs: bool
    redo: bool = False  # retrain even where recorded (--rerun, --force)
    deterministic: bool = False  # the run asked for deterministic algorithms (recorded; set in the worker)

    @property
    def key(self) -> str:
        return self.plan.cell_key


@dataclasses.dataclass(frozen=True)
class SetBuilt:
    """What a protect or purify job came to: its seconds, or the traceback of its failure; ``full`` holds (errno,
    message, path) when the failure was the storage's (a full disk, a read-only or forbidden folder), which ends the
    run: every other set and cell would fail alike."""

    key: str
    seconds: float | None = None
    error: str | None = None
    full: tuple[int | None, str, str | None] | None = None


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def storage_failure(err: BaseException) -> tuple[int | None, str, str | None] | None:
    """(errno, message, path) of an OS error of the storage, else None. numpy reports a short write on a full disk
    as an OSError without errno ("N requested and M written"), so that counts too."""
    if not isinstance(err, OSError):
        return None
    short_write = err.errno is None and " requested and " in str(err) and str(err).endswith(" written")
    if err.errno not in STORAGE_ERRNOS and not short_write:
        return None
    message = f"No space left on device ({err})" if short_write else err.strerror or str(err)
    return err.errno, message, None if err.filename is None else str(err.filename)


def protect_job(job: ProtectJob, device: torch.device) -> SetBuilt:
    """Protect the clean train set and cache the result with the models the protection fitted."""
    cache = Cache(job.cache)
    train = mixes.require(cache, "dataset", f"{job.dataset_key}-train")
    protection = PROTECTIONS.create(job.protection.name, **job.protection.kwargs)
    start = time.perf_counter()
    fitted = mixes.fit_protection(protection, train, job.fitted_on, seed=job.seed, device=device)
    seconds = time.perf_counter() - start
    _check_output(train, fitted.data, f"protection {job.protection.label}")
    _check_models(protection, fitted)
    cache.save("protected", job.key, fitted.data, {"spec": protection.spec(), "seed": job.seed, "seconds": seconds,
                                                   "device": str(device),
                                                   "info": {**fitted.data.info, "protected_images": len(train)},
                                                   **perturbation_metrics(train.images, fitted.data.images)},
               models=fitted.models, replace=job.redo)
    return SetBuilt(job.key, seconds)


def purify_job(job: PurifyJob, device: torch.device) -> SetBuilt:
    """Apply a data-stage countermeasure to the cell's (partly) protected train set and cache the result."""
    cache = Cache(job.cache)
    sets = mixes.assemble(cache, job.plan.source)
    cell = job.plan.cell
    countermeasure = COUNTERMEASURES.create(cell.countermeasure.name, **cell.countermeasure.kwargs)
    needs: dict[str, Any] = _models_for(countermeasure, cache, job.plan, device)
    if countermeasure.needs_attacker:
        protection = PROTECTIONS.create(cell.protection.name, **cell.protection.kwargs)
        fitted_by = load_models(cache.path("protected", job.plan.protection_key), job.plan.protection_fits, device) \
            if job.plan.protection_fits else Models()
        needs["attacker"] = mixes.attacker(protection, fitted_by, sets, seed=cell.seed, device=device)
    start = time.perf_counter()
    fitted = countermeasure.fit(sets.train, seed=cell.seed, device=device, **needs)
    seconds = time.perf_counter() - start
    _check_output(sets.train, fitted.data, f"countermeasure {cell.countermeasure.label}",
                  subset=countermeasure.returns_subset)
    _check_models(countermeasure, fitted)
    cache.save("purified", job.key, fitted.data, {"spec": countermeasure.spec(), "seed": cell.seed,
                                                  "seconds": seconds, "device": str(device), "info": fitted.data.info},
               models=fitted.models, replace=job.redo)
    return SetBuilt(job.key, seconds)


def train_job(job: TrainJob, device: torch.device) -> Record:
    """Train and evaluate one cell; always returns its record (status ``error`` with the traceback on failure)."""
    measured: dict[str, Any] = {"seconds": {}}  # Record fields, as the stages measure them
    status, error = "ok", None
    try:
        if job.upstream_error:
            raise RuntimeError(f"an earlier stage failed:\n{job.upstream_error}")
        cache = Cache(job.cache)
        devices.reset_memory_peak(device)
        start = time.perf_counter()
        sets = mixes.assemble(cache, job.plan.source)
        train = mixes.require(cache, "purified", job.plan.purify_key) if job.plan.purify_key else sets.train
        test = mixes.require(cache, "dataset", f"{job.plan.dataset_key}-test")
        measured["seconds"]["load"] = time.perf_counter() - start
        seconds, reports = stage_reports(cache, job.plan)
        measured["seconds"].update(seconds)
        measured.update(reports)
        if sets.mask.any():  # clean vs protected, over the protected images
            measured.update(perturbation_metrics(sets.clean.images[sets.mask], sets.train.images[sets.mask]))
        built = Components.of(job.plan.cell)
        recipe = make_recipe(**job.recipe).for_dataset(job.plan.cell.dataset.name).for_victim(built.victim.name)
        measured.update(recipe=recipe.name, recipe_params=dataclasses.asdict(recipe))
        start = time.perf_counter()
        result = _train(job, cache, built, recipe, train, test, device)
        measured["seconds"]["train"] = time.perf_counter() - start
        measured.update({k: v for k, v in result.items() if k != "model"})
        if sets.mask.any() and job.plan.protection_key:
            measured.update(gradient_metrics(result["model"], sets.clean, sets.train, sets.mask, device))
    except Exception:
        status, error = "error", traceback.format_exc()
    return Record(**identity(job), **measured, status=status, error=error, device=str(device), threads=job.threads,
                  versions=library_versions(), memory=devices.memory_use(device), finished_at=time.time())


def failed_record(job: TrainJob, device: str, error: str) -> Record:
    """The record of a cell that failed without reporting (its worker died): its identity and the reason."""
    return Record(**identity(job), seconds={}, status="error", error=error, device=device, threads=job.threads,
                  versions=library_versions(), finished_at=time.time())


def identity(job: TrainJob) -> dict[str, Any]:
    """A record's identity: its key, matrix, labels, components (name, params, what made them: version and a
    plugin's code; declared stages and reports)."""
    cell, plan = job.plan.cell, job.plan
    info: dict[str, Any] = {"cell": plan.cell_key, "matrix": job.matrix, "seed": cell.seed,
                            "poison_ratio": cell.poison_ratio, "mix": cell.mix, "dataset_key": plan.dataset_key,
                            "protection_key": plan.protection_key, "purify_key": plan.purify_key, "components": {},
                            "deterministic": job.deterministic}
    built = Components.of(cell)
    dataset = DATASETS.create(cell.dataset.name, **cell.dataset.kwargs)
    for axis, component in (("dataset", dataset), ("protection", built.protection),
                            ("countermeasure", built.countermeasure), ("victim", built.victim)):
        choice, spec = getattr(cell, axis), component.spec()
        info.update({axis: choice.label, f"{axis}_name": choice.name, f"{axis}_params": choice.kwargs})
        info["components"][axis] = Made(spec["name"], spec["version"], spec.get("code"))
    info.update(countermeasure_stage="+".join(sorted(built.countermeasure.stages)) or "none",
                countermeasure_reports=built.countermeasure.reports)
    return info


def stage_reports(cache: Cache, plan: Plan) -> tuple[dict[str, float], dict[str, Any]]:
    """What the protect and purify stages reported in their manifests: their seconds, and their info and fitted
    models (``protect_info``, ``protect_models`` …)."""
    seconds, reports = {}, {}
    for stage, kind, key in (("protect", "protected", plan.protection_key), ("purify", "purified", plan.purify_key)):
        if key:
            manifest = cache.manifest(kind, key)
            seconds[stage] = manifest["seconds"]
            reports.update({f"{stage}_info": manifest.get("info", {}),
                            f"{stage}_models": sorted(manifest.get("models", {}))})
    return seconds, reports


def _train(job: TrainJob, cache: Cache, built: Components, recipe: Recipe, train: ImageSet, test: ImageSet,
           device: torch.device) -> dict[str, Any]:
    """Build the victim and train it with the countermeasure's hooks, showing epochs where asked."""
    countermeasure, cell = built.countermeasure, job.plan.cell
    augment = DATASETS.get(cell.dataset.name).augment if recipe.augment == "dataset" else recipe.augment
    hooks = countermeasure.train_hooks(train.num_classes, train.size, **_models_for(
        countermeasure, cache, job.plan, device, own=True)) if TRAIN in countermeasure.stages else None
    torch.manual_seed(cell.seed)
    needs = _models_for(built.victim, cache, job.plan, device)
    model = built.victim.build(train.num_classes, train.channels, train.size, **needs)
    with tqdm(total=None if recipe.iterations is not None else recipe.epochs, desc="  epochs", leave=False, file=sys.stderr,
              disable=not job.show_epochs) as bar:
        result = train_and_evaluate(model, train, test, recipe, seed=cell.seed, device=device, augment=augment,
                                    hooks=hooks, stats=built.victim.input_stats(**needs),
                                    on_epoch=lambda e, tr, te: (bar.update(), bar.set_postfix(test=f"{te:.3f}")))
    return {"test_acc_final": result["final"], "test_acc_best": result["best"], "best_epoch": result["best_epoch"],
            "train_acc": result["train_acc"], "test_acc": result["test_acc"], "images_per_s": result["images_per_s"],
            "augment": augment, "precision": result["precision"], "steps": result["steps"], "model": result["model"],
            **{k: result[k] for k in ("data_placement", "tf32_conv", "compile_seconds")}}


def _models_for(component: Any, cache: Cache, plan: Plan, device: torch.device, own: bool = False) -> dict[str, Models]:
    """``{"models": …}`` for a component that declares ``needs_models`` (the planner checked the cell's protection
    fits them) or ``uses_models`` (those the protection fits), with, where ``own``, the models the countermeasure
    fitted itself in its data stage; nothing for other components: only those take the keyword."""
    own_kinds = component.fits if own else ()
    if not (component.needs_models or component.uses_models or own_kinds):
        return {}
    kinds = component.needs_models + tuple(k for k in component.uses_models if k in plan.protection_fits)
    models = dict(load_models(cache.path("protected", plan.protection_key), kinds, device)) if kinds else {}
    if own_kinds:
        assert plan.purify_key is not None, "a countermeasure that fits models has a data stage"
        models.update(load_models(cache.path("purified", plan.purify_key), own_kinds, device))
    return {"models": Models(models)}


def gradient_metrics(model: torch.nn.Module, clean: ImageSet, protected: ImageSet, mask: torch.Tensor,
                     device: torch.device, limit: int = 2000) -> dict[str, float]:
    """CAR and GCR (ConfounderGAN App. A) of the trained victim on (at most ``limit``, evenly spaced) protected
    train images against their clean originals."""
    index = torch.nonzero(mask).flatten()
    index = index[torch.linspace(0, len(index) - 1, min(limit, len(index))).long()]
    args = (model, clean.images[index], protected.images[index], clean.labels[index], device)
    return {"car": confidence_ascent_ratio(*args), "gcr": gradient_compression_ratio(*args)}


def _check_models(component: Any, fitted: Fitted) -> None:
    if sorted(fitted.models) != sorted(component.fits):
        raise RuntimeError(f"{component.name} declares fits = {component.fits} but returned models {sorted(fitted.models)}")


def _check_output(before: ImageSet, after: ImageSet, what: str, subset: bool = False) -> None:
    """The stage kept every image and its label (or, for a countermeasure that ``returns_subset``, the image
    shape, the classes and at most as many images), on the CPU."""
    if {after.images.device.type, after.labels.device.type} != {"cpu"}:
        devices = f"{after.images.device} (images), {after.labels.device} (labels)"
        raise RuntimeError(f"{what} returned tensors on {devices}: components return CPU tensors; call .cpu() "
                           "(ImageSet.with_images does)")
    if subset:
        if after.images.shape[1:] != before.images.shape[1:] or len(after) > len(before) or \
                after.num_classes != before.num_classes:
            raise RuntimeError(f"{what} returns_subset but changed the image shape or the classes, or added images")
    elif after.images.shape != before.images.shape or not torch.equal(after.labels, before.labels):
        raise RuntimeError(f"{what} changed the shape or the labels of the train set")
