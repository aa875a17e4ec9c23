"""Append-only JSONL records, one per finished cell, and the perturbation metrics they carry.

A record is never rewritten; a rerun skips cells whose key is recorded (timm's ``bulk_runner`` style). A
line cut short by a crash is ignored on read, and the next append starts on a fresh line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch


class RecordLog:
    """``records.jsonl`` of one matrix's runs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with open(self.path, "a+b") as handle:
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


def perturbation_metrics(clean: torch.Tensor, protected: torch.Tensor) -> dict[str, float | None]:
    """L∞ and mean per-image L2 of ``protected − clean`` in [0, 1] units, and mean per-image PSNR (dB).

    Images left unchanged are left out of the PSNR mean (their PSNR is infinite); ``None`` if all are.
    """
    if len(clean) == 0:
        return {"linf": 0.0, "l2": 0.0, "psnr": None}
    diff = (protected.double() - clean.double()).flatten(1) / 255
    mse = diff.pow(2).mean(1)
    changed = mse > 0
    psnr = (10 * torch.log10(1 / mse[changed])).mean().item() if changed.any() else None
    return {"linf": diff.abs().max().item(), "l2": diff.norm(dim=1).mean().item(),
            "psnr": None if psnr is None or math.isnan(psnr) else psnr}
