"""Runs a matrix: protect (once per protection key) → data-stage countermeasure (once per purification key)
→ train and evaluate each cell; cached, resumable, and parallel through a backend (``bench.execute.backends``: joblib,
submitit or Ray).

Planning (keys, capability checks) is ``bench.plan.planner``; the stages and their typed jobs are ``bench.execute.stages``.
This module skips what is recorded or cached and runs each stage's jobs in parallel, appending records as
cells finish. Runs may share one results folder: each job claims its key first (``bench.execute.claims``); a key another
live worker holds is left to it, and its result is waited for at the end of the stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from bench.execute import backends

from bench.plan import estimate

from bench.data import mixes
from bench.execute.backends import Backend, BackendOptions
from bench.store.cache import Cache
from bench.execute.claims import DEFAULT_STALE, Claims
from bench.plan.matrix import Matrix, expand, load_matrix, select
from bench.plan.planner import check_cells, known_dataset_key, plan_cell, prepare_dataset, refusal
from bench.store.records import RecordLog
from bench.core.registry import ConfigError
from bench.execute.stages import ProtectJob, PurifyJob, Stage, TrainJob, claimed, protect_job, purify_job, train_job
from bench.execute.train import keep_freed_memory

Job = ProtectJob | PurifyJob | TrainJob


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run: where results go, parallelism, device, CPU threads per job (fixed, so that results do
    not depend on ``jobs``), cell filters, whether to only plan, and the longest estimate a CPU run accepts."""

    results: Path = Path("results")
    jobs: int = 1
    device: str = "auto"
    threads: int = 1
    only: tuple[str, ...] = ()
    dry_run: bool = False
    retry_failed: bool = False
    rebuild_sets: bool = False  # also build the missing protected sets of recorded cells (for bench report)
    max_hours: float = estimate.DEFAULT_MAX_HOURS  # on a CPU, refuse a run estimated longer
    stale: float = DEFAULT_STALE  # seconds without a heartbeat after which another worker's claim is taken over
    backend: BackendOptions = BackendOptions()  # where jobs run (bench.execute.backends)


def run_matrix(matrix: Matrix, options: RunOptions, out: Callable[[str], None] = print) -> dict[str, int]:
    """Run every missing cell of ``matrix``; returns counts of cells trained, skipped and failed."""
    cells = select(expand(matrix), list(options.only))
    claims = Claims(options.results / "claims", options.stale)  # checks the settings before any work
    options.backend.check(options.device)
    cache = Cache(options.results / "cache")
    log = RecordLog(options.results / "runs" / matrix.name / "records.jsonl")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if options.device == "auto" else options.device
    device = options.backend.target(device)  # a cluster's GPUs, where it is given them
    check_budget(matrix, cells, cache, log.latest(), device, options, out)
    built, reasons = check_cells(cells, device.split(":")[0], lambda line: print(line, file=sys.stderr),
                                 refuse=not options.dry_run)
    prepare = known_dataset_key if options.dry_run else prepare_dataset  # a dry run loads and writes nothing
    dataset_keys = {choice: prepare(cache, choice) for choice in {c.dataset for c in cells}}
    plans = [plan_cell(cell, dataset_keys[cell.dataset], matrix.recipe, b) for cell, b in zip(cells, built)]
    recorded = log.latest()
    if options.dry_run:
        for p, why in zip(plans, reasons):
            poison = "identity" if p.protection_key is None else (
                "cached" if cache.has("protected", p.protection_key) else "to build")
            result = recorded.get(p.cell_key, {}).get("status", "to run")
            blocked = f" | blocked: {'; '.join(r.split(':')[0] for r in why)}" if why else ""  # in full below
            out(f"{' | '.join(p.cell.labels().values())} | poison: {poison} | result: {result}{blocked}")
        out(f"{len(plans)} cells, {sum(p.cell_key in recorded for p in plans)} recorded")
        for choice, key in dataset_keys.items():
            if key.startswith("unprepared-"):
                out(f"dataset {choice.label}: not loaded yet, so nothing made from it is cached; a run loads it "
                    "first (and stops with where to place its files if they are absent)")
        if error := refusal(cells, reasons):  # listed first, so a dry run shows the whole grid before refusing
            raise error
        return {"cells": len(plans), "trained": 0, "skipped": len(plans), "failed": 0}
    save_resolved(matrix, options.results / "runs" / matrix.name / "matrix.json")
    todo = [p for p in plans if p.cell_key not in recorded
            or (options.retry_failed and recorded[p.cell_key]["status"] != "ok")]
    backend = backends.create(options.backend, options.results, options.jobs, options.threads, device, out)
    failures: dict[str, str] = {}
    since = time.time()
    counts = {"cells": len(plans), "trained": 0, "skipped": len(plans) - len(todo), "failed": 0}

    protect_jobs = {p.protection_key: ProtectJob(cache.root, options.threads, p.protection_key, p.dataset_key,
                                                 p.cell.protection, p.cell.seed,
                                                 mixes.fitted_on(p.cell.mix, p.cell.poison_ratio), p.protection_fits)
                    for p in (plans if options.rebuild_sets else todo)
                    if p.protection_key and not cache.valid("protected", p.protection_key, p.protection_fits)}
    counts["protected"] = _run_stage(Stage("protect", claims, "protect"), protect_job, list(protect_jobs.values()),
                                     backend, failures)
    purify_jobs = {p.purify_key: PurifyJob(cache.root, options.threads, p)
                   for p in todo if p.purify_key and not cache.valid("purified", p.purify_key, p.purify_fits)
                   and p.protection_key not in failures}
    counts["purified"] = _run_stage(Stage("purify", claims, "purify"), purify_job, list(purify_jobs.values()),
                                    backend, failures)

    bar = tqdm(total=len(plans), initial=counts["skipped"], desc="cells", unit="cell", file=sys.stderr,
               dynamic_ncols=True)
    train_jobs = [TrainJob(cache.root, options.threads, p, matrix.name, matrix.recipe,
                           failures.get(p.protection_key or "") or failures.get(p.purify_key or ""),
                           options.jobs == 1 or len(todo) == 1) for p in todo]

    def record(result: dict[str, Any]) -> None:  # appended by the worker, before it released the cell's claim
        counts["trained" if result["status"] == "ok" else "failed"] += 1
        bar.update()
        if result["status"] != "ok":
            bar.write(f"cell failed: {result['protection']} × {result['countermeasure']} × {result['victim']}: "
                      f"{result['error'].strip().splitlines()[-1]}")

    def elsewhere(job: TrainJob) -> None:  # recorded by another run
        counts["skipped"] += 1
        bar.update()

    train = Stage("train", claims, f"train/{matrix.name}", log.path, options.retry_failed, since)
    _run_claimed(train, _call, train_job, train_jobs, backend, record, elsewhere)
    bar.close()
    return counts


def check_budget(matrix: Matrix, cells: list, cache: Cache, recorded: dict[str, Any], device: str,
                 options: RunOptions, out: Callable[[str], None]) -> None:
    """Print the cost estimate; unless a dry run, refuse (exit 2, naming the matrix's ``cpu_alternative``) a CPU
    run estimated over ``options.max_hours``, before anything is loaded or written."""
    records = estimate.timings([options.results, Path(os.environ.get("BENCH_RESULTS", "results"))])
    work = estimate.estimate(matrix, cells, cache, recorded, records, device, options.jobs)
    out(work.line(matrix.name))

    def of(name: str) -> estimate.Estimate:
        other = load_matrix(name)
        log = RecordLog(options.results / "runs" / other.name / "records.jsonl")
        return estimate.estimate(other, expand(other), cache, log.latest(), records, device, options.jobs)

    reason = None if options.dry_run else estimate.refusal(matrix, work, options.max_hours, of)
    if reason:
        raise ConfigError(reason)


def save_resolved(matrix: Matrix, path: Path) -> None:
    """The resolved matrix (every variant's full parameters) beside its records, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    resolved = {"name": matrix.name, "source": matrix.source, "description": matrix.description,
                "seeds": matrix.seeds, "poison_ratio": matrix.poison_ratios, "mix": matrix.mixes, "recipe": matrix.recipe,
                "exclude": matrix.exclude, "layout": dataclasses.asdict(matrix.layout), "reference": matrix.reference,
                "axes": {axis: [{"label": c.label, "name": c.name, "params": c.kwargs} for c in choices]
                         for axis, choices in matrix.axes.items()}}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(resolved, indent=1, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------- parallel execution

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
    logging.getLogger("bench").setLevel(logging.INFO)  # the built-in components too (bench.protections …)


def _call(fn: Callable[[Any, torch.device], dict], job: Job, devices: Any) -> dict[str, Any]:
    show_progress()  # in this process, which may be a joblib worker
    keep_freed_memory()
    with _acquire(devices, job.threads) as device:
        return fn(job, device)


def _guarded(fn: Callable, job: ProtectJob | PurifyJob, devices: Any) -> dict[str, Any]:
    try:
        return {"key": job.key, "error": None, **_call(fn, job, devices)}
    except Exception:
        return {"key": job.key, "error": traceback.format_exc()}


def _run_stage(stage: Stage, fn: Callable, jobs: list[Any], backend: Backend, failures: dict[str, str]) -> int:
    """Run a cache-building stage; failures are remembered so that dependent cells are recorded as errors.
    Returns how many sets this run built (others may come from another run sharing the folder)."""
    built = [0]
    if not jobs:
        return 0
    with tqdm(total=len(jobs), desc=stage.name, unit="set", file=sys.stderr, leave=False) as bar:
        def done(result: dict[str, Any]) -> None:
            bar.update()
            failures.pop(result["key"], None)
            if result["error"]:
                failures[result["key"]] = result["error"]
                bar.write(f"{stage.name} failed: {result['error'].strip().splitlines()[-1]}")
            else:
                built[0] += 1
        _run_claimed(stage, _guarded, fn, jobs, backend, done, lambda job: bar.update())
    return built[0]


def _run_claimed(stage: Stage, runner: Callable, fn: Callable, jobs: list[Any], backend: Backend,
                 on_result: Callable[[dict], None], elsewhere: Callable[[Any], None]) -> None:
    """``backend.map`` with each job under its claim; the jobs that another worker holds are waited for (``elsewhere``
    sees those it finished), and run here if their claim is released without a result or goes stale."""
    by_key, pending = {job.key: job for job in jobs}, list(jobs)
    while pending:
        deferred: list[Any] = []

        def collect(result: dict[str, Any]) -> None:
            claim = result.pop("claim")
            if claim == "deferred":
                deferred.append(by_key[result["key"]])
            elif claim == "elsewhere":
                elsewhere(by_key[result["key"]])
            else:
                on_result(result)

        backend.map(functools.partial(claimed, runner=runner, stage=stage), fn, pending, collect)
        if deferred:
            who = stage.claims.holder(stage.folder, deferred[0].key) or {}
            tqdm.write(f"{stage.name}: {len(deferred)} claimed by another worker (e.g. {who.get('host', '?')} pid "
                       f"{who.get('pid', '?')}); waiting (a claim is taken over after {stage.claims.stale:g} s "
                       "without a heartbeat)", file=sys.stderr)
        pending = stage.claims.wait(stage.folder, deferred, lambda job: job.key, stage.finished, elsewhere)
