"""Runs a matrix: protect (once per protection key) → data-stage countermeasure (once per purification key)
→ train and evaluate each cell; cached, resumable, and parallel through joblib.

Jobs are plain dicts (names and parameters, never component objects) so that plugin classes need not be
picklable; each worker rebuilds components from the registries and reads its inputs from the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from bench.cache import Cache, library_versions, make_key
from bench.components import COUNTERMEASURES, PROTECTIONS, VICTIMS, ImageSet
from bench.data import DATASETS, fingerprint
from bench.matrix import Cell, Matrix, expand, select
from bench.records import RecordLog, perturbation_metrics
from bench.train import make_recipe, train_and_evaluate


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run: where results go, parallelism, device, CPU threads per job (fixed, so that results do
    not depend on ``jobs``), cell filters, and whether to only plan."""

    results: Path = Path("results")
    jobs: int = 1
    device: str = "auto"
    threads: int = 1
    only: tuple[str, ...] = ()
    dry_run: bool = False
    retry_failed: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
    """A cell with its cache keys (``None`` where a stage is the identity)."""

    cell: Cell
    dataset_key: str
    protection_key: str | None
    purify_key: str | None
    cell_key: str


def run_matrix(matrix: Matrix, options: RunOptions, out: Callable[[str], None] = print) -> dict[str, int]:
    """Run every missing cell of ``matrix``; returns counts of cells trained, skipped and failed."""
    cells = select(expand(matrix), list(options.only))
    cache = Cache(options.results / "cache")
    log = RecordLog(options.results / "runs" / matrix.name / "records.jsonl")
    dataset_keys = {choice: prepare_dataset(cache, choice) for choice in {c.dataset for c in cells}}
    plans = [plan_cell(cell, dataset_keys[cell.dataset], matrix.recipe) for cell in cells]
    recorded = log.latest()
    if options.dry_run:
        for p in plans:
            poison = "identity" if p.protection_key is None else (
                "cached" if cache.has("protected", p.protection_key) else "to build")
            result = recorded.get(p.cell_key, {}).get("status", "to run")
            out(f"{' | '.join(p.cell.labels().values())} | poison: {poison} | result: {result}")
        out(f"{len(plans)} cells, {sum(p.cell_key in recorded for p in plans)} recorded")
        return {"cells": len(plans), "trained": 0, "skipped": len(plans), "failed": 0}
    save_resolved(matrix, options.results / "runs" / matrix.name / "matrix.json")
    todo = [p for p in plans if p.cell_key not in recorded
            or (options.retry_failed and recorded[p.cell_key]["status"] != "ok")]
    base = {"cache": str(cache.root), "threads": options.threads}
    devices = _device_pool(options)
    failures: dict[str, str] = {}

    protect_jobs = {p.protection_key: {**base, "key": p.protection_key, "dataset_key": p.dataset_key,
                                       "protection": p.cell.protection, "seed": p.cell.seed}
                    for p in todo if p.protection_key and not cache.valid("protected", p.protection_key)}
    _run_stage("protect", protect_job, list(protect_jobs.values()), options.jobs, devices, failures)
    purify_jobs = {p.purify_key: {**base, "key": p.purify_key, **_inputs(p), "countermeasure": p.cell.countermeasure}
                   for p in todo if p.purify_key and not cache.valid("purified", p.purify_key)
                   and p.protection_key not in failures}
    _run_stage("purify", purify_job, list(purify_jobs.values()), options.jobs, devices, failures)

    counts = {"cells": len(plans), "trained": 0, "skipped": len(plans) - len(todo), "failed": 0}
    bar = tqdm(total=len(plans), initial=counts["skipped"], desc="cells", unit="cell", file=sys.stderr,
               dynamic_ncols=True)
    train_jobs = [{**base, **_inputs(p), "plan": _plan_info(p, matrix), "recipe": matrix.recipe,
                   "upstream_error": failures.get(p.protection_key or "") or failures.get(p.purify_key or ""),
                   "show_epochs": options.jobs == 1 or len(todo) == 1} for p in todo]

    def record(result: dict[str, Any]) -> None:
        log.append(result)
        counts["trained" if result["status"] == "ok" else "failed"] += 1
        bar.update()
        if result["status"] != "ok":
            bar.write(f"cell failed: {result['protection']} × {result['countermeasure']} × {result['victim']}: "
                      f"{result['error'].strip().splitlines()[-1]}")

    _parallel(_call, train_job, train_jobs, options.jobs, devices, record)
    bar.close()
    return counts


def prepare_dataset(cache: Cache, choice: Any) -> str:
    """Load a dataset once, key it by its spec and content, and store train/test in the cache for workers."""
    dataset = DATASETS.create(choice.name, **choice.kwargs)
    train, test = dataset.load()
    key = make_key({"dataset": dataset.spec(), "content": fingerprint(train, test)})
    for split, data in (("train", train), ("test", test)):
        if not cache.valid("dataset", f"{key}-{split}"):
            cache.save("dataset", f"{key}-{split}", data, {"spec": dataset.spec(), "split": split})
    return key


def plan_cell(cell: Cell, dataset_key: str, recipe: dict[str, Any]) -> Plan:
    """The cell's cache keys, from everything that determines each stage's output."""
    protection = PROTECTIONS.create(cell.protection.name, **cell.protection.kwargs)
    countermeasure = COUNTERMEASURES.create(cell.countermeasure.name, **cell.countermeasure.kwargs)
    victim = VICTIMS.create(cell.victim.name, **cell.victim.kwargs)
    protection_key = None if protection.identity else make_key(
        {"dataset": dataset_key, "protection": protection.spec(), "seed": cell.seed})
    source = {"dataset": dataset_key, "protection": protection_key, "poison_ratio": cell.poison_ratio,
              "seed": cell.seed}
    purify_key = None if countermeasure.identity or countermeasure.stage != "data" else make_key(
        {**source, "countermeasure": countermeasure.spec()})
    cell_key = make_key({**source, "countermeasure": countermeasure.spec(), "victim": victim.spec(),
                         "recipe": dataclasses.asdict(make_recipe(**recipe))})
    return Plan(cell, dataset_key, protection_key, purify_key, cell_key)


def save_resolved(matrix: Matrix, path: Path) -> None:
    """The resolved matrix (every variant's full parameters) beside its records, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    resolved = {"name": matrix.name, "source": matrix.source, "description": matrix.description,
                "seeds": matrix.seeds, "poison_ratio": matrix.poison_ratios, "recipe": matrix.recipe,
                "exclude": matrix.exclude,
                "axes": {axis: [{"label": c.label, "name": c.name, "params": c.kwargs} for c in choices]
                         for axis, choices in matrix.axes.items()}}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(resolved, indent=1, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------- workers (run in joblib processes)

def protect_job(job: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Protect the clean train set and cache the result."""
    cache = Cache(Path(job["cache"]))
    train = cache.load("dataset", f"{job['dataset_key']}-train")
    protection = PROTECTIONS.create(job["protection"].name, **job["protection"].kwargs)
    start = time.perf_counter()
    protected = protection.protect(train, seed=job["seed"], device=device)
    seconds = time.perf_counter() - start
    _check_output(train, protected, f"protection {job['protection'].label}")
    cache.save("protected", job["key"], protected, {"spec": protection.spec(), "seed": job["seed"],
                                                    "seconds": seconds, "device": str(device),
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
                                                  "device": str(device)})
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
        record.update(perturbation_metrics(clean.images[mask], train.images[mask]))  # clean vs protected
        if job["purify_key"]:
            train = _require(cache, "purified", job["purify_key"])
        test = _require(cache, "dataset", f"{job['dataset_key']}-test")
        record["seconds"]["load"] = time.perf_counter() - start
        for stage, kind, key in (("protect", "protected", job["protection_key"]), ("purify", "purified", job["purify_key"])):
            if key:
                record["seconds"][stage] = cache.manifest(kind, key)["seconds"]
        victim = VICTIMS.create(plan["victim_name"], **plan["victim_params"])
        recipe = make_recipe(**job["recipe"])
        record["recipe"], record["recipe_params"] = recipe.name, dataclasses.asdict(recipe)
        augment = DATASETS.get(plan["dataset_name"]).augment if recipe.augment == "dataset" else recipe.augment
        torch.manual_seed(plan["seed"])
        start = time.perf_counter()
        model = victim.build(train.num_classes, train.channels, train.size)
        with tqdm(total=recipe.epochs, desc="  epochs", leave=False, file=sys.stderr,
                  disable=not job["show_epochs"]) as bar:
            result = train_and_evaluate(model, train, test, recipe, seed=plan["seed"], device=device, augment=augment,
                                        on_epoch=lambda e, tr, te: (bar.update(), bar.set_postfix(test=f"{te:.3f}")))
        record["seconds"]["train"] = time.perf_counter() - start
        record.update({"test_acc_final": result["final"], "test_acc_best": result["best"],
                       "best_epoch": result["best_epoch"], "train_acc": result["train_acc"],
                       "test_acc": result["test_acc"], "images_per_s": result["images_per_s"], "augment": augment})
    except Exception:
        record.update(status="error", error=traceback.format_exc())
    record["finished_at"] = time.time()
    return record


def training_set(cache: Cache, job: dict[str, Any]) -> tuple[ImageSet, ImageSet, torch.Tensor]:
    """Clean train set, the train set with ``poison_ratio`` of each class protected, and that mask."""
    clean = _require(cache, "dataset", f"{job['dataset_key']}-train")
    if not job["protection_key"]:
        return clean, clean, torch.ones(len(clean), dtype=torch.bool)
    protected = _require(cache, "protected", job["protection_key"])
    mask = torch.zeros(len(clean), dtype=torch.bool)
    gen = torch.Generator().manual_seed(job["seed"])
    for c in range(clean.num_classes):
        members = torch.nonzero(clean.labels == c).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        mask[members[: round(job["poison_ratio"] * len(members))]] = True
    mixed = torch.where(mask[:, None, None, None], protected.images, clean.images)
    return clean, clean.with_images(mixed), mask


def _require(cache: Cache, kind: str, key: str) -> ImageSet:
    data = cache.load(kind, key)
    if data is None:
        raise RuntimeError(f"cache entry {kind}/{key} is missing or corrupted; rerun to rebuild it")
    return data


def _check_output(before: ImageSet, after: ImageSet, what: str) -> None:
    if after.images.shape != before.images.shape or not torch.equal(after.labels, before.labels):
        raise RuntimeError(f"{what} changed the shape or the labels of the train set")


def _inputs(p: Plan) -> dict[str, Any]:
    return {"dataset_key": p.dataset_key, "protection_key": p.protection_key, "purify_key": p.purify_key,
            "poison_ratio": p.cell.poison_ratio, "seed": p.cell.seed}


def _plan_info(p: Plan, matrix: Matrix) -> dict[str, Any]:
    info: dict[str, Any] = {"cell": p.cell_key, "matrix": matrix.name, "seed": p.cell.seed,
                            "poison_ratio": p.cell.poison_ratio}
    for axis in ("dataset", "protection", "countermeasure", "victim"):
        choice = getattr(p.cell, axis)
        info.update({axis: choice.label, f"{axis}_name": choice.name, f"{axis}_params": choice.kwargs})
    info["countermeasure_stage"] = COUNTERMEASURES.get(p.cell.countermeasure.name).stage
    return info


# ---------------------------------------------------------------- parallel execution

def _device_pool(options: RunOptions) -> Any:
    """A device name, or a queue of GPU names when several GPUs serve several jobs (one cell per GPU)."""
    name = options.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and torch.cuda.device_count() > 1 and options.jobs > 1:
        return device_queue([f"cuda:{i}" for i in range(torch.cuda.device_count())])
    return name


def device_queue(names: list[str]) -> Any:
    """A queue shared with joblib workers: a job takes a device from it and puts it back when done."""
    import multiprocessing

    queue = multiprocessing.Manager().Queue()
    for name in names:
        queue.put(name)
    return queue


@contextlib.contextmanager
def _acquire(devices: Any, threads: int) -> Iterator[torch.device]:
    torch.set_num_threads(threads)
    if isinstance(devices, str):
        yield torch.device(devices)
        return
    name = devices.get()
    try:
        yield torch.device(name)
    finally:
        devices.put(name)


def _call(fn: Callable[[dict, torch.device], dict], job: dict[str, Any], devices: Any) -> dict[str, Any]:
    with _acquire(devices, job["threads"]) as device:
        return fn(job, device)


def _guarded(fn: Callable, job: dict[str, Any], devices: Any) -> dict[str, Any]:
    try:
        return {"key": job["key"], "error": None, **_call(fn, job, devices)}
    except Exception:
        return {"key": job["key"], "error": traceback.format_exc()}


def _run_stage(desc: str, fn: Callable, jobs: list[dict], n_jobs: int, devices: Any, failures: dict[str, str]) -> None:
    """Run a cache-building stage; failures are remembered so that dependent cells are recorded as errors."""
    if not jobs:
        return
    with tqdm(total=len(jobs), desc=desc, unit="set", file=sys.stderr, leave=False) as bar:
        def done(result: dict[str, Any]) -> None:
            bar.update()
            if result["error"]:
                failures[result["key"]] = result["error"]
                bar.write(f"{desc} failed: {result['error'].strip().splitlines()[-1]}")
        _parallel(_guarded, fn, jobs, n_jobs, devices, done)


def _parallel(runner: Callable, fn: Callable, jobs: list[dict], n_jobs: int, devices: Any,
              on_result: Callable[[dict], None]) -> None:
    """``runner(fn, job, devices)`` over ``jobs``, in-process for one job, else in joblib worker processes;
    ``on_result`` sees each result as it finishes (so records are appended as cells end)."""
    if n_jobs <= 1 or len(jobs) <= 1:
        for job in jobs:
            on_result(runner(fn, job, devices))
        return
    from joblib import Parallel, delayed

    tasks = (delayed(runner)(fn, job, devices) for job in jobs)
    for result in Parallel(n_jobs=min(n_jobs, len(jobs)), return_as="generator_unordered")(tasks):
        on_result(result)
