"""Claims on the keys of a results folder that several runs share: a worker claims a key before computing it,
beats while it works and releases the claim once the result is written; a claim whose heartbeat stopped (a killed
worker) is taken over. A claim is ``<results>/claims/<stage>/<key>.claim`` (JSON: host, pid, start time, token),
created with ``O_CREAT | O_EXCL`` (one creator wins); a daemon thread touches its mtime every ``heartbeat`` s. One
untouched for ``stale`` s is renamed to a tombstone (``<key>.claim.stale-<token>``) and created anew; takeover and
release happen under the stage folder's ``filelock`` lock, so that one of several takers succeeds and nobody
removes a claim another just made.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

from filelock import FileLock

from bench.core.registry import ConfigError

DEFAULT_STALE = 60.0  # seconds without a heartbeat after which a claim is taken over
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Claims:
    """The claims under ``root``; ``heartbeat`` defaults to min(5 s, stale / 4); ``poll`` is the wait's period."""

    root: Path
    stale: float = DEFAULT_STALE
    heartbeat: float | None = None
    poll: float = 1.0

    def __post_init__(self) -> None:
        if not (self.stale > 0 and self.poll > 0 and 0 < self.interval < self.stale):
            raise ConfigError(f"claims: need a stale timeout > 0 (--stale-after S; got {self.stale}), a poll period "
                              f"> 0 (got {self.poll}) and 0 < heartbeat < stale (got {self.interval}; leave it unset "
                              "for min(5, stale / 4))")

    @property
    def interval(self) -> float:
        return self.heartbeat if self.heartbeat is not None else min(5.0, self.stale / 4)

    def path(self, stage: str, key: str) -> Path:
        return Path(self.root) / stage / f"{key}.claim"

    def claim(self, stage: str, key: str) -> Claim | None:
        """Claim ``key`` (taking over a stale claim), or None while another live worker holds it."""
        path = self.path(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": token,
                "stage": stage, "key": key}
        if not _create(path, info):
            with _lock(path.parent):  # a claim is replaced only under it (taken over here, or released)
                try:
                    if time.time() - os.stat(path).st_mtime <= self.stale:
                        return None
                    os.rename(path, path.with_name(f"{path.name}.stale-{token}"))
                except FileNotFoundError:  # released meanwhile
                    pass
                if not _create(path, info):  # a creator (who needs no lock) came first
                    return None
        return Claim(path, token, self.interval)

    def live(self, stage: str, key: str) -> bool:
        """Whether a claim on ``key`` exists with a heartbeat younger than ``stale`` seconds."""
        try:
            return time.time() - os.stat(self.path(stage, key)).st_mtime <= self.stale
        except FileNotFoundError:
            return False

    def holder(self, stage: str, key: str) -> dict[str, Any] | None:
        """The claim's contents (host, pid, started …; live or not), or None."""
        try:
            return json.loads(self.path(stage, key).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def release_held_by(self, stage: str, key: str, pid: int) -> bool:
        """Delete the claim on ``key`` if a process ``pid`` of this host holds it (a worker that died); True if so."""
        path = self.path(stage, key)
        with _lock(path.parent):
            holder = self.holder(stage, key) or {}
            if holder.get("pid") != pid or holder.get("host") != socket.gethostname():
                return False
            path.unlink(missing_ok=True)
            return True

    def wait(self, stage: str, pending: list[T], key: Callable[[T], str], done: Callable[[list[T]], list[T]],
             on_done: Callable[[T], None]) -> list[T]:
        """Poll until some of ``pending`` (keys others claimed) are free to claim again (released or stale) or all are
        done (``done(items)`` says which are); ``on_done`` sees each done one; returns those not done."""
        while pending:
            finished = {id(item) for item in done(pending)}
            for item in (item for item in pending if id(item) in finished):
                on_done(item)
            pending = [item for item in pending if id(item) not in finished]
            if any(not self.live(stage, key(item)) for item in pending):
                return pending
            time.sleep(self.poll)
        return []


class Claim:
    """A held claim: beats from a daemon thread until released (use it as a context manager)."""

    def __init__(self, path: Path, token: str, interval: float) -> None:
        self.path, self.token, self.lost = path, token, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True, name=f"claim {path.name}")
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                if not self._mine():
                    raise FileNotFoundError(self.path)
                os.utime(self.path)
            except FileNotFoundError:  # taken over: this worker was thought dead (its result is the same anyway)
                self.lost = True
                return

    def _mine(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.token
        except (OSError, json.JSONDecodeError):
            return False

    def release(self) -> None:
        """Stop the heartbeat and delete the claim (if it is still this worker's)."""
        self._stop.set()
        self._thread.join()
        with _lock(self.path.parent):
            if self._mine():
                self.path.unlink()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create(path: Path, info: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        json.dump(info, handle)
    return True


def _lock(folder: Path) -> FileLock:  # filelock rather than fcntl by hand: it also serves filesystems without flock
    return FileLock(str(folder / ".lock"), mode=0o666)  # the umask applies: group-shared folders stay shared
