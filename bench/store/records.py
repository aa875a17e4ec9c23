"""Append-only JSONL records, one per finished cell (plain JSON: reading them needs no torch).

A record is never rewritten; a rerun skips cells whose key is recorded (timm's ``bulk_runner`` style). A
line cut short by a crash is ignored on read, and the next append starts on a fresh line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock


class RecordLog:
    """``records.jsonl`` of one matrix's runs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as one line, under the log's lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with FileLock(str(self.path) + ".lock"), open(self.path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a previous writer was killed mid-line
                    line = "\n" + line
            handle.write(line.encode())
            handle.flush()
            os.fsync(handle.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every complete record, in order."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last record of each cell key."""
        return {record["cell"]: record for record in self.read() if "cell" in record}
