"""Cost of a matrix before it runs: cells recorded, protected/purified sets cached, and the wall time of the rest.

Times come from records of similar work in ``<results>/runs/*/records.jsonl`` (and ``./results``): a cell's training
from cells of the same victim and device kind (same recipe and countermeasure first), scaled by the images it trains
on (train images × epochs, or iterations × batch, × their resolution's ``Outline.compute``); a protected or purified
set from sets of the same component and parameters, scaled alike. Else ``TRAIN_RATE`` and ``WORK_PER_IMAGE`` (scaled by the component's budget
parameters, ``BUDGETS``) give rough rates × the device kind's median recorded/table ratio (``calibrate``: of the
same component there, else of every recorded set or training), with a range. Nothing is loaded or written; the
work is divided by the jobs, the wall time at least each stage's longest job (stages run one after another).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.data.datasets import outline_of, train_images
from bench.plan.matrix import Cell, Choice, Matrix
from bench.plan.planner import dataset_choices, known_dataset_key, mix_refusal, plan_cell, to_train
from bench.plan.rates import budget, compute, passes, surrogate, table_set_seconds, train_rate  # noqa: F401
from bench.plan.recipes import make_recipe
from bench.store.cache import Cache
from bench.store.keys import make_key
from bench.store.records import Record, RecordLog

DEFAULT_MAX_HOURS = 12.0  # `bench run` on a CPU refuses a matrix estimated longer (--max-hours)
STAGES = ("protect", "purify", "train")


@dataclasses.dataclass(frozen=True)
class Timing:
    """One job's seconds, range, and source: ``records``, ``calibrated`` (the table × ``factor``) or ``table``."""

    seconds: float
    low: float
    high: float
    source: str
    factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Counts, and the estimated wall time of the remaining work with ``jobs`` parallel jobs on ``device``: central
    ``seconds`` within ``low``–``high``; ``longest`` is the longest single job's seconds per stage (protect, purify,
    train), ``untimed`` the stages whose longest job is timed from the table, ``data_gb`` the largest train set."""

    cells: int
    recorded: int
    sets: dict[str, tuple[int, int]]  # "protected"/"purified" → (cached, to build)
    seconds: float
    jobs: int
    device: str
    from_records: int  # stages timed from similar records
    from_table: int  # stages timed from the rate tables (calibrated or not)
    again: int = 0  # recorded cells trained again (--rerun, --force, --retry-failed)
    low: float | None = None  # None: as ``seconds``
    high: float | None = None
    uncalibrated: int = 0  # of from_table, stages (not free) with no device factor: no record on this device kind
    factors: tuple[float, ...] = ()  # the device factors used (min, max)
    longest: dict[str, float] = dataclasses.field(default_factory=dict)
    untimed: frozenset[str] = frozenset()
    data_gb: float = 0.0

    def line(self, name: str) -> str:
        sets = "; ".join(f"{kind} sets {cached:,} cached, {todo:,} to build" for kind, (cached, todo) in self.sets.items())
        return (f"matrix {name}: {self.cells:,} cells, {self.recorded:,} recorded, "
                f"{self.cells - self.recorded + self.again:,} to train; {sets}; est. {self.span()} on this "
                f"{self.device.upper()} ({self.jobs} job{'s' * (self.jobs != 1)}; {self.sources()})")

    def span(self) -> str:
        """``40 min (25–70 min)``: the central estimate and its range."""
        low, high = (duration(self.seconds if x is None else x) for x in (self.low, self.high))
        low = low.split()[0] if low.split()[1] == high.split()[1] else low
        return duration(self.seconds) + ("" if low == high.split()[0] else f" ({low}–{high})")

    def sources(self) -> str:
        """Where the stages' timings come from: records, the table × a device factor, the bare table."""
        stages, here = self.from_records + self.from_table, f"on this {self.device.upper()}"
        if not self.from_table:
            return f"all {stages} stages timed from records {here}" if stages else "nothing to run"
        factor = "–".join(dict.fromkeys(f"{f:.2g}" for f in self.factors))
        return (f"{self.from_records} of {stages} stages timed from records {here}, the rest from bench's rate table"
                + (f" × {factor} device factor from records" if self.factors else "")
                + (f", {self.uncalibrated} uncalibrated (no record on this device)" if self.uncalibrated else ""))


def duration(seconds: float) -> str:  # ``95 min`` under two hours, else ``310 h``
    return f"{seconds / 60:,.0f} min" if seconds < 2 * 3600 else f"{seconds / 3600:,.0f} h"


def set_images(stage: str, component: Choice, dataset: Choice) -> float:
    """The images a protect or purify stage fits on, in 32-px images of its surrogate's work (``rates.compute``)."""
    victim = surrogate(stage, component.name, component.kwargs)
    return train_images(dataset.name, dataset.kwargs, stage == "protect") * compute(victim, {}, dataset.name, dataset.kwargs)


def timings(folders: list[Path]) -> list[Record]:
    """Every ok record under ``<folder>/runs/*/records.jsonl`` (a damaged line is reported and skipped)."""
    files = sorted({p.resolve() for f in folders for p in Path(f).glob("runs/*/records.jsonl")})
    return [r for p in files for r in RecordLog(p).read() if r.ok]


def calibrate(records: list[Record], kind: str) -> dict[str, list[float]]:
    """Ratios recorded / table seconds of the distinct stages recorded on device ``kind`` (those over 1 s both ways):
    ``train``, ``build`` (protected and purified sets), ``build:<component>``, and ``all``."""
    pairs: dict[tuple[str, str | None], tuple[tuple[str, ...], float, float]] = {}  # a stage → (groups, both)
    for r in (r for r in records if r.device.split(":")[0] == kind):
        if "train" in r.seconds and r.steps and r.recipe_params:
            table = _trained(r) / train_rate(kind, r.victim_name, r.victim_params)
            pairs.setdefault(("train", r.cell), (("train", "all"), r.seconds["train"], table))
        for stage, axis, key in (("protect", "protection", r.protection_key), ("purify", "countermeasure", r.purify_key)):
            if stage in r.seconds and (stage, key) not in pairs:
                name, params = getattr(r, f"{axis}_name"), getattr(r, f"{axis}_params")
                images = set_images(stage, Choice(name, tuple(params.items()), ""), _dataset(r))
                table = table_set_seconds(name, params, images, stage, kind)
                pairs[stage, key] = (("build", f"build:{name}", "all"), r.seconds[stage], table)
    ratios: dict[str, list[float]] = {}
    for groups, seconds, table in (p for p in pairs.values() if p[1] >= 1 and p[2] >= 1):
        for group in groups:
            ratios.setdefault(group, []).append(seconds / table)
    return ratios


def estimate(matrix: Matrix, cells: list[Cell], cache: Cache, recorded: dict[str, Record], known: list[Record],
             records: list[Record], device: str, jobs: int, redo: set[Cell] | None = None,
             retry_failed: bool = False) -> Estimate:
    """Plan ``cells`` (with the dataset keys the cache or the ``known`` records give) and estimate their remaining
    work on ``device`` from the timings of ``records``; ``redo`` cells (``--rerun``) train and rebuild their sets
    again, and failed cells train again with ``retry_failed``."""
    kind = device.split(":")[0]
    records = [r for r in records if r.device.split(":")[0] == kind]  # timings of this device kind
    ratios = calibrate(records, kind)
    keys = {choice: known_dataset_key(cache, choice, known).key for choice in dataset_choices(cells)}  # no loading
    plans = [plan_cell(cell, keys, matrix.recipe) for cell in cells  # check_cells refuses the rest
             if not mix_refusal(cell)]
    keys = to_train(plans, recorded, redo := redo or set(), retry_failed)
    todo = [p for p in plans if p.cell_key in keys]
    times = [("train", _train_seconds(p.cell, matrix.recipe, records, kind, ratios)) for p in todo]
    sets = {}
    for stage, axis in (("protected", "protection"), ("purified", "countermeasure")):
        key_of = (lambda p: p.protection_key) if stage == "protected" else (lambda p: p.purify_key)
        cached = {key_of(p) for p in plans if key_of(p) and cache.has(stage, key_of(p))}
        build = {key_of(p): p.cell for p in todo if key_of(p) and (key_of(p) not in cached or p.cell in redo)}
        step = "protect" if stage == "protected" else "purify"
        firsts = {(getattr(c, axis), c.dataset): key for key, c in reversed(build.items())}  # a fitted model: once
        times += [(step, _set_seconds(getattr(c, axis), c.dataset, step, records, kind, ratios,
                                      shared=firsts[getattr(c, axis), c.dataset] != key)) for key, c in build.items()]
        sets[stage] = (len(cached), len(build))
    longest = {s: max((t for x, t in times if x == s), key=lambda t: t.seconds) for s in STAGES if s in dict(times)}
    found, share = sum(t.source == "records" for _, t in times), 1 / max(1, jobs)
    path = [sum(getattr(t, f) for t in longest.values()) for f in ("seconds", "low", "high")]
    wall = [max(sum(getattr(t, f) for _, t in times) * share, least) for f, least in zip(("seconds", "low", "high"), path)]
    data = max((train_images(d.name, d.kwargs) * outline_of(d.name, d.kwargs).image_bytes()
                for d in {p.cell.dataset for p in todo}), default=0)
    factors = sorted({round(t.factor, 2) for _, t in times if t.source == "calibrated"})
    return Estimate(len(plans), sum(p.cell_key in recorded for p in plans), sets, wall[0], jobs, kind, found,
                    len(times) - found, sum(p.cell_key in recorded for p in todo), wall[1], wall[2],
                    sum(t.source == "table" and t.seconds > 0 for _, t in times), tuple(dict.fromkeys(factors[:1] + factors[-1:])),
                    {s: t.seconds for s, t in longest.items()},
                    frozenset(s for s, t in longest.items() if t.source != "records"), data / 1e9)


def refusal(matrix: Matrix, work: Estimate, max_hours: float, estimate_of: Callable[[str], Estimate]) -> str | None:
    """Why a CPU run whose central estimate is over ``max_hours`` is refused (naming the ``cpu_alternative``), or None."""
    hours = work.seconds / 3600
    if work.device != "cpu" or hours <= max_hours:
        return None
    alt = matrix.cpu_alternative
    instead = f"Run `--matrix {alt}` (est. {duration(estimate_of(alt).seconds)}) instead, or" if alt else "Shrink it, or"
    return (f"matrix {matrix.name}: {work.cells:,} cells, est. {duration(work.seconds)} on this CPU ({work.jobs} job{'s' * (work.jobs != 1)}) "
            f"— a GPU job. {instead} pass --max-hours {math.ceil(hours) + 1} to run it anyway.")


def _calibrated(table: float, ratios: dict[str, list[float]], groups: tuple[str, ...]) -> Timing:
    """The table's seconds × the median ratio of the first group recorded (the same component's: within ×1.5;
    a device-wide one: its 10th–90th percentile, at least ×2), else uncalibrated within ×4."""
    for group in groups:
        if ratios.get(group):
            values = sorted(ratios[group])
            factor, near = statistics.median(values), ":" in group
            lo, hi = values[len(values) // 10] / factor, values[-1 - len(values) // 10] / factor
            lo, hi = (min(lo, 1 / 1.5), max(hi, 1.5)) if near else (min(lo, 0.5), max(hi, 2.0))
            return Timing(table * factor, table * factor * lo, table * factor * hi, "calibrated", factor)
    return Timing(table, table / 4, table * 4, "table")


def _recorded(work: float, rates: list[float]) -> Timing:
    """``work`` at the median of recorded rates (work per second), within their spread (at least ×0.8–1.25)."""
    central = work / statistics.median(rates)
    return Timing(central, min(work / max(rates), central * 0.8), max(work / min(rates), central * 1.25), "records")


def _same(record: Record, axis: str, choice: Choice) -> bool:
    return getattr(record, f"{axis}_name") == choice.name and \
        make_key(getattr(record, f"{axis}_params")) == make_key(choice.kwargs)


def _trained(r: Record) -> float:
    """A record's training work in 32-px images: steps × batch × the countermeasure's passes × the resolution's."""
    return r.steps * r.recipe_params["batch_size"] * passes(r.countermeasure_name, r.countermeasure_params) \
        * compute(r.victim_name, r.victim_params, r.dataset_name, r.dataset_params)


def _dataset(r: Record) -> Choice:
    return Choice(r.dataset_name, tuple(r.dataset_params.items()), "")


def _train_seconds(cell: Cell, recipe: dict[str, Any], records: list[Record], kind: str,
                   ratios: dict[str, list[float]]) -> Timing:
    """The cell's training: its images × epochs (or iterations × batch) at the median rate of records of the same
    victim (of the same recipe and countermeasure where there are), else at the table's rate, calibrated."""
    own = make_recipe(**recipe).for_dataset(cell.dataset.name).for_victim(cell.victim.name)
    samples = own.iterations * own.batch_size if own.iterations else own.epochs * train_images(cell.dataset.name, cell.dataset.kwargs)
    work = samples * passes(cell.countermeasure.name, cell.countermeasure.kwargs) \
        * compute(cell.victim.name, cell.victim.kwargs, cell.dataset.name, cell.dataset.kwargs)
    alike = [r for r in records if r.victim_name == cell.victim.name and "train" in r.seconds and r.steps
             and r.recipe_params]
    same = [r for r in alike if r.recipe == recipe["name"] and _same(r, "countermeasure", cell.countermeasure)]
    rates = [_trained(r) / max(r.seconds["train"], 1e-9) for r in same or alike]
    table = work / train_rate(kind, cell.victim.name, cell.victim.kwargs)
    return _recorded(work, rates) if rates else _calibrated(table, ratios, ("train", "all"))


def _set_seconds(choice: Choice, dataset: Choice, stage: str, records: list[Record], kind: str,
                 ratios: dict[str, list[float]], shared: bool = False) -> Timing:
    """A protected (``protect``) or purified (``purify``) set: the median seconds per image of records of the same
    component and parameters × its images, else the table's (``WORK_PER_IMAGE`` × ``budget``), calibrated."""
    axis, images = "protection" if stage == "protect" else "countermeasure", set_images(stage, choice, dataset)
    per_second = [set_images(stage, choice, _dataset(r)) / max(r.seconds[stage], 1e-9) for r in records
                  if _same(r, axis, choice) and stage in r.seconds]
    if per_second:
        return _recorded(images, per_second)
    table = table_set_seconds(choice.name, choice.kwargs, images, stage, kind, shared)
    return _calibrated(table, ratios, (f"build:{choice.name}", "build", "all")) if table else Timing(0, 0, 0, "table")
