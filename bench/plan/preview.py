"""The dry run's table (``bench run --dry-run``): every planned cell, whether its protected set is cached and its
result recorded (in any matrix's log of the results folder), why a cell will run (never recorded, a stale
record at its place in this matrix's table: a component's version or code changed, or asked for again), and where
its pretrained weights will come from when not from a local path (the hub's cache, or a download at run time)."""

from __future__ import annotations

from typing import Callable

from bench.core.exchange import Pretrained, WeightsSource
from bench.plan.planner import Components, KnownKey, Plan
from bench.store.cache import Cache
from bench.store.records import Record, stale_reasons

COLUMNS = ("dataset", "protection", "countermeasure", "victim", "seed", "poison_ratio", "mix")
HEADER = " | ".join([*COLUMNS, "poison", "result"])


def preview(plans: list[Plan], reasons: list[list[str]], dataset_keys: dict[object, KnownKey], cache: Cache,
            recorded: dict[str, Record], own: list[Record], todo: set[str], out: Callable[[str], None]) -> None:
    """Print the table, then the counts. ``own``: the matrix's own log (for stale records at a cell's place);
    ``todo``: the keys of the cells a run would train."""
    shown_at = {tuple(r.labels()[c] for c in COLUMNS): r for r in own}  # the newest record at each place
    out(HEADER)
    stale, found = 0, {}
    for plan, why in zip(plans, reasons):
        labels = plan.cell.labels()
        poison = "identity" if plan.protection_key is None else (
            "cached" if cache.has("protected", plan.protection_key) else "to build")
        record = recorded.get(plan.cell_key)
        old = shown_at.get(tuple(labels[c] for c in COLUMNS))
        if plan.cell_key not in todo:
            result = record.status if record else "to run"
        elif record is not None:
            result = f"to rerun (recorded: {record.status})"
        elif old is not None:
            stale += 1
            result = f"to run (stale record: {'; '.join(stale_reasons(old)) or 'its inputs changed'})"
        else:
            result = "to run"
        blocked = f" | blocked: {'; '.join(r.split(':')[0] for r in why)}" if why else ""  # in full below
        remote = [w for w in cell_weights(plan, found) if w.kind in ("hub-cache", "download")] if not why else []
        weights = f" | weights: {'; '.join(w.describe() for w in remote)}" if remote else ""
        out(f"{' | '.join(labels[c] for c in COLUMNS)} | poison: {poison} | result: {result}{blocked}{weights}")
    listed = sum(p.cell_key in recorded for p in plans)
    again = sum(p.cell_key in todo and p.cell_key in recorded for p in plans)
    out(f"{len(plans)} cells, {listed} recorded, {sum(p.cell_key in todo for p in plans)} to train"
        + (f" ({stale} replace a stale record)" if stale else "") + (f" ({again} recorded, run again)" if again else ""))
    fetch = list({w.where: w for w in found.values() if w.kind == "download"}.values())  # UGE's and DH's CLIP: one
    if fetch:
        out(f"weights to download at run time (about {sum(w.weights.size_mb for w in fetch):,.0f} MB): "
            + ", ".join(f"{w.weights.name} ({w.where})" for w in fetch)
            + "; fetch them beforehand with `bench weights --matrix M --download` (compute nodes offline: --offline)")
    for choice, known in dataset_keys.items():
        label = getattr(choice, "label", choice)
        if known.source == "records":
            out(f"dataset {label}: key from its records (not loaded; a run fingerprints the files and reuses these "
                "records only if the data are the same)")
        elif known.source == "none":
            out(f"dataset {label}: not loaded yet, so nothing made from it is cached; a run loads it first (and "
                "stops with where to place its files if they are absent)")


def cell_weights(plan: Plan, found: dict[Pretrained, WeightsSource]) -> list[WeightsSource]:
    """Where each pretrained weight the cell's components need comes from, resolved once per weight in ``found``."""
    built = Components.of(plan.cell)
    needed = [w for c in (built.protection, built.countermeasure, built.victim) for w in c.pretrained_needed()]
    return [found[w] if w in found else found.setdefault(w, w.resolve()) for w in needed]
