"""Records: one per finished cell, a typed ``Record`` (schema ``SCHEMA``) appended as one JSON line to
``<results>/runs/<matrix>/records.jsonl``.

A record is built in one place (``bench.execute.stages.train_job``) and read by attribute. It names what made it
(each component's version and, for a plugin, code fingerprint), so a reader can tell a stale row (``stale_reasons``). A line is never rewritten; a rerun skips cells whose key is recorded anywhere under the results
folder (``RecordStore``), so a matrix that copies or extends another trains only its new cells. Lines of an older
schema are brought to this one by ``upgrade`` as they are read, then checked (``Record.problems``): every reader
reports a damaged line or record (file, line, what is wrong) and skips it, so its cell counts as not recorded
(``bench.store.integrity``; a last line cut short by a crash is skipped quietly, the next append starts a new line).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from bench.store import keys
from bench.store.integrity import Damage, mistyped, read_checked, report, short
from bench.store.locks import locked

SCHEMA = 2
AXES = ("dataset", "protection", "countermeasure", "victim")
STATUSES = ("ok", "error")


@dataclasses.dataclass(frozen=True)
class Made:
    """What made one part of a cell: a component's name, its ``version`` (``None``: not known, a record of schema 1
    whose key does not reveal it) and, for a plugin, the fingerprint of its code."""

    name: str
    version: int | None
    code: str | None = None


@dataclasses.dataclass(frozen=True)
class Record:
    """One cell's result. Labels (``protection``) are the matrix's, ``*_name``/``*_params`` the components'; keys
    address the cache (``bench.store.keys``); accuracies are in [0, 1]; ``seconds`` per stage."""

    cell: str
    matrix: str
    seed: int
    poison_ratio: float
    mix: str
    dataset: str
    dataset_name: str
    dataset_params: dict[str, Any]
    protection: str
    protection_name: str
    protection_params: dict[str, Any]
    countermeasure: str
    countermeasure_name: str
    countermeasure_params: dict[str, Any]
    victim: str
    victim_name: str
    victim_params: dict[str, Any]
    dataset_key: str | None  # None in records older than dataset keys (bench.report.figures recovers it)
    protection_key: str | None
    purify_key: str | None
    countermeasure_stage: str
    countermeasure_reports: str
    components: dict[str, Made]
    status: str
    error: str | None = None
    device: str = ""
    threads: int = 1
    versions: dict[str, str] = dataclasses.field(default_factory=dict)  # libraries that can change numbers
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    recipe: str | None = None
    recipe_params: dict[str, Any] | None = None
    test_acc_final: float | None = None
    test_acc_best: float | None = None
    best_epoch: int | None = None
    train_acc: list[float] | None = None
    test_acc: list[float] | None = None
    images_per_s: float | None = None
    augment: str | None = None
    precision: str | None = None
    steps: int | None = None
    data_placement: str | None = None  # where the train set stayed: device, host-pinned (batches streamed), host (CPU)
    tf32_conv: bool | None = None  # cuDNN could run fp32 convolutions in TF32 (CUDA only)
    compile_seconds: float | None = None  # steps that compiled a graph (recipe.compile), left out of images_per_s
    memory: dict[str, float] | None = None  # MiB: peak_rss (the worker process's, so far), cuda_peak (this cell's)
    deterministic: bool | None = None  # run with --deterministic (CUDA's deterministic algorithms, no autotuning)
    linf: float | None = None  # protected vs clean train images (bench.execute.metrics.perturbation_metrics)
    l2: float | None = None
    psnr: float | None = None
    car: float | None = None  # ConfounderGAN App. A, on the trained victim
    gcr: float | None = None
    protect_info: dict[str, Any] | None = None
    protect_models: list[str] | None = None
    purify_info: dict[str, Any] | None = None
    purify_models: list[str] | None = None
    finished_at: float = 0.0
    legacy_cell: str | None = None  # the key an older schema gave the cell
    schema: int = SCHEMA

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def labels(self) -> dict[str, str]:
        """Its place in a table, as ``bench.plan.matrix.Cell.labels`` gives a cell's."""
        return {"dataset": self.dataset, "protection": self.protection, "countermeasure": self.countermeasure,
                "victim": self.victim, "seed": str(self.seed), "poison_ratio": f"{self.poison_ratio:g}",
                "mix": self.mix}

    def to_json(self) -> dict[str, Any]:
        """The JSON line's object (``Made`` as plain objects)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Record:
        """A record from its JSON object, of any schema (``upgrade``), checked (``problems``); ValueError if it is
        not one."""
        try:
            raw = upgrade(raw)
            if unknown := sorted(set(raw) - {f.name for f in dataclasses.fields(cls)}):
                raise ValueError(f"unknown record fields {unknown}")
            record = cls(**{**raw, "components": {axis: Made(**made) for axis, made in raw["components"].items()}})
        except (TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"not a record ({type(err).__name__}: {err})") from err
        if problems := record.problems():
            raise ValueError("; ".join(problems))
        return record

    def problems(self) -> list[str]:
        """Why it is no valid record: fields not of their annotated type (``mistyped``), else an accuracy (a field
        named ``*acc*``; None: not measured) or a curve of them (NaN: an epoch not evaluated) outside [0, 1], or a
        status not in ``STATUSES``."""
        if found := mistyped(self):
            return found
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if "acc" in f.name}
        found = [f"{name} = {short(value)} is outside [0, 1]" for name, value in values.items()
                 if any(not 0 <= v <= 1 for v in (value if isinstance(value, list) else [value] * (value is not None))
                        if not (isinstance(value, list) and math.isnan(v)))]
        return found + [f"status {self.status!r} is none of {', '.join(STATUSES)}"] * (self.status not in STATUSES)


def upgrade(raw: dict[str, Any]) -> dict[str, Any]:
    """A record's JSON object in the current schema. Schema 1 (no ``schema`` field, bench < 0.2) named no component
    versions and keyed cells with the recipe's description: the versions are recovered from the keys that hold them
    (a protection's from ``protection_key``, a data-stage countermeasure's from ``purify_key``; a component still
    at version 1 was at 1), and the cell key is recomputed where every version is known (``legacy_cell`` keeps the
    old one). A cell it cannot re-key keeps its old key: no run reuses it, and ``stale_reasons`` says why."""
    schema = raw.get("schema", 1)
    if not isinstance(schema, int) or schema > SCHEMA:
        raise ValueError(f"record schema {schema!r} is newer than this bench's ({SCHEMA}): upgrade bench to read it")
    if schema == SCHEMA:
        return raw
    made = {axis: _recovered(axis, raw) for axis in AXES}
    new = {**raw, "schema": SCHEMA, "legacy_cell": raw["cell"], "components": made}
    specs = {axis: {"name": m["name"], "version": m["version"], "params": raw[f"{axis}_params"]}
             for axis, m in made.items()}
    if raw.get("recipe_params") and all(m["version"] is not None and not _is_plugin(axis, m["name"])
                                        for axis, m in made.items()):
        unused = specs["protection"] if raw.get("mix") == "clean_only" else None
        source = keys.train_source(raw["dataset_key"], raw["protection_key"], raw["poison_ratio"], raw["seed"],
                                   raw.get("mix", "protected"), unused)
        new["cell"] = keys.cell_key(source, specs["countermeasure"], specs["victim"], raw["recipe_params"])
    return new


def _recovered(axis: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The version of a schema-1 record's component on ``axis``: reproduced from the key that holds it, else 1
    where the component has never left version 1 (versions start at 1), else unknown (``None``)."""
    name, params = raw[f"{axis}_name"], raw[f"{axis}_params"]
    current = _current_version(axis, name)
    if current is None:
        return {"name": name, "version": None, "code": None}
    spec = lambda version: {"name": name, "version": version, "params": params}
    fitted_on = raw["poison_ratio"] if raw.get("mix") in ("fit_subset", "ood") else None
    candidates = {
        "protection": raw.get("protection_key") and (lambda v: keys.protection_key(
            raw["dataset_key"], spec(v), raw["seed"], fitted_on) == raw["protection_key"]),
        "countermeasure": raw.get("purify_key") and (lambda v: keys.purify_key(keys.train_source(
            raw["dataset_key"], raw["protection_key"], raw["poison_ratio"], raw["seed"], raw.get("mix", "protected"),
            None), spec(v)) == raw["purify_key"]),
    }
    test = candidates.get(axis)
    version = next((v for v in range(1, current + 1) if test(v)), None) if test else None
    return {"name": name, "version": 1 if version is None and current == 1 else version, "code": None}


def _registry(axis: str) -> Any:
    from bench.core.components import COUNTERMEASURES, PROTECTIONS, VICTIMS
    from bench.data.datasets import DATASETS

    return {"dataset": DATASETS, "protection": PROTECTIONS, "countermeasure": COUNTERMEASURES, "victim": VICTIMS}[axis]


def current_made(axis: str, name: str) -> Made | None:
    """What this bench would record for component ``name`` on ``axis`` now; None where it is not registered, or
    where a plugin fails to import (nothing can be judged then; every command that plans names the file)."""
    from bench.core.registry import PluginImportError, component_identity

    registry = _registry(axis)
    try:
        if name not in registry:
            return None
    except PluginImportError:
        return None
    return Made(**component_identity(registry.get(name)))


def _current_version(axis: str, name: str) -> int | None:
    made = current_made(axis, name)
    return None if made is None else made.version


def _is_plugin(axis: str, name: str) -> bool:
    made = current_made(axis, name)
    return made is not None and made.code is not None


def stale_reasons(record: Record) -> list[str]:
    """Why ``record`` no longer shows what this bench computes: each component whose version or code differs from
    the installed one's (none for components not installed here: nothing to compare with)."""
    reasons = []
    for axis, made in record.components.items():
        now = current_made(axis, made.name)
        if now is None:
            continue
        if made.version is None:
            reasons.append(f"{made.name}: version not recorded (bench < 0.2), now v{now.version}")
        elif made.version != now.version:
            reasons.append(f"{made.name} v{made.version} (now v{now.version})")
        elif made.code != now.code:
            reasons.append(f"{made.name}: code changed since (its package or file, or a helper it imports)")
    return reasons


class RecordLog:
    """``records.jsonl`` of one matrix's runs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, record: Record) -> None:
        """Append one record as one line, under the log's lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record.to_json(), sort_keys=True, default=str) + "\n"
        with locked(f"{self.path}.lock", what=f"the record log {self.path}"), open(self.path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() > 0:
                handle.seek(-1, os.SEEK_END)
                if handle.read(1) != b"\n":  # a previous writer was killed mid-line
                    line = "\n" + line
            handle.write(line.encode())
            handle.flush()
            os.fsync(handle.fileno())

    def checked(self) -> tuple[list[Record], list[Damage]]:
        """Every valid record, in order, in the current schema (``Record.from_json``), and every damaged line
        (``integrity.read_checked``); nothing is reported."""
        return read_checked(self.path, Record.from_json)

    def read(self) -> list[Record]:
        """Every valid record, in order; damaged lines are reported on stderr (``report``) and skipped."""
        records, damage = self.checked()
        report(damage)
        return records

    def latest(self) -> dict[str, Record]:
        """The last record of each cell key."""
        return {record.cell: record for record in self.read()}


class RecordStore:
    """Every record log under a results folder (``runs/*/records.jsonl``), read by cell key."""

    def __init__(self, results: Path) -> None:
        self.results = Path(results)

    def logs(self) -> list[RecordLog]:
        return [RecordLog(path) for path in sorted(self.results.glob("runs/*/records.jsonl"))]

    def checked(self) -> tuple[list[Record], list[Damage]]:
        """Every log's records and damaged lines (``RecordLog.checked``); nothing is reported."""
        found = [log.checked() for log in self.logs()]
        return [r for records, _ in found for r in records], [d for _, damage in found for d in damage]

    def read(self) -> list[Record]:
        """Every log's valid records; damaged lines are reported (``report``) and skipped."""
        records, damage = self.checked()
        report(damage)
        return records

    def latest(self) -> dict[str, Record]:
        """The newest record of each cell key, whichever matrix's log holds it."""
        found: dict[str, Record] = {}
        for record in sorted(self.read(), key=lambda r: r.finished_at):  # stable: a log's order breaks ties
            found[record.cell] = record
        return found
