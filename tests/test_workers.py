"""Worker processes a run survives losing (``bench.execute.pool``): a dead worker fails its cell only and is
replaced, a one-job stage still runs in a worker, a killed run takes its workers with it, a worker whose CUDA context
broke is replaced, and devices are explicit (``bench.execute.devices``, CUDA faked where needed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from bench.core.registry import ConfigError
from bench.execute import devices
from bench.execute.backends import Local
from bench.store.records import RecordLog
from conftest import REPO, TINY, run_subprocess

PLUGIN = '''
import os, pathlib, signal, time
from torch import nn
from bench.api import VICTIMS, Victim

def _net(num_classes, in_channels, image_size):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size * image_size, num_classes))

@VICTIMS.register("dies_once")
class DiesOnce(Victim):
    """Kills its own process (as the OOM killer would) the first time it is built."""
    paper = "test"
    def build(self, num_classes, in_channels, image_size):
        mark = pathlib.Path(os.environ["WORKER_TEST_MARK"])
        if not mark.exists():
            mark.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return _net(num_classes, in_channels, image_size)

@VICTIMS.register("sleeper")
class Sleeper(Victim):
    paper = "test"
    def build(self, num_classes, in_channels, image_size):
        time.sleep(120)
        return _net(num_classes, in_channels, image_size)

@VICTIMS.register("poisons")
class Poisons(Victim):
    """Trains normally, then makes its worker believe its CUDA context broke (a device-side assert)."""
    paper = "test"
    def build(self, num_classes, in_channels, image_size):
        import bench.execute.devices as devices
        devices.context_usable = lambda device: False
        return _net(num_classes, in_channels, image_size)
'''


def matrix(tmp_path: Path, victims: str, protections: str = "clean = {}\ncwp = { size_fraction = 0.375 }") -> Path:
    text = TINY.format(extra_countermeasures="").replace("clean = {}\ncwp = { size_fraction = 0.375 }", protections)
    path = tmp_path / "w.toml"
    path.write_text(text.replace("[victims.cnn]\nwidth = 8\n", victims))
    return path


def plugin_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "plugins").mkdir(exist_ok=True)
    (tmp_path / "plugins" / "faults.py").write_text(PLUGIN)
    return {"BENCH_PLUGINS": str(tmp_path / "plugins"), "WORKER_TEST_MARK": str(tmp_path / "mark")}


def latest(results: Path) -> dict:
    return RecordLog(results / "runs" / "w" / "records.jsonl").latest()


def test_a_dead_worker_fails_its_cell_only_and_retry_failed_completes(tmp_path):
    """kill -9 of a worker (here by the victim itself) used to abort the whole run with a joblib traceback."""
    path, env = matrix(tmp_path, '[victims.cnn]\nwidth = 8\n[victims.dies_once]\n'), plugin_env(tmp_path)
    args = ["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--jobs", "2"]
    proc = run_subprocess(args, tmp_path, env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "dies_once (seed 0" in proc.stderr and "the worker process died (SIGKILL" in proc.stderr, proc.stderr[-1500:]
    recs = latest(tmp_path / "r")
    assert len(recs) == 4 and sum(not r.ok for r in recs.values()) == 1, [(r.victim, r.status) for r in recs.values()]
    assert not list((tmp_path / "r" / "claims" / "train").glob("*.claim")), "the dead worker's claim was released"
    again = run_subprocess([*args, "--retry-failed"], tmp_path, env)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(r.ok for r in latest(tmp_path / "r").values())


def test_a_stage_of_one_job_runs_in_a_worker_with_jobs_2(tmp_path):
    """With one job the stage ran in the driver: a crash there killed the run outright (exit -9)."""
    path, env = matrix(tmp_path, "[victims.dies_once]\n", protections="clean = {}"), plugin_env(tmp_path)
    proc = run_subprocess(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--jobs", "2"], tmp_path,
                          env)
    assert proc.returncode == 1 and "worker process died" in proc.stderr, (proc.returncode, proc.stderr[-1500:])


def test_a_worker_whose_cuda_context_broke_is_replaced(tmp_path):
    """After a job that leaves the context unusable, the worker exits and a fresh one runs the next jobs."""
    path, env = matrix(tmp_path, "[victims.poisons]\n[victims.cnn]\nwidth = 8\n"), plugin_env(tmp_path)
    proc = run_subprocess(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--jobs", "2"], tmp_path,
                          env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(r.ok for r in latest(tmp_path / "r").values()) and len(latest(tmp_path / "r")) == 4
    assert proc.stderr.count("started a fresh worker") >= 1, proc.stderr[-1500:]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_kill_9_of_the_run_stops_its_workers_within_seconds(tmp_path):
    """loky workers outlived a killed driver by about 5.5 minutes, still computing and recording."""
    path, env = matrix(tmp_path, "[victims.sleeper]\n"), plugin_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--matrix", str(path), "--results",
                             str(tmp_path / "r"), "--jobs", "2"], cwd=tmp_path, env={**os.environ, **env,
                            "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    deadline = time.time() + 120
    while time.time() < deadline and len(workers) < 2:
        workers = [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
                   if "bench.execute.pool" in p.read_text(errors="replace") and
                   f"\0{proc.pid}\0" in p.read_text(errors="replace")] if Path("/proc").exists() else []
        time.sleep(0.3)
    assert len(workers) == 2, "the run never started its workers"
    time.sleep(3)  # into the sleeping build
    proc.kill()
    proc.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers), "workers outlived the killed run by 10 s"


@pytest.fixture
def four_gpus(monkeypatch):
    """This machine as a 4-GPU one, for what is decided before CUDA is touched."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_device_lists_and_one_job_per_listed_gpu(four_gpus):
    """--device cuda:N without --jobs used to start one job per CPU core, all on that GPU."""
    assert devices.parse("cuda:1") == ["cuda:1"] and devices.default_jobs(["cuda:1"], threads=1) == 1
    assert devices.parse("cuda:0,2") == ["cuda:0", "cuda:2"] and devices.default_jobs(devices.parse("cuda"), 1) == 4
    assert devices.parse("auto") == [f"cuda:{i}" for i in range(4)]
    assert devices.slots(["cuda:0", "cuda:2"], 3) == ["cuda:0", "cuda:2", "cuda:0"]
    for wrong, message in (("cuda:4", "has 4 GPU"), ("cuda:0,0", "without repeats"), ("gpu", "expected auto")):
        with pytest.raises(ConfigError, match=message):
            devices.parse(wrong)


def test_dry_run_with_device_cuda_n_plans_one_job(four_gpus, tmp_path, capsys):
    from bench.cli import main

    path = tmp_path / "t.toml"
    path.write_text(TINY.format(extra_countermeasures=""))
    for device, jobs in (("cuda:1", "1 job;"), ("cuda:0,3", "2 jobs;"), ("cuda", "4 jobs;")):
        assert main(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--device", device,
                     "--dry-run"]) == 0
        assert f"({jobs}" in capsys.readouterr().out


def test_gpu_jobs_never_run_in_the_driver():
    """--jobs 1 on a GPU ran every job in the driver: one device-side assert failed the rest of the grid."""
    assert Local(1, ["cpu"], 1).in_process and not Local(1, ["cuda:0"], 1).in_process
    assert not Local(2, ["cpu"], 1).in_process


def test_a_worker_pins_its_gpu_and_the_cudnn_flags(monkeypatch):
    pinned = []
    monkeypatch.setattr(torch.cuda, "set_device", pinned.append)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: pinned.append(("deterministic", a)))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    devices.pin("cuda:3", threads=torch.get_num_threads(), deterministic=False)
    assert pinned == [("deterministic", (False,)), torch.device("cuda:3")] and torch.backends.cudnn.benchmark
    devices.pin("cuda:3", threads=torch.get_num_threads(), deterministic=True)
    assert ("deterministic", (True,)) in pinned and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")


def test_context_probe_is_true_on_cpu():
    assert devices.context_usable("cpu")


def test_deterministic_names_the_components_that_cannot_honour_it_and_is_recorded(tmp_path, capsys):
    """--deterministic on CUDA: the planner names cnn (AdaptiveAvgPool2d backward) and TAP (grid_sample backward),
    surrogates included; every record says whether the run asked for it."""
    from bench.cli import main
    from bench.plan.matrix import expand, parse_matrix
    from bench.plan.planner import check_cells

    text = TINY.format(extra_countermeasures="").replace("cwp = { size_fraction = 0.375 }",
                                                         'tap = { surrogate = "resnet20" }')
    notes: list[str] = []
    check_cells(expand(parse_matrix(tomllib.loads(text), "t")), "cuda", notes.append, deterministic=True)
    assert any("cnn cannot honour it (AdaptiveAvgPool2d(2)" in n for n in notes)
    assert any("tap cannot honour it (grid_sample" in n for n in notes) and not any("resnet20" in n for n in notes)
    notes.clear()
    check_cells(expand(parse_matrix(tomllib.loads(text.replace('"resnet20"', '"lenet"')), "t")), "cuda", notes.append,
                deterministic=True)
    assert any("lenet cannot honour it" in n for n in notes), "a surrogate's own nondeterminism is named"
    notes.clear()
    check_cells(expand(parse_matrix(tomllib.loads(text), "t")), "cuda", notes.append)
    assert not any("deterministic" in n for n in notes)
    path = tmp_path / "d.toml"
    path.write_text(TINY.format(extra_countermeasures=""))
    assert main(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--device", "cpu", "--jobs", "1",
                 "--deterministic", "--only", "protection=clean"]) == 0
    recs = RecordLog(tmp_path / "r" / "runs" / "d" / "records.jsonl").read()
    assert recs and all(r.deterministic is True for r in recs)
    import bench

    result = bench.run(tomllib.loads(TINY.format(extra_countermeasures="")), results=tmp_path / "api", device="cpu",
                       only=("protection=clean", "countermeasure=none"), deterministic=True, out=lambda line: None)
    assert result.counts.trained == 1 and bench.records(results=tmp_path / "api")["deterministic"].tolist() == [True]



def test_auto_says_so_when_a_gpu_is_present_that_torch_cannot_use(monkeypatch, capsys):
    """--device auto fell back to the CPU silently when the driver was too old for torch's CUDA build."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "Path", lambda path: type("P", (), {"exists": lambda self: path == "/dev/nvidia0"})())
    with pytest.warns(UserWarning, match="NVIDIA GPU is present"):
        assert devices.parse("auto") == ["cpu"]
    assert "CUDA unusable" in capsys.readouterr().err


def test_a_table_mixing_cpu_and_gpu_cells_says_so():
    """A shared results folder could put CPU-fp32 and GPU-bf16 cells in one table without a word."""
    import pandas as pd

    from bench.report.leaderboard import mixed_settings

    group = pd.DataFrame({"status": ["ok", "ok", "ok", "error"], "device": ["cpu", "cuda:0", "cuda:1", "cpu"],
                          "precision": ["fp32", "bf16", "bf16", None]})
    assert mixed_settings(group) == ("mixed devices/precisions: cpu fp32 (1 cells), cuda bf16 (2 cells)",)
    assert mixed_settings(group.iloc[1:3]) == ()


def test_one_device_commands_resolve_and_check_their_device(four_gpus):
    """bench protect, perf and selfcheck each resolved --device their own way; perf took any string as given."""
    assert devices.single("auto") == torch.device("cuda:0") and devices.single("cuda:2") == torch.device("cuda:2")
    assert devices.single("cpu") == torch.device("cpu")
    for wrong, message in (("cuda:0,1", "uses one device"), ("cuda:9", "has 4 GPU"), ("tpu", "expected auto")):
        with pytest.raises(ConfigError, match=message):
            devices.single(wrong)


def _workers_of(pid: int) -> list[int]:
    return [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
            if "bench.execute.pool" in (text := p.read_text(errors="replace")) and f"\0{pid}\0" in text]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ctrl_c_stops_the_run_without_a_traceback_from_each_worker(tmp_path):
    """Ctrl-C reaches the terminal's process group: the driver's, not the workers' (each has its own), and the
    driver stops them; they used to print a traceback each."""
    path, env = matrix(tmp_path, "[victims.sleeper]\n"), plugin_env(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--matrix", str(path), "--results",
                             str(tmp_path / "r"), "--jobs", "2"], cwd=tmp_path, env={**os.environ, **env,
                            "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # Python keeps SIGINT ignored where its parent ignored it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # (pytest-xdist's)
    deadline = time.time() + 120
    while time.time() < deadline and len(_workers_of(proc.pid)) < 2:
        time.sleep(0.3)
    workers = _workers_of(proc.pid)
    assert len(workers) == 2, "the run never started its workers"
    time.sleep(3)  # into the sleeping build
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the run went on after Ctrl-C: {proc.communicate()[1][-2000:]}") from None
    assert proc.returncode != 0 and "in serve" not in err, err[-2000:]
    assert not any(_alive(p) for p in workers)
