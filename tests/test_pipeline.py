"""End-to-end behaviour of `bench run`: caching, resuming, errors, plugins, parallelism, and a protection
that really protects (on real data, on CPU)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from bench.cli import main
from bench.store.records import RecordLog
from conftest import REPO, TINY, run_subprocess, tiny_matrix


def records(results: Path, name: str = "tiny") -> list[dict]:
    return RecordLog(results / "runs" / name / "records.jsonl").read()


def test_run_then_rerun_trains_nothing(tmp_path, capsys):
    """A run records every cell and writes the leaderboard; a rerun trains nothing."""
    matrix = tiny_matrix(tmp_path)
    assert main(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--jobs", "1"]) == 0
    first = records(tmp_path / "r")
    assert len(first) == 4 and all(r.status == "ok" for r in first)
    assert {r.recipe for r in first} == {"quick"} and all(len(r.test_acc) == 2 for r in first)
    out = capsys.readouterr().out
    assert "4 trained" in out and "| clean" in out.replace("|        clean", "| clean")
    assert main(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--jobs", "1"]) == 0
    assert "0 trained, 4 already recorded" in capsys.readouterr().out
    assert len(records(tmp_path / "r")) == 4
    board = tmp_path / "r" / "leaderboards" / "tiny"
    assert {p.name for p in board.iterdir()} >= {"digits__cnn__quick.final.csv", "digits__cnn__quick.final.md"}


def test_record_fields(tmp_path):
    """Records carry params, seed, recipe, curves, norms, timings, device and status."""
    matrix = tiny_matrix(tmp_path)
    main(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--jobs", "1"])
    by_label = {(r.protection, r.countermeasure): r for r in records(tmp_path / "r")}
    cwp = by_label[("cwp", "bdr")]
    assert cwp.protection_params == {"size_fraction": 0.375} and cwp.countermeasure_params == {"bits": 2}
    assert cwp.dataset_params["per_class"] == 20 and cwp.victim_params == {"width": 8}
    assert cwp.seed == 0 and cwp.poison_ratio == 1.0 and cwp.device == "cpu" and cwp.error is None
    assert cwp.linf > 0.5 and cwp.l2 > 0 and cwp.psnr > 0
    assert set(cwp.seconds) >= {"load", "protect", "purify", "train"}
    assert 0 <= cwp.test_acc_final <= cwp.test_acc_best <= 1
    assert 0 <= cwp.car <= 1 and cwp.gcr > 0  # ConfounderGAN App. A, on the protected train images
    clean = by_label[("clean", "none")]
    assert clean.linf == 0 and clean.psnr is None and clean.car is None


@pytest.mark.parametrize("line, key, hint", [
    ("cwpp = {{ size_fraction = 0.375 }}", "protections.cwpp", "'cwp'"),        # unknown component
    ("cwp = {{ size_fractoin = 0.375 }}", "protections.cwp", "'size_fraction'"),  # unknown parameter
    ("cwp = {{ size_fraction = 'big' }}", "protections.cwp", "size_fraction"),    # bad type
    ("cwp = {{ size_fraction = 3.0 }}", "protections.cwp", "size_fraction"),      # out of range
])
def test_bad_matrix_exits_2_before_running(tmp_path, capsys, line, key, hint):
    """Unknown component / parameter / bad value: exit 2 naming file, key and close matches; nothing written."""
    text = TINY.replace("cwp = {{ size_fraction = 0.375 }}", line).format(extra_countermeasures="")
    matrix = tiny_matrix(tmp_path, text=text)
    code = main(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert str(matrix) in err and key in err and hint in err
    assert not (tmp_path / "r").exists()


def test_bad_matrix_exit_code_from_shell(tmp_path):
    """The real process exits with 2 on an unknown countermeasure."""
    matrix = tiny_matrix(tmp_path, extra_countermeasures="jepg = { quality = 10 }")
    proc = run_subprocess(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r")], tmp_path)
    assert proc.returncode == 2 and "'jpeg'" in proc.stderr and "countermeasures.jepg" in proc.stderr


PLUGIN = '''
"""A countermeasure dropped in as one file: inverts the images."""
from typing import ClassVar
from bench.core.components import COUNTERMEASURES, Countermeasure, ImageSet


@COUNTERMEASURES.register("invert_test")
class Invert(Countermeasure):
    """Test plugin."""
    paper: ClassVar[str] = "test plugin"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})
    strength: int = 255

    def purify(self, train: ImageSet, *, seed, device) -> ImageSet:
        return train.with_images(self.strength - train.images)
'''


def test_plugin_folder_module_is_listed_and_runs(tmp_path):
    """A module in $BENCH_PLUGINS appears in `bench list` and runs in a matrix with no other edit."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "invert.py").write_text(PLUGIN)
    env = {"BENCH_PLUGINS": str(plugins)}
    listed = run_subprocess(["list", "countermeasures"], tmp_path, env)
    assert listed.returncode == 0 and "invert_test" in listed.stdout and "strength=255" in listed.stdout
    matrix = tiny_matrix(tmp_path, extra_countermeasures="invert_test = {}")
    proc = run_subprocess(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--jobs", "2"],
                          tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    done = {(r.protection, r.countermeasure): r.status for r in records(tmp_path / "r")}
    assert done[("cwp", "invert_test")] == "ok" and done[("clean", "invert_test")] == "ok"


def test_module_dropped_into_package_is_discovered(tmp_path):
    """Copying one file into countermeasures/ (of a copy of the repo) is all it takes."""
    copy = tmp_path / "repo"
    for package in ("bench", "protections", "countermeasures", "victims"):
        shutil.copytree(REPO / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "countermeasures" / "invert_test.py").write_text(PLUGIN)
    proc = run_subprocess(["list", "countermeasures"], copy, {"PYTHONPATH": str(copy)})
    assert proc.returncode == 0 and "invert_test" in proc.stdout


def test_failed_cell_is_recorded_and_grid_continues(tmp_path):
    """A protection that raises: its cells are recorded as errors, the others still run, and the run exits 1
    naming the error."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken.py").write_text(
        "from bench.core.components import PROTECTIONS, Protection\n"
        "@PROTECTIONS.register('broken_test')\n"
        "class Broken(Protection):\n"
        "    def protect(self, train, *, seed, device):\n"
        "        raise RuntimeError('deliberate failure')\n")
    text = TINY.replace("cwp = {{ size_fraction = 0.375 }}", "broken_test = {{}}").format(extra_countermeasures="")
    matrix = tiny_matrix(tmp_path, text=text)
    proc = run_subprocess(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--jobs", "1"],
                          tmp_path, {"BENCH_PLUGINS": str(plugins)})
    assert proc.returncode == 1, proc.stderr
    assert "1 cell(s) failed" in proc.stderr and "RuntimeError: deliberate failure" in proc.stderr
    status = {r.protection: r for r in records(tmp_path / "r")}
    assert status["clean"].status == "ok"
    assert status["broken_test"].status == "error" and "deliberate failure" in status["broken_test"].error
    assert "error" in proc.stdout  # the leaderboard marks the failed cell


def test_jobs_2_gives_same_records_as_jobs_1(tmp_path):
    """Parallel cells give the same numbers, and the same seed gives byte-identical protected data."""
    matrix = tiny_matrix(tmp_path)
    for results, jobs in (("a", "1"), ("b", "2")):  # on the CPU: bit-identity is promised there only (audit §9)
        assert main(["run", "--matrix", str(matrix), "--results", str(tmp_path / results), "--jobs", jobs,
                     "--device", "cpu"]) == 0
    keep = ("cell", "protection", "countermeasure", "test_acc", "train_acc", "linf", "l2", "psnr")
    a = sorted((tuple(json.dumps(getattr(r, k)) for k in keep) for r in records(tmp_path / "a")))
    b = sorted((tuple(json.dumps(getattr(r, k)) for k in keep) for r in records(tmp_path / "b")))
    assert a == b
    manifests = [sorted(json.loads(m.read_text())["sha256"]["images.npy"]
                        for m in (root / "cache" / "protected").glob("*/manifest.json")) for root in (tmp_path / "a", tmp_path / "b")]
    assert manifests[0] == manifests[1] and len(manifests[0]) == 1


def test_corrupted_cache_entry_is_detected_and_rebuilt(tmp_path, capsys):
    """Flipping a byte of a cached poison: the next run notices, rebuilds it, and gets the same bytes."""
    matrix = tiny_matrix(tmp_path)
    results = tmp_path / "r"
    main(["run", "--matrix", str(matrix), "--results", str(results), "--jobs", "1"])
    entry = next((results / "cache" / "protected").iterdir())
    original = json.loads((entry / "manifest.json").read_text())["sha256"]["images.npy"]
    data = bytearray((entry / "images.npy").read_bytes())
    data[-1] ^= 0xFF
    (entry / "images.npy").write_bytes(bytes(data))
    shutil.rmtree(results / "runs")
    capsys.readouterr()
    assert main(["run", "--matrix", str(matrix), "--results", str(results), "--jobs", "1"]) == 0
    assert "corrupted" in capsys.readouterr().err
    assert json.loads((entry / "manifest.json").read_text())["sha256"]["images.npy"] == original
    assert all(r.status == "ok" for r in records(results))


def test_rebuild_sets_builds_a_recorded_cells_missing_set_without_retraining(tmp_path, capsys):
    """Records kept without their cache (another machine): a plain rerun builds nothing, --rebuild-sets builds the
    protected set with the same bytes and trains no cell, and `bench report` then shows its images."""
    from bench.report.figures import load_protected

    matrix = tiny_matrix(tmp_path)
    results = tmp_path / "r"
    assert main(["run", "--matrix", str(matrix), "--results", str(results), "--jobs", "1"]) == 0
    entry = next((results / "cache" / "protected").iterdir())
    original = json.loads((entry / "manifest.json").read_text())["sha256"]["images.npy"]
    shutil.rmtree(results / "cache" / "protected")
    cwp = next(r for r in records(results) if r.protection == "cwp")
    assert "--rebuild-sets" in load_protected(results / "cache", cwp.to_json())
    for extra, built in (([], 0), (["--rebuild-sets"], 1)):
        capsys.readouterr()
        assert main(["run", "--matrix", str(matrix), "--results", str(results), "--jobs", "1", *extra]) == 0
        assert "0 trained, 4 already recorded, 0 failed" in capsys.readouterr().out
        assert len(list((results / "cache" / "protected").glob("*/manifest.json"))) == built
    assert json.loads((entry / "manifest.json").read_text())["sha256"]["images.npy"] == original
    assert len(records(results)) == 4
    assert not isinstance(load_protected(results / "cache", cwp.to_json()), str)


def test_dry_run_only_and_leaderboard_command(tmp_path, capsys):
    """--dry-run lists cells and cache state without running; --only filters; `bench leaderboard` reprints."""
    matrix = tiny_matrix(tmp_path)
    results = tmp_path / "r"
    assert main(["run", "--matrix", str(matrix), "--results", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("to run") == 4 and "poison: to build" in out and not (results / "runs").exists()
    assert main(["run", "--matrix", str(matrix), "--results", str(results), "--only", "protection=cwp",
                 "--only", "countermeasure=none", "--jobs", "1"]) == 0
    assert [(r.protection, r.countermeasure) for r in records(results)] == [("cwp", "none")]
    capsys.readouterr()
    main(["run", "--matrix", str(matrix), "--results", str(results), "--dry-run"])
    out = capsys.readouterr().out
    assert out.count("result: ok") == 1 and "poison: cached" in out
    assert main(["leaderboard", "--matrix", "tiny", "--results", str(results), "--metric", "best"]) == 0
    assert "best" in capsys.readouterr().out
    assert main(["leaderboard", "--matrix", "nope", "--results", str(results)]) == 2


def test_kill_9_then_rerun_keeps_recorded_cells(tmp_path):
    """kill -9 mid-run: every recorded cell is kept and only the missing ones run afterwards."""
    text = TINY.format(extra_countermeasures="bdr = {}\ngrayscale = {}\nmedian_filter = {}\njpeg = {}")
    matrix = tiny_matrix(tmp_path, text=text.replace("epochs = 2", "epochs = 4"))
    results = tmp_path / "r"
    log = results / "runs" / "tiny" / "records.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--matrix", str(matrix), "--results", str(results),
                             "--jobs", "1"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = RecordLog(log).read()
    assert 2 <= len(before) < 10, "the run should have been killed part-way"
    rerun = run_subprocess(["run", "--matrix", str(matrix), "--results", str(results), "--jobs", "1"], tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{10 - len(before)} trained, {len(before)} already recorded" in rerun.stdout
    after = RecordLog(log).read()
    assert after[:len(before)] == before and len({r.cell for r in after}) == 10 == len(after)


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (from /proc, Linux)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_stops_the_worker_processes_with_the_run(tmp_path):
    """kill (SIGTERM) mid-run with --jobs 2: the run exits and its worker processes do not go on computing cells."""
    text = TINY.format(extra_countermeasures="bdr = {}\ngrayscale = {}\nmedian_filter = {}\njpeg = {}")
    matrix = tiny_matrix(tmp_path, text=text.replace("epochs = 2", "epochs = 30"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--matrix", str(matrix), "--results",
                             str(tmp_path / "r"), "--jobs", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 120, set()
    while time.time() < deadline and len(workers) < 2:
        workers = {p for p in _children(proc.pid) if "bench.execute.pool" in (Path(f"/proc/{p}/cmdline").read_text(errors="replace")
                                                                 if Path(f"/proc/{p}/cmdline").exists() else "")}
        time.sleep(0.2)
    assert workers, "the run never started its worker processes"
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
        time.sleep(0.2)
    alive = [p for p in workers if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"worker processes {alive} outlived the run"


def test_cwp_protects_real_data(tmp_path):
    """Behaviour, not a stub: a CNN trained on class-wise-patched digits scores far below one trained on
    clean digits (the smoke matrix's settings)."""
    text = TINY.format(extra_countermeasures="").replace("per_class = 20\ntest_per_class = 10\n", "").replace(
        "epochs = 2", "epochs = 10").replace("width = 8", "width = 16")
    matrix = tiny_matrix(tmp_path, text=text)
    assert main(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--jobs", "2"]) == 0
    acc = {r.protection: r.test_acc_final for r in records(tmp_path / "r")}
    assert acc["clean"] >= 0.85 and acc["cwp"] <= acc["clean"] - 0.30, acc


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_tiny_matrix_on_gpu_matches_cpu_shape(tmp_path):
    """On a GPU the same matrix runs (bf16 autocast, channels_last) and records the CUDA device."""
    matrix = tiny_matrix(tmp_path)
    assert main(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--device", "cuda"]) == 0
    recs = records(tmp_path / "r")
    assert len(recs) == 4 and all(r.status == "ok" and r.device.startswith("cuda") for r in recs)


def test_cuda_requested_without_gpu_exits_2(tmp_path, capsys):
    """Asking for CUDA where there is none is a configuration error, caught before running."""
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["run", "--matrix", str(tiny_matrix(tmp_path)), "--results", str(tmp_path / "r"),
                 "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_each_worker_keeps_one_device_for_its_lifetime():
    """Several workers on several devices: each job runs on its worker's device, each worker always on the same one
    (checked with CPU workers; ``devices.slots`` assigns GPUs round robin, tested in test_workers)."""
    from bench.execute.backends import Local
    from bench.execute.scheduler import _call
    from conftest import hold_device

    results, lost = [], []
    backend = Local(2, ["cpu"], 1)
    try:
        jobs = [types.SimpleNamespace(i=i, threads=1, key=str(i)) for i in range(6)]
        backend.map(_call, hold_device, jobs, results.append, lambda job, why: lost.append(why))
        backend.map(_call, hold_device, jobs[:2], results.append, lambda job, why: lost.append(why))
    finally:
        backend.close()
    assert not lost and len(results) == 8 and {r["device"] for r in results} == {"cpu"}
    assert len({r["pid"] for r in results}) == 2, "two worker processes ran every job, across both stages"
    assert os.getpid() not in {r["pid"] for r in results}


def test_component_progress_logs_reach_stderr_of_a_run_process():
    """Long protections (EM's rounds) log at INFO; a run prints those, and keeps other libraries quiet."""
    code = ("import logging; from bench.execute.scheduler import show_progress; show_progress(); "
            "logging.getLogger('bench.protections.em').info('em round 1: surrogate error 0.5'); "
            "logging.getLogger('urllib3').info('library chatter')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "bench.protections.em: em round 1: surrogate error 0.5" in proc.stderr
    assert "library chatter" not in proc.stderr
