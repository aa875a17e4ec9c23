"""Claims on the keys of a results folder that several runs share: a worker claims a key before computing it,
beats while it works and releases the claim once the result is written; a claim whose heartbeat stopped (a killed
worker) is taken over. A claim is ``<results>/claims/<stage>/<key>.claim`` (JSON: host, pid, start time, token),
created with ``O_CREAT | O_EXCL`` (one creator wins); a daemon thread touches its mtime every ``heartbeat`` s.

A claim may be taken over (``Claims.stale_reason``, which ``claim``, ``live`` and ``wait`` all follow) when it is
untouched for ``stale`` s, dated more than ``stale`` s in the future (clock skew, a restored copy), unreadable for
longer than a heartbeat (a claim is written just after its creation), or held by a process of this host that no
longer runs; each takeover is reported on stderr. It is renamed to a tombstone (``<key>.claim.stale-<token>``,
kept a day for inspection) and created anew. Takeover and release happen under the stage folder's lock
(``bench.store.locks``, which times out naming its holder), so that one of several takers succeeds and nobody
removes a claim another just made.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

from bench.core.registry import ConfigError
from bench.store.locks import alive, describe, identity, locked, read_holder

DEFAULT_STALE = 60.0  # seconds without a heartbeat after which a claim is taken over
TOMBSTONE_DAYS = 1.0  # a taken-over claim is kept this long (the takeover's warning named it already)
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

    def lock(self, stage: str) -> contextlib.AbstractContextManager[None]:
        """The stage folder's lock: claims are replaced only under it (taken over, or released)."""
        return _lock(Path(self.root) / stage)

    def claim(self, stage: str, key: str) -> Claim | None:
        """Claim ``key`` (taking over a stale claim), or None while another live worker holds it."""
        path = self.path(stage, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        info = {**identity(), "started": time.time(), "token": token, "stage": stage, "key": key}
        if _create(path, info):
            return Claim(path, token, self.interval)
        with self.lock(stage):
            try:
                why, holder = self.stale_reason(stage, key), read_holder(path)
                if why is None:
                    return None
                tombstone = path.with_name(f"{path.name}.stale-{token}")
                os.rename(path, tombstone)
                with contextlib.suppress(OSError):
                    os.utime(tombstone)  # its age is the takeover's: see _prune
            except FileNotFoundError:  # released meanwhile
                why = None
            if not _create(path, info):  # a creator (who needs no lock) came first
                return None
            _prune(path.parent)
        if why is not None:
            who = describe(holder) if holder else "an unknown holder"
            print(f"bench: warning: took over the claim {path} of {who}: {why} (kept as {tombstone.name})",
                  file=sys.stderr)
        return Claim(path, token, self.interval, took_over=why is not None)

    def stale_reason(self, stage: str, key: str) -> str | None:
        """Why the claim on ``key`` may be taken over, or None while it is live; FileNotFoundError without one."""
        path = self.path(stage, key)
        age = time.time() - os.stat(path).st_mtime
        holder = read_holder(path)
        if -age > self.stale:
            return f"its heartbeat is dated {-age:.0f} s in the future (clock skew, or a restored copy)"
        if holder is None or not isinstance(holder.get("token"), str):
            # a claim is written just after its O_EXCL creation: one seen empty may be being written
            return f"its contents are unreadable, {age:.0f} s after its last change" if age > self.interval else None
        if alive(holder) is False:
            return "its process ended without releasing it"
        if age > self.stale:
            return f"no heartbeat for {age:.0f} s (the limit is {self.stale:g} s: --stale-after)"
        return None

    def live(self, stage: str, key: str) -> bool:
        """Whether a claim on ``key`` exists that may not be taken over (``stale_reason``)."""
        try:
            return self.stale_reason(stage, key) is None
        except FileNotFoundError:
            return False

    def holder(self, stage: str, key: str) -> dict[str, Any] | None:
        """The claim's contents (host, pid, started …; live or not), or None."""
        return read_holder(self.path(stage, key))

    def release_held_by(self, stage: str, key: str, pid: int) -> bool:
        """Delete the claim on ``key`` if a process ``pid`` of this host holds it (a worker that died); True if so."""
        path = self.path(stage, key)
        with self.lock(stage):
            holder = self.holder(stage, key) or {}
            if holder.get("pid") != pid or holder.get("host") != identity()["host"]:
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
    """A held claim: beats from a daemon thread until released (use it as a context manager). ``took_over``: it
    replaced another worker's claim; ``lost``: another worker's replaced it (seen by the heartbeat)."""

    def __init__(self, path: Path, token: str, interval: float, took_over: bool = False) -> None:
        self.path, self.token, self.lost, self.took_over = path, token, False, took_over
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
        return (read_holder(self.path) or {}).get("token") == self.token

    def contested(self) -> bool:
        """Whether another worker may have computed this key too: this claim took over another's, or was taken over
        (a worker suspended past the stale timeout): then the result is recorded only if none is yet."""
        return self.took_over or self.lost or not self._mine()

    def release(self) -> None:
        """Stop the heartbeat and delete the claim (if it is still this worker's)."""
        self._stop.set()
        self._thread.join()
        with _lock(self.path.parent):
            if self._mine():
                self.path.unlink()

    def __enter__(self) -> Self:
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


def _lock(folder: Path) -> contextlib.AbstractContextManager[None]:
    return locked(folder / ".lock", what=f"the claims in {folder}")


def _prune(folder: Path) -> None:
    """Delete tombstones older than ``TOMBSTONE_DAYS`` (their mtime is their takeover's; a future one is suspect)."""
    now = time.time()
    for tombstone in folder.glob("*.claim.stale-*"):
        with contextlib.suppress(OSError):
            if abs(now - tombstone.stat().st_mtime) > TOMBSTONE_DAYS * 86400:
                tombstone.unlink()
