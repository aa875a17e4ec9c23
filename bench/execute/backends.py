"""Where a stage's jobs run: joblib processes here (``local``), Slurm job arrays (``submitit``) or a Ray cluster
(``ray``). Each runs the same runner over the same frozen jobs (``bench.execute.stages``), so records and cache keys do not
depend on the backend, and each job runs under its key's claim in its worker, so runs on one results folder (any
backends) never compute a key twice. Every worker first loads the driver's plugin set (``bench.core.plugins``:
discovered plugins, modules of components a script registered by import, ``__main__``'s components by value), so that
a component the driver knows is known to every job. submitit and ray are optional (``pip install -e '.[cluster]'``)."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import multiprocessing
import os
import shlex
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from joblib import Parallel, delayed
from joblib.externals.loky import get_reusable_executor

import bench
from bench.core import plugins
from bench.core.registry import ConfigError

NAMES = ("local", "submitit", "ray")
Runner = Callable[[Callable, Any, Any], dict]  # runner(fn, job, devices) -> result


class Backend(Protocol):
    """Runs ``runner(fn, job, devices)`` for each job, calling ``on_result`` in the caller as each one finishes."""
    def map(self, runner: Runner, fn: Callable, jobs: list[Any], on_result: Callable[[dict], None]) -> None: ...


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """The ``bench run`` options that choose and configure a backend (``None``: not given)."""

    name: str = "local"
    slurm_partition: str | None = None
    slurm_time_min: int | None = None
    gpus_per_task: float | None = None
    ray_address: str | None = None

    def check(self, device: str = "auto") -> None:
        """Raise ConfigError on an unknown backend, an option another backend owns, a bad value (GPUs for a ``device``
        of ``cpu``), a missing package."""
        if self.name not in NAMES:
            raise ConfigError(f"--backend {self.name!r}: expected one of {', '.join(NAMES)}")
        for flag, value, owner in (("--slurm-partition", self.slurm_partition, "submitit"), ("--ray-address",
                                   self.ray_address, "ray"), ("--slurm-time-min", self.slurm_time_min, "submitit")):
            if value is not None and self.name != owner:
                raise ConfigError(f"{flag} is an option of --backend {owner}, not of --backend {self.name}")
        if self.gpus_per_task is not None:
            if self.name == "local":
                raise ConfigError("--gpus-per-task is for --backend submitit or ray (local jobs take one GPU each)")
            if self.gpus_per_task <= 0 or device == "cpu":
                raise ConfigError(f"--gpus-per-task must be > 0 and not with --device cpu, got {self.gpus_per_task:g}")
            if self.name == "submitit" and self.gpus_per_task != int(self.gpus_per_task):
                raise ConfigError(f"--gpus-per-task {self.gpus_per_task:g}: Slurm allocates whole GPUs (fractional "
                                  "GPUs are for --backend ray)")
        if self.slurm_time_min is not None and self.slurm_time_min <= 0:
            raise ConfigError(f"--slurm-time-min must be > 0, got {self.slurm_time_min}")
        if self.name != "local" and importlib.util.find_spec(self.name) is None:
            raise ConfigError(f"--backend {self.name} needs the package {self.name!r}: pip install -e '.[cluster]'")


    def target(self, device: str) -> str:
        """The device jobs run on: CUDA where a cluster backend is given GPUs, else ``device`` (resolved here)."""
        return "cuda" if self.name != "local" and self.gpus_per_task else device


def create(options: BackendOptions, results: Path, jobs: int, threads: int, device: str,
           out: Callable[[str], None] = print) -> Backend:
    """The backend ``options`` name, running ``jobs`` at once of ``threads`` CPU threads on ``device`` (resolved:
    ``cpu``, ``cuda`` or ``cuda:N``); a remote job gets ``--gpus-per-task`` GPUs (default one where ``device`` is CUDA)."""
    options.check(device)
    if options.name == "local":
        return Local(jobs, device_pool(device, jobs))
    gpus = options.gpus_per_task if options.gpus_per_task is not None else float(device.startswith("cuda"))
    remote_device = "cuda" if gpus else "cpu"  # the task sees only the GPUs it was given
    if options.name == "ray":
        out(f"ray: {'cluster at ' + options.ray_address if options.ray_address else 'a local Ray instance'}, "
            f"{threads} CPU(s) and {gpus:g} GPU(s) per task")
        return Ray(remote_device, jobs, threads, gpus, options.ray_address)
    cluster = "slurm" if shutil.which("sbatch") else "local"
    out(f"submitit: {'Slurm job arrays' if cluster == 'slurm' else 'no sbatch on PATH, so its local executor'} "
        f"(logs in {results / 'submitit'})")
    return Submitit(remote_device, jobs, threads, int(gpus), results / "submitit", cluster, options.slurm_partition,
                    options.slurm_time_min)


def device_pool(device: str, jobs: int) -> Any:
    """A device name, or a queue of GPU names when several GPUs serve several local jobs (one job per GPU)."""
    if device == "cuda" and torch.cuda.device_count() > 1 and jobs > 1:
        return device_queue([f"cuda:{i}" for i in range(torch.cuda.device_count())])
    return device


def device_queue(names: list[str]) -> Any:
    """A queue shared with joblib workers: a job takes a device from it and puts it back when done."""
    queue = multiprocessing.Manager().Queue()
    for name in names:
        queue.put(name)
    return queue


@dataclasses.dataclass(frozen=True)
class Local:
    """joblib worker processes on this machine (in-process for one job)."""

    jobs: int
    devices: Any

    def map(self, runner: Runner, fn: Callable, jobs: list[Any], on_result: Callable[[dict], None]) -> None:
        if self.jobs <= 1 or len(jobs) <= 1:
            for job in jobs:
                on_result(runner(fn, job, self.devices))
            return
        runner = with_plugins(runner)
        tasks = (delayed(runner)(fn, job, self.devices) for job in jobs)
        try:
            for result in Parallel(n_jobs=min(self.jobs, len(jobs)), return_as="generator_unordered")(tasks):
                on_result(result)
        except BaseException:  # Ctrl-C, SIGTERM: no worker outlives the run to keep computing (and writing the cache)
            get_reusable_executor().shutdown(wait=False, kill_workers=True)
            raise


@dataclasses.dataclass(frozen=True)
class Submitit:
    """One submitit job array per stage: Slurm where ``sbatch`` is on PATH, else submitit's local executor (which
    starts every job of an array at once, so it is given ``jobs`` jobs at a time)."""

    devices: str
    jobs: int
    threads: int
    gpus: int
    folder: Path
    cluster: str
    partition: str | None
    time_min: int | None

    def map(self, runner: Runner, fn: Callable, jobs: list[Any], on_result: Callable[[dict], None]) -> None:
        import submitit

        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        setup = [f"export PYTHONPATH={shlex.quote(_pythonpath())}"]
        parameters: dict[str, Any] = {"slurm_array_parallelism": self.jobs, "gpus_per_node": self.gpus,
                                      "cpus_per_task": self.threads, "local_setup": setup, "slurm_setup": setup}
        if self.time_min is not None or self.cluster == "local":  # the local executor's default is 2 minutes
            parameters["timeout_min"] = self.time_min or 7 * 24 * 60
        executor.update_parameters(**parameters, **({"slurm_partition": self.partition} if self.partition else {}))
        chunk, runner = len(jobs) if self.cluster == "slurm" else max(1, self.jobs), with_plugins(runner)
        for part in (jobs[start:start + chunk] for start in range(0, len(jobs), chunk)):
            submitted = executor.map_array(runner, [fn] * len(part), part, [self.devices] * len(part))
            try:
                for job in submitit.helpers.as_completed(submitted, poll_frequency=1.0):
                    on_result(job.result())
            except BaseException:
                for job in submitted:
                    job.cancel(check=False)
                raise


@dataclasses.dataclass(frozen=True)
class Ray:
    """Ray tasks of ``threads`` CPUs and ``gpus`` (possibly fractional) GPUs each, on the cluster at ``address`` or on
    a Ray instance started here with ``jobs × threads`` CPUs; results are taken as they arrive."""

    devices: str
    jobs: int
    threads: int
    gpus: float
    address: str | None

    def map(self, runner: Runner, fn: Callable, jobs: list[Any], on_result: Callable[[dict], None]) -> None:
        import ray

        env = {"env_vars": worker_env()}  # a cluster's workers do not inherit the driver's environment
        if not ray.is_initialized():
            here = {} if self.address else {"num_cpus": self.jobs * self.threads, "num_gpus": torch.cuda.device_count()}
            ray.init(self.address, include_dashboard=False, runtime_env=env, **here)
        task = ray.remote(num_cpus=self.threads, num_gpus=self.gpus, max_retries=0, runtime_env=env)(_apply)
        runner = with_plugins(runner)
        pending = [task.remote(runner, fn, job, self.devices) for job in jobs]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                on_result(ray.get(done[0]))
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise


def _apply(runner: Runner, fn: Callable, job: Any, devices: Any) -> dict:  # ray.remote takes a function
    return runner(fn, job, devices)


def with_plugins(runner: Runner) -> Runner:
    """``runner`` preceded, in the worker, by loading the driver's plugin set as it is now."""
    return functools.partial(_in_plugin_set, plugins.active(), runner)


def _in_plugin_set(plugin_set: plugins.PluginSet, runner: Runner, fn: Callable, job: Any, devices: Any) -> dict:
    plugins.ensure(plugin_set)
    return runner(fn, job, devices)


def worker_env() -> dict[str, str]:
    """Environment a remote worker needs: this checkout on PYTHONPATH and the driver's ``$BENCH_*`` variables."""
    return {"PYTHONPATH": _pythonpath(), **{k: v for k, v in os.environ.items() if k.startswith("BENCH_")}}


def _pythonpath() -> str:
    """PYTHONPATH for a worker: this checkout first (the same code must be at the same path on every node)."""
    return os.pathsep.join(p for p in (str(Path(bench.__file__).resolve().parent.parent), os.environ.get("PYTHONPATH"))
                           if p)

