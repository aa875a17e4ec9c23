"""Claims and locks on damaged or contested state (audit defects 10, 12, 13, 18): future-dated, unreadable and
dead-holder claims are taken over with a warning; a worker whose claim was taken over (suspended past the stale
timeout) records nothing twice; tombstones are pruned; lock waits time out naming the holder."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.core.registry import ConfigError
from bench.execute.claimed import Stage, claimed
from bench.execute.claims import Claims
from bench.execute.stages import TrainJob
from bench.store.locks import LockTimeout, identity, locked
from bench.store.records import RecordLog
from tests.conftest import make_record

DAY = 86400.0


def _put_claim(claims: Claims, key: str, holder: dict | None = None, raw: bytes | None = None, age: float = 0.0,
               stage: str = "train") -> Path:
    """A claim file another worker left: ``holder`` as JSON (or ``raw`` bytes), last touched ``age`` s ago."""
    path = claims.path(stage, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw if raw is not None else json.dumps({"token": "theirs", "started": time.time(), **(holder or {})
                                                             }).encode())
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _wait_polls(claims: Claims, key: str, limit: int = 40) -> list[str]:
    """``claims.wait`` on ``key``, failing (instead of hanging) after ``limit`` polls."""
    polls = []

    def done(items: list[str]) -> list[str]:
        polls.append(1)
        assert len(polls) < limit, f"still waiting on {key} after {limit} polls"
        return []
    return claims.wait("train", [key], str, done, lambda item: None)


def test_a_future_dated_claim_is_taken_over_with_a_warning_and_not_waited_for(tmp_path, capsys):
    claims = Claims(tmp_path, stale=60, poll=0.01)
    path = _put_claim(claims, "k", {"host": "elsewhere", "pid": 4242}, age=-DAY)  # a restored copy, or clock skew
    assert not claims.live("train", "k")
    assert _wait_polls(claims, "k") == ["k"]  # the audit's run waited 150 s here
    with claims.claim("train", "k") as held:
        assert held.took_over and claims.holder("train", "k")["token"] == held.token
    err = capsys.readouterr().err
    assert str(path) in err and "host elsewhere" in err and "pid 4242" in err and "in the future" in err


@pytest.mark.parametrize("raw", [b"", b"{not json", b"42", b"\xff\xfe\x00", b'{"pid": 1}'])
def test_an_unreadable_claim_is_taken_over_after_a_grace(tmp_path, capsys, raw):
    claims = Claims(tmp_path, stale=60, heartbeat=1.0)
    path = _put_claim(claims, "k", raw=raw, age=0.0)
    assert claims.live("train", "k") and claims.claim("train", "k") is None  # it may be being written
    os.utime(path, (time.time() - 2, time.time() - 2))  # older than a heartbeat
    assert not claims.live("train", "k")
    held = claims.claim("train", "k")
    assert held is not None and held.took_over
    held.release()
    assert "unreadable" in capsys.readouterr().err


def test_a_claim_of_a_dead_process_of_this_host_is_taken_over_at_once(tmp_path, capsys):
    claims = Claims(tmp_path, stale=60, poll=0.01)
    pid = _dead_pid()
    _put_claim(claims, "k", {**identity(), "pid": pid})
    assert not claims.live("train", "k") and _wait_polls(claims, "k") == ["k"]
    held = claims.claim("train", "k")
    assert held is not None and held.took_over
    held.release()
    assert f"pid {pid} on this host" in capsys.readouterr().err
    # a live process of this host, and a pid of another host, keep theirs until the heartbeat stops
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _put_claim(claims, "live", {**identity(), "pid": sleeper.pid})
        _put_claim(claims, "remote", {**identity(), "host": socket.gethostname() + "-other", "pid": pid})
        assert claims.claim("train", "live") is None and claims.claim("train", "remote") is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_takeover_prunes_tombstones_older_than_a_day(tmp_path):
    claims = Claims(tmp_path, stale=30)
    folder = claims.path("train", "k").parent
    folder.mkdir(parents=True)
    ages = {"old": DAY + 600, "recent": 3600, "future": -DAY - 600}  # 17 accumulated over the audit's 21 trials
    for name, age in ages.items():
        tombstone = folder / f"{name}.claim.stale-abc"
        tombstone.write_text("{}")
        os.utime(tombstone, (time.time() - age, time.time() - age))
    _put_claim(claims, "k", {"pid": -1}, age=120)  # pid -1 must never be signalled (it means every process)
    claims.claim("train", "k").release()
    left = sorted(p.name.split(".")[0] for p in folder.glob("*.claim.stale-*"))
    assert left == ["k", "recent"]


# ------------------------------------------------------------------ a worker suspended past the stale timeout

def _stages(tmp_path: Path) -> tuple[Stage, Stage, TrainJob]:
    """Worker A (heartbeat every 50 s: it never beats during the test) and worker B (a 0.2 s stale timeout) on one
    results folder, and a cell for them."""
    results = tmp_path / "r"
    log = results / "runs" / "m" / "records.jsonl"
    slow = Stage("train", Claims(results / "claims", stale=100, heartbeat=50), "train", log, results)
    quick = Stage("train", Claims(results / "claims", stale=0.2, heartbeat=0.05), "train", log, results)
    job = TrainJob(tmp_path / "cache", 1, SimpleNamespace(cell_key="k"), "m", {}, None, False)
    return slow, quick, job


def _suspend(stage: Stage) -> None:
    """A's heartbeat seems to have stopped 10 s ago (``kill -STOP``, a laptop asleep)."""
    path = stage.claims.path("train", "k")
    os.utime(path, (time.time() - 10, time.time() - 10))


def test_a_resumed_worker_does_not_record_a_cell_its_taker_recorded(tmp_path):
    a, b, job = _stages(tmp_path)
    outcomes = {}

    def run_a(fn, job, devices):
        _suspend(a)
        outcomes["b"] = claimed(None, job, None, runner=lambda *_: make_record(cell="k", finished_at=1.0), stage=b)
        return make_record(cell="k", finished_at=2.0)  # A resumes with its own result

    outcomes["a"] = claimed(None, job, None, runner=run_a, stage=a)
    assert (outcomes["a"].claim, outcomes["b"].claim) == ("elsewhere", "ran")
    assert [r.finished_at for r in RecordLog(a.log).read()] == [1.0]  # the audit saw 2 records here


def test_a_taker_does_not_record_a_cell_the_resumed_worker_recorded_first(tmp_path):
    a, b, job = _stages(tmp_path)
    suspended, resume, outcomes = threading.Event(), threading.Event(), {}

    def run_a(fn, job, devices):
        _suspend(a)
        suspended.set()
        assert resume.wait(30)
        return make_record(cell="k", finished_at=1.0)

    worker_a = threading.Thread(target=lambda: outcomes.update(a=claimed(None, job, None, runner=run_a, stage=a)))
    worker_a.start()
    assert suspended.wait(30)

    def run_b(fn, job, devices):  # B took the claim over; A resumes and records while B computes
        resume.set()
        worker_a.join(30)
        return make_record(cell="k", finished_at=2.0)

    outcomes["b"] = claimed(None, job, None, runner=run_b, stage=b)
    assert (outcomes["a"].claim, outcomes["b"].claim) == ("ran", "elsewhere")
    assert [r.finished_at for r in RecordLog(a.log).read()] == [1.0]


# ------------------------------------------------------------------ lock timeouts

def _flock(path: Path):
    """Hold ``path`` as ``flock(1)`` does (no holder recorded); returns the open file (close it to release)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")  # noqa: SIM115 (the caller closes it)
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


def test_a_lock_wait_times_out_naming_the_holder(tmp_path):
    lock = tmp_path / "x.lock"
    with locked(lock, what="the test"):
        start = time.time()
        with pytest.raises(LockTimeout) as caught, locked(lock, what="the test", timeout=0.2):
            pass
        assert time.time() - start < 5
    message = str(caught.value)
    assert str(lock) in message and f"pid {os.getpid()} on this host" in message and "still running" in message
    assert "BENCH_LOCK_TIMEOUT" in message and "\n" not in message
    with locked(lock, what="the test", timeout=0.2):  # released with its holder record
        assert json.loads((tmp_path / "x.lock.holder").read_text())["pid"] == os.getpid()
    assert not (tmp_path / "x.lock.holder").exists()


def test_a_lock_held_by_another_program_says_how_to_find_it(tmp_path):
    lock = tmp_path / "x.lock"
    handle = _flock(lock)
    try:
        with pytest.raises(LockTimeout, match="not recorded.*fuser"), locked(lock, what="the test", timeout=0.1):
            pass
        (tmp_path / "x.lock.holder").write_text(json.dumps({**identity(), "pid": _dead_pid(), "since": 0}))
        with pytest.raises(LockTimeout, match="is gone, so another"), locked(lock, what="the test", timeout=0.1):
            pass
    finally:
        handle.close()


def test_the_claims_lock_times_out_instead_of_hanging(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_LOCK_TIMEOUT", "0.3")
    claims = Claims(tmp_path, stale=30)
    _put_claim(claims, "k", {"pid": -1}, age=120)  # stale: taking it over needs the stage folder's lock
    handle, raised = _flock(claims.path("train", "k").parent / ".lock"), []

    def take() -> None:
        try:
            claims.claim("train", "k")
        except LockTimeout as err:
            raised.append(str(err))
    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    taker.join(10)  # the audit's run hung here until killed
    handle.close()
    assert not taker.is_alive() and raised and "the claims in" in raised[0]


def test_the_record_log_lock_times_out(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_LOCK_TIMEOUT", "0.3")
    log = tmp_path / "records.jsonl"
    handle = _flock(tmp_path / "records.jsonl.lock")
    try:
        with pytest.raises(LockTimeout, match="records.jsonl.lock"):
            RecordLog(log).append(make_record())
    finally:
        handle.close()


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf"])
def test_a_bad_lock_timeout_is_a_config_error(tmp_path, monkeypatch, value):
    monkeypatch.setenv("BENCH_LOCK_TIMEOUT", value)
    with pytest.raises(ConfigError, match="BENCH_LOCK_TIMEOUT"), locked(tmp_path / "x.lock", what="the test"):
        pass


def test_a_set_moved_aside_between_two_reads_is_not_done(tmp_path, monkeypatch):
    """Another run may move a damaged entry aside after this one found it: its manifest then fails to read, and the
    set counts as not done (it is rebuilt), rather than ending the stage in a ValueError."""
    from types import SimpleNamespace

    from bench.store.cache import Cache
    from bench.testing import digits_set

    cache = Cache(tmp_path / "cache")
    cache.save("purified", "k", digits_set(), {"spec": {}})
    job = SimpleNamespace(cache=cache.root, key="k", redo=False, plan=SimpleNamespace(purify_fits=()))
    stage = Stage("purify", Claims(tmp_path / "claims"), "purify")
    assert stage.done(job)

    def moved(self, kind, key):
        raise ValueError("manifest.json unreadable: No such file or directory")

    monkeypatch.setattr(Cache, "manifest", moved)
    assert not stage.done(job)
