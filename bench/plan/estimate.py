"""Cost of a matrix before it runs: cells recorded, protected/purified sets cached, and the wall time of the rest.

Times come from records of similar work in ``<results>/runs/*/records.jsonl`` (and ``./results``): a cell's training
from cells of the same victim and device kind (same recipe and countermeasure first), scaled by the images it trains
on (train images × epochs, or iterations × batch); a protected or purified set from sets of the same component and
parameters, scaled by its image count. Else ``TRAIN_RATE`` and ``WORK_PER_IMAGE`` give rough rates. Nothing is
loaded or written (dataset keys come from the cache's manifests), and the estimate is divided by the jobs.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any, Callable

from bench.core.components import COUNTERMEASURES, PROTECTIONS
from bench.data import mixes
from bench.plan.matrix import Cell, Choice, Matrix
from bench.plan.planner import known_dataset_key, plan_cell, to_train
from bench.plan.recipes import make_recipe
from bench.store.cache import Cache
from bench.store.keys import make_key
from bench.store.records import Record, RecordLog

DEFAULT_MAX_HOURS = 12.0  # `bench run` on a CPU refuses a matrix estimated longer (--max-hours)
# Training images/s of bench's loop. cpu: a 1-thread fp32 step (batch 64) timed on the 2-core dev machine under
# load, scaled so that cnn matches dh-table1-cpu's ≈ 100 s per `cpu`-recipe cell; cuda: rough guesses for one
# H100-class GPU (bf16, channels_last), not measured here. A victim not listed counts as resnet18.
TRAIN_RATE = {"cpu": dict(cnn=400, lenet=8000, resnet20=350, resnet32=210, resnet18=38, resnet50=9, vgg11=160, vgg19=50,
                          densenet121=13, mobilenetv2=80, shufflenetv2=165, vit=35),
              "cuda": dict(cnn=60000, lenet=100000, resnet20=30000, resnet32=20000, resnet18=25000, resnet50=8000,
                           vgg11=40000, vgg19=20000, densenet121=5000, mobilenetv2=15000, shufflenetv2=15000, vit=15000)}
# Protect/purify work per train image, in training images of the component's surrogate (the plain CNN where it
# has none), from the CPU matrices' fits on 500 images (README); unlisted components are ≈ free (filters, JPEG…).
WORK_PER_IMAGE = dict(em=270, tap=480, rem=1200, confoundergan=1350, uge=1000, dh=800, ar=3, diffpure=100, dncnn=200,
                      dncnn_reference=200, dvae=200, orthogonal_projection=10)
TRAIN_IMAGES = {"cifar10": 50_000, "cifar10-jpeg": 50_000, "cifar100": 50_000, "svhn": 73_257, "digits": 1_438}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Counts, and the estimated wall time of the remaining work with ``jobs`` parallel jobs on ``device``."""

    cells: int
    recorded: int
    sets: dict[str, tuple[int, int]]  # "protected"/"purified" → (cached, to build)
    seconds: float
    jobs: int
    device: str
    from_records: int  # stages timed from similar records
    from_table: int  # stages timed from the rate tables
    again: int = 0  # recorded cells trained again (--rerun, --force, --retry-failed)

    def line(self, name: str) -> str:
        sets = "; ".join(f"{kind} sets {cached:,} cached, {todo:,} to build" for kind, (cached, todo) in self.sets.items())
        jobs = f"{self.jobs} job{'s' * (self.jobs != 1)}"
        return (f"matrix {name}: {self.cells:,} cells, {self.recorded:,} recorded, "
                f"{self.cells - self.recorded + self.again:,} to train; {sets}; est. {duration(self.seconds)} on this "
                f"{self.device.upper()} ({jobs}; timings: recorded for {self.from_records} of "
                f"{self.from_records + self.from_table} stages, else bench's rough rate table)")


def duration(seconds: float) -> str:
    """``95 min`` under two hours, else ``310 h``."""
    return f"{seconds / 60:,.0f} min" if seconds < 2 * 3600 else f"{seconds / 3600:,.0f} h"


def train_images(dataset: Choice) -> int:
    """Train images of a dataset choice, from its size (``TRAIN_IMAGES``, else 50,000) and ``per_class``."""
    full, per_class = TRAIN_IMAGES.get(dataset.name, 50_000), dataset.kwargs.get("per_class")
    return full if per_class is None else min(full, per_class * (100 if dataset.name == "cifar100" else 10))


def timings(folders: list[Path]) -> list[Record]:
    """Every ok record under ``<folder>/runs/*/records.jsonl``."""
    files = sorted({p.resolve() for f in folders for p in Path(f).glob("runs/*/records.jsonl")})
    return [r for p in files for r in RecordLog(p).read() if r.ok]


def estimate(matrix: Matrix, cells: list[Cell], cache: Cache, recorded: dict[str, Record], known: list[Record],
             records: list[Record], device: str, jobs: int, redo: set[Cell] | None = None,
             retry_failed: bool = False) -> Estimate:
    """Plan ``cells`` (with the dataset keys the cache or the ``known`` records give) and estimate their remaining
    work on ``device`` from the timings of ``records``; ``redo`` cells (``--rerun``) train and rebuild their sets
    again, and failed cells train again with ``retry_failed``."""
    kind = device.split(":")[0]
    records = [r for r in records if r.device.split(":")[0] == kind]  # timings of this device kind
    keys = {choice: known_dataset_key(cache, choice, known).key for choice in {c.dataset for c in cells}}  # no loading
    plans = [plan_cell(cell, keys[cell.dataset], matrix.recipe) for cell in cells  # check_cells refuses the rest
             if not mixes.missing_capability(cell.mix, PROTECTIONS.get(cell.protection.name))]
    redo = redo or set()
    keys = to_train(plans, recorded, redo, retry_failed)
    todo = [p for p in plans if p.cell_key in keys]
    times = [_train_seconds(p.cell, matrix.recipe, records, kind) for p in todo]
    sets = {}
    for stage, axis in (("protected", "protection"), ("purified", "countermeasure")):
        key_of = (lambda p: p.protection_key) if stage == "protected" else (lambda p: p.purify_key)
        cached = {key_of(p) for p in plans if key_of(p) and cache.has(stage, key_of(p))}
        build = {key_of(p): p.cell for p in todo if key_of(p) and (key_of(p) not in cached or p.cell in redo)}
        times += [_set_seconds(getattr(cell, axis), cell.dataset, stage, records, kind) for cell in build.values()]
        sets[stage] = (len(cached), len(build))
    found = sum(known for _, known in times)
    listed = sum(p.cell_key in recorded for p in plans)
    return Estimate(len(plans), listed, sets, sum(t for t, _ in times) / max(1, jobs), jobs, kind, found,
                    len(times) - found, again=sum(p.cell_key in recorded for p in todo))


def refusal(matrix: Matrix, work: Estimate, max_hours: float, estimate_of: Callable[[str], Estimate]) -> str | None:
    """Why a CPU run estimated over ``max_hours`` is refused (naming the ``cpu_alternative``), or None."""
    hours = work.seconds / 3600
    if work.device != "cpu" or hours <= max_hours:
        return None
    alt = matrix.cpu_alternative
    instead = f"Run `--matrix {alt}` (est. {duration(estimate_of(alt).seconds)}) instead, or" if alt else "Shrink it, or"
    return (f"matrix {matrix.name}: {work.cells:,} cells, est. {duration(work.seconds)} on this CPU ({work.jobs} job{'s' * (work.jobs != 1)}) "
            f"— a GPU job. {instead} pass --max-hours {math.ceil(hours) + 1} to run it anyway.")


def _same(record: Record, axis: str, choice: Choice) -> bool:
    return getattr(record, f"{axis}_name") == choice.name and \
        make_key(getattr(record, f"{axis}_params")) == make_key(choice.kwargs)


def _rate(kind: str, victim: str) -> float:
    rates = TRAIN_RATE[kind if kind in TRAIN_RATE else "cuda"]
    return rates.get(victim, rates["resnet18"])


def _factor(name: str, params: dict[str, Any]) -> float:
    """Forward/backward passes per trained image that a train-stage countermeasure costs."""
    return params["steps"] + 1 if name == "adv_training" else params["repeats"] if name == "ueraser" else \
        2 if name == "distill" else 1


def _train_seconds(cell: Cell, recipe: dict[str, Any], records: list[Record], kind: str) -> tuple[float, bool]:
    """(seconds, whether from records) to train the cell: its images × epochs (or iterations × batch) at the median
    rate of records of the same victim (of the same recipe and countermeasure where there are)."""
    own = make_recipe(**recipe).for_victim(cell.victim.name)
    samples = own.iterations * own.batch_size if own.iterations else own.epochs * train_images(cell.dataset)
    work = samples * _factor(cell.countermeasure.name, cell.countermeasure.kwargs)
    alike = [r for r in records if r.victim_name == cell.victim.name and "train" in r.seconds and r.steps
             and r.recipe_params]
    same = [r for r in alike if r.recipe == recipe["name"] and _same(r, "countermeasure", cell.countermeasure)]
    rates = [r.steps * r.recipe_params["batch_size"] * _factor(r.countermeasure_name, r.countermeasure_params)
             / max(r.seconds["train"], 1e-9) for r in same or alike]
    return (work / statistics.median(rates), True) if rates else (work / _rate(kind, cell.victim.name), False)


def _set_seconds(choice: Choice, dataset: Choice, stage: str, records: list[Record], kind: str) -> tuple[float, bool]:
    """(seconds, whether from records) to build a protected/purified set: the median seconds per image of records
    of the same component and parameters, else ``WORK_PER_IMAGE``, × its images."""
    axis, step = ("protection", "protect") if stage == "protected" else ("countermeasure", "purify")
    per_image = [r.seconds[step] / train_images(Choice(r.dataset_name, tuple(r.dataset_params.items()), ""))
                 for r in records if _same(r, axis, choice) and step in r.seconds]
    if per_image:
        return statistics.median(per_image) * train_images(dataset), True
    param = (PROTECTIONS if stage == "protected" else COUNTERMEASURES).get(choice.name).surrogate_param
    surrogate = choice.kwargs[param] if param else "cnn"
    return WORK_PER_IMAGE.get(choice.name, 0) * train_images(dataset) / _rate(kind, surrogate), False
