"""Runs a matrix: protect (once per protection key) → data-stage countermeasure (once per purification key)
→ train and evaluate each cell; cached, resumable, and parallel through joblib.

The stages themselves live in ``bench.stages``; this module plans cells (cache keys), skips what is
recorded or cached, and runs each stage's jobs in parallel, appending records as cells finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from bench.cache import Cache, make_key
from bench.components import COUNTERMEASURES, PROTECTIONS, VICTIMS
from bench.data import DATASETS, fingerprint
from bench.matrix import Cell, Matrix, expand, select
from bench.records import RecordLog
from bench.stages import protect_job, purify_job, train_job
from bench.recipes import make_recipe
from bench.registry import ConfigError
from bench.train import keep_freed_memory


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
                                       "protection": p.cell.protection, "seed": p.cell.seed,
                                       "fitted_on": p.cell.poison_ratio if p.cell.mix in ("fit_subset", "ood") else None}
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
    fitted_on_subset = cell.mix in ("fit_subset", "ood")
    if cell.mix == "ood" and not protection.identity and not getattr(protection, "artifact", None):
        raise ConfigError(f"mix 'ood' needs a protection that encrypts unseen images without labels (one that saves "
                          f"a model, e.g. confoundergan); {cell.protection.label} cannot: exclude that combination "
                          f"with [[exclude]] protection = {cell.protection.label!r}, mix = 'ood'")
    protection_key = None if protection.identity or cell.mix == "clean_only" else make_key(
        {"dataset": dataset_key, "protection": protection.spec(), "seed": cell.seed,
         **({"fitted_on": cell.poison_ratio} if fitted_on_subset else {})})
    source = {"dataset": dataset_key, "protection": protection_key, "poison_ratio": cell.poison_ratio,
              "seed": cell.seed, **({"mix": cell.mix} if cell.mix != "protected" else {}),
              # clean_only ignores the protection, but each row of a table is its own cell
              **({"unused_protection": protection.spec()} if cell.mix == "clean_only" else {})}
    purify_key = None if countermeasure.identity or countermeasure.stage != "data" else make_key(
        {**source, "countermeasure": countermeasure.spec()})
    cell_key = make_key({**source, "countermeasure": countermeasure.spec(), "victim": victim.spec(),
                         "recipe": dataclasses.asdict(make_recipe(**recipe))})
    return Plan(cell, dataset_key, protection_key, purify_key, cell_key)


def save_resolved(matrix: Matrix, path: Path) -> None:
    """The resolved matrix (every variant's full parameters) beside its records, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    resolved = {"name": matrix.name, "source": matrix.source, "description": matrix.description,
                "seeds": matrix.seeds, "poison_ratio": matrix.poison_ratios, "mix": matrix.mixes, "recipe": matrix.recipe,
                "exclude": matrix.exclude,
                "axes": {axis: [{"label": c.label, "name": c.name, "params": c.kwargs} for c in choices]
                         for axis, choices in matrix.axes.items()}}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(resolved, indent=1, default=str))
    os.replace(tmp, path)


def _inputs(p: Plan) -> dict[str, Any]:
    return {"dataset_key": p.dataset_key, "protection_key": p.protection_key, "purify_key": p.purify_key,
            "poison_ratio": p.cell.poison_ratio, "seed": p.cell.seed, "mix": p.cell.mix}


def _plan_info(p: Plan, matrix: Matrix) -> dict[str, Any]:
    info: dict[str, Any] = {"cell": p.cell_key, "matrix": matrix.name, "seed": p.cell.seed,
                            "poison_ratio": p.cell.poison_ratio, "mix": p.cell.mix}
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


def show_progress() -> None:
    """Print bench's own INFO logs (e.g. EM's rounds, which take minutes each) on stderr; other libraries stay
    at WARNING. A no-op where logging is already configured (pytest, an embedding program)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for package in ("bench", "protections", "countermeasures", "victims"):
        logging.getLogger(package).setLevel(logging.INFO)


def _call(fn: Callable[[dict, torch.device], dict], job: dict[str, Any], devices: Any) -> dict[str, Any]:
    show_progress()  # in this process, which may be a joblib worker
    keep_freed_memory()
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
