"""Counting host-device synchronisations, the stalls that keep the host from queueing GPU work ahead."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

SYNC_WARNING = "called a synchronizing CUDA operation"  # c10's text under set_sync_debug_mode("warn")


def count_host_syncs(fn: Callable[[], object]) -> int:
    """How many synchronising CUDA operations PyTorch reports while ``fn()`` runs.

    Uses ``torch.cuda.set_sync_debug_mode("warn")``, which covers most but not all syncs (PyTorch says which it
    misses: distributed and sparse ops), and restores the previous mode. ``fn``'s result is discarded. Raises
    RuntimeError without CUDA.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("count_host_syncs needs CUDA: PyTorch reports synchronisations only on CUDA")
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum(SYNC_WARNING in str(warning.message) for warning in caught)
