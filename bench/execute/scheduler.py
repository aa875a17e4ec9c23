"""Runs a matrix: protect (once per protection key) → data-stage countermeasure (once per purification key)
→ train and evaluate each cell; cached, resumable, and parallel through a backend (``bench.execute.backends``: joblib,
submitit or Ray).

Planning (keys, capability checks) is ``bench.plan.planner``; the stages and their typed jobs are ``bench.execute.stages``.
This module skips what is recorded or cached and runs each stage's jobs in parallel, appending records as
cells finish. Runs may share one results folder: each job claims its key first (``bench.execute.claims``); a key another
live worker holds is left to it, and its result is waited for at the end of the stage.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from bench.core.registry import BenchWarning, ConfigError
from bench.data import mixes
from bench.execute import backends, devices
from bench.execute.backends import Backend, BackendOptions
from bench.execute.claimed import Outcome, Stage, claimed, lost
from bench.execute.claims import DEFAULT_STALE, Claims
from bench.execute.stages import (ProtectJob, PurifyJob, SetBuilt, TrainJob, protect_job, purify_job, storage_failure,
                                  train_job)
from bench.execute.train import keep_freed_memory
from bench.plan import estimate
from bench.plan.matrix import Cell, Matrix, expand, load_matrix, resolved, select
from bench.plan.planner import (check_cells, dataset_choices, known_dataset_key, plan_cell, prepare_datasets, refusal,
                                to_train)
from bench.plan.preview import preview
from bench.plan.requests import JobRequest, job_requests
from bench.plan.validate import MAX_CELLS, plan_cells, progress
from bench.store import atomic
from bench.store.cache import Cache
from bench.store.integrity import error_line
from bench.store.records import Record, RecordLog, RecordStore

Job = ProtectJob | PurifyJob | TrainJob


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How to run: where results go, parallelism, device, CPU threads per job (fixed, so that results do
    not depend on ``jobs``), cell filters, whether to only plan, what to redo, and the longest estimate a CPU run
    accepts."""

    results: Path = Path("results")
    jobs: int = 1
    device: str = "auto"  # auto, cpu, cuda (every GPU), cuda:N or cuda:N,M (bench.execute.devices)
    threads: int = 1
    only: tuple[str, ...] = ()
    dry_run: bool = False
    retry_failed: bool = False
    rerun: tuple[str, ...] = ()  # KEY=GLOB: retrain these cells and rebuild their sets even where recorded and cached
    force: bool = False  # every cell, as --rerun of all
    rebuild_sets: bool = False  # also build the missing protected sets of recorded cells (for bench report)
    max_hours: float = estimate.DEFAULT_MAX_HOURS  # on a CPU, refuse a run estimated longer
    stale: float = DEFAULT_STALE  # seconds without a heartbeat after which another worker's claim is taken over
    backend: BackendOptions = BackendOptions()  # where jobs run (bench.execute.backends)
    deterministic: bool = False  # deterministic algorithms on CUDA, no cuDNN autotuning (recorded per cell)
    max_cells: int = MAX_CELLS  # refuse (before expanding) a matrix with more cells

    def __post_init__(self) -> None:
        if self.jobs < 1 or self.threads < 1:
            raise ConfigError(f"jobs (--jobs) must be ≥ 1 and threads (--threads) ≥ 1, got {self.jobs} and "
                              f"{self.threads}")
        devices.parse(self.device)  # raises on an unknown form or a GPU this machine lacks
        for name, flag, value in (("max_hours", "--max-hours", self.max_hours), ("stale", "--stale-after", self.stale)):
            if not 0 < value < math.inf:  # NaN too
                raise ConfigError(f"{name} ({flag}) must be > 0 and finite, got {value:g}; omit it for the "
                                  f"default {getattr(RunOptions, name):g}")
        if self.max_cells < 1:
            raise ConfigError(f"max_cells (--max-cells) must be ≥ 1, got {self.max_cells}; omit it for {MAX_CELLS:,}")
        if self.force and self.rerun:
            raise ConfigError("force (--force) reruns every cell: drop rerun (--rerun), or force to rerun only those")


@dataclasses.dataclass(frozen=True)
class RunCounts:
    """What a run did: cells in the (selected) matrix, trained here, already recorded (or by another run meanwhile),
    failed; protected and purified sets built here."""

    cells: int
    trained: int = 0
    skipped: int = 0
    failed: int = 0
    protected: int = 0
    purified: int = 0


def run_matrix(matrix: Matrix, options: RunOptions, out: Callable[[str], None] = print) -> RunCounts:
    """Run every cell of ``matrix`` not recorded anywhere under ``options.results`` (and those ``rerun``/``force``
    name); the dry run prints the plan instead (``bench.plan.preview``)."""
    cells = plan_cells(matrix, list(options.only), options.max_cells, progress)
    redo = set(cells if options.force else select(cells, list(options.rerun), "--rerun") if options.rerun else [])
    claims = Claims(options.results / "claims", options.stale)  # checks the settings before any work
    options.backend.check(options.device)
    cache = Cache(options.results / "cache")
    store = RecordStore(options.results)
    log = RecordLog(options.results / "runs" / matrix.name / "records.jsonl")
    records = store.read()
    recorded = store.latest()
    targets = devices.parse(options.device)
    device = options.backend.target(devices.kind(targets))  # a cluster's GPUs, where it is given them
    step = progress(len(cells))
    step("estimating the run's cost")
    work = check_budget(matrix, cells, cache, recorded, records, redo, device, options, out)
    step("checking each cell's components")
    built, reasons = check_cells(cells, device, lambda line: print(line, file=sys.stderr),
                                 refuse=not options.dry_run, deterministic=options.deterministic)
    if options.dry_run:  # loads and writes nothing; dataset keys from the cache or the records
        keys = {choice: known_dataset_key(cache, choice, records) for choice in dataset_choices(cells)}
        step("computing each cell's cache keys")
        plans = [plan_cell(cell, {c: k.key for c, k in keys.items()}, matrix.recipe, b) for cell, b in zip(cells, built)]
        preview(plans, reasons, keys, cache, recorded, log.read(), to_train(plans, recorded, redo, options.retry_failed),
                out)
        if error := refusal(cells, reasons):  # listed first, so a dry run shows the whole grid before refusing
            raise error
        return RunCounts(len(plans), skipped=len(plans))
    dataset_keys = prepare_datasets(cache, dataset_choices(cells))
    step("computing each cell's cache keys")
    plans = [plan_cell(cell, dataset_keys, matrix.recipe, b) for cell, b in zip(cells, built)]
    save_resolved(matrix, [p.cell_key for p in plans], options.results / "runs" / matrix.name / "matrix.json")
    train_keys = to_train(plans, recorded, redo, options.retry_failed)
    todo = [p for p in plans if p.cell_key in train_keys]
    backend = backends.create(options.backend, options.jobs, options.threads, targets, options.deterministic, out)
    try:
        limits = options.backend
        requests = job_requests(work, device, options.threads, time_min=limits.slurm_time_min, mem_gb=limits.mem_gb,
                                cpus=limits.cpus_per_task)
        return _run_stages(matrix, options, plans, todo, redo, cache, log, claims, backend, requests)
    finally:
        backend.close()


def _run_stages(matrix: Matrix, options: RunOptions, plans: list, todo: list, redo: set[Cell], cache: Cache,
                log: RecordLog, claims: Claims, backend: Backend, requests: dict[str, JobRequest]) -> RunCounts:
    """Protect, purify and train what ``todo`` needs, on ``backend`` (cluster tasks sized by ``requests``)."""
    again = [p for p in plans if p.cell in redo]  # their sets are rebuilt too, for every cell that shares them
    rebuild = {p.protection_key for p in again} | {p.purify_key for p in again}
    failures: dict[str, str] = {}
    since = time.time()
    skipped = len(plans) - len(todo)

    protect_jobs = {p.protection_key: ProtectJob(cache.root, options.threads, p.protection_key, p.crafting_key,
                                                 p.cell.protection, p.cell.seed,
                                                 mixes.fitted_on(p.cell.mix, p.cell.poison_ratio), p.protection_fits,
                                                 redo=p.protection_key in rebuild)
                    for p in (plans if options.rebuild_sets else todo)
                    if p.protection_key and (p.protection_key in rebuild
                                             or not cache.valid("protected", p.protection_key, p.protection_fits))}
    protected = _run_stage(Stage("protect", claims, "protect", since=since), protect_job, list(protect_jobs.values()),
                           backend, failures, requests["protect"])
    purify_jobs = {p.purify_key: PurifyJob(cache.root, options.threads, p, redo=p.purify_key in rebuild)
                   for p in todo if p.purify_key and p.protection_key not in failures
                   and (p.purify_key in rebuild or not cache.valid("purified", p.purify_key, p.purify_fits))}
    purified = _run_stage(Stage("purify", claims, "purify", since=since), purify_job, list(purify_jobs.values()),
                          backend, failures, requests["purify"])

    bar = tqdm(total=len(plans), initial=skipped, desc="cells", unit="cell", file=sys.stderr, dynamic_ncols=True)
    train_jobs = [TrainJob(cache.root, options.threads, p, matrix.name, matrix.recipe,
                           failures.get(p.protection_key or "") or failures.get(p.purify_key or ""),
                           options.jobs == 1 or len(todo) == 1, redo=p.cell in redo,
                           deterministic=options.deterministic) for p in todo]
    trained = {"ok": 0, "error": 0, "elsewhere": 0}

    def record(result: Record) -> None:  # appended by the worker, before it released the cell's claim
        trained[result.status] += 1
        bar.update()
        if not result.ok:
            bar.write(f"cell failed: {result.protection} × {result.countermeasure} × {result.victim}: "
                      f"{error_line(result.error)}")

    def elsewhere(job: TrainJob) -> None:  # recorded by another run
        trained["elsewhere"] += 1
        bar.update()

    train = Stage("train", claims, "train", log.path, options.results, options.retry_failed, since)
    _run_claimed(train, _call, train_job, train_jobs, backend, record, elsewhere, requests["train"])
    bar.close()
    return RunCounts(len(plans), trained["ok"], skipped + trained["elsewhere"], trained["error"], protected, purified)


def check_budget(matrix: Matrix, cells: list, cache: Cache, recorded: dict[str, Record], records: list[Record],
                 redo: set[Cell], device: str, options: RunOptions, out: Callable[[str], None]) -> estimate.Estimate:
    """Print the cost estimate; unless a dry run, refuse (exit 2, naming the matrix's ``cpu_alternative``) a CPU
    run estimated over ``options.max_hours``, before anything is loaded or written."""
    timings = estimate.timings([options.results, Path(os.environ.get("BENCH_RESULTS", "results"))])
    work = estimate.estimate(matrix, cells, cache, recorded, records, timings, device, options.jobs, redo,
                             options.retry_failed)
    out(work.line(matrix.name))

    def of(name: str) -> estimate.Estimate:
        other = load_matrix(name)
        return estimate.estimate(other, expand(other), cache, recorded, records, timings, device, options.jobs)

    if not options.dry_run and (reason := estimate.refusal(matrix, work, options.max_hours, of)):
        raise ConfigError(reason)
    return work


def save_resolved(matrix: Matrix, cells: list[str], path: Path) -> None:
    """The resolved matrix beside its records (``bench.plan.matrix.resolved``), written atomically, with the keys of
    the cells planned here and in earlier runs (its leaderboard finds their records in any matrix's log)."""
    from bench.report.view import saved_matrix

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        before = saved_matrix(path, matrix.name).get("cells", []) if path.is_file() else []
    except ConfigError as err:  # damaged: rewritten now, with the cells planned here
        problem = str(err).split(": it is damaged")[0]  # saved_matrix's message, less its fix (done here)
        warnings.warn(f"{problem}: it is damaged; rewriting it with this run's cells", BenchWarning, stacklevel=2)
        before = []
    text = json.dumps(resolved(matrix, list(dict.fromkeys([*before, *cells]))), indent=1)  # JSON values only
    atomic.write_text(path, text)


# ---------------------------------------------------------------- parallel execution

def show_progress() -> None:
    """Print bench's own INFO logs (e.g. EM's rounds, which take minutes each) on stderr; other libraries stay
    at WARNING. A no-op where logging is already configured (pytest, an embedding program)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("bench").setLevel(logging.INFO)  # the built-in components too (bench.protections …)


def _call(fn: Callable[[Any, torch.device], Any], job: Job, device: str) -> Any:
    show_progress()  # in this process, which may be a worker
    keep_freed_memory()
    torch.set_num_threads(job.threads)
    return fn(job, torch.device(device))


def _guarded(fn: Callable, job: ProtectJob | PurifyJob, device: str) -> SetBuilt:
    try:
        return _call(fn, job, device)
    except Exception as err:
        return SetBuilt(job.key, error=traceback.format_exc(), full=storage_failure(err))


def _run_stage(stage: Stage, fn: Callable, jobs: list[Any], backend: Backend, failures: dict[str, str],
               request: JobRequest | None = None) -> int:
    """Run a cache-building stage; failures are remembered so that dependent cells are recorded as errors.
    Returns how many sets this run built (others may come from another run sharing the folder)."""
    built = [0]
    if not jobs:
        return 0
    with tqdm(total=len(jobs), desc=stage.name, unit="set", file=sys.stderr, leave=False) as bar:
        def done(result: SetBuilt) -> None:
            bar.update()
            if result.full:  # the storage failed (disk full …): end the run with one line (bench.cli)
                number, message, path = result.full
                raise OSError(number, message, path or str(stage.results or jobs[0].cache))
            if result.error:
                failures[result.key] = result.error
                bar.write(f"{stage.name} failed: {error_line(result.error)}")
            else:
                built[0] += 1
        _run_claimed(stage, _guarded, fn, jobs, backend, done, lambda job: bar.update(), request)
    return built[0]


def _run_claimed(stage: Stage, runner: Callable, fn: Callable, jobs: list[Any], backend: Backend,
                 on_result: Callable[[Any], None], elsewhere: Callable[[Any], None],
                 request: JobRequest | None = None) -> None:
    """``backend.map`` with each job under its claim; the jobs that another worker holds are waited for (``elsewhere``
    sees those it finished), and run here if their claim is released without a result or goes stale."""
    by_key, pending = {job.key: job for job in jobs}, list(jobs)
    while pending:
        deferred: list[Any] = []

        def collect(outcome: Outcome) -> None:
            if outcome.claim == "deferred":
                deferred.append(by_key[outcome.key])
            elif outcome.claim == "elsewhere":
                elsewhere(by_key[outcome.key])
            else:
                on_result(outcome.result)

        backend.map(functools.partial(claimed, runner=runner, stage=stage), fn, pending, collect,
                    lambda job, why: collect(lost(job, why, stage)), request)
        if deferred:
            who = stage.claims.holder(stage.folder, deferred[0].key) or {}
            tqdm.write(f"{stage.name}: {len(deferred)} claimed by another worker (e.g. {who.get('host', '?')} pid "
                       f"{who.get('pid', '?')}); waiting (a claim is taken over after {stage.claims.stale:g} s "
                       "without a heartbeat)", file=sys.stderr)
        pending = stage.claims.wait(stage.folder, deferred, lambda job: job.key, stage.finished, elsewhere)
