"""The cluster backends (``bench.execute.backends``): Slurm job arrays through submitit, and Ray tasks. Each task
asks for the stage's ``JobRequest``; a task that fails (time limit, preemption, OOM kill, node failure, Ray's memory
monitor) is a lost job whose cells fail with the reason, and the others go on. submitit's pickles, which the driver
and the jobs unpickle, live only in a folder no other user can write (``private_folder``)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import stat
from pathlib import Path
from typing import Any, Callable

from bench.core.registry import ConfigError
from bench.execute.backends import (BackendOptions, OnLost, Runner, call_runner, checkout_pythonpath, with_plugins,
                                    worker_env)
from bench.execute.pool import Lost
from bench.plan.requests import JobRequest


def default_submitit_folder() -> Path:
    """``$XDG_CACHE_HOME/bench/submitit`` (``~/.cache``): the user's own, and on a cluster's shared home."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bench" / "submitit"


def private_folder(folder: Path) -> Path:
    """``folder`` (created 0700), after checking that no other user can write it or swap it: it and every folder
    above it must belong to this user or root and be writable by nobody else (sticky folders such as /tmp excepted
    above it). submitit keeps pickles there that the driver and the jobs unpickle: another user's write is code
    execution as this user."""
    folder = Path(folder).expanduser().absolute()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for path in (folder, *folder.parents):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            path = path.resolve()
            info = path.stat()
        others_write = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky = path != folder and info.st_mode & stat.S_ISVTX
        if info.st_uid not in (os.getuid(), 0) or (others_write and not sticky):
            raise ConfigError(f"submitit folder {folder}: {path} is {'owned by uid ' + str(info.st_uid) if info.st_uid not in (os.getuid(), 0) else 'writable by other users'} "
                              "(mode " + oct(info.st_mode & 0o7777) + "), so another user could replace the job "
                              "pickles bench loads; pass --submitit-folder a folder only you can write (the default is "
                              "~/.cache/bench/submitit)")
    return folder



@dataclasses.dataclass(frozen=True)
class Submitit:
    """One submitit job array per stage: Slurm where ``sbatch`` is on PATH, else submitit's local executor (which
    starts every job of an array at once, so it is given ``jobs`` jobs at a time). A task that fails (time limit,
    preemption, OOM kill, node failure) is a lost job; the others go on."""

    devices: str
    jobs: int
    threads: int
    gpus: int
    folder: Path
    cluster: str
    options: BackendOptions

    def map(self, runner: Runner, fn: Callable, jobs: list[Any], on_result: Callable[[Any], None], on_lost: OnLost,
            request: JobRequest | None = None) -> None:
        import submitit

        sized = request or self.options.request(self.threads)
        executor = submitit.AutoExecutor(folder=self.folder, cluster=self.cluster)
        setup = [f"export PYTHONPATH={shlex.quote(checkout_pythonpath())}"]
        parameters: dict[str, Any] = {"slurm_array_parallelism": self.jobs, "gpus_per_node": self.gpus,
                                      "cpus_per_task": sized.cpus, "mem_gb": sized.mem_gb,
                                      "timeout_min": sized.time_min, "local_setup": setup, "slurm_setup": setup}
        if self.options.slurm_partition:
            parameters["slurm_partition"] = self.options.slurm_partition
        executor.update_parameters(**parameters)
        chunk, runner = len(jobs) if self.cluster == "slurm" else max(1, self.jobs), with_plugins(runner)
        for part in (jobs[start:start + chunk] for start in range(0, len(jobs), chunk)):
            submitted = executor.map_array(runner, [fn] * len(part), part, [self.devices] * len(part))
            ours = {id(task): job for task, job in zip(submitted, part)}
            try:
                for task in submitit.helpers.as_completed(submitted, poll_frequency=1.0):
                    try:
                        result = task.result()
                    except Exception as err:  # noqa: BLE001 - the task's failure, whatever submitit calls it
                        on_lost(ours[id(task)], Lost(f"Slurm task {task.job_id} failed (limits: {sized.time_min} min, "
                                                     f"{sized.mem_gb} GB): {type(err).__name__}: {err}".strip()[:4000],
                                                     None, self.devices))
                    else:
                        on_result(result)
            except BaseException:
                for task in submitted:
                    task.cancel(check=False)
                raise

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Ray:
    """Ray tasks of the request's CPUs and memory and ``gpus`` (possibly fractional) GPUs each, on the cluster at
    the options' address or on a Ray instance started here; results are taken as they arrive, and a task Ray loses
    (worker crash, its OOM killer) is a lost job. System failures are retried once, exceptions never."""

    devices: str
    jobs: int
    threads: int
    gpus: float
    options: BackendOptions

    def map(self, runner: Runner, fn: Callable, jobs: list[Any], on_result: Callable[[Any], None], on_lost: OnLost,
            request: JobRequest | None = None) -> None:
        import ray

        sized = request or self.options.request(self.threads)
        env = {"env_vars": worker_env()}  # a cluster's workers do not inherit the driver's environment
        if not ray.is_initialized():
            here = {} if self.options.ray_address else {
                "num_cpus": max(self.jobs * sized.cpus, os.cpu_count() or 1), "num_gpus": _gpu_count()}
            ray.init(self.options.ray_address, include_dashboard=False, runtime_env=env, **here)
        task = ray.remote(num_cpus=sized.cpus, num_gpus=self.gpus, memory=sized.mem_gb * 2**30, max_retries=1,
                          runtime_env=env)(call_runner)
        runner = with_plugins(runner)
        pending = {task.remote(runner, fn, job, self.devices): job for job in jobs}
        try:
            while pending:
                (done,), _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(done)
                try:
                    result = ray.get(done)
                except ray.exceptions.RayError as err:
                    on_lost(job, Lost(f"Ray task failed: {type(err).__name__}: {err}"[:4000], None, self.devices))
                else:
                    on_result(result)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    def close(self) -> None:
        pass


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()
