"""Leaderboard properties mutation testing asked for: file names, notes under a table, seed statistics, records.csv."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bench.plan.layout import Layout
from bench.report.leaderboard import Table, build_tables, leaderboard, markdown, write_tables
from tests.conftest import record_json

STALE_V1 = "protection cwp version 1 (now 2)"
STALE_CODE = "countermeasure jpeg code changed"


def rec(protection: str, countermeasure: str, acc: float | None = 0.5, **fields: Any) -> dict[str, Any]:
    """A table row as ``bench.report.view`` gives one (accuracies in [0, 1]); ``fields`` override; the cell key
    follows the labels unless given."""
    row = {"status": "ok", "dataset": "digits", "victim": "cnn", "recipe": "quick", "poison_ratio": 1.0,
           "protection": protection, "countermeasure": countermeasure, "seed": 0, "countermeasure_reports": "final",
           "test_acc_final": acc, "test_acc_best": acc, **fields}
    labels = ("dataset", "victim", "recipe", "poison_ratio", "mix", "protection", "countermeasure", "seed")
    row.setdefault("cell", "|".join(str(row.get(k)) for k in labels))
    return row


def one(records: list[dict[str, Any]], **kwargs: Any) -> Table:
    tables = build_tables(records, **kwargs)
    assert len(tables) == 1, [t.slug for t in tables]
    return tables[0]


def write_log(results: Path, rows: list[dict[str, Any]], extra: str = "", saved: dict | None = None) -> Path:
    """A run ``m``'s records.jsonl (``extra`` appended verbatim) and matrix.json."""
    run = results / "runs" / "m"
    run.mkdir(parents=True)
    (run / "matrix.json").write_text(json.dumps(saved or {"axes": {}}))
    (run / "records.jsonl").write_text("".join(json.dumps(record_json(**r)) + "\n" for r in rows) + extra)
    return run


# ------------------------------------------------------------------ names: slugs and titles


def test_slug_keeps_letters_of_either_case_and_turns_other_runs_into_one_dash(tmp_path: Path) -> None:
    """File names: upper case kept, each run of other characters one '-', none at either end."""
    table = one([rec("clean", "none", dataset="X-ray", victim="ViT B/16", recipe="paper (2x)")])
    assert table.slug == "X-ray__ViT-B-16__paper-2x"
    assert {p.name for p in write_tables([table], tmp_path)} == {"X-ray__ViT-B-16__paper-2x.final.csv",
                                                                 "X-ray__ViT-B-16__paper-2x.final.md"}


def test_bad_metric_error_lists_the_metrics() -> None:
    """The error names the bad metric and every allowed one."""
    with pytest.raises(ValueError, match=r"metric must be one of final, best, car, gcr, got 'last'"):
        build_tables([rec("clean", "none")], metric="last")


def test_a_cell_that_failed_before_its_recipe_shows_in_a_recipe_question_mark_table() -> None:
    """A record without a recipe is not dropped: its table says ``recipe ?``."""
    table = one([rec("cwp", "none", None, status="error", recipe=None)])
    assert table.title.endswith("recipe ?") and table.slug == "digits__cnn__"
    assert table.display.at["cwp", "none"] == "error"


def test_rows_without_a_recipe_field_get_the_recipe_question_mark_table() -> None:
    """Hand-made rows lacking the field altogether are a table of recipe ``?`` (they silently gave no table)."""
    row = {k: v for k, v in rec("clean", "none").items() if k != "recipe"}
    table = one([row])
    assert table.title.endswith("recipe ?") and table.mean.at["clean", "none"] == pytest.approx(50)


# ------------------------------------------------------------------ ratio columns (ConfounderGAN Fig. 5)


def test_ratio_columns_run_by_numeric_p_whatever_the_record_order() -> None:
    """Columns by p as a number (1e-05 before 0.5 though it sorts after it as text), not as listed."""
    records = [rec("em", "jpeg", acc, poison_ratio=p) for acc, p in ((0.9, 0.9), (0.1, 1e-05), (0.5, 0.5))]
    table = one(records, layout=Layout(labels={"jpeg": "JPEG"}))
    assert list(table.mean.columns) == ["p=1e-05 (JPEG)", "p=0.5 (JPEG)", "p=0.9 (JPEG)", "Mean", "Max"]
    assert table.mean.at["em", "p=1e-05 (JPEG)"] == pytest.approx(10)


def test_ratios_split_tables_when_countermeasures_are_rows() -> None:
    """Fig. 5's ratio columns only replace countermeasure columns: with victim columns each ratio gets a table."""
    records = [rec("em", "none", acc, poison_ratio=p) for acc, p in ((0.3, 0.5), (0.4, 0.9))]
    tables = build_tables(records, layout=Layout(rows=("protection", "countermeasure"), columns="victim"))
    assert [t.slug for t in tables] == ["digits__quick__p0.5", "digits__quick__p0.9"]
    assert [list(t.mean.index) for t in tables] == [["em · none"], ["em · none"]]
    assert tables[1].title.endswith("poison ratio 0.9") and tables[1].mean.at["em · none", "cnn"] == pytest.approx(40)


# ------------------------------------------------------------------ values


def test_a_metric_no_record_has_leaves_empty_cells_but_best_reporting_columns_show_their_best() -> None:
    """gcr measured nowhere: ok cells are empty (not ``error``); early_stop still shows its best epoch."""
    records = [rec("clean", "none", 0.9), rec("clean", "early_stop", 0.5, test_acc_best=0.7,
                                              countermeasure_reports="best")]
    table = one(records, metric="gcr")
    assert table.display.at["clean", "none"] == "" and pd.isna(table.mean.at["clean", "none"])
    assert table.display.at["clean", "early_stop"] == "70.00"


def test_an_accuracy_that_is_no_number_is_an_empty_cell() -> None:
    """Hand-made rows with a non-number accuracy (final or best) leave that cell empty, the others shown."""
    records = [rec("clean", "none", 0.9), {**rec("cwp", "none"), "test_acc_final": "n/a"},
               {**rec("cwp", "early_stop", countermeasure_reports="best"), "test_acc_best": "n/a"}]
    table = one(records)
    assert table.display.at["cwp", "none"] == table.display.at["cwp", "early_stop"] == ""
    assert table.display.at["clean", "none"] == "90.00"


def test_best_reporting_records_without_a_best_accuracy_show_their_final_one() -> None:
    """No ``test_acc_best`` field at all: the best-reporting column falls back to the final accuracy."""
    records = [{k: v for k, v in rec("cwp", "early_stop", 0.4, countermeasure_reports="best").items()
                if k != "test_acc_best"}]
    assert one(records).display.at["cwp", "early_stop"] == "40.00"


def test_records_without_reports_warn_with_the_cause_and_the_fix() -> None:
    """The warning names how many records, the cause (an older bench), what the columns show, and the fix."""
    old = rec("cwp", "early_stop", 0.1)
    del old["countermeasure_reports"]
    with pytest.warns(UserWarning, match=r"1 record\(s\) carry no countermeasure_reports \(written by an older bench\)"
                      r": their columns show the final epoch even for a countermeasure that reports its best "
                      r"\(early_stop\); rerun those cells into a fresh --results folder to refresh them"):
        build_tables([old])


# ------------------------------------------------------------------ which record stands for a position


def test_another_mix_at_the_same_labels_is_its_own_row() -> None:
    """``mix`` is part of a table position: clean_only beside protected, neither replaces the other."""
    table = one([rec("em", "none", 0.2), rec("em", "none", 0.8, mix="clean_only")])
    assert list(table.mean.index) == ["em", "em [clean_only]"]
    assert table.mean.at["em [clean_only]", "none"] == pytest.approx(80)


def test_equal_finish_times_at_one_position_keep_the_record_later_in_the_log() -> None:
    """Ties in finished_at (a copied log, records from before the field): the later line stands, for every seed."""
    times = [0.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    records = [rec("em", "none", acc, seed=s, finished_at=t, cell=f"{which}-{s}")
               for s, t in enumerate(times) for which, acc in (("old", 0.9), ("new", 0.2))]
    table = one(records)
    assert table.display.at["em", "none"] == "20.00 ± 0.00"


# ------------------------------------------------------------------ notes under a table


def test_stale_cells_are_marked_and_their_reasons_counted_in_first_seen_order() -> None:
    """Only records with a reason are stale (a missing or empty reason is current); one line per reason."""
    records = [rec("cwp", "none", stale=STALE_V1), rec("cwp", "jpeg", stale=STALE_CODE),
               rec("cwp", "jpeg", seed=1, stale=STALE_CODE), rec("clean", "none", stale=None), rec("clean", "jpeg")]
    table = one(records)
    assert table.stale == (f"1 record(s) made by {STALE_V1}; `bench run` retrains them",
                           f"2 record(s) made by {STALE_CODE}; `bench run` retrains them")
    assert table.display.at["cwp", "none"] == "50.00 (stale)" and table.display.at["cwp", "Mean"] == "50.00 (stale)"
    assert table.display.at["clean", "none"] == "50.00" and table.display.at["clean", "Max"] == "50.00"


def test_ran_lists_each_protection_and_countermeasure_choice_once() -> None:
    """``label: ran`` from protect_info and purify_info, deduplicated; infos without ``ran`` add nothing."""
    records = [rec("uge", "none", protect_info={"ran": "CLIP ViT-B/32"}),
               rec("uge", "none", seed=1, protect_info={"ran": "CLIP ViT-B/32"}),
               rec("uge", "diffpure", purify_info={"ran": "DDPM (alternative)"}),
               rec("clean", "none", protect_info={"epsilon": 8}, purify_info=None)]
    assert one(records).ran == ("uge: CLIP ViT-B/32", "diffpure: DDPM (alternative)")


def mixed(records: list[dict[str, Any]]) -> tuple[str, ...]:
    return one(records).ran


def test_mixed_devices_line_counts_ok_cells_by_device_kind_and_precision() -> None:
    """Device indices merge into their kind; failed cells do not count; two settings are already mixed."""
    records = [rec("clean", "none", device="cuda:0", precision="bf16"),
               rec("clean", "jpeg", device="cuda:1", precision="bf16"),
               rec("cwp", "none", device="cpu", precision="fp32"),
               rec("cwp", "jpeg", None, status="error", device="mps", precision="fp16")]
    assert mixed(records) == ("mixed devices/precisions: cpu fp32 (1 cells), cuda bf16 (2 cells)",)
    assert mixed(records[:2]) == ()  # two GPUs of one kind, one precision
    assert mixed([*records[:2], {**records[3], "status": "ok", "test_acc_final": 0.4}]) == (
        "mixed devices/precisions: cuda bf16 (2 cells), mps fp16 (1 cells)",)


def test_mixed_precisions_without_devices_and_unknown_precision() -> None:
    """Records without a device field still compare precisions; a missing precision reads ``?``."""
    records = [rec("clean", "none", precision="fp32"), rec("clean", "jpeg", precision=None)]
    assert mixed(records) == ("mixed devices/precisions: ? (1 cells), fp32 (1 cells)",)


def test_mixed_devices_without_precisions_and_a_record_without_a_device() -> None:
    """Records without a precision field compare devices alone; a missing device leaves only the precision."""
    assert mixed([rec("clean", "none", device="cuda:0"), rec("clean", "jpeg", device="cpu")]) == (
        "mixed devices/precisions: cpu (1 cells), cuda (1 cells)",)
    assert mixed([rec("clean", "none", device="cuda:0", precision="fp32"), rec("clean", "jpeg", precision="fp32")]) == (
        "mixed devices/precisions: cuda fp32 (1 cells), fp32 (1 cells)",)


# ------------------------------------------------------------------ seed statistics and files


def test_std_frame_has_the_tables_rows_and_columns_in_order() -> None:
    """table.std (the .std.csv) lists rows and columns as the table does (clean, none first), without Mean/Max."""
    records = [rec(p, c, acc + s / 10, seed=s) for p, acc in (("cwp", 0.1), ("clean", 0.5)) for c in ("jpeg", "none")
               for s in (0, 1)]
    table = one(records)
    assert list(table.std.index) == ["clean", "cwp"] and list(table.std.columns) == ["none", "jpeg"]
    assert table.std.at["clean", "none"] == pytest.approx(7.0711, abs=1e-4)


def test_csv_keeps_four_decimals(tmp_path: Path) -> None:
    """The numeric CSV rounds means to 4 decimals (33.3333, not more)."""
    table = one([rec("clean", "none", 1 / 3)])
    csv = write_tables([table], tmp_path)[0]
    assert csv.read_text().splitlines() == ["protection,none,Mean,Max", "clean,33.3333,33.3333,33.3333"]


def with_notes(**notes: tuple[str, ...]) -> str:
    return markdown(dataclasses.replace(one([rec("clean", "none", 0.9), rec("cwp", "none", 0.1)]), **notes))


def test_markdown_right_aligns_and_lists_each_note_on_its_own_line() -> None:
    """Title, a right-aligned table, then one ``- …`` line per ran / stale / skipped note, in that order."""
    text = with_notes(ran=("uge: CLIP", "diffpure: DDPM"), stale=("1 record(s) a", "2 record(s) b"),
                      skipped=("runs/m/records.jsonl:3", "runs/m/records.jsonl:4"))
    head, table, tail = text.split("\n\n")
    assert head == "### digits × cnn — test accuracy (%, final), recipe quick"
    align = table.splitlines()[1]
    assert align.startswith("|-") and align.endswith(":|") and set(align) == {"|", "-", ":"}
    assert align.count(":") == align.count("|") - 1  # every column right-aligned
    assert tail == ("- ran: uge: CLIP\n- ran: diffpure: DDPM\n- (stale): 1 record(s) a\n- (stale): 2 record(s) b\n"
                    "- skipped (damaged record line, its cell counts as not recorded): runs/m/records.jsonl:3\n"
                    "- skipped (damaged record line, its cell counts as not recorded): runs/m/records.jsonl:4\n")


def test_markdown_writes_every_number_as_the_table_shows_it() -> None:
    """Two decimals everywhere: tabulate's number parsing wrote "90.00" as 90 beside "10.00 ± 0.00" cells."""
    assert "|        clean |  90.00 |  90.00 | 90.00 |" in with_notes()


def test_markdown_without_notes_ends_with_the_table() -> None:
    """No notes: one newline after the last table row, nothing else."""
    text = with_notes()
    assert text.count("\n\n") == 1 and text.endswith("|\n") and text.splitlines()[-1].startswith("|")
    assert with_notes(stale=("s",)).endswith("|\n\n- (stale): s\n")


# ------------------------------------------------------------------ leaderboard(): the command's files


def test_records_csv_is_flat_without_curves_errors_or_an_index(tmp_path: Path) -> None:
    """records.csv: a header of record fields (cell first), one line per cell, curves and errors left out."""
    rows = [{"cell": "a", "train_acc": [0.1, 0.2], "test_acc": [0.1, 0.3]},
            {"cell": "b", "protection": "cwp", "status": "error", "error": "RuntimeError: boom",
             "test_acc_final": None, "test_acc_best": None}]
    write_log(tmp_path, rows)
    _, written = leaderboard(tmp_path, "m")
    out = tmp_path / "leaderboards" / "m" / "records.csv"
    assert written[-1] == out
    flat = pd.read_csv(out)
    assert flat.columns[0] == "cell" and list(flat["cell"]) == ["a", "b"]
    assert not {"train_acc", "test_acc", "error"} & set(flat.columns)
    assert {"protection", "status", "stale", "components.protection.version"} <= set(flat.columns)


def test_leaderboard_lists_damaged_lines_under_each_table(tmp_path: Path) -> None:
    """A damaged record line is skipped and named under the table, in the .md file too."""
    write_log(tmp_path, [{"cell": "a"}], extra="{not json\n")
    with pytest.warns(Warning, match="skipped line 2"):
        tables, written = leaderboard(tmp_path, "m")
    assert len(tables[0].skipped) == 1 and "records.jsonl" in tables[0].skipped[0]
    md = next(p for p in written if p.suffix == ".md")
    assert f"- skipped (damaged record line, its cell counts as not recorded): {tables[0].skipped[0]}" in md.read_text()


def test_leaderboard_writes_the_metric_it_shows_and_splits_recipes_unless_asked(tmp_path: Path) -> None:
    """``metric`` names the files; recipes get a table each by default, one with ``mix_recipes``."""
    write_log(tmp_path, [{"cell": "a", "recipe": "quick"}, {"cell": "b", "recipe": "fast", "protection": "cwp"}])
    tables, written = leaderboard(tmp_path, "m", metric="best")
    assert [t.slug for t in tables] == ["digits__cnn__quick", "digits__cnn__fast"]
    assert sorted(p.name for p in written) == ["digits__cnn__fast.best.csv", "digits__cnn__fast.best.md",
                                               "digits__cnn__quick.best.csv", "digits__cnn__quick.best.md",
                                               "records.csv"]
    tables, _ = leaderboard(tmp_path, "m", mix_recipes=True)
    assert [t.slug for t in tables] == ["digits__cnn__fast-quick"]
