"""Worker processes a run survives losing: one per slot, each pinned to its device for its lifetime.

Hand-written because no library does the three things a grid needs at once: joblib/loky and
``concurrent.futures`` mark every pending job failed when one worker dies and cannot say which job killed it, and
``multiprocessing.Pool`` silently loses the job. Here the driver knows which job each worker holds, so a worker
that dies (OOM killer, segfault, a poisoned CUDA context) fails that job alone, with the reason, and a fresh worker
takes its slot. Workers are started by fork+exec (``python -m bench.execute.pool``), so no CUDA or OpenMP state
is inherited and no ``__main__`` is re-imported; they die with the driver (``PR_SET_PDEATHSIG``, and a watch on
the parent's pid where that is unavailable). Jobs travel cloudpickled over a socket pair.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

import torch

from bench.core import plugins
from bench.execute import devices
from bench.store.integrity import DamagedLines

POISONED = 70  # a worker's exit status after its CUDA context stopped working
SYS_PATH = "BENCH_WORKER_SYS_PATH"
Task = Callable[[str], Any]  # task(device) -> result, run in a worker


@dataclasses.dataclass(frozen=True)
class Lost:
    """A job that ended without a result: why (its worker died, or it raised outside its own error handling), the
    worker's pid where known (its claims are released) and the device it ran on."""

    reason: str
    pid: int | None
    device: str


class WorkerLost(RuntimeError):
    """No worker could be started for a slot (it died three times before taking a job)."""


class _Worker:
    def __init__(self, device: str, threads: int, deterministic: bool, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair()
        args = [sys.executable, "-m", "bench.execute.pool", str(theirs.fileno()), str(os.getpid()), device,
                str(threads), str(int(deterministic))]
        # the driver's import path (a test's conftest, a script's folder), appended: jobs are unpickled with it
        env = {**env, SYS_PATH: os.pathsep.join(sys.path)}
        # its own process group: a terminal's Ctrl-C reaches the driver only, which stops the workers
        self.process = subprocess.Popen(args, pass_fds=(theirs.fileno(),), env=env, process_group=0)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.device, self.task, self.ready, self.retiring = device, None, False, False

    def reason(self) -> str:
        """Why it died, from its exit status."""
        code = self.process.wait()
        if code == POISONED:
            return f"the worker's CUDA context on {self.device} stopped working after its job (a device-side error)"
        if code < 0:
            name = signal.Signals(-code).name
            hint = ": out of host memory (the OOM killer), or killed" if -code == signal.SIGKILL else ""
            return f"the worker process died ({name}{hint}) on {self.device}"
        return f"the worker process exited with status {code} on {self.device}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.conn.close()


class Pool:
    """``slots`` (one device each) of worker processes; ``map`` runs tasks on them, replacing workers that die."""

    def __init__(self, slots: list[str], threads: int, deterministic: bool, env: dict[str, str]) -> None:
        self.threads, self.deterministic, self.env = threads, deterministic, env
        self.workers = [_Worker(device, threads, deterministic, env) for device in slots]
        self.deaths = [0] * len(slots)

    def map(self, tasks: list[Task], on_result: Callable[[int, Any], None],
            on_lost: Callable[[int, Lost], None]) -> None:
        """Run ``tasks`` (``task(device)``); ``on_result(i, result)`` or ``on_lost(i, Lost)`` per task, in this
        process as each ends. An exception raised here (Ctrl-C, SIGTERM) kills every worker."""
        queue, running = list(range(len(tasks)))[::-1], 0
        try:
            while queue or running:
                for worker in self.workers:
                    if worker.task is None and worker.ready and queue:
                        worker.task = queue.pop()
                        worker.conn.send_bytes(plugins.cloudpickle().dumps(tasks[worker.task]))
                        running += 1
                for conn in wait([w.conn for w in self.workers]):
                    slot = next(i for i, w in enumerate(self.workers) if w.conn is conn)
                    running -= self._receive(slot, on_result, on_lost)
        except BaseException:
            self.close(kill=True)
            raise

    def _receive(self, slot: int, on_result: Callable[[int, Any], None],
                 on_lost: Callable[[int, Lost], None]) -> int:
        """Handle what slot's worker sent (ready, a result) or its death; returns how many tasks ended."""
        worker = self.workers[slot]
        try:
            message = worker.conn.recv_bytes()
        except (EOFError, OSError):  # it died: its task (if any) is lost, a fresh worker takes the slot
            task, pid, reason = worker.task, worker.process.pid, worker.reason()
            worker.kill()
            self.deaths[slot] += 0 if worker.ready or worker.retiring else 1
            if self.deaths[slot] >= 3:
                raise WorkerLost(f"no worker could start on {worker.device}: {reason}") from None
            self.workers[slot] = _Worker(worker.device, self.threads, self.deterministic, self.env)
            print(f"bench: {reason}; started a fresh worker", file=sys.stderr, flush=True)
            if task is not None:
                on_lost(task, Lost(reason, pid, worker.device))
                return 1
            return 0
        if message == b"ready":
            worker.ready = True
            return 0
        task, worker.task = worker.task, None
        ok, value, usable = plugins.cloudpickle().loads(message)
        if not usable:  # it exits after this reply: no new task for it, a fresh worker replaces it
            worker.ready, worker.retiring = False, True
        if ok:
            on_result(task, value)
        else:
            on_lost(task, Lost(f"the job raised in its worker:\n{value}", worker.process.pid, worker.device))
        return 1

    def close(self, kill: bool = False) -> None:
        """End the workers: at once with ``kill``, else by closing their connections (they exit when idle)."""
        for worker in self.workers:
            if kill:
                worker.kill()
            else:
                worker.conn.close()
        for worker in self.workers:
            try:
                worker.process.wait(timeout=None if kill else 10)
            except subprocess.TimeoutExpired:
                worker.kill()


def _die_with_parent(parent: int) -> None:
    """Exit when the driver dies, however it dies: the kernel's parent-death signal, and a watch on the pid."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:  # the driver died before prctl took effect
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="parent watch").start()


def serve(fd: int, parent: int, device: str, threads: int, deterministic: bool) -> None:
    """A worker: pin the device, then run the tasks that arrive until the driver closes the connection."""
    _die_with_parent(parent)
    sys.path.extend(p for p in os.environ.pop(SYS_PATH, "").split(os.pathsep) if p and p not in sys.path)
    conn = Connection(fd)
    warnings.simplefilter("ignore", DamagedLines)  # the driver reported the damaged record lines already
    devices.pin(device, threads, deterministic)
    conn.send_bytes(b"ready")
    pickler = plugins.cloudpickle()
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            ok, value = True, pickler.loads(message)(device)
        except Exception:  # noqa: BLE001 - runners record their own failures; this is a harness error
            ok, value = False, traceback.format_exc()
        usable = devices.context_usable(device)  # told with the reply, so the driver sends this worker nothing more
        if usable and device.startswith("cuda"):  # hand the job's cached blocks back: workers may share this GPU
            torch.cuda.empty_cache()
        conn.send_bytes(pickler.dumps((ok, value, usable)))
        if not usable:
            os._exit(POISONED)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1")
