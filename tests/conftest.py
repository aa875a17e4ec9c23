"""Shared helpers: tiny matrices on embedded data, running the CLI in-process or as a subprocess, and finding the
CIFAR-10 JPEG copy (tests that need real RGB photographs skip without it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.testing import CIFAR10_JPEG_MISSING, cifar10_jpeg_path  # noqa: F401  (one copy, tests import them here)

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights: a cell planned from the hub fails, not fetches
# looked up when a marked test starts, not at import (make mutate's check runs imports with every function failing)
requires_cifar10_jpeg = pytest.mark.requires_cifar10_jpeg


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("requires_cifar10_jpeg") and cifar10_jpeg_path() is None:
        pytest.skip(CIFAR10_JPEG_MISSING)


def require_cifar10_jpeg() -> Path:
    """The copy's path; skips the calling test (or fixture) without it."""
    path = cifar10_jpeg_path()
    if path is None:
        pytest.skip(CIFAR10_JPEG_MISSING)
    return path

TINY = """
description = "tiny test matrix"
seeds = [0]
[recipe]
name = "quick"
epochs = 2
[datasets.digits]
per_class = 20
test_per_class = 10
[protections]
clean = {{}}
cwp = {{ size_fraction = 0.375 }}
[countermeasures]
none = {{}}
{extra_countermeasures}
[victims.cnn]
width = 8
"""


def tiny_matrix(folder: Path, name: str = "tiny", extra_countermeasures: str = "bdr = {}", text: str | None = None) -> Path:
    """Write a small matrix (4 cells by default) and return its path."""
    path = folder / f"{name}.toml"
    path.write_text(text if text is not None else TINY.format(extra_countermeasures=extra_countermeasures))
    return path


def run_subprocess(args: list[str], cwd: Path, env: dict[str, str] | None = None,
                   timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m bench ARGS`` in a fresh interpreter (plugin discovery happens once per process)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run on 2 cores: keep torch single-threaded in-process, as bench's jobs are."""
    torch.set_num_threads(1)


def hold_device(job: dict, device: torch.device) -> dict:
    """A job for the scheduler's device pool test: holds its device briefly and reports it."""
    import time

    start = time.time()
    time.sleep(0.3)
    return {"device": str(device), "pid": os.getpid(), "start": start, "end": time.time()}


def record_json(**fields) -> dict:
    """A current-schema record's JSON object (``bench.store.records.Record``): a finished ``clean × none × cnn``
    cell on digits, with ``fields`` replacing its values (labels default to the names; components are at their
    installed versions, so the record is not stale)."""
    from bench.store.records import SCHEMA, current_made

    names = {axis: fields.get(f"{axis}_name", fields.get(axis, default)) for axis, default in
             (("dataset", "digits"), ("protection", "clean"), ("countermeasure", "none"), ("victim", "cnn"))}
    base = {"cell": "cell-0", "matrix": "m", "seed": 0, "poison_ratio": 1.0, "mix": "protected",
            **{axis: name for axis, name in names.items()}, **{f"{axis}_name": name for axis, name in names.items()},
            **{f"{axis}_params": {} for axis in names}, "dataset_key": "data-0", "protection_key": None,
            "purify_key": None, "countermeasure_stage": "none", "countermeasure_reports": "final",
            "components": {axis: {"name": name, "version": made.version if made else 1, "code": made and made.code}
                           for axis, name in names.items() for made in [current_made(axis, name)]},
            "status": "ok", "test_acc_final": 0.5, "test_acc_best": 0.5, "recipe": "quick", "schema": SCHEMA}
    return {**base, **fields}


def make_record(**fields):
    """``record_json`` as a ``Record``."""
    from bench.store.records import Record

    return Record.from_json(record_json(**fields))
