"""Properties of ``bench.store.records`` the other tests leave open: a schema-1 record gets back each version its keys
hold (protection and data-stage countermeasure, every mix, a record without ``mix``) and the planner's cell key, or
keeps its old key where a version is unknown, a component is a plugin or the recipe is missing; ``stale_reasons``
wording; the exact bytes ``RecordLog.append`` writes (sorted keys, one line each, a cut-short line closed first);
``RecordStore.latest``'s values; the messages ``from_json`` and ``problems`` give."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.core import fingerprint
from bench.core.components import COUNTERMEASURES, PROTECTIONS
from bench.plan.matrix import Cell, Choice
from bench.plan.planner import Components, Plan, plan_cell
from bench.plan.recipes import make_recipe
from bench.store.locks import LockTimeout, locked
from bench.store.records import Made, Record, RecordLog, RecordStore, stale_reasons, upgrade
from tests.conftest import make_record, record_json


def planned(protection: str, countermeasure: str = "none", mix: str = "protected", ratio: float = 0.5,
            seed: int = 3) -> Plan:
    """The planner's keys for ``protection × countermeasure × cnn`` on digits (dataset key ``data-0``)."""
    choice = lambda name: Choice(name, (), name)
    cell = Cell(choice("digits"), choice(protection), choice(countermeasure), choice("cnn"), seed, ratio, mix)
    return plan_cell(cell, {cell.dataset: "data-0"}, {"name": "quick"})


def schema_1(plan: Plan, **fields: Any) -> dict[str, Any]:
    """The JSON object bench 0.1 wrote for ``plan``'s cell: no schema, components nor legacy_cell, its cell keyed
    by the recipe's description."""
    built, cell = Components.of(plan.cell), plan.cell
    raw = record_json(cell="described-by-prose", protection=cell.protection.name,
                      countermeasure=cell.countermeasure.name, seed=cell.seed, poison_ratio=cell.poison_ratio,
                      mix=cell.mix, protection_key=plan.source.protection_key, purify_key=plan.purify_key,
                      protection_params=built.protection.spec()["params"],
                      countermeasure_params=built.countermeasure.spec()["params"],
                      victim_params=built.victim.spec()["params"],
                      recipe_params=dataclasses.asdict(make_recipe(name="quick").for_dataset("digits")
                                                       .for_victim("cnn")))
    return {k: v for k, v in {**raw, **fields}.items() if k not in ("schema", "components")}


def versions(raw: dict[str, Any]) -> dict[str, int | None]:
    return {axis: made["version"] for axis, made in upgrade(raw)["components"].items()}


# ------------------------------------------------------------------ upgrade: versions and keys of schema 1


@pytest.mark.parametrize("mix", ["protected", "fit_subset", "ood"])
def test_an_older_version_is_recovered_from_the_keys_and_the_cell_re_keyed_as_the_planner_did(monkeypatch, mix):
    """uge and orthogonal_projection (data stage) are at v2; a record made at v1 recovers v1 from its protection and
    purification keys under every mix (fit_subset/ood fit on the ratio), gets the planner's v1 cell key, and is stale."""
    with monkeypatch.context() as old:
        old.setattr(PROTECTIONS.get("uge"), "version", 1)
        old.setattr(COUNTERMEASURES.get("orthogonal_projection"), "version", 1)
        plan = planned("uge", "orthogonal_projection", mix=mix)
    raw = schema_1(plan)
    assert plan.purify_key and versions(raw) == {"dataset": 1, "protection": 1, "countermeasure": 1, "victim": 1}
    record = Record.from_json(raw)
    assert record.cell == plan.cell_key and record.legacy_cell == "described-by-prose"
    assert stale_reasons(record) == ["uge v1 (now v2)", "orthogonal_projection v1 (now v2)"]


def test_the_current_version_is_recovered_and_the_record_is_not_stale():
    plan = planned("uge", "orthogonal_projection", mix="fit_subset")
    record = Record.from_json(schema_1(plan))
    assert (record.components["protection"].version, record.components["countermeasure"].version) == (2, 2)
    assert record.cell == plan.cell_key and stale_reasons(record) == []


def test_a_record_without_a_mix_is_read_as_mix_protected(monkeypatch):
    """Records older than mixes name none: their keys are those of the whole-set protected mix."""
    with monkeypatch.context() as old:
        old.setattr(PROTECTIONS.get("uge"), "version", 1)
        old.setattr(COUNTERMEASURES.get("orthogonal_projection"), "version", 1)
        plan = planned("uge", "orthogonal_projection")
    raw = schema_1(plan)
    del raw["mix"]
    upgraded = upgrade(raw)
    assert versions(raw) == {"dataset": 1, "protection": 1, "countermeasure": 1, "victim": 1}
    assert upgraded["cell"] == plan.cell_key


@pytest.mark.parametrize("protection", ["cwp", "random_noise"])
def test_clean_only_records_are_re_keyed_apart_by_their_unused_protection(protection):
    """clean_only trains no protection, yet each row is its own cell: the re-keyed cell is the planner's."""
    plan = planned(protection, mix="clean_only")
    assert plan.source.protection_key is None
    assert upgrade(schema_1(plan))["cell"] == plan.cell_key
    assert planned("cwp", mix="clean_only").cell_key != planned("random_noise", mix="clean_only").cell_key


def test_a_component_not_installed_has_no_version_and_the_cell_keeps_its_old_key():
    plan = planned("cwp")
    raw = schema_1(plan, protection_name="gone", protection="gone")
    upgraded = upgrade(raw)
    assert upgraded["components"]["protection"] == {"name": "gone", "version": None, "code": None}
    record = Record.from_json(raw)
    assert record.components["protection"] == Made("gone", None, None)
    assert record.cell == record.legacy_cell == "described-by-prose" and stale_reasons(record) == []


def test_a_key_no_known_version_made_leaves_the_version_unknown_unless_it_never_left_1():
    """A protection key none of v1..v(now) reproduces: unknown for uge (v2), 1 for cwp (never left v1)."""
    uge = schema_1(planned("uge"), protection_key="not-a-key-of-any-version")
    assert versions(uge)["protection"] is None and upgrade(uge)["cell"] == "described-by-prose"
    assert stale_reasons(Record.from_json(uge)) == ["uge: version not recorded (bench < 0.2), now v2"]
    cwp = schema_1(planned("cwp"), protection_key="not-a-key-of-any-version")
    assert versions(cwp)["protection"] == 1


def test_a_key_made_by_a_version_newer_than_the_installed_one_is_not_recovered(monkeypatch):
    """Only the versions this bench has had (1 … now) are tried: a record from a newer uge (v3) stays unknown."""
    with monkeypatch.context() as newer:
        newer.setattr(PROTECTIONS.get("uge"), "version", 3)
        plan = planned("uge")
    assert versions(schema_1(plan))["protection"] is None


def test_a_record_without_its_recipe_keeps_its_old_key_but_recovers_its_versions():
    plan = planned("uge", "orthogonal_projection")
    for missing in ({"recipe_params": None}, {}):
        raw = {k: v for k, v in schema_1(plan, **missing).items() if missing or k != "recipe_params"}
        upgraded = upgrade(raw)
        assert upgraded["cell"] == upgraded["legacy_cell"] == "described-by-prose"
        assert versions(raw) == {"dataset": 1, "protection": 2, "countermeasure": 2, "victim": 1}


def test_a_record_of_a_plugin_keeps_its_old_key(monkeypatch):
    """A plugin's key held its code fingerprint, which schema 1 did not record: no re-key can be trusted."""
    plan = planned("cwp")
    assert upgrade(schema_1(plan))["cell"] == plan.cell_key  # built-in: re-keyed
    real = fingerprint.code_fingerprint
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda cls: "fp" if cls.name == "cwp" else real(cls))
    assert upgrade(schema_1(plan))["cell"] == "described-by-prose"


# ------------------------------------------------------------------ stale_reasons


def test_a_component_not_installed_does_not_hide_the_staleness_of_the_next_one():
    components = {"dataset": {"name": "gone", "version": 1}, "protection": {"name": "uge", "version": 1},
                  "countermeasure": {"name": "none", "version": 1}, "victim": {"name": "cnn", "version": None}}
    assert stale_reasons(make_record(components=components)) == [
        "uge v1 (now v2)", "cnn: version not recorded (bench < 0.2), now v1"]


# ------------------------------------------------------------------ RecordLog.append: the bytes on disk


def line_of(record: Record) -> bytes:
    return (json.dumps(record.to_json(), sort_keys=True, default=str) + "\n").encode()


def test_append_creates_missing_folders_and_writes_one_sorted_line_per_record(tmp_path):
    log = RecordLog(tmp_path / "results" / "runs" / "m" / "records.jsonl")
    first, second = make_record(cell="a"), make_record(cell="b", test_acc_final=0.0)
    log.append(first)
    log.append(second)
    lines = log.path.read_bytes().split(b"\n")
    assert lines[2:] == [b""] and len(lines) == 3  # one line each, newline-terminated, no blank line
    keys = list(json.loads(lines[0]))
    assert keys == sorted(keys) and keys[0] == "augment"
    assert [r.cell for r in log.read()] == ["a", "b"]
    assert log.path.read_bytes() == line_of(first) + line_of(second)


@pytest.mark.parametrize("cut", [b"{", b'{"cell": "x", "ma'])
def test_append_after_a_line_cut_short_starts_a_new_line(tmp_path, cut):
    """A writer killed mid-line (even after one byte) leaves no newline: the next record goes on its own line."""
    log = RecordLog(tmp_path / "records.jsonl")
    log.path.write_bytes(cut)
    record = make_record(cell="after")
    log.append(record)
    assert log.path.read_bytes() == cut + b"\n" + line_of(record)
    with pytest.warns(UserWarning, match="line 1"):
        assert [r.cell for r in log.read()] == ["after"]


def test_a_value_json_cannot_hold_is_written_as_text(tmp_path):
    log = RecordLog(tmp_path / "records.jsonl")
    log.append(dataclasses.replace(make_record(), dataset_params={"root": Path("/data/digits")}))
    assert log.read()[0].dataset_params == {"root": "/data/digits"}


def test_a_held_log_lock_times_out_naming_the_record_log(tmp_path, monkeypatch):
    log = RecordLog(tmp_path / "records.jsonl")
    monkeypatch.setenv("BENCH_LOCK_TIMEOUT", "0.05")
    with locked(f"{log.path}.lock", what="a test"), pytest.raises(LockTimeout, match=f"the record log {log.path}"):
        log.append(make_record())


# ------------------------------------------------------------------ RecordStore.latest


def test_the_store_gives_the_newest_record_of_each_cell_across_logs(tmp_path):
    for matrix, finished in (("a", 2.0), ("b", 1.0)):
        RecordLog(tmp_path / "runs" / matrix / "records.jsonl").append(
            make_record(cell="same", matrix=matrix, finished_at=finished))
    latest = RecordStore(tmp_path).latest()
    assert list(latest) == ["same"] and latest["same"].matrix == "a" and latest["same"].finished_at == 2.0


# ------------------------------------------------------------------ from_json and problems: what is wrong


def test_from_json_names_unknown_fields_and_a_missing_one():
    with pytest.raises(ValueError, match=r"unknown record fields \['bogus', 'zeta'\]"):
        Record.from_json({**record_json(), "bogus": 1, "zeta": 2})
    raw = record_json()
    del raw["cell"]
    with pytest.raises(ValueError, match=r"not a record \(TypeError: .*'cell'"):
        Record.from_json(raw)


def test_every_problem_is_named_with_its_value_joined_by_semicolons():
    raw = record_json(test_acc_best=1.5, train_acc=[0.5, -0.25], status="done")
    with pytest.raises(ValueError) as refused:
        Record.from_json(raw)
    assert str(refused.value) == ("test_acc_best = 1.5 is outside [0, 1]; train_acc = [0.5, -0.25] is outside "
                                  "[0, 1]; status 'done' is none of ok, error")


def test_accuracies_of_exactly_0_and_1_are_valid_but_a_nan_one_is_not():
    """[0, 1] is closed; NaN marks an epoch not evaluated in a curve only, never a final accuracy."""
    record = make_record(test_acc_final=0.0, test_acc_best=1.0, train_acc=[0.0, 1.0], test_acc=[math.nan, 0.0])
    assert record.problems() == []
    assert dataclasses.replace(record, test_acc_final=math.nan).problems() == ["test_acc_final = nan is outside [0, 1]"]
