"""What a cluster job of each stage asks for (Slurm's ``--time``, ``--mem``, ``--cpus-per-task``), from the estimate.

``job_requests`` sizes a job by the longest job the estimate (``bench.plan.estimate``) gives the stage: its time ×
``SAFETY`` (× ``TABLE_SAFETY`` where that job is timed from the rate table rather than records), at least
``MIN_TIME_MIN``; memory by the device kind's default, more for large train sets; CPUs by the threads per job. The
caller's own values (``--slurm-time-min``, ``--slurm-mem-gb``, ``--cpus-per-task``) win.
"""

from __future__ import annotations

import dataclasses
import math

from bench.plan.estimate import STAGES, Estimate

SAFETY = 3.0  # × the longest job timed from records
TABLE_SAFETY = 6.0  # × the longest job timed from the rate table (its range reaches ×2–4)
MIN_TIME_MIN = 30
# Host memory per job: a worker's Python, torch and a model (≈ 1–1.5 GB measured on a CPU, more with CUDA's
# context and pinned buffers), plus MEM_PER_DATA_GB per GB of uint8 train images (the set, its protected and
# purified copies, float batches and the leaderboard's reloads).
DEFAULT_MEM_GB = {"cpu": 8, "cuda": 32}
MEM_PER_DATA_GB = 8
MEM_OVERHEAD_GB = 2
GPU_MIN_CPUS = 4  # data loading and augmentation beside a GPU


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """One job's request: wall-time limit in minutes, memory in GB, CPUs per task."""

    time_min: int
    mem_gb: int
    cpus: int


def job_requests(work: Estimate, device: str, threads: int, *, time_min: int | None = None,
                 mem_gb: int | None = None, cpus: int | None = None) -> dict[str, JobRequest]:
    """A ``JobRequest`` for each stage (``protect``, ``purify``, ``train``) of the estimated ``work`` on ``device``
    (its kind: ``cpu``, ``cuda``…) with ``threads`` per job; ``time_min``/``mem_gb``/``cpus`` override."""
    kind = device.split(":")[0]
    memory = max(DEFAULT_MEM_GB.get(kind, DEFAULT_MEM_GB["cuda"]),
                 math.ceil(MEM_OVERHEAD_GB + MEM_PER_DATA_GB * work.data_gb))
    threads = max(1, threads)
    count = threads if kind == "cpu" else max(threads, GPU_MIN_CPUS)
    requests = {}
    for stage in STAGES:
        safety = TABLE_SAFETY if stage in work.untimed else SAFETY
        minutes = max(MIN_TIME_MIN, math.ceil(safety * work.longest.get(stage, 0.0) / 60))
        requests[stage] = JobRequest(time_min or minutes, mem_gb or memory, cpus or count)
    return requests
