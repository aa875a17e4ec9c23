"""`bench run --backend local|submitit|ray`: the same records from every backend (keys and accuracies), option
checks before any work, and two runs of different backends on one folder computing each cell once."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main
from bench.core.registry import ConfigError
from bench.execute.backends import BackendOptions
from bench.store.records import RecordLog
from conftest import REPO

MATRIX = """
description = "tiny backends matrix"
seeds = [0]
[recipe]
name = "quick"
epochs = 6
[datasets.digits]
per_class = 30
test_per_class = 10
[protections]
clean = {}
cwn = { epsilon = 8.0 }
[countermeasures]
none = {}
[victims.cnn]
width = 8
"""


def needs(package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(importlib.util.find_spec(package) is None,
                              reason=f"{package} is not installed (pip install -e '.[cluster]')")


def outcome(results: Path) -> dict[str, tuple]:
    """Each cell's key → its status, labels and test accuracies (final and per epoch)."""
    return {r.cell: (r.status, r.protection, r.countermeasure, r.test_acc_final, r.test_acc)
            for r in RecordLog(results / "runs" / "tiny" / "records.jsonl").read()}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("backends") / "tiny.toml"
    path.write_text(MATRIX)
    return path


@pytest.fixture(scope="module")
def local(matrix) -> dict[str, tuple]:
    results = matrix.parent / "local"
    assert main(["run", "--matrix", str(matrix), "--results", str(results), "--jobs", "2", "--device", "cpu"]) == 0
    records = outcome(results)
    assert len(records) == 2 and all(r[0] == "ok" for r in records.values())
    assert max(r[3] for r in records.values()) > 0.3, "the clean cell learns something, so equal accuracies mean much"
    return records


@pytest.fixture
def ray_session():
    yield
    import ray

    ray.shutdown()


@pytest.mark.slow  # ~30 s each, plus ~20 s for the local run they are compared with
@needs("ray")
def test_ray_gives_the_records_of_local(matrix, local, ray_session, capsys):
    results = matrix.parent / "ray"
    assert main(["run", "--matrix", str(matrix), "--results", str(results), "--jobs", "2", "--device", "cpu",
                 "--backend", "ray"]) == 0
    assert "ray: a local Ray instance" in capsys.readouterr().out
    assert outcome(results) == local


@pytest.mark.slow
@needs("submitit")
def test_submitit_local_executor_gives_the_records_of_local(matrix, local, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no sbatch: submitit's local executor
    monkeypatch.setenv("XDG_CACHE_HOME", str(matrix.parent / "home-cache"))
    results = matrix.parent / "submitit"
    assert main(["run", "--matrix", str(matrix), "--results", str(results), "--jobs", "2", "--device", "cpu",
                 "--backend", "submitit"]) == 0
    assert "no sbatch on PATH, so its local executor" in capsys.readouterr().out
    assert outcome(results) == local
    assert not (results / "submitit").exists(), "submitit's pickles are never in the (shared) results folder"
    assert any((matrix.parent / "home-cache" / "bench" / "submitit").iterdir()), "they are in the user's own folder"


@pytest.mark.slow
@needs("ray")
def test_a_ray_run_and_a_local_run_on_one_folder_compute_each_cell_once(matrix, local):
    results = matrix.parent / "shared"
    runs = [subprocess.Popen([sys.executable, "-m", "bench", "run", "--matrix", str(matrix), "--results", str(results),
                              "--jobs", "1", "--device", "cpu", "--backend", backend], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for backend in ("ray", "local")]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    keys = [r.cell for r in RecordLog(results / "runs" / "tiny" / "records.jsonl").read()]
    assert sorted(keys) == sorted(local), "each cell recorded once between the two runs"
    assert outcome(results) == local


@pytest.mark.parametrize("options, message", [
    (BackendOptions("dask"), "--backend 'dask': expected one of local, submitit, ray"),
    (BackendOptions("ray", slurm_partition="gpu"), "--slurm-partition is an option of --backend submitit"),
    (BackendOptions("local", slurm_time_min=30), "--slurm-time-min is an option of --backend submitit"),
    (BackendOptions("submitit", ray_address="auto"), "--ray-address is an option of --backend ray"),
    (BackendOptions("local", gpus_per_task=1), "--gpus-per-task is for --backend submitit or ray"),
    (BackendOptions("ray", gpus_per_task=0), "--gpus-per-task must be > 0"),
    (BackendOptions("ray", gpus_per_task=-0.5), "--gpus-per-task must be > 0"),
    (BackendOptions("submitit", gpus_per_task=0.5), "Slurm allocates whole GPUs"),
    (BackendOptions("submitit", gpus_per_task=2), "a bench job uses one GPU"),
    (BackendOptions("local", mem_gb=8), "--mem-gb is an option of --backend submitit or ray"),
    (BackendOptions("ray", submitit_folder=Path("x")), "--submitit-folder is an option of --backend submitit"),
    (BackendOptions("submitit", slurm_time_min=0), "--slurm-time-min must be > 0"),
])
def test_bad_backend_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        options.check()


def test_gpus_with_device_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="not with --device cpu"):
        BackendOptions("ray", gpus_per_task=1).check("cpu")


def test_a_missing_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs the package 'ray': pip install -e '\.\[cluster\]'"):
        BackendOptions("ray").check()


@pytest.mark.parametrize("extra, message", [
    (["--backend", "slurm"], "--backend 'slurm'"),
    (["--backend", "ray", "--slurm-partition", "gpu"], "--slurm-partition is an option of --backend submitit"),
    (["--backend", "ray", "--gpus-per-task", "0"], "--gpus-per-task must be > 0"),
])
def test_bad_backend_options_exit_2_before_any_work(tmp_path, capsys, extra, message):
    (tmp_path / "tiny.toml").write_text(MATRIX)
    assert main(["run", "--matrix", str(tmp_path / "tiny.toml"), "--results", str(tmp_path / "r"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_jobs_given_gpus_on_a_cluster_plan_for_cuda():
    """From a login node without GPUs, `--gpus-per-task` makes the estimate and the checks plan for CUDA."""
    assert BackendOptions("ray", gpus_per_task=0.5).target("cpu") == "cuda"
    assert BackendOptions("submitit").target("cpu") == "cpu" and BackendOptions("local").target("cuda:1") == "cuda:1"


class _FakeTask:
    def __init__(self, index: int, fail: bool) -> None:
        self.job_id, self.fail = f"77_{index}", fail

    def result(self):
        if self.fail:
            raise RuntimeError("job 77 was killed: TIMEOUT")
        return f"result {self.job_id}"

    def cancel(self, check: bool = False) -> None:
        pass


def test_submitit_asks_for_the_estimated_limits_and_a_failed_task_is_a_lost_job(monkeypatch, tmp_path):
    """submitit's 5-minute default killed every Slurm job, and one failed job cancelled the whole array."""
    import types as pytypes

    from bench.execute.cluster import Submitit
    from bench.plan.requests import JobRequest

    seen: dict = {}

    class Executor:
        def __init__(self, folder, cluster):
            seen["folder"] = folder

        def update_parameters(self, **parameters):
            seen.update(parameters)

        def map_array(self, fn, fns, jobs, devices):
            return [_FakeTask(i, fail=(i == 1)) for i in range(len(jobs))]

    fake = pytypes.SimpleNamespace(AutoExecutor=Executor, helpers=pytypes.SimpleNamespace(
        as_completed=lambda tasks, poll_frequency: iter(tasks)))
    monkeypatch.setitem(sys.modules, "submitit", fake)
    results, lost = [], []
    backend = Submitit("cuda", 4, 1, 1, tmp_path, "slurm", BackendOptions("submitit", mem_gb=64))
    backend.map(lambda fn, job, device: job, None, ["a", "b", "c"], results.append,
                lambda job, why: lost.append((job, why.reason)), JobRequest(90, 64, 4))
    assert seen["timeout_min"] == 90 and seen["mem_gb"] == 64 and seen["cpus_per_task"] == 4
    assert results == ["result 77_0", "result 77_2"]
    assert lost == [("b", "Slurm task 77_1 failed (limits: 90 min, 64 GB): RuntimeError: job 77 was killed: TIMEOUT")]


def test_ray_workers_get_the_drivers_weights_data_and_hub_settings(monkeypatch):
    """Ray workers got only PYTHONPATH: $BENCH_* weights and data root, and HF_HUB_OFFLINE, never reached them."""
    from bench.execute.backends import worker_env

    for name, value in (("BENCH_DATA_ROOT", "/data"), ("BENCH_CLIP", "/w/clip"), ("HF_HUB_OFFLINE", "1"),
                        ("HF_HOME", "/hf"), ("CUBLAS_WORKSPACE_CONFIG", ":4096:8"), ("UNRELATED", "x")):
        monkeypatch.setenv(name, value)
    env = worker_env()
    assert {k: env[k] for k in ("BENCH_DATA_ROOT", "BENCH_CLIP", "HF_HUB_OFFLINE", "HF_HOME",
                                "CUBLAS_WORKSPACE_CONFIG")} == {"BENCH_DATA_ROOT": "/data", "BENCH_CLIP": "/w/clip",
                                                                 "HF_HUB_OFFLINE": "1", "HF_HOME": "/hf",
                                                                 "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert "UNRELATED" not in env and str(REPO) in env["PYTHONPATH"]


def test_ray_asks_for_memory_and_a_lost_task_is_a_lost_job(monkeypatch):
    import types as pytypes

    from bench.execute.cluster import Ray
    from bench.plan.requests import JobRequest

    class RayError(Exception):
        pass

    seen: dict = {}

    def remote(**options):
        seen.update(options)
        return lambda fn: pytypes.SimpleNamespace(remote=lambda runner, f, job, device: job)

    def get(ref):
        if ref == "b":
            raise RayError("worker crashed: OOM")
        return f"result {ref}"

    fake = pytypes.SimpleNamespace(is_initialized=lambda: True, remote=remote, get=get, cancel=lambda *a, **k: None,
                                   wait=lambda refs, num_returns: (refs[:1], refs[1:]),
                                   exceptions=pytypes.SimpleNamespace(RayError=RayError))
    monkeypatch.setitem(sys.modules, "ray", fake)
    results, lost = [], []
    Ray("cpu", 2, 1, 0.0, BackendOptions("ray")).map(lambda fn, job, device: job, None, ["a", "b"], results.append,
                                                     lambda job, why: lost.append((job, why.reason)),
                                                     JobRequest(30, 8, 2))
    assert seen["memory"] == 8 * 2**30 and seen["num_cpus"] == 2 and seen["max_retries"] == 1
    assert results == ["result a"] and lost == [("b", "Ray task failed: RayError: worker crashed: OOM")]


def test_a_cluster_task_without_an_estimate_gets_the_options_or_a_day_16_gb_and_its_threads():
    """submitit and ray size a task the run gave no estimate for with one default (BackendOptions.request)."""
    from bench.plan.requests import JobRequest

    assert BackendOptions("submitit").request(3) == JobRequest(24 * 60, 16, 3)
    assert BackendOptions("ray", slurm_time_min=30, mem_gb=4, cpus_per_task=2).request(3) == JobRequest(30, 4, 2)
