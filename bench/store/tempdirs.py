"""Temporary folders named after their writer (``<prefix>~<random>~<pid>@<host>@<pid namespace>``), so that those of
writers that died (killed mid-save) can be told from a live writer's and removed (``sweep``); the liveness check is
the locks' and claims' (``bench.store.locks.alive``)."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

from bench.store.locks import alive, identity

LITTER_AGE = 86400.0  # s: a temporary folder this old is abandoned, whoever wrote it (a save takes seconds)


def temp_folder(parent: Path, prefix: str) -> Path:
    """A new, empty folder in ``parent`` (mode 0700) whose name ends with this process's identity."""
    me = identity()
    host = re.sub(r"[/@~\x00]", "_", me["host"])  # another name than gethostname's: only age removes it
    return Path(tempfile.mkdtemp(prefix=f"{prefix}~", suffix=f"~{me['pid']}@{host}@{me['pidns'] or ''}", dir=parent))


def sweep(folder: Path) -> None:
    """Remove the temporary folders (``.tmp-*``, ``.old-*``) in ``folder`` that their writers left: those of a process
    of this host (and pid namespace) that is gone, and any older than ``LITTER_AGE``. A live writer's folder stays."""
    for path in [*folder.glob(".tmp-*"), *folder.glob(".old-*")]:
        if _abandoned(path):
            shutil.rmtree(path, ignore_errors=True)


def _abandoned(path: Path) -> bool:
    """Whether the temporary folder ``path`` has no live writer."""
    try:
        if time.time() - path.lstat().st_mtime > LITTER_AGE:
            return True
    except FileNotFoundError:
        return False
    pid, _, where = path.name.rpartition("~")[2].partition("@")
    host, _, pidns = where.partition("@")
    if not pid.isdigit():
        return False  # an older bench's name: only its age tells
    return alive({"pid": int(pid), "host": host, "pidns": pidns or None}) is False
