"""Records that never show stale numbers: schema-1 records upgraded (versions recovered, cells re-keyed as the planner
keys them), stale records marked in the leaderboard, the comparison and the dry run, records found by key across
the results folder (a matrix that extends or copies another trains only its new cells), --rerun and --force."""

from __future__ import annotations

import json

import pytest

from bench.cli import main
from bench.core.components import PROTECTIONS
from bench.plan.matrix import expand, load_matrix
from bench.plan.planner import known_dataset_key, plan_cell
from bench.store.cache import Cache
from bench.store.integrity import read_objects
from bench.store.records import Record, RecordLog, RecordStore, stale_reasons, upgrade
from tests.conftest import REPO, make_record, tiny_matrix

COMMITTED = REPO / "results" / "runs" / "dh-table1-cpu" / "records.jsonl"


def schema_1_lines() -> list[dict]:
    """The committed dh-table1-cpu records bench 0.1 wrote (no ``schema`` field)."""
    return [raw for _, raw in read_objects(COMMITTED)[0] if "schema" not in raw]


def test_schema_1_records_recover_their_versions_from_their_keys():
    lines = schema_1_lines()
    assert len(lines) >= 100
    for raw in lines:
        made = upgrade(raw)["components"]
        assert all(m["version"] is not None for m in made.values()), raw["protection"]
        name = raw["protection_name"]
        expected = 2 if name == "dh" else PROTECTIONS.get(name).version  # dh's records predate its v3
        if raw["protection_key"] or raw["protection_name"] == "clean":
            assert made["protection"]["version"] == expected, raw["protection"]


def test_upgraded_keys_are_the_planners_and_only_dh_v2_records_are_stale():
    """A fresh clone's committed records count as recorded: the upgrade re-keys each cell as the planner keys it."""
    matrix = load_matrix("dh-table1-cpu")
    records = [Record.from_json(raw) for raw in schema_1_lines()]
    choice = matrix.axes["datasets"][0]
    known = known_dataset_key(Cache(REPO / "no-cache"), choice, records)
    assert known.source == "records"
    planned = {plan_cell(cell, {choice: known.key}, matrix.recipe).cell_key for cell in expand(matrix)}
    current = [r for r in records if not stale_reasons(r)]
    assert {r.protection_name for r in records if stale_reasons(r)} == {"dh"}
    assert all(r.cell in planned for r in current) and len(current) == len(records) - 28
    assert all(r.cell not in planned for r in records if stale_reasons(r))
    assert all(r.legacy_cell and r.legacy_cell != r.cell for r in current)


def test_a_record_of_a_newer_schema_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="upgrade bench"):
        upgrade({"schema": 99, "cell": "x"})


def test_a_component_whose_version_moved_on_makes_its_records_stale(monkeypatch):
    record = make_record(protection="cwp", components={"dataset": {"name": "digits", "version": 1},
                                                      "protection": {"name": "cwp", "version": 1},
                                                      "countermeasure": {"name": "none", "version": 1},
                                                      "victim": {"name": "cnn", "version": 1}})
    assert stale_reasons(record) == []
    monkeypatch.setattr(PROTECTIONS.get("cwp"), "version", 3)
    assert stale_reasons(record) == ["cwp v1 (now v3)"]


def run(matrix, results, *extra) -> int:
    return main(["run", "--matrix", str(matrix), "--results", str(results), "--jobs", "1", *extra])


def test_stale_records_are_marked_and_retrained(tmp_path, capsys, monkeypatch):
    matrix, results = tiny_matrix(tmp_path), tmp_path / "r"
    assert run(matrix, results) == 0
    old = PROTECTIONS.get("cwp").version
    monkeypatch.setattr(PROTECTIONS.get("cwp"), "version", old + 1)
    capsys.readouterr()
    assert main(["leaderboard", "--matrix", str(matrix), "--results", str(results)]) == 0
    shown = capsys.readouterr().out
    assert shown.count("(stale)") == 5  # cwp's two cells, its row's Mean and Max, and the footnote
    assert f"(stale): 2 record(s) made by cwp v{old} (now v{old + 1}); `bench run` retrains them" in shown
    assert run(matrix, results, "--dry-run") == 0
    dry = capsys.readouterr().out
    assert dry.splitlines()[1].startswith("dataset | protection | countermeasure | victim | seed")
    assert "4 cells, 2 recorded, 2 to train (2 replace a stale record)" in dry
    assert run(matrix, results) == 0
    assert "2 trained, 2 already recorded" in capsys.readouterr().out
    assert main(["leaderboard", "--matrix", str(matrix), "--results", str(results)]) == 0
    assert "(stale)" not in capsys.readouterr().out


def test_a_matrix_that_extends_another_trains_only_its_new_cells(tmp_path, capsys):
    parent, results = tiny_matrix(tmp_path), tmp_path / "r"
    assert run(parent, results) == 0
    child = tmp_path / "child.toml"
    child.write_text(f'extends = "{parent.name}"\n[countermeasures]\ngrayscale = {{}}\n[recipe]\nepochs = 2\n')
    capsys.readouterr()
    assert run(child, results, "--dry-run") == 0
    assert "6 cells, 4 recorded, 2 to train" in capsys.readouterr().out
    assert run(child, results) == 0
    out = capsys.readouterr().out
    assert "matrix child: 6 cells — 2 trained, 4 already recorded" in out
    assert "grayscale" in out and "bdr" in out  # its leaderboard shows the parent's cells too
    assert len(RecordLog(results / "runs" / "child" / "records.jsonl").read()) == 2
    frame_cells = {r.cell for r in RecordStore(results).read()}
    assert len(frame_cells) == 6


def test_extends_errors_name_the_file(tmp_path):
    loop = tmp_path / "a.toml"
    loop.write_text('extends = "a.toml"\n')
    assert main(["run", "--matrix", str(loop), "--dry-run"]) == 2
    (tmp_path / "b.toml").write_text('extends = "no-such-matrix"\n')
    assert main(["run", "--matrix", str(tmp_path / "b.toml"), "--dry-run"]) == 2


def purified_times(results) -> dict[str, float]:
    """When each purified set was made, by key."""
    return {p.parent.name: json.loads(p.read_text())["created"] for p in results.glob("cache/purified/*/manifest.json")}


def test_rerun_retrains_and_rebuilds_only_the_matching_cells(tmp_path, capsys):
    matrix, results = tiny_matrix(tmp_path), tmp_path / "r"
    assert run(matrix, results) == 0
    created = purified_times(results)
    capsys.readouterr()
    assert run(matrix, results, "--rerun", "countermeasure=bdr") == 0
    out = capsys.readouterr().out
    assert "2 trained, 2 already recorded" in out
    estimate = out.splitlines()[0]  # it counts what --rerun retrains and rebuilds
    assert "4 cells, 4 recorded, 2 to train; protected sets 1 cached, 1 to build; purified sets 2 cached, 2 to" in estimate
    again = purified_times(results)
    assert again.keys() == created.keys() and all(again[k] > created[k] for k in created)  # bdr's sets rebuilt
    latest = RecordLog(results / "runs" / "tiny" / "records.jsonl").read()
    assert len(latest) == 6 and {r.countermeasure for r in latest[4:]} == {"bdr"}
    assert run(matrix, results, "--force") == 0
    assert "4 trained, 0 already recorded" in capsys.readouterr().out
    assert run(matrix, results, "--force", "--rerun", "countermeasure=bdr") == 2


def test_a_recipes_prose_is_not_in_the_cell_key(monkeypatch):
    """Rewording a recipe's description (or renaming it) used to orphan every record: keys hold what trains."""
    import dataclasses

    from bench.plan import recipes

    matrix = load_matrix("smoke")
    cell = expand(matrix)[0]
    before = plan_cell(cell, {cell.dataset: "data-0"}, matrix.recipe).cell_key
    reworded = dataclasses.replace(recipes.RECIPES["quick"], source="another description")
    monkeypatch.setitem(recipes.RECIPES, "quick", reworded)
    assert plan_cell(cell, {cell.dataset: "data-0"}, matrix.recipe).cell_key == before
    monkeypatch.setitem(recipes.RECIPES, "quick", dataclasses.replace(reworded, lr=reworded.lr * 2))
    assert plan_cell(cell, {cell.dataset: "data-0"}, matrix.recipe).cell_key != before  # a setting that trains differently


def test_a_plugin_whose_code_changed_is_stale(monkeypatch):
    record = make_record(components={"dataset": {"name": "digits", "version": 1},
                                     "protection": {"name": "clean", "version": 1},
                                     "countermeasure": {"name": "none", "version": 1, "code": "old-fingerprint"},
                                     "victim": {"name": "cnn", "version": 1}})
    assert stale_reasons(record) == ["none: code changed since (its package or file, or a helper it imports)"]
