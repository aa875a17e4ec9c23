"""Properties of the scheduler (``bench.execute.scheduler``) a user relies on: option checks that name the bad option,
what a run trains, skips and retries and how it counts and reports it, the CPU budget refusal, ``matrix.json``, and
the bookkeeping of failed, deferred and storage-failing jobs. In-process only (``--jobs 1`` on the CPU), with the
train stage replaced by an instant one where the property is about scheduling."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
import threading
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from conftest import TINY, tiny_matrix
from tqdm import tqdm

from bench.core.registry import BenchWarning, ConfigError
from bench.execute import backends, scheduler
from bench.execute.backends import BackendOptions, Local
from bench.execute.pool import Lost
from bench.execute.scheduler import RunCounts, RunOptions, run_matrix
from bench.execute.stages import ProtectJob, SetBuilt, TrainJob, identity
from bench.plan.matrix import load_matrix
from bench.store.cache import Cache
from bench.store.locks import identity as host_identity
from bench.store.records import Record, RecordLog

# ---------------------------------------------------------------- helpers

class Trainer:
    """An instant train stage: records which cells it trained (with the job), fails the cells ``fail`` names."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.jobs: list[TrainJob] = []
        self.fail = fail

    def __call__(self, job: TrainJob, device: torch.device) -> Record:
        self.jobs.append(job)
        bad = job.plan.cell.protection.label in self.fail or job.upstream_error is not None
        error = (f"Traceback …\n  File \"x.py\", line 1\nRuntimeError: {job.plan.cell.protection.label} broke\n"
                 if bad else None)
        return Record(**identity(job), status="error" if bad else "ok", error=error, device=str(device),
                      threads=job.threads, test_acc_final=None if bad else 0.5, test_acc_best=None if bad else 0.5,
                      finished_at=time.time())

    def cells(self) -> list[tuple[str, str]]:
        return sorted((j.plan.cell.protection.label, j.plan.cell.countermeasure.label) for j in self.jobs)


@pytest.fixture
def trainer(monkeypatch) -> Trainer:
    fake = Trainer()
    monkeypatch.setattr(scheduler, "train_job", fake)
    return fake


def options(results: Path, **kw: Any) -> RunOptions:
    return RunOptions(results=results, jobs=1, device="cpu", **kw)


def log_of(results: Path, name: str = "tiny") -> list[Record]:
    return RecordLog(results / "runs" / name / "records.jsonl").read()


def run(path: Path, results: Path, lines: list[str] | None = None, **kw: Any) -> RunCounts:
    out = lines.append if lines is not None else (lambda line: None)
    return run_matrix(load_matrix(str(path)), options(results, **kw), out)


ALL = [("clean", "bdr"), ("clean", "none"), ("cwp", "bdr"), ("cwp", "none")]


# ---------------------------------------------------------------- RunOptions

@pytest.mark.parametrize("kw, names", [
    ({"jobs": 0}, ["jobs (--jobs)", "got 0 and 1"]),
    ({"threads": 0}, ["threads (--threads)", "got 1 and 0"]),
    ({"max_hours": 0.0}, ["max_hours (--max-hours) must be > 0 and finite, got 0", "default 12"]),
    ({"max_hours": math.inf}, ["max_hours (--max-hours)", "got inf"]),
    ({"max_hours": math.nan}, ["max_hours (--max-hours)", "got nan"]),
    ({"stale": 0.0}, ["stale (--stale-after) must be > 0 and finite, got 0", "default 60"]),
    ({"stale": -1.0}, ["stale (--stale-after)", "got -1"]),
    ({"stale": math.inf}, ["stale (--stale-after)", "got inf"]),
    ({"max_cells": 0}, ["max_cells (--max-cells) must be ≥ 1, got 0", "omit it for 100,000"]),
    ({"force": True, "rerun": ("protection=cwp",)}, ["force (--force)", "drop rerun (--rerun)"]),
])
def test_bad_run_options_are_refused_naming_the_option(kw, names):
    """Each out-of-range option is a ConfigError naming the option, its flag, the value and the default."""
    with pytest.raises(ConfigError) as err:
        RunOptions(**kw)
    for name in names:
        assert name in str(err.value)


def test_force_with_rerun_is_refused_with_the_choice():
    """--force with --rerun is refused with one sentence that says what each does and which to drop."""
    with pytest.raises(ConfigError) as err:
        RunOptions(force=True, rerun=("protection=cwp",))
    assert str(err.value) == "force (--force) reruns every cell: drop rerun (--rerun), or force to rerun only those"


@pytest.mark.parametrize("kw", [{"jobs": 1, "threads": 1}, {"max_hours": 0.5}, {"stale": 0.001}, {"max_hours": 1e9},
                                {"max_cells": 1}, {"force": True}, {"rerun": ("seed=0",)}])
def test_boundary_run_options_are_accepted(kw):
    """The smallest valid values (1 job and thread, one cell, any positive finite time) and force or rerun alone
    are accepted."""
    assert all(getattr(RunOptions(**kw), k) == v for k, v in kw.items())


def test_run_options_defaults_and_device_check():
    """Defaults: ./results, one job and thread, auto device, 12 h, 60 s stale; an unknown device is refused."""
    o = RunOptions()
    assert (o.results, o.jobs, o.threads, o.device, o.max_hours, o.stale) == (Path("results"), 1, 1, "auto", 12.0, 60.0)
    assert (o.only, o.rerun, o.dry_run, o.retry_failed, o.force, o.rebuild_sets, o.deterministic) == \
        ((), (), False, False, False, False, False)
    with pytest.raises(ConfigError):
        RunOptions(device="tpu")


def test_run_counts_defaults():
    """RunCounts only needs the cell count; everything else starts at 0."""
    assert dataclasses.astuple(RunCounts(3)) == (3, 0, 0, 0, 0, 0)


# ---------------------------------------------------------------- what a run trains, skips and counts

class Created:
    """``backends.create`` spied on: its arguments, and the request and number of jobs of each ``map`` (always
    in-process here)."""

    def __init__(self) -> None:
        self.args: tuple = ()
        self.requests: list[Any] = []
        self.sizes: list[int] = []

    def __call__(self, options: BackendOptions, jobs: int, threads: int, devices: list[str], deterministic: bool = False,
                 out: Any = print) -> Local:
        self.args = (options, jobs, threads, devices, deterministic, out)
        spy, local = self, Local(1, ["cpu"], threads)

        class Spied(Local):
            def map(self, runner, fn, jobs, on_result, on_lost, request=None):
                spy.requests.append(request)
                spy.sizes.append(len(jobs))
                return local.map(runner, fn, jobs, on_result, on_lost, request)
        return Spied(1, ["cpu"], threads)


@pytest.fixture
def created(monkeypatch) -> Created:
    spy = Created()
    monkeypatch.setattr(backends, "create", spy)
    return spy


def test_first_run_trains_every_cell_then_a_rerun_trains_none(tmp_path, trainer, capsys):
    """A first run trains each cell once (building one protected and two purified sets) and records it; a rerun
    trains nothing and counts every cell as already recorded; the estimate line goes to ``out``."""
    path, results, lines = tiny_matrix(tmp_path), tmp_path / "r", []
    assert run(path, results, lines) == RunCounts(4, trained=4, skipped=0, failed=0, protected=1, purified=2)
    assert trainer.cells() == ALL and len(log_of(results)) == 4
    assert lines[0].startswith("matrix tiny: 4 cells, 0 recorded, 4 to train; protected sets 0 cached, 1 to build")
    job = trainer.jobs[0]
    assert (job.cache, job.threads, job.matrix, job.recipe) == (results / "cache", 1, "tiny", {"name": "quick", "epochs": 2})
    assert job.show_epochs and not job.redo and not job.deterministic and job.upstream_error is None
    assert {p.name for p in (results / "claims").iterdir()} == {"protect", "purify", "train"}
    trainer.jobs.clear()
    lines.clear()
    assert run(path, results, lines) == RunCounts(4, trained=0, skipped=4, failed=0, protected=0, purified=0)
    assert trainer.jobs == [] and len(log_of(results)) == 4
    assert lines[0].startswith("matrix tiny: 4 cells, 4 recorded, 0 to train")


SEEDED = """
description = "a seeded protection, fitted on the whole set and on half of each class"
seeds = [0, 1]
poison_ratio = [0.5]
mix = ["protected", "fit_subset"]
[recipe]
name = "quick"
epochs = 1
[datasets.digits]
per_class = 4
test_per_class = 2
[protections]
random_noise = {}
[countermeasures]
none = {}
[victims.cnn]
width = 8
"""


def test_protected_sets_are_drawn_with_the_cells_seed_on_the_mixs_part(tmp_path, trainer):
    """Each protected set is made with its cell's seed (random noise differs between seeds; the cache records the
    seed) and on the part of each class the mix fits it on: all images for ``protected``, half of each class for
    ``fit_subset`` (the rest stays clean)."""
    path, results = tiny_matrix(tmp_path, "seeded", text=SEEDED), tmp_path / "r"
    assert run(path, results) == RunCounts(4, trained=4, protected=4)
    cache = Cache(results / "cache")
    clean = cache.load("dataset", f"{trainer.jobs[0].plan.dataset_key}-train")
    noise = {}
    for job in trainer.jobs:
        cell, key = job.plan.cell, job.plan.protection_key
        protected = cache.load("protected", key)
        assert json.loads((cache.path("protected", key) / "manifest.json").read_text())["seed"] == cell.seed
        changed = (protected.images != clean.images).flatten(1).any(1)
        per_class = torch.bincount(clean.labels[changed], minlength=10).tolist()
        assert per_class == ([4] * 10 if cell.mix == "protected" else [2] * 10), (cell.mix, per_class)
        noise[cell.seed, cell.mix] = protected.images.int() - clean.images.int()
    assert not torch.equal(noise[0, "protected"], noise[1, "protected"])


def test_progress_bar_counts_cells_from_the_recorded_ones(tmp_path, trainer, capsys):
    """The cells' bar on stderr starts at the cells already recorded and counts to all of the matrix's, in cells."""
    path, results = tiny_matrix(tmp_path), tmp_path / "r"
    run(path, results, only=("protection=clean",))
    capsys.readouterr()
    run(path, results)
    renders = [part for part in capsys.readouterr().err.split("\r") if part.startswith("cells:")]
    assert renders[0].startswith("cells:  50%|") and " 2/4 [" in renders[0], renders
    assert renders[-1].startswith("cells: 100%|") and " 4/4 [" in renders[-1] and "cell/s]" in renders[-1], renders


def test_each_cell_another_run_records_counts_as_skipped(tmp_path, trainer, monkeypatch):
    """Cells whose claims another run held and then recorded count as skipped, each one, and are not trained."""
    run_claimed = scheduler._run_claimed

    def recorded_elsewhere(stage, runner, fn, jobs, backend, on_result, elsewhere, request=None):
        if stage.name != "train":
            return run_claimed(stage, runner, fn, jobs, backend, on_result, elsewhere, request)
        for job in jobs:
            elsewhere(job)
    monkeypatch.setattr(scheduler, "_run_claimed", recorded_elsewhere)
    assert run(tiny_matrix(tmp_path), tmp_path / "r") == RunCounts(4, skipped=4, protected=1, purified=2)
    assert trainer.jobs == []


def test_saved_matrix_lists_the_cells_of_every_run(tmp_path, trainer):
    """runs/<matrix>/matrix.json holds the resolved matrix and the keys of the cells planned here and earlier."""
    path, results = tiny_matrix(tmp_path), tmp_path / "r"
    run(path, results, only=("protection=cwp",))
    saved = json.loads((results / "runs" / "tiny" / "matrix.json").read_text())
    cwp = [r.cell for r in log_of(results)]
    assert saved["name"] == "tiny" and saved["cells"] == cwp and len(cwp) == 2
    run(path, results)
    saved = json.loads((results / "runs" / "tiny" / "matrix.json").read_text())
    assert saved["cells"][:2] == cwp and sorted(saved["cells"]) == sorted(r.cell for r in log_of(results))
    assert len(saved["cells"]) == 4


def test_failed_cells_are_counted_and_retried_only_when_asked(tmp_path, trainer, monkeypatch, capsys):
    """Failed cells count as failed and print their error's last line; a rerun leaves them, --retry-failed trains
    exactly them again, and a dry run with --retry-failed marks them to rerun."""
    path, results = tiny_matrix(tmp_path), tmp_path / "r"
    trainer.fail = ("cwp",)
    assert run(path, results) == RunCounts(4, trained=2, skipped=0, failed=2, protected=1, purified=2)
    assert "cell failed: cwp × none × cnn: RuntimeError: cwp broke" in "".join(capsys.readouterr())
    trainer.fail, trainer.jobs = (), []
    assert run(path, results) == RunCounts(4, skipped=4)
    assert trainer.jobs == []
    lines: list[str] = []
    assert run(path, results, lines, dry_run=True, retry_failed=True) == RunCounts(4, skipped=4)
    assert sum("to rerun (recorded: error)" in line for line in lines) == 2
    lines.clear()
    assert run(path, results, lines, retry_failed=True) == RunCounts(4, trained=2, skipped=2)
    assert trainer.cells() == [("cwp", "bdr"), ("cwp", "none")]
    assert "2 to train" in lines[0]


def test_rerun_retrains_the_named_cells_and_rebuilds_their_sets(tmp_path, trainer):
    """--rerun retrains the matching recorded cells and rebuilds the sets they use (not the others'); --force
    retrains every cell; the estimate counts them."""
    path, results = tiny_matrix(tmp_path), tmp_path / "r"
    run(path, results)
    trainer.jobs.clear()
    lines: list[str] = []
    assert run(path, results, lines, rerun=("protection=cwp",)) == RunCounts(4, trained=2, skipped=2, protected=1,
                                                                             purified=1)
    assert trainer.cells() == [("cwp", "bdr"), ("cwp", "none")] and all(j.redo for j in trainer.jobs)
    assert "4 recorded, 2 to train" in lines[0]
    trainer.jobs.clear()
    assert run(path, results, force=True) == RunCounts(4, trained=4, protected=1, purified=2)
    assert trainer.cells() == ALL
    assert len(log_of(results)) == 10


def test_rerun_matching_nothing_names_the_flag(tmp_path, trainer):
    """A --rerun glob that keeps no cell is a ConfigError naming --rerun and the labels there are."""
    with pytest.raises(ConfigError, match=r"^--rerun.*protection=nope") as err:
        run(tiny_matrix(tmp_path), tmp_path / "r", rerun=("protection=nope",))
    assert "cwp" in str(err.value)
    assert trainer.jobs == []


def test_rebuild_sets_builds_missing_sets_of_recorded_cells_only_when_asked(tmp_path, trainer):
    """Without their cache, recorded cells are not retrained; --rebuild-sets builds their missing protected set."""
    path, results = tiny_matrix(tmp_path), tmp_path / "r"
    run(path, results)
    shutil.rmtree(results / "cache" / "protected")
    trainer.jobs.clear()
    assert run(path, results) == RunCounts(4, skipped=4)
    assert run(path, results, rebuild_sets=True) == RunCounts(4, skipped=4, protected=1)
    assert trainer.jobs == [] and len(list((results / "cache" / "protected").glob("*/manifest.json"))) == 1


def test_backend_gets_the_runs_settings(tmp_path, trainer, created):
    """The backend is made for the run's jobs, threads, devices, determinism and ``out``; with several jobs the
    epoch bars are hidden unless one cell trains, and each job carries --deterministic."""
    path, results, lines = tiny_matrix(tmp_path), tmp_path / "r", []
    run_matrix(load_matrix(str(path)), RunOptions(results=results, jobs=2, threads=2, device="cpu",
                                                  deterministic=True, only=("countermeasure=none",)), lines.append)
    _, jobs, threads, devices, deterministic, out = created.args
    assert (jobs, threads, devices, deterministic, out) == (2, 2, ["cpu"], True, lines.append)
    assert [j.show_epochs for j in trainer.jobs] == [False, False]
    assert all(j.deterministic and j.threads == 2 for j in trainer.jobs)
    trainer.jobs.clear()
    run_matrix(load_matrix(str(path)), RunOptions(results=results, jobs=2, device="cpu"), lines.append)
    assert [j.show_epochs for j in trainer.jobs] == [False, False]  # the two bdr cells
    run_matrix(load_matrix(str(path)), RunOptions(results=results, jobs=2, device="cpu", force=True,
                                                  only=("protection=cwp", "countermeasure=none")), lines.append)
    assert [j.show_epochs for j in trainer.jobs[2:]] == [True]  # one cell to train: its epochs are shown


def test_cluster_limits_size_each_stages_request(tmp_path, trainer, created):
    """--slurm-time-min, --mem-gb and --cpus-per-task size the request of every stage's tasks."""
    pytest.importorskip("submitit")
    limits = BackendOptions("submitit", slurm_time_min=45, mem_gb=3, cpus_per_task=2)
    run(tiny_matrix(tmp_path), tmp_path / "r", backend=limits)
    assert created.args[0] == limits and len(created.requests) == 3
    assert {(r.time_min, r.mem_gb, r.cpus) for r in created.requests} == {(45, 3, 2)}


def test_backend_options_are_checked_against_the_device(tmp_path, trainer):
    """GPUs per task with --device cpu is refused before anything is written."""
    with pytest.raises(ConfigError, match="not with --device cpu"):
        run(tiny_matrix(tmp_path), tmp_path / "r", backend=BackendOptions("submitit", gpus_per_task=1.0))
    assert not (tmp_path / "r" / "runs").exists()


# ---------------------------------------------------------------- dry run, planning notes and refusals

def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, trainer):
    """A dry run counts every cell as skipped, prints the estimate and the table to ``out``, trains and writes
    nothing; after the cache is gone it still finds the dataset key, and so the results, from the records."""
    path, results, lines = tiny_matrix(tmp_path), tmp_path / "r", []
    assert run(path, results, lines, dry_run=True) == RunCounts(4, skipped=4)
    assert lines[0].startswith("matrix tiny: 4 cells, 0 recorded, 4 to train")
    assert sum(line.endswith("| result: to run") for line in lines) == 4 and "4 cells, 0 recorded, 4 to train" in lines
    assert trainer.jobs == [] and not (results / "runs").exists()
    run(path, results)
    shutil.rmtree(results / "cache")
    lines.clear()
    assert run(path, results, lines, dry_run=True) == RunCounts(4, skipped=4)
    assert sum(line.endswith("| result: ok") for line in lines) == 4
    assert any(line.startswith("dataset digits: key from its records") for line in lines)


def test_planning_steps_are_reported_for_large_matrices(tmp_path, trainer, monkeypatch, capsys):
    """From PROGRESS_CELLS cells on, planning names each step on stderr, in a run and in a dry run."""
    monkeypatch.setattr("bench.plan.validate.PROGRESS_CELLS", 1)
    path, results = tiny_matrix(tmp_path), tmp_path / "r"
    for dry in (True, False):
        run(path, results, dry_run=dry)
        err = capsys.readouterr().err
        steps = [line.removeprefix("bench: planning 4 cells: ").split(" …")[0] for line in err.splitlines()
                 if line.startswith("bench: planning 4 cells: ")]
        assert steps == ["expanding tiny", "estimating the run's cost", "checking each cell's components",
                         "computing each cell's cache keys"], steps


def test_cpu_notes_name_expensive_and_nondeterministic_components(tmp_path, capsys):
    """Planning notes on stderr: a component expensive on a CPU, and (a GPU cluster with --deterministic) one that
    cannot honour it."""
    text = TINY.replace("cwp = {{ size_fraction = 0.375 }}", "em = {{ steps = 1 }}").format(extra_countermeasures="")
    path = tiny_matrix(tmp_path, text=text)
    run(path, tmp_path / "r", dry_run=True)
    assert "bench: note: em is expensive on a CPU" in capsys.readouterr().err
    pytest.importorskip("submitit")
    run_matrix(load_matrix(str(path)), RunOptions(results=tmp_path / "r", jobs=1, dry_run=True, deterministic=True,
                                                  backend=BackendOptions("submitit", gpus_per_task=1.0)), print)
    assert "bench: note: --deterministic: cnn cannot honour it" in capsys.readouterr().err


def test_cells_components_cannot_run_are_refused(tmp_path, trainer):
    """A cell its components cannot run: a run refuses before writing anything; a dry run prints the whole table
    (marking it blocked) and then refuses."""
    text = TINY.replace("cwp = {{ size_fraction = 0.375 }}", "em = {{ surrogate = 'nope' }}").format(
        extra_countermeasures="")
    path, results, lines = tiny_matrix(tmp_path, text=text), tmp_path / "r", []
    with pytest.raises(ConfigError, match="ask for what their components cannot do"):
        run(path, results)
    assert trainer.jobs == [] and not (results / "runs").exists()
    with pytest.raises(ConfigError, match="'nope' is not a registered victim"):
        run(path, results, lines, dry_run=True)
    assert sum("| blocked: " in line for line in lines) == 1 and sum("| result: " in line for line in lines) == 2


# ---------------------------------------------------------------- the CPU budget

def test_cpu_budget_refusal_names_the_alternative_and_the_flag(tmp_path, trainer, monkeypatch):
    """A CPU run estimated over --max-hours is refused before any work, naming the matrix's cpu_alternative (with
    its estimate) and the --max-hours that would run it; a dry run only prints the estimate."""
    text = "cpu_alternative = \"smoke\"\n" + TINY.format(extra_countermeasures="bdr = {}")
    path, results = tiny_matrix(tmp_path, text=text), tmp_path / "r"
    with pytest.raises(ConfigError) as err:
        run(path, results, max_hours=1e-9)
    message = str(err.value)
    assert message.startswith("matrix tiny: 4 cells, est. ") and "on this CPU (1 job) — a GPU job." in message
    assert "Run `--matrix smoke` (est. " in message and message.endswith("instead, or pass --max-hours 2 to run it anyway.")
    assert trainer.jobs == [] and not (results / "runs").exists() and not (results / "cache" / "dataset").exists()
    assert run(path, results, dry_run=True, max_hours=1e-9) == RunCounts(4, skipped=4)


def test_estimate_times_from_records_here_and_in_bench_results(tmp_path, trainer, monkeypatch):
    """The estimate times cells from the records of the results folder, of $BENCH_RESULTS, else of ./results."""
    from conftest import make_record

    past = make_record(device="cpu", seconds={"train": 30.0}, steps=40, recipe_params={"batch_size": 128},
                       recipe="quick")
    for folder in ("mine", "env", "cwd/results"):
        RecordLog(tmp_path / folder / "runs" / "old" / "records.jsonl").append(past)
    path = tiny_matrix(tmp_path, text=TINY.replace("cwp = {{ size_fraction = 0.375 }}", "").format(
        extra_countermeasures=""))
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path / "nowhere"))
    for results, env, timed in (("mine", "nowhere", True), ("fresh", "env", True), ("fresh2", "nowhere", False)):
        monkeypatch.setenv("BENCH_RESULTS", str(tmp_path / env))
        lines: list[str] = []
        run(path, tmp_path / results, lines, dry_run=True)
        assert ("all 1 stages timed from records" in lines[0]) is timed, lines[0]
    monkeypatch.delenv("BENCH_RESULTS")
    lines = []
    run(path, tmp_path / "fresh3", lines, dry_run=True)
    assert "all 1 stages timed from records" in lines[0]  # ./results


# ---------------------------------------------------------------- matrix.json

def test_save_resolved_merges_cells_and_rewrites_a_damaged_file(tmp_path):
    """save_resolved creates the folders (no warning), keeps the cells of earlier runs first (no duplicates), writes
    indented JSON (one value per line, for reading and diffing), takes a file without cells (an older bench's) as
    none, and rewrites a damaged file with a warning naming it and what is wrong, not saved_matrix's fix."""
    from bench.execute.scheduler import save_resolved

    matrix, path = load_matrix(str(tiny_matrix(tmp_path))), tmp_path / "runs" / "tiny" / "matrix.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_resolved(matrix, ["a", "b"], path)
        save_resolved(matrix, ["c", "a"], path)
    saved = json.loads(path.read_text())
    assert saved["cells"] == ["a", "b", "c"] and saved["name"] == "tiny" and saved["source"] == matrix.source
    assert path.read_text() == json.dumps(saved, indent=1)
    path.write_text(json.dumps({key: value for key, value in saved.items() if key != "cells"}))
    save_resolved(matrix, ["e"], path)
    assert json.loads(path.read_text())["cells"] == ["e"]
    path.write_text("[1]")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_resolved(matrix, ["d"], path)
    assert [str(w.message) for w in caught if w.category is BenchWarning] == [
        f"{path} holds a JSON list, not the matrix's object: it is damaged; rewriting it with this run's cells"]
    assert json.loads(path.read_text())["cells"] == ["d"]


# ---------------------------------------------------------------- failures and storage

def test_failed_protection_fails_its_cells_and_skips_their_purification(tmp_path, trainer, monkeypatch, capsys):
    """A protection that raises: its error's last line is printed, its cells get its traceback as upstream error
    (and are recorded failed), the sets that need it are not purified, the other cells run."""
    def broken(job: ProtectJob, device: torch.device) -> SetBuilt:
        raise RuntimeError("deliberate protect failure")
    monkeypatch.setattr(scheduler, "protect_job", broken)
    counts = run(tiny_matrix(tmp_path), tmp_path / "r")
    assert counts == RunCounts(4, trained=2, failed=2, protected=0, purified=1)
    out = "".join(capsys.readouterr())
    assert "protect failed: RuntimeError: deliberate protect failure" in out and "purify failed" not in out
    upstream = {j.plan.cell.protection.label: j.upstream_error for j in trainer.jobs}
    assert upstream["clean"] is None and "deliberate protect failure" in upstream["cwp"]
    assert {(r.protection, r.status) for r in log_of(tmp_path / "r")} == {("clean", "ok"), ("cwp", "error")}


def test_failed_purification_fails_only_its_cells(tmp_path, trainer, monkeypatch, capsys):
    """A countermeasure's data stage that raises fails the cells of its sets, with its traceback."""
    def broken(job: Any, device: torch.device) -> SetBuilt:
        raise ValueError("deliberate purify failure")
    monkeypatch.setattr(scheduler, "purify_job", broken)
    assert run(tiny_matrix(tmp_path), tmp_path / "r") == RunCounts(4, trained=2, failed=2, protected=1, purified=0)
    assert "purify failed: ValueError: deliberate purify failure" in "".join(capsys.readouterr())
    failed = {j.plan.cell.countermeasure.label for j in trainer.jobs if j.upstream_error}
    assert failed == {"bdr"}


def test_a_failure_without_error_text_is_reported_as_such(tmp_path, monkeypatch, capsys):
    """A failed cell or set whose error text is missing or blank prints ``no error text`` (and the run goes on)."""
    def blank(job: TrainJob, device: torch.device) -> Record:
        return Record(**identity(job), status="error", error=None if job.plan.cell.protection.label == "clean" else " \n",
                      device=str(device), threads=1, finished_at=time.time())
    monkeypatch.setattr(scheduler, "train_job", blank)
    monkeypatch.setattr(scheduler, "protect_job", lambda job, device: SetBuilt(job.key, error="\n"))
    assert run(tiny_matrix(tmp_path), tmp_path / "r") == RunCounts(4, failed=4, purified=1)
    err = "".join(capsys.readouterr())
    assert "protect failed: no error text" in err
    assert all(f"cell failed: {cell} × cnn: no error text" in err
               for cell in ("clean × none", "clean × bdr", "cwp × none", "cwp × bdr")), err


def test_cached_sets_are_reused_by_new_cells_and_rebuilt_without_their_model(tmp_path, trainer, created,
                                                                             monkeypatch):
    """New cells (another victim) use the protected and purified sets recorded cells cached: no job for a set
    reaches the backend. A protected or purified set that lacks a model its component now declares fitting is
    rebuilt."""
    results = tmp_path / "r"
    assert run(tiny_matrix(tmp_path), results) == RunCounts(4, trained=4, protected=1, purified=2)
    wider = TINY.format(extra_countermeasures="bdr = {}").replace("width = 8", "width = [8, 4]")
    path = tiny_matrix(tmp_path, "wider", text=wider)
    created.sizes.clear()
    assert run(path, results) == RunCounts(8, trained=4, skipped=4)
    assert created.sizes == [4]  # the new cells' training only
    shutil.rmtree(results / "runs")  # every cell untrained again, its sets cached
    plan_cell = scheduler.plan_cell  # cwp and bdr now declare fitting models their cached sets lack

    def declaring(cell: Any, *args: Any) -> Any:
        plan = plan_cell(cell, *args)
        fits = {"protection_fits": ("generator",)} if cell.protection.label == "cwp" else {}
        return dataclasses.replace(plan, **fits, **{"purify_fits": ("denoiser",)} if plan.purify_key else {})
    monkeypatch.setattr(scheduler, "plan_cell", declaring)
    assert run(path, results) == RunCounts(8, trained=8, protected=1, purified=2)


def visible(err: str) -> list[str]:
    """What stays on a terminal of the bars written to ``err``: each line's last render, blank ones left out."""
    return [shown for line in err.split("\n") if (shown := line.split("\r")[-1]).strip()]


class Bars(tqdm):
    """tqdm that keeps, for each bar closed, its description, count, total and unit."""

    closed: ClassVar[list[tuple[str, int, int | None, str]]] = []

    def close(self) -> None:
        if not self.disable:
            Bars.closed.append((self.desc, self.n, self.total, self.unit))
        super().close()


def test_set_stages_show_their_sets_and_count_each(tmp_path, trainer, monkeypatch, capsys):
    """Each set stage's bar, named by the stage, counts its sets to their total; the cells' bar starts at the cells
    recorded already."""
    monkeypatch.setattr(scheduler, "tqdm", Bars)
    monkeypatch.setattr(Bars, "closed", [])
    run(tiny_matrix(tmp_path), tmp_path / "r")
    assert Bars.closed == [("protect", 1, 1, "set"), ("purify", 2, 2, "set"), ("cells", 4, 4, "cell")]
    renders = capsys.readouterr().err.split("\r")
    assert "protect:   0%|          | 0/1 [00:00<?, ?set/s]" in renders, renders


def test_only_the_cells_bar_stays_on_the_screen(tmp_path, trainer, capsys):
    """The set stages' bars are cleared when done; the cells' bar is left as the run's summary."""
    run(tiny_matrix(tmp_path), tmp_path / "r")
    shown = visible(capsys.readouterr().err)
    assert len(shown) == 1 and shown[0].startswith("cells: 100%|"), shown


def hook_backend(monkeypatch, hook: Any) -> None:
    """Runs use the in-process backend, which first passes each stage's jobs and ``on_lost`` to ``hook``; it returns
    the jobs still to run."""
    class Hooked(Local):
        def map(self, runner, fn, jobs, on_result, on_lost, request=None):
            return super().map(runner, fn, hook(jobs, on_lost), on_result, on_lost, request)
    monkeypatch.setattr(backends, "create", lambda options, jobs, threads, devices, *rest: Hooked(1, ["cpu"], threads))


def test_a_set_another_run_built_meanwhile_is_used_not_rebuilt(tmp_path, trainer, monkeypatch):
    """A protected set another run cached after this one planned (seen when its job takes the claim) is used: the
    stage counts it done and builds nothing, and its cells train."""
    first, results = tmp_path / "first", tmp_path / "r"
    run(tiny_matrix(tmp_path), first, only=("countermeasure=none",))

    def land(jobs: list, on_lost: Any) -> list:  # the other run's set lands just before the protect stage's jobs
        if isinstance(jobs[0], ProtectJob):
            shutil.copytree(first / "cache" / "protected", results / "cache" / "protected", dirs_exist_ok=True)
        return jobs
    hook_backend(monkeypatch, land)
    monkeypatch.setattr(scheduler, "tqdm", Bars)
    monkeypatch.setattr(Bars, "closed", [])
    assert run(tiny_matrix(tmp_path), results) == RunCounts(4, trained=4, protected=0, purified=2)
    assert Bars.closed[0] == ("protect", 1, 1, "set")  # the set counts as done


def test_jobs_whose_worker_died_fail_their_cells_with_the_reason(tmp_path, trainer, monkeypatch, capsys):
    """A backend that loses a job (its worker died) fails it: a lost set fails its cells with the reason, a lost
    cell is recorded as failed with it."""
    lost_stage = [ProtectJob]

    def lose(jobs: list, on_lost: Any) -> list:
        if not isinstance(jobs[0], lost_stage[0]):
            return jobs
        for job in jobs:
            on_lost(job, Lost(f"worker for {job.key} died (signal 9)", None, "cpu"))
        return []
    hook_backend(monkeypatch, lose)
    path, results = tiny_matrix(tmp_path), tmp_path / "r"
    assert run(path, results) == RunCounts(4, trained=2, failed=2, purified=1)
    assert "protect failed: worker for" in "".join(capsys.readouterr())
    assert {j.plan.cell.protection.label for j in trainer.jobs if j.upstream_error} == {"cwp"}
    assert all("died (signal 9)" in j.upstream_error for j in trainer.jobs if j.upstream_error)
    lost_stage[0] = TrainJob
    trainer.jobs.clear()
    assert run(path, results, force=True) == RunCounts(4, failed=4, protected=1, purified=2)
    assert trainer.jobs == []
    assert {r.error for r in log_of(results)[-4:]} == {f"worker for {r.cell} died (signal 9)" for r in log_of(results)[-4:]}


@pytest.mark.parametrize("filename", ["/disk/protected/x", None])
def test_storage_failure_ends_the_run_naming_the_path(tmp_path, trainer, monkeypatch, filename):
    """A full disk while building a set ends the run with an OSError naming the path (else the cache folder); no cell
    is trained."""
    import errno

    def full(job: ProtectJob, device: torch.device) -> SetBuilt:
        raise OSError(errno.ENOSPC, "No space left on device", *([filename] if filename else []))
    monkeypatch.setattr(scheduler, "protect_job", full)
    with pytest.raises(OSError) as err:
        run(tiny_matrix(tmp_path), tmp_path / "r")
    assert err.value.errno == errno.ENOSPC and err.value.strerror == "No space left on device"
    assert err.value.filename == (filename or str(tmp_path / "r" / "cache"))
    assert trainer.jobs == []


def test_guarded_turns_exceptions_into_failed_sets():
    """_guarded: a raising stage becomes a SetBuilt with its traceback, and with ``full`` for a storage error."""
    import errno

    from bench.execute.scheduler import _guarded
    job = ProtectJob(Path("c"), 1, "k1", "d", None, 0, None)  # type: ignore[arg-type]

    def boom(job: Any, device: torch.device) -> SetBuilt:
        raise KeyError("boom")
    built = _guarded(boom, job, "cpu")
    assert built.key == "k1" and "KeyError: 'boom'" in built.error and built.full is None

    def disk(job: Any, device: torch.device) -> SetBuilt:
        raise OSError(errno.EROFS, "Read-only file system", "/ro")
    assert _guarded(disk, job, "cpu").full == (errno.EROFS, "Read-only file system", "/ro")
    assert _guarded(lambda job, device: SetBuilt(job.key, 1.5), job, "cpu") == SetBuilt("k1", 1.5)


def test_show_progress_prints_benchs_info_logs_and_others_warnings(capsys):
    """Where logging is not configured, bench's INFO lines (EM's rounds …) reach stderr as ``HH:MM:SS name: text``;
    other libraries' stay at WARNING, even where one lowered the root level."""
    root, ours = logging.getLogger(), logging.getLogger("bench")
    handlers, levels = root.handlers[:], (root.level, ours.level)
    root.handlers.clear()  # pytest's handlers configure logging: show_progress would leave it alone
    root.setLevel(logging.INFO)  # as a library that lowers the root level without a handler leaves it
    try:
        scheduler.show_progress()
        logging.getLogger("bench.protections.em").info("round 1 of 10")
        logging.getLogger("PIL").info("not shown")
        logging.getLogger("PIL").warning("shown")
    finally:
        root.handlers[:] = handlers
        root.setLevel(levels[0])
        ours.setLevel(levels[1])
    err = capsys.readouterr().err
    assert re.search(r"^\d\d:\d\d:\d\d bench.protections.em: round 1 of 10$", err, re.MULTILINE), err
    assert re.search(r"^\d\d:\d\d:\d\d PIL: shown$", err, re.MULTILINE) and "not shown" not in err, err


def test_call_runs_the_job_on_its_device_with_its_threads():
    """_call gives the stage function a torch.device and the job's thread count, and shows bench's INFO logs."""
    from bench.execute.scheduler import _call

    job = ProtectJob(Path("c"), 2, "k1", "d", None, 0, None)  # type: ignore[arg-type]
    try:
        seen = _call(lambda job, device: (device, torch.get_num_threads()), job, "cpu")
    finally:
        torch.set_num_threads(1)
    assert seen == (torch.device("cpu"), 2)
    assert logging.getLogger("bench").level == logging.INFO


# ---------------------------------------------------------------- runs sharing a results folder

def hold(results: Path, key: str) -> Path:
    """A live claim on a train key, as another worker of this host holds it."""
    path = results / "claims" / "train" / f"{key}.claim"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**host_identity(), "started": time.time(), "token": "other", "stage": "train",
                                "key": key}))
    return path


def wait_until(condition: Any, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        time.sleep(0.05)


def run_beside(other_worker: Any, path: Path, results: Path) -> RunCounts:
    """The ``none`` cells run again (--force, claims stale after 30 s) while ``other_worker`` acts in a thread."""
    thread = threading.Thread(target=other_worker)
    thread.start()
    try:
        return run(path, results, force=True, stale=30.0, only=("countermeasure=none",))
    finally:
        thread.join()


def test_a_claim_that_does_not_name_its_holder_is_waited_for(tmp_path, trainer, capsys):
    """One cell held by a live claim that does not say who holds it (no host, no pid): the run says so once, with
    ``?`` for both, and waits; once the claim is released without a record, the cell is trained here."""
    path, results = tiny_matrix(tmp_path), tmp_path / "r"
    run(path, results, only=("countermeasure=none",))
    first = {r.protection: r.cell for r in log_of(results)}
    claim = results / "claims" / "train" / f"{first['clean']}.claim"
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(json.dumps({"started": time.time(), "token": "other", "stage": "train", "key": first["clean"]}))
    trainer.jobs.clear()

    def release() -> None:  # once this run trained the other cell, i.e. after it deferred the held one
        wait_until(lambda: bool(trainer.jobs))
        claim.unlink()
    assert run_beside(release, path, results) == RunCounts(2, trained=2, protected=1)
    assert trainer.cells() == [("clean", "none"), ("cwp", "none")]
    err = capsys.readouterr().err
    assert ("train: 1 claimed by another worker (e.g. ? pid ?); waiting (a claim is taken over after 30 s without a "
            "heartbeat)") in err
    assert err.count("claimed by another worker") == 1, err  # it waited on the claim, not retried it in a loop


def test_cells_claimed_elsewhere_are_waited_for(tmp_path, trainer, capsys):
    """With --force, two cells held by another worker: the run says so (with the holder and the stale timeout) and
    waits; the one the other worker records counts as already recorded, the one it releases is trained here."""
    path, results = tiny_matrix(tmp_path), tmp_path / "r"
    run(path, results, only=("countermeasure=none",))
    first = {r.protection: r for r in log_of(results)}
    claims = {name: hold(results, first[name].cell) for name in ("clean", "cwp")}
    trainer.jobs.clear()
    manifest = next((results / "cache" / "protected").glob("*/manifest.json"))
    built = manifest.stat().st_mtime_ns

    def other_worker() -> None:  # acts once this run rebuilt the protected set, i.e. while it waits on the claims
        wait_until(lambda: manifest.exists() and manifest.stat().st_mtime_ns != built)
        time.sleep(0.3)
        RecordLog(results / "runs" / "tiny" / "records.jsonl").append(dataclasses.replace(first["clean"],
                                                                                      finished_at=time.time()))
        for claim in claims.values():
            claim.unlink()
    assert run_beside(other_worker, path, results) == RunCounts(2, trained=1, skipped=1, protected=1)
    assert trainer.cells() == [("cwp", "none")]
    me = host_identity()
    assert (f"train: 2 claimed by another worker (e.g. {me['host']} pid {me['pid']}); waiting (a claim is taken over "
            "after 30 s without a heartbeat)") in capsys.readouterr().err
