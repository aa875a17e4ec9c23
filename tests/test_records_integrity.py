"""Damaged records and matrix.json (audit defects 5 and 15): every reader reports a damaged line (file, line, what
is wrong) and skips it, a record is checked against ``Record``'s field types, a damaged record's cell counts as not
recorded (``bench run`` trains it again), another matrix's records or a stray ``./results`` never stop a run, and a
damaged matrix.json is a ConfigError (exit 2) that says how to rewrite it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import pytest

from bench.cli import main
from bench.plan import estimate
from bench.store.integrity import mistyped, read_objects
from bench.store.records import Record, RecordLog, RecordStore
from tests.conftest import record_json, tiny_matrix

GOOD = json.dumps(record_json(cell="a", test_acc=[0.1, float("nan"), 0.3])).encode()
LAST = json.dumps(record_json(cell="b")).encode()
DAMAGED = {  # a line → a word of the problem the warning must name
    "bad UTF-8": (b'{"cell": "x\xff"}', "UTF-8"),
    "a number": (b"42", "number"),
    "null": (b"null", "null"),
    "an array": (b"[1, 2]", "array"),
    "garbage": (b"this is not json", "not JSON"),
    "NUL bytes": (b"\0" * 4096, "NUL"),
    "no record": (b'{"foo": 1}', "not a valid record"),
    "a bare cell": (b'{"cell": "a"}', "not a valid record"),
    "an accuracy as text": (json.dumps(record_json(cell="a", test_acc_final="0.9x")).encode(), "test_acc_final"),
    "a list for a float": (json.dumps(record_json(cell="a", test_acc_final=[0.9])).encode(), "test_acc_final"),
    "text in a curve": (json.dumps(record_json(cell="a", train_acc=[0.1, "x"])).encode(), "train_acc"),
    "an accuracy over 1": (json.dumps(record_json(cell="a", test_acc_best=1.5)).encode(), "outside [0, 1]"),
    "true for a seed": (json.dumps(record_json(cell="a", seed=True)).encode(), "seed"),
    "an unknown status": (json.dumps(record_json(cell="a", status="done")).encode(), "status"),
    "a component without name": (json.dumps(record_json(cell="a", components={"dataset": {"version": 1}})).encode(),
                                 "not a record"),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_every_reader_reports_a_damaged_line_and_skips_it(tmp_path, damage):
    """Old: 0xff, 42, null and [1, 2] raised (UnicodeDecodeError, TypeError); the type cases were read as records."""
    line, word = DAMAGED[damage]
    log = RecordLog(tmp_path / "runs" / "m" / "records.jsonl")
    log.path.parent.mkdir(parents=True)
    log.path.write_bytes(GOOD + b"\n" + line + b"\n" + LAST + b"\n")
    with pytest.warns(UserWarning) as caught:
        assert [r.cell for r in log.read()] == ["a", "b"]
    message = str(caught[0].message)
    assert str(log.path) in message and "line 2" in message and word in message, message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per process: the other readers skip it quietly
        assert set(RecordStore(tmp_path).latest()) == set(log.latest()) == {"a", "b"}
        assert [r.cell for r in estimate.timings([tmp_path])] == ["a", "b"]


def test_a_damaged_record_is_not_recorded_where_it_was_a_cells_only_one(tmp_path):
    """Old: a record with test_acc_final = "0.9x" counted as recorded (never retrained) and dropped its seed."""
    log = RecordLog(tmp_path / "runs" / "m" / "records.jsonl")
    log.path.parent.mkdir(parents=True)
    log.path.write_bytes(DAMAGED["an accuracy as text"][0] + b"\n" + LAST + b"\n")
    with pytest.warns(UserWarning, match="line 1"):
        assert set(RecordStore(tmp_path).latest()) == {"b"}


def test_every_field_of_a_record_is_checked_against_its_annotation():
    """Generic: a value of no JSON type a field allows (a set) is refused, naming the field, for every field."""
    for field in dataclasses.fields(Record):
        raw = {**record_json(), field.name: {1, 2}}
        with pytest.raises(ValueError) as refused:
            Record.from_json(raw)
        if field.name not in ("components", "schema"):  # refused earlier: not a mapping / not a schema number
            assert field.name in str(refused.value)


def test_mistyped_follows_the_annotations_of_any_dataclass():
    @dataclasses.dataclass
    class Sample:
        n: int
        x: float
        names: list[str]
        table: dict[str, float | None]
        maybe: bool | None = None

    assert mistyped(Sample(1, 2, ["a"], {"k": None, "j": 0.5})) == []
    wrong = mistyped(Sample(True, "1", ["a", 2], {"k": "v"}, maybe=0))
    assert [w.split(" = ")[0] for w in wrong] == ["n", "x", "names", "table", "maybe"]


def test_a_last_line_cut_short_by_a_crash_is_skipped_quietly_until_a_line_follows_it(tmp_path):
    """Every prefix of a record (and NUL bytes) as the last line, without its newline, is what a killed writer
    leaves: no warning. Once a line follows it, it is damage like any other (old: skipped without a word)."""
    path = tmp_path / "records.jsonl"
    for cut in [*(GOOD[:n] for n in range(1, len(GOOD), 7)), b"\0" * 4096]:
        path.write_bytes(LAST + b"\n" + cut)
        objects, damage = read_objects(path)
        assert [o["cell"] for _, o in objects] == ["b"] and damage == [], cut
    path.write_bytes(LAST + b"\n" + GOOD[:100] + b"\n" + LAST + b"\n")
    assert [(d.line, d.problem.split(" (")[0], d.cell) for d in read_objects(path)[1]] == [(2, "cut short", "a")]
    path.write_bytes(LAST + b"\n" + b"garbage, no record")  # not the start of an object: reported
    assert [d.line for d in read_objects(path)[1]] == [2]


# ------------------------------------------------------------------ bench run, leaderboard, report


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny matrix (4 cells), run once: its TOML and results folder (copy before changing it)."""
    folder = tmp_path_factory.mktemp("recorded")
    matrix = tiny_matrix(folder)
    assert main(["run", "--matrix", str(matrix), "--results", str(folder / "r"), "--jobs", "1"]) == 0
    return matrix, folder / "r"


@pytest.fixture
def copy(recorded, tmp_path) -> tuple[Path, Path]:
    matrix, results = recorded
    shutil.copytree(results, tmp_path / "r")
    return matrix, tmp_path / "r"


def test_bench_run_never_stops_on_another_matrixs_records_or_a_stray_results_folder(copy, tmp_path, monkeypatch,
                                                                                     capsys):
    """Old: a 0xff line in any records.jsonl of the results folder, or of ./results, was a UnicodeDecodeError."""
    matrix, results = copy
    (results / "runs" / "other").mkdir()
    (results / "runs" / "other" / "records.jsonl").write_bytes(b"\xff\n")
    stray = tmp_path / "cwd" / "results" / "runs" / "y"
    stray.mkdir(parents=True)
    (stray / "records.jsonl").write_bytes(b"42\n")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv("BENCH_RESULTS", raising=False)
    with pytest.warns(UserWarning) as caught:
        assert main(["run", "--matrix", str(matrix), "--results", str(results), "--dry-run"]) == 0
    assert "4 recorded, 0 to train" in capsys.readouterr().out
    assert {Path(str(w.message).split(": ")[0]).name for w in caught} == {"records.jsonl"}
    assert {Path(str(w.message).split(": ")[0]).parent.name for w in caught} == {"other", "y"}


def damage_one_record(results: Path) -> str:
    """Give the first record test_acc_final = "0.9x"; its cell key."""
    path = results / "runs" / "tiny" / "records.jsonl"
    lines = path.read_text().splitlines()
    raw = json.loads(lines[0])
    lines[0] = json.dumps({**raw, "test_acc_final": "0.9x"})
    path.write_text("\n".join(lines) + "\n")
    return raw["cell"]


def test_a_damaged_record_is_listed_with_the_leaderboard_and_its_cell_is_trained_again(copy, capsys):
    """Old: leaderboard rc 0 without a word, the cell empty; `bench run` counted it as recorded."""
    matrix, results = copy
    damage_one_record(results)
    with pytest.warns(UserWarning, match="line 1: not a valid record"):
        assert main(["leaderboard", "--matrix", "tiny", "--results", str(results)]) == 0
    shown = capsys.readouterr().out
    assert "skipped (damaged record line, its cell counts as not recorded): runs/tiny/records.jsonl, line 1" in shown
    assert "test_acc_final = '0.9x' is not float" in shown
    assert main(["run", "--matrix", str(matrix), "--results", str(results), "--dry-run"]) == 0
    assert "3 recorded, 1 to train" in capsys.readouterr().out
    assert main(["report", "--matrix", "tiny", "--results", str(results)]) == 0
    assert "runs/tiny/records.jsonl, line 1" in (results / "reports" / "tiny" / "report.md").read_text()


def test_records_that_are_all_damaged_or_none_say_so_with_exit_2(copy, capsys):
    _, results = copy
    log = results / "runs" / "tiny" / "records.jsonl"
    for content, said in ((b"", "no records for matrix 'tiny'"), (b"\xff\n", "1 damaged line(s) skipped")):
        log.write_bytes(content)
        for command in ("leaderboard", "report"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert main([command, "--matrix", "tiny", "--results", str(results)]) == 2
            assert said in capsys.readouterr().err


MATRIX_DAMAGE = {
    "truncated": lambda text: text[:100],
    "not an object": lambda text: "[]",
    "without axes": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "axes"}),
    "axes of the wrong type": lambda text: json.dumps({**json.loads(text), "axes": {"protections": ["clean"]}}),
    "cells of the wrong type": lambda text: json.dumps({**json.loads(text), "cells": 5}),
    "a bad layout": lambda text: json.dumps({**json.loads(text), "layout": []}),
}


@pytest.mark.parametrize("damage", MATRIX_DAMAGE)
def test_a_damaged_matrix_json_is_exit_2_naming_the_fix(copy, capsys, damage):
    """Old: truncated and [] were tracebacks (JSONDecodeError, AttributeError), no axes passed unnoticed."""
    _, results = copy
    saved = results / "runs" / "tiny" / "matrix.json"
    saved.write_text(MATRIX_DAMAGE[damage](saved.read_text()))
    for command in ("leaderboard", "report"):
        assert main([command, "--matrix", "tiny", "--results", str(results)]) == 2
        said = capsys.readouterr().err
        assert str(saved) in said and "it is damaged; rerun `bench run --matrix" in said, said
