"""A job under its key's claim (``bench.execute.claims``): whether its result exists (a valid cache entry, or a record
in any log of the results folder), and running it unless another live worker holds the key or has made the result,
so that runs sharing a results folder compute each key once. A record is appended before the claim is released; a
worker whose claim was taken over (suspended past the stale timeout), or that took one over, appends it only if the
cell is not recorded yet (no duplicate record).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.execute.claims import Claims
from bench.execute.pool import Lost
from bench.execute.stages import ProtectJob, PurifyJob, SetBuilt, TrainJob, failed_record
from bench.store.cache import Cache
from bench.store.records import Record, RecordLog, RecordStore


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A job under its claim: ``ran`` (``result``: a ``Record`` for train, else a ``SetBuilt``), ``deferred`` (another
    live worker holds the claim) or ``elsewhere`` (its result exists, made by another worker)."""

    key: str
    claim: str
    result: Record | SetBuilt | None = None


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage as its claims see it: the claims, their folder, and where its results land (train: the matrix's
    record log, ``log``, among every log of the results folder, ``results``; else the cache the jobs name). A record
    counts as the result unless it failed and failures are retried, or the job is redone: then only one made since
    ``since`` (this run's start) does."""

    name: str
    claims: Claims
    folder: str
    log: Path | None = None
    results: Path | None = None
    retry_failed: bool = False
    since: float = 0.0

    def done(self, job: ProtectJob | PurifyJob | TrainJob, verify: bool = False,
             latest: dict[str, Record] | None = None) -> bool:
        """Whether the job's result exists (with ``verify``, its checksums too: what does not verify is moved aside);
        ``latest`` is the results folder's ``RecordStore.latest()`` if already read."""
        if isinstance(job, TrainJob):
            assert self.results is not None
            record = (RecordStore(self.results).latest() if latest is None else latest).get(job.key)
            return record is not None and (record.finished_at >= self.since or not job.redo
                                           and (record.ok or not self.retry_failed))
        kind, fits = ("protected", job.fits) if isinstance(job, ProtectJob) else ("purified", job.plan.purify_fits)
        cache = Cache(job.cache)
        if verify and not cache.valid(kind, job.key, fits):
            return False
        try:  # read once: another run may move a damaged entry aside meanwhile (then it is not done)
            manifest = cache.manifest(kind, job.key)
        except ValueError:
            return False
        return set(fits) <= set(manifest.get("models", {})) and (not job.redo or manifest["created"] >= self.since)

    def finished(self, jobs: list[Any]) -> list[Any]:
        """Those of ``jobs`` whose result exists (reading the record logs once for all)."""
        latest = RecordStore(self.results).latest() if self.results is not None else None
        return [job for job in jobs if self.done(job, latest=latest)]


def claimed(fn: Callable, job: Any, devices: Any, *, runner: Callable, stage: Stage) -> Outcome:
    """``runner(fn, job, devices)`` under the job's claim (``ran``), unless another worker holds it (``deferred``)
    or its result exists (``elsewhere``, also when a worker it took the claim from, or that took it over, recorded the
    cell meanwhile); a record is appended before the claim is released."""
    claim = stage.claims.claim(stage.folder, job.key)
    if claim is None:
        return Outcome(job.key, "deferred")
    with claim:
        if stage.done(job, verify=True):
            return Outcome(job.key, "elsewhere")
        result = runner(fn, job, devices)
        if isinstance(result, Record):
            assert stage.log is not None
            if not claim.contested():
                RecordLog(stage.log).append(result)
                return Outcome(job.key, "ran", result)
            # another worker ran it too (one of us was thought dead): the first to record it wins, checked under
            # the claims' lock, where the other checks too
            with stage.claims.lock(stage.folder):
                if stage.done(job):
                    return Outcome(job.key, "elsewhere")
                RecordLog(stage.log).append(result)
        return Outcome(job.key, "ran", result)


def lost(job: Any, why: Lost, stage: Stage) -> Outcome:
    """A job that ended without a result (its worker died, or it raised outside its own handling): release the claim
    the dead worker held, and fail the job: a failed set (its cells are recorded with this reason), or the cell's
    failed record, appended here. A record the worker appended before dying stands."""
    if why.pid is not None:
        stage.claims.release_held_by(stage.folder, job.key, why.pid)
    if not isinstance(job, TrainJob):
        return Outcome(job.key, "ran", SetBuilt(job.key, error=why.reason))
    if stage.done(job):
        return Outcome(job.key, "elsewhere")
    record = failed_record(job, why.device, why.reason)
    assert stage.log is not None
    RecordLog(stage.log).append(record)
    return Outcome(job.key, "ran", record)
