"""The devices a run uses, as explicit choices: ``--device`` parsed into a list of devices (``auto``, ``cpu``,
``cuda`` = every GPU, ``cuda:N`` or ``cuda:N,M`` = those listed), one local job per listed GPU by default, each
worker pinned to one device for its lifetime, and a check that a worker's CUDA context survived an error.

A device-side assert (a bad label, an out-of-range index) poisons the process's CUDA context: every later CUDA call
there fails. A worker whose context no longer works exits after reporting its job, and the pool starts a fresh one
(``bench.execute.pool``), so one bad cell does not fail the rest of the grid.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch

from bench.core.registry import ConfigError


def parse(device: str) -> list[str]:
    """Concrete devices for ``--device``: ``["cpu"]``, or ``cuda:N`` names (``cuda`` and ``auto``: every GPU here).

    Raises ConfigError on an unknown form, a GPU index this machine lacks, or CUDA asked for where there is none."""
    if device == "cpu":
        return ["cpu"]
    if device == "auto":
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        warn_if_cuda_unusable()
        return ["cpu"]
    if device != "cuda" and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device!r}: expected auto, cpu, cuda, cuda:N or cuda:N,M (a list of GPUs)")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}, built for "
                          f"CUDA {torch.version.cuda}); use --device cpu or auto")
    count = torch.cuda.device_count()
    if device == "cuda":
        return [f"cuda:{i}" for i in range(count)]
    indices = device.removeprefix("cuda:").split(",")
    if not all(i.strip().isdigit() for i in indices) or len(set(indices)) != len(indices):
        raise ConfigError(f"--device {device}: expected cuda:N or a list without repeats, e.g. cuda:0,2")
    wrong = [i for i in indices if int(i) >= count]
    if wrong:
        raise ConfigError(f"--device {device}: this machine has {count} GPU(s) (cuda:0 … cuda:{count - 1}); no "
                          f"cuda:{', cuda:'.join(wrong)}")
    return [f"cuda:{int(i)}" for i in indices]


def single(device: str) -> torch.device:
    """The one device of a command that uses one (``bench protect``, ``perf``, ``selfcheck``): ``auto`` is the first
    GPU, else the CPU. Raises ConfigError as ``parse`` does, and on a list of GPUs."""
    found = parse(device)
    if len(found) > 1 and device not in ("auto", "cuda"):
        raise ConfigError(f"--device {device}: this command uses one device; give cuda:N")
    return torch.device(found[0])


def kind(devices: list[str]) -> str:
    """``cpu`` or ``cuda``: what the planner and the estimate need to know."""
    return devices[0].split(":")[0]


def default_jobs(devices: list[str], threads: int) -> int:
    """One job per listed GPU; on a CPU one per ``threads`` cores."""
    return len(devices) if kind(devices) == "cuda" else max(1, (os.cpu_count() or 1) // max(1, threads))


def slots(devices: list[str], jobs: int) -> list[str]:
    """The device of each of ``jobs`` workers, round robin over ``devices`` (several workers may share a GPU)."""
    return [devices[i % len(devices)] for i in range(jobs)]


def pin(device: str, threads: int, deterministic: bool = False) -> None:
    """Set up this worker process for its lifetime: CPU threads, the cuDNN/determinism switches
    (``bench.execute.precision.configure_cuda``, before any CUDA work) and its one GPU as the current device, so that
    code that says ``cuda`` uses it and no context is created on GPU 0."""
    from bench.execute.precision import configure_cuda

    torch.set_num_threads(threads)
    if deterministic or device.startswith("cuda"):
        configure_cuda(deterministic)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))


def context_usable(device: str) -> bool:
    """Whether CUDA still works in this process on ``device`` (a device-side assert makes every later call fail);
    always True on a CPU. An out-of-memory error leaves the context usable."""
    if not device.startswith("cuda"):
        return True
    try:
        return torch.ones(1, device=device).add_(1).sum().item() == 2.0
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return False


def warn_if_cuda_unusable() -> None:
    """Say so when this machine has an NVIDIA GPU that torch cannot use (``--device auto`` would run on the CPU):
    typically a driver older than torch's CUDA build."""
    if Path("/dev/nvidia0").exists() and not torch.cuda.is_available():
        warnings.warn(f"an NVIDIA GPU is present (/dev/nvidia0) but torch {torch.__version__} (CUDA "
                      f"{torch.version.cuda}) cannot use it, so --device auto runs on the CPU; update the driver or "
                      "install a torch build for it (Makefile TORCH_INDEX_URL), or pass --device cpu to silence this",
                      stacklevel=2)
        print("bench: warning: CUDA unusable, running on the CPU (see the warning above)", file=sys.stderr)


def reset_memory_peak(device: torch.device) -> None:
    """Start a cell's CUDA peak (``memory_use``) from what is allocated now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_use(device: torch.device) -> dict[str, float]:
    """MiB: ``peak_rss``, this process's peak resident set so far (``ru_maxrss``: a pool worker's over the cells it
    ran; memory-mapped pages read count while mapped), and on CUDA ``cuda_peak``, the most allocated since
    ``reset_memory_peak``."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    use = {"peak_rss": round(peak, 1)}
    if device.type == "cuda":
        use["cuda_peak"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return use
