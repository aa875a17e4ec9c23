"""Atomic file writes: a reader sees the old file or the new one, never a part, and a failed write (a full disk, a
killed process aside) leaves no temporary file behind."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file beside it and ``os.replace``, which replaces a link
    at ``path`` rather than writing through it; the temporary file is removed on any error."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as file:  # "x": a fresh file, with the mode the umask gives
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets while it reads, racing other threads)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        old = os.umask(0o022)
        os.umask(old)
        return old
