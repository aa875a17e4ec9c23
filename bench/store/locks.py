"""File locks that say who holds them: ``locked`` takes a ``filelock`` lock with a timeout (``$BENCH_LOCK_TIMEOUT``,
default ``DEFAULT_TIMEOUT`` s) and, while held, records its holder (host, pid, since when) in a sidecar
``<lock>.holder``; a wait that times out raises ``LockTimeout`` naming the lock, its holder (and, on this host,
whether that process still runs) and the fix. The holder identity and its liveness check also serve the claims
(``bench.execute.claims``).

The locks guarded here are held for milliseconds (a record append, a claim takeover or release), so a wait of
minutes means a stopped process (``kill -STOP``, a hung filesystem) or another program holding the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from bench.core.registry import ConfigError

DEFAULT_TIMEOUT = 120.0  # seconds a lock is waited for
TIMEOUT_ENV = "BENCH_LOCK_TIMEOUT"  # forwarded to workers with the other BENCH_* variables


class LockTimeout(TimeoutError):
    """A lock was not acquired in time; the message names the lock, its holder and the fix (the CLI: exit 1)."""


def lock_timeout() -> float:
    """Seconds to wait for a lock: ``$BENCH_LOCK_TIMEOUT`` or ``DEFAULT_TIMEOUT``."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"${TIMEOUT_ENV} must be a number of seconds > 0 (got {text!r}): fix it, or unset it for "
                          f"the default {DEFAULT_TIMEOUT:g} s")
    return value


def identity() -> dict[str, Any]:
    """This process as a lock or claim holder: host name, pid and pid namespace (a container on the same host)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pidns": _pid_namespace()}


def alive(holder: dict[str, Any]) -> bool | None:
    """Whether the process ``holder`` (an ``identity()``) still runs; None where this process cannot tell (another
    host or pid namespace, or no pid)."""
    pid = holder.get("pid")
    if (holder.get("host") != socket.gethostname() or holder.get("pidns") != _pid_namespace()
            or type(pid) is not int or pid <= 0):  # pid <= 0 would signal a whole process group
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, OSError):
        return None
    return True


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    """``pid N on this host (since 12:03:04, 130 s ago; still running)``, or on host H (not checkable here)."""
    now = time.time() if now is None else now
    started = holder.get("since", holder.get("started"))
    since = (f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}, {now - started:.0f} s ago"
             if isinstance(started, (int, float)) and math.isfinite(started) else "start unknown")
    state = {True: "still running", False: "no longer running", None: "this host cannot check it"}[alive(holder)]
    where = "this host" if holder.get("host") == socket.gethostname() else f"host {holder.get('host', '?')}"
    return f"pid {holder.get('pid', '?')} on {where} ({since}; {state})"


def read_holder(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path`` (a lock's sidecar, a claim), or None if absent or unreadable."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


@contextlib.contextmanager
def locked(path: Path | str, *, what: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the file lock ``path`` (``what`` names what it guards, for the error), waiting at most ``timeout`` s
    (default ``lock_timeout()``); raises ``LockTimeout`` naming the holder otherwise."""
    path = Path(path)
    wait = lock_timeout() if timeout is None else timeout
    # filelock rather than fcntl by hand: it also serves filesystems without flock; mode: the umask applies, so
    # group-shared folders stay shared
    lock = FileLock(str(path), mode=0o666)
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        raise LockTimeout(_timeout_message(path, what, wait)) from None
    sidecar = _sidecar(path)
    try:
        _record_holder(sidecar)
        yield
    finally:
        try:
            sidecar.unlink(missing_ok=True)  # before the release: a sidecar seen by a waiter names the holder
        except OSError:
            pass
        lock.release()


def _sidecar(path: Path) -> Path:
    return path.with_name(f"{path.name}.holder")


def _record_holder(sidecar: Path) -> None:
    """Write this process's identity to ``sidecar`` atomically; best effort: it only serves error messages."""
    temporary = sidecar.with_name(f"{sidecar.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(json.dumps({**identity(), "since": time.time()}))
        os.replace(temporary, sidecar)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def _timeout_message(path: Path, what: str, wait: float) -> str:
    holder = read_holder(_sidecar(path))
    fix = f"end that process, or set ${TIMEOUT_ENV} to more seconds to wait longer (now {wait:g})"
    if holder is None:
        who = (f"its holder is not recorded (a program other than bench, e.g. `flock`, or one that just released it); "
               f"find it with `fuser -v {path}`")
    elif alive(holder) is False:
        who = (f"its last recorded holder, {describe(holder)}, is gone, so another program holds it; find it with "
               f"`fuser -v {path}`")
    else:
        who = f"held by {describe(holder)}"
    return f"waited {wait:g} s for the lock on {what} ({path}): {who}; {fix}"


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: no pid namespaces to tell apart
        return None
