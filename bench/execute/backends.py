"""Where a stage's jobs run: worker processes here (``local``, ``bench.execute.pool``), Slurm job arrays
(``submitit``) or a Ray cluster (``ray``). Each runs the same runner over the same frozen jobs (``bench.execute.stages``),
so records and cache keys do not depend on the backend, and each job runs under its key's claim in its worker, so runs
on one results folder (any backends) never compute a key twice. Every worker first loads the driver's plugin set
(``bench.core.plugins``), so that a component the driver knows is known to every job.

A job whose worker dies (OOM killer, segfault, a Slurm time limit, Ray's memory monitor) or whose CUDA context breaks
is reported to ``on_lost`` and becomes a failed cell; the run goes on. Cluster tasks ask for the time, memory and
CPUs of the stage's ``JobRequest`` (from the estimate, overridable). submitit's pickles never live in a folder another
user can write (``private_folder``). submitit and ray are optional (``pip install -e '.[cluster]'``)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

import bench
from bench.core import plugins
from bench.core.registry import ConfigError
from bench.execute import devices as device_list
from bench.execute.pool import Lost, Pool
from bench.plan.requests import JobRequest

NAMES = ("local", "submitit", "ray")
Runner = Callable[[Callable, Any, str], Any]  # runner(fn, job, device) -> result
OnLost = Callable[[Any, Lost], None]  # on_lost(job, why)
WORKER_ENV = ("BENCH_", "HF_", "TRANSFORMERS_", "TORCH_", "CUBLAS_", "CUDA_LAUNCH_BLOCKING")  # what workers inherit


class Backend(Protocol):
    """Runs ``runner(fn, job, device)`` for each job, calling ``on_result`` (or ``on_lost``) in the caller as each one
    ends; ``request`` sizes cluster tasks."""
    def map(self, runner: Runner, fn: Callable, jobs: list[Any], on_result: Callable[[Any], None], on_lost: OnLost,
            request: JobRequest | None = None) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """The ``bench run`` options that choose and configure a backend (``None``: not given, i.e. sized from the
    estimate or the backend's default)."""

    name: str = "local"
    slurm_partition: str | None = None
    slurm_time_min: int | None = None
    gpus_per_task: float | None = None
    ray_address: str | None = None
    mem_gb: int | None = None
    cpus_per_task: int | None = None
    submitit_folder: Path | None = None

    def check(self, device: str = "auto") -> None:
        """Raise ConfigError on an unknown backend, an option another backend owns, a bad value (GPUs for a ``device``
        of ``cpu``), a missing package."""
        if self.name not in NAMES:
            raise ConfigError(f"--backend {self.name!r}: expected one of {', '.join(NAMES)}")
        for flag, value, owners in (("--slurm-partition", self.slurm_partition, ("submitit",)),
                                    ("--ray-address", self.ray_address, ("ray",)),
                                    ("--slurm-time-min", self.slurm_time_min, ("submitit",)),
                                    ("--submitit-folder", self.submitit_folder, ("submitit",)),
                                    ("--mem-gb", self.mem_gb, ("submitit", "ray")),
                                    ("--cpus-per-task", self.cpus_per_task, ("submitit", "ray"))):
            if value is not None and self.name not in owners:
                raise ConfigError(f"{flag} is an option of --backend {' or '.join(owners)}, not of --backend {self.name}")
        if self.gpus_per_task is not None:
            if self.name == "local":
                raise ConfigError("--gpus-per-task is for --backend submitit or ray (local jobs take one GPU each)")
            if not 0 < self.gpus_per_task <= 1 or device == "cpu":
                raise ConfigError(f"--gpus-per-task must be > 0 and ≤ 1 (a bench job uses one GPU; ray shares one "
                                  f"among several with fractions) and not with --device cpu, got {self.gpus_per_task:g}")
            if self.name == "submitit" and self.gpus_per_task != 1:
                raise ConfigError(f"--gpus-per-task {self.gpus_per_task:g}: Slurm allocates whole GPUs (fractional "
                                  "GPUs are for --backend ray)")
        for flag, value in (("--slurm-time-min", self.slurm_time_min), ("--mem-gb", self.mem_gb),
                            ("--cpus-per-task", self.cpus_per_task)):
            if value is not None and value <= 0:
                raise ConfigError(f"{flag} must be > 0, got {value}")
        if self.name != "local" and importlib.util.find_spec(self.name) is None:
            raise ConfigError(f"--backend {self.name} needs the package {self.name!r}: pip install -e '.[cluster]'")

    def request(self, threads: int) -> JobRequest:
        """A task's size where the run gave no estimate: the options given, else a day, 16 GB and ``threads`` CPUs."""
        return JobRequest(self.slurm_time_min or 24 * 60, self.mem_gb or 16, self.cpus_per_task or threads)

    def target(self, device: str) -> str:
        """The device jobs run on: CUDA where a cluster backend is given GPUs, else ``device``."""
        return "cuda" if self.name != "local" and self.gpus_per_task else device



def create(options: BackendOptions, jobs: int, threads: int, devices: list[str], deterministic: bool = False,
           out: Callable[[str], None] = print) -> Backend:
    """The backend ``options`` name, running ``jobs`` at once of ``threads`` CPU threads on ``devices`` (``cpu`` or
    ``cuda:N`` names); a remote job gets ``--gpus-per-task`` GPUs (default one where the devices are GPUs)."""
    options.check(devices[0])
    if options.name == "local":
        return Local(jobs, devices, threads, deterministic)
    gpus = options.gpus_per_task if options.gpus_per_task is not None else float(device_list.kind(devices) == "cuda")
    remote_device = "cuda" if gpus else "cpu"  # the task sees only the GPUs it was given
    if options.name == "ray":
        out(f"ray: {'cluster at ' + options.ray_address if options.ray_address else 'a local Ray instance'}, "
            f"{gpus:g} GPU(s) per task")
        from bench.execute.cluster import Ray

        return Ray(remote_device, jobs, threads, gpus, options)
    from bench.execute.cluster import Submitit, default_submitit_folder, private_folder

    folder = private_folder(options.submitit_folder or default_submitit_folder())
    cluster = "slurm" if shutil.which("sbatch") else "local"
    out(f"submitit: {'Slurm job arrays' if cluster == 'slurm' else 'no sbatch on PATH, so its local executor'} "
        f"(job files and logs in {folder})")
    return Submitit(remote_device, jobs, threads, int(gpus), folder, cluster, options)


class Local:
    """Worker processes on this machine (``bench.execute.pool``), one per job slot, each pinned to one of
    ``devices``; in this process only for one job at a time on a CPU."""

    def __init__(self, jobs: int, devices: list[str], threads: int, deterministic: bool = False) -> None:
        self.jobs, self.devices, self.threads, self.deterministic = jobs, devices, threads, deterministic
        self.pool: Pool | None = None

    @property
    def in_process(self) -> bool:
        return self.jobs == 1 and self.devices == ["cpu"]

    def map(self, runner: Runner, fn: Callable, jobs: list[Any], on_result: Callable[[Any], None], on_lost: OnLost,
            request: JobRequest | None = None) -> None:
        if self.in_process:
            if self.deterministic:
                device_list.pin("cpu", self.threads, deterministic=True)
            for job in jobs:
                on_result(runner(fn, job, "cpu"))
            return
        if self.pool is None:
            env = {**os.environ, "PYTHONPATH": checkout_pythonpath()}
            self.pool = Pool(device_list.slots(self.devices, self.jobs), self.threads, self.deterministic, env)
        runner = with_plugins(runner)
        self.pool.map([functools.partial(call_runner, runner, fn, job) for job in jobs],
                      lambda i, result: on_result(result), lambda i, lost: on_lost(jobs[i], lost))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def call_runner(runner: Runner, fn: Callable, job: Any, device: str) -> Any:  # ray.remote and the pool take a function
    return runner(fn, job, device)


def with_plugins(runner: Runner) -> Runner:
    """``runner`` preceded, in the worker, by loading the driver's plugin set as it is now."""
    return functools.partial(_in_plugin_set, plugins.active(), runner)


def _in_plugin_set(plugin_set: plugins.PluginSet, runner: Runner, fn: Callable, job: Any, device: str) -> Any:
    plugins.ensure(plugin_set)
    return runner(fn, job, device)


def worker_env() -> dict[str, str]:
    """Environment a remote worker needs: this checkout on PYTHONPATH and the driver's ``$BENCH_*`` (weights, data
    root, plugins), hub (``HF_*``, offline mode), torch and cuBLAS variables."""
    return {"PYTHONPATH": checkout_pythonpath(), **{k: v for k, v in os.environ.items() if k.startswith(WORKER_ENV)}}


def checkout_pythonpath() -> str:
    """PYTHONPATH for a worker: this checkout first (the same code must be at the same path on every node)."""
    return os.pathsep.join(p for p in (str(Path(bench.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH"))
                           if p)

