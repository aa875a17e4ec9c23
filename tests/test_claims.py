"""Claims on keys shared by several workers (one winner, stale takeover, release, waiting), record appends from
several processes, and two `bench run`s on one results folder (each cell trained once; a killed run's claim is
taken over)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.core.registry import ConfigError
from bench.execute.claims import Claims
from bench.store.records import RecordLog
from tests.conftest import make_record

REPO = Path(__file__).resolve().parent.parent
SPAWN = multiprocessing.get_context("spawn")  # children import only bench.execute.claims / bench.store.records, not torch


def _contend(root: str, stale: float, start: float) -> tuple[int, bool]:
    """One contender: at ``start`` claim key ``k`` and keep it (the process exits holding it)."""
    time.sleep(max(0.0, start - time.time()))
    return os.getpid(), Claims(Path(root), stale=stale).claim("train", "k") is not None


def _contest(root: Path, stale: float, n: int = 6) -> list[tuple[int, bool]]:
    with SPAWN.Pool(n) as pool:
        return pool.starmap(_contend, [(str(root), stale, time.time() + 3.0)] * n)


def test_one_of_many_concurrent_claims_wins(tmp_path):
    results = _contest(tmp_path, stale=60)
    winners = [pid for pid, won in results if won]
    assert len(winners) == 1
    holder = Claims(tmp_path).holder("train", "k")
    assert holder["pid"] == winners[0] and holder["key"] == "k" and {"host", "started", "token"} <= set(holder)


def test_stale_claim_is_taken_over_by_exactly_one(tmp_path):
    claims = Claims(tmp_path, stale=30)
    path = claims.path("train", "k")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": -1, "token": "dead"}))
    os.utime(path, (time.time() - 120, time.time() - 120))  # a worker killed two minutes ago
    assert not claims.live("train", "k")
    winners = [pid for pid, won in _contest(tmp_path, stale=30) if won]
    assert len(winners) == 1 and claims.holder("train", "k")["pid"] == winners[0]
    tombstones = list(path.parent.glob("k.claim.stale-*"))
    assert len(tombstones) == 1 and json.loads(tombstones[0].read_text())["token"] == "dead"


def test_live_heartbeat_is_not_taken_over(tmp_path):
    claims = Claims(tmp_path, stale=1.0, heartbeat=0.2)
    with claims.claim("train", "k") as held:
        time.sleep(1.5)  # longer than the stale timeout: only the heartbeat keeps it live
        assert claims.live("train", "k")
        assert not any(won for _, won in _contest(tmp_path, stale=1.0, n=3))
        assert not held.lost
    assert not claims.path("train", "k").exists()


def test_release_frees_the_key_and_spares_a_taker(tmp_path):
    claims = Claims(tmp_path, stale=200, heartbeat=100)
    first = claims.claim("purify", "k")
    assert first is not None and claims.claim("purify", "k") is None
    first.release()
    assert not claims.path("purify", "k").exists()
    second = claims.claim("purify", "k")
    assert second is not None
    os.utime(second.path, (time.time() - 300, time.time() - 300))  # its heartbeat seemed to stop
    taker = Claims(tmp_path, stale=1).claim("purify", "k")
    assert taker is not None
    second.release()  # the presumed-dead worker ends: the taker's claim stays
    assert claims.holder("purify", "k")["token"] == taker.token
    taker.release()


def test_wait_returns_keys_released_without_result_and_reports_done_ones(tmp_path):
    claims = Claims(tmp_path, stale=30, poll=0.05)
    held = [claims.claim("protect", key) for key in ("a", "b")]
    finished: set[str] = set()
    threading.Timer(0.3, lambda: (finished.add("a"), held[0].release())).start()
    threading.Timer(0.6, held[1].release).start()
    seen: list[str] = []
    start = time.time()
    done = lambda keys: [key for key in keys if key in finished]
    assert claims.wait("protect", ["a", "b"], str, done, seen.append) == ["b"]
    assert seen == ["a"] and 0.5 < time.time() - start < 5


@pytest.mark.parametrize("kwargs", [{"stale": 0}, {"stale": 10, "heartbeat": 10}, {"stale": 10, "poll": -1}])
def test_bad_settings_raise_config_error(tmp_path, kwargs):
    with pytest.raises(ConfigError, match="stale"):
        Claims(tmp_path, **kwargs)


def _append(path: str, writer: int, n: int) -> None:
    log = RecordLog(Path(path))
    for i in range(n):
        log.append(make_record(cell=f"{writer}-{i}", error="x" * (20_000 + 97 * i)))


def test_concurrent_appends_give_whole_lines(tmp_path):
    path = tmp_path / "records.jsonl"
    procs = [SPAWN.Process(target=_append, args=(str(path), w, 200)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    lines = path.read_text().splitlines()
    assert len(lines) == 800
    records = [json.loads(line) for line in lines]  # every line parses
    assert {r["cell"] for r in records} == {f"{w}-{i}" for w in range(4) for i in range(200)}


# ------------------------------------------------------------------ two runs on one results folder

def slow_tiny(epochs: int) -> str:
    """conftest's tiny matrix (clean, cwp × none, bdr) with cells long enough to kill one."""
    from conftest import TINY

    return TINY.format(extra_countermeasures="bdr = {}").replace("epochs = 2", f"epochs = {epochs}")


def _start(matrix: str, results: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench", "run", "--matrix", matrix, "--results", str(results),
                             "--jobs", "1", "--device", "cpu", *extra], cwd=results.parent, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _leaderboard(stdout: str) -> str:
    return stdout[stdout.index("###"):]


@pytest.mark.parametrize("matrix", ["tiny", pytest.param("smoke", marks=pytest.mark.slow)])
def test_two_runs_on_one_folder_train_each_cell_once(tmp_path, matrix):
    if matrix == "tiny":
        matrix = str(tmp_path / "tiny.toml")
        Path(matrix).write_text(slow_tiny(20))
    results = tmp_path / "r"
    runs = [_start(matrix, results) for _ in range(2)]
    outs = [run.communicate(timeout=1200) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outs]
    records = RecordLog(next(results.glob("runs/*/records.jsonl"))).read()
    cells = [r.cell for r in records]
    assert len(cells) == len(set(cells)) and all(r.status == "ok" for r in records)
    trained = [int(out.split(" trained")[0].rsplit("— ", 1)[1]) for out, _ in outs]
    assert sum(trained) == len(cells)
    assert f"{len(cells)} cells" in outs[0][0] and _leaderboard(outs[0][0]) == _leaderboard(outs[1][0])
    assert not list(results.glob("claims/**/*.claim"))  # all released


def test_killed_worker_claim_is_taken_over(tmp_path):
    matrix = tmp_path / "tiny.toml"
    matrix.write_text(slow_tiny(60))
    results = tmp_path / "r"
    first = _start(str(matrix), results)
    deadline = time.time() + 240
    while not list(results.glob("claims/train/*.claim")) and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before it claimed a cell"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    orphans = list(results.glob("claims/**/*.claim"))
    second = _start(str(matrix), results, "--stale-after", "2")
    _, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-2000:]
    records = RecordLog(results / "runs" / "tiny" / "records.jsonl").read()
    assert len(records) == 4 and len({r.cell for r in records}) == 4 and all(r.status == "ok" for r in records)
    assert len(list(results.glob("claims/**/*.claim.stale-*"))) == len(orphans) >= 1
    assert not list(results.glob("claims/**/*.claim"))
