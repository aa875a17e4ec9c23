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
