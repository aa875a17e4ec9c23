"""Leaderboard tables from synthetic records: layout, statistics, errors, grouping, ordering and files."""

from __future__ import annotations

import math
import os
import statistics

import pandas as pd
import pytest

from bench.plan.layout import Layout
from bench.report.leaderboard import build_tables, leaderboard, markdown, write_tables
from tests.conftest import REPO, record_json


def rec(protection: str, countermeasure: str, acc: float | None = 0.5, *, seed: int = 0, best: float | None = None,
        status: str = "ok", dataset: str = "digits", victim: str = "cnn", recipe: str = "quick",
        ratio: float = 1.0, reports: str = "final") -> dict:
    """A record as the runner writes it (accuracies in [0, 1])."""
    ok = status == "ok"
    return {"cell": f"{dataset}|{victim}|{recipe}|{ratio}|{protection}|{countermeasure}|{seed}", "status": status,
            "dataset": dataset, "victim": victim, "recipe": recipe, "poison_ratio": ratio, "protection": protection,
            "countermeasure": countermeasure, "countermeasure_reports": reports, "seed": seed, "test_acc_final": acc if ok else None,
            "test_acc_best": (best if best is not None else acc) if ok else None,
            "error": None if ok else "RuntimeError: boom"}


GRID = {("cwp", "none"): 0.10, ("cwp", "jpeg"): 0.40, ("cwp", "bdr"): 0.70,
        ("clean", "jpeg"): 0.80, ("clean", "bdr"): 0.60, ("clean", "none"): 0.90}


def grid_records() -> list[dict]:
    """clean and 'none' deliberately appear after other labels."""
    return [rec(p, c, acc) for (p, c), acc in GRID.items()]


def only_table(records, **kwargs):
    tables = build_tables(records, **kwargs)
    assert len(tables) == 1
    return tables[0]


# ------------------------------------------------------------------ layout and statistics


def test_clean_row_and_none_column_first():
    table = only_table(grid_records())
    assert list(table.mean.index) == ["clean", "cwp"]
    assert list(table.mean.columns) == ["none", "jpeg", "bdr", "Mean", "Max"]
    assert list(table.display.columns) == list(table.mean.columns)
    assert list(table.display.index) == ["clean", "cwp"]
    assert table.mean.index.name == "protection"


def test_values_are_percent():
    table = only_table(grid_records())
    for (p, c), acc in GRID.items():
        assert table.mean.at[p, c] == pytest.approx(acc * 100)
        assert table.display.at[p, c] == f"{acc * 100:.2f}"


@pytest.mark.parametrize("row", ["clean", "cwp"])
def test_mean_and_max_columns(row):
    table = only_table(grid_records())
    values = [GRID[(row, c)] * 100 for c in ("none", "jpeg", "bdr")]
    assert table.mean.at[row, "Mean"] == pytest.approx(sum(values) / 3)
    assert table.mean.at[row, "Max"] == pytest.approx(max(values))
    assert table.display.at[row, "Mean"] == f"{sum(values) / 3:.2f}"
    assert table.display.at[row, "Max"] == f"{max(values):.2f}"


def test_two_seeds_give_mean_and_sample_std():
    records = [rec("clean", "none", 0.50, seed=0), rec("clean", "none", 0.60, seed=1),
               rec("clean", "jpeg", 0.20, seed=0), rec("clean", "jpeg", 0.30, seed=1), rec("clean", "jpeg", 0.70, seed=2)]
    table = only_table(records)
    sd_none = statistics.stdev([50.0, 60.0])  # 7.07 (the population std would be 5.00)
    sd_jpeg = statistics.stdev([20.0, 30.0, 70.0])
    assert table.display.at["clean", "none"] == f"55.00 ± {sd_none:.2f}" == "55.00 ± 7.07"
    assert table.display.at["clean", "jpeg"] == f"40.00 ± {sd_jpeg:.2f}"
    assert table.std.at["clean", "none"] == pytest.approx(sd_none)
    # Mean / Max are over the per-cell means
    assert table.mean.at["clean", "Mean"] == pytest.approx((55 + 40) / 2)
    assert table.mean.at["clean", "Max"] == pytest.approx(55)


def test_single_seed_has_no_std():
    table = only_table(grid_records())
    assert "±" not in "".join(table.display.astype(str).to_numpy().ravel())
    assert table.std.isna().all().all()


def test_error_record_shows_error_and_is_left_out_of_statistics():
    records = grid_records()
    records[records.index(rec("cwp", "jpeg", 0.40))] = rec("cwp", "jpeg", status="error")
    table = only_table(records)
    assert table.display.at["cwp", "jpeg"] == "error"
    assert math.isnan(table.mean.at["cwp", "jpeg"])
    assert table.mean.at["cwp", "Mean"] == pytest.approx((10 + 70) / 2)
    assert table.mean.at["cwp", "Max"] == pytest.approx(70)


def test_error_record_with_an_accuracy_is_still_an_error():
    """A failed record's accuracy (e.g. from before a crash) never reaches the table."""
    broken = {**rec("clean", "none", 0.9), "status": "error", "error": "TrainingDiverged"}
    table = only_table([broken, rec("clean", "jpeg", 0.5)])
    assert table.display.at["clean", "none"] == "error"
    assert table.mean.at["clean", "Mean"] == pytest.approx(50)


def test_missing_cell_is_empty():
    records = [r for r in grid_records() if (r["protection"], r["countermeasure"]) != ("cwp", "bdr")]
    table = only_table(records)
    assert table.display.at["cwp", "bdr"] == ""
    assert math.isnan(table.mean.at["cwp", "bdr"])
    assert table.mean.at["cwp", "Mean"] == pytest.approx((10 + 40) / 2)


def test_row_with_only_errors_has_empty_mean_and_max():
    records = [rec("clean", "none", 0.9), rec("clean", "jpeg", 0.8), rec("cwn", "none", status="error"),
               rec("cwn", "jpeg", status="error")]
    table = only_table(records)
    assert list(table.display.loc["cwn"]) == ["error", "error", "", ""]


def test_latest_record_of_a_cell_wins():
    """A rerun after an error replaces the error; the earlier value never counts as a second seed."""
    records = [rec("clean", "none", status="error"), rec("clean", "none", 0.30), rec("clean", "none", 0.75)]
    table = only_table(records)
    assert table.display.at["clean", "none"] == "75.00"


# ------------------------------------------------------------------ grouping and options


def test_two_recipes_give_two_tables():
    records = grid_records() + [rec(p, c, acc / 2, recipe="fast") for (p, c), acc in GRID.items()]
    tables = build_tables(records)
    assert len(tables) == 2
    quick, fast = tables
    assert "recipe quick" in quick.title and "recipe fast" in fast.title
    assert quick.slug != fast.slug and "quick" in quick.slug and "fast" in fast.slug
    assert quick.mean.at["cwp", "jpeg"] == pytest.approx(40) and fast.mean.at["cwp", "jpeg"] == pytest.approx(20)


def test_mix_recipes_gives_one_table_naming_both():
    records = [rec("clean", "none", 0.5, recipe="quick"), rec("cwp", "none", 0.1, recipe="fast")]
    table = only_table(records, mix_recipes=True)
    assert "fast+quick" in table.title
    assert list(table.mean.index) == ["clean", "cwp"]


@pytest.mark.parametrize("split, values", [
    ("dataset", ["digits", "cifar10"]),
    ("victim", ["cnn", "resnet18"]),
])
def test_datasets_and_victims_get_their_own_tables(split, values):
    records = [rec("clean", "none", 0.5, **{split: values[0]}), rec("clean", "none", 0.7, **{split: values[1]})]
    tables = build_tables(records)
    assert len(tables) == 2
    for table, value, acc in zip(tables, values, (50, 70)):
        assert value in table.title and value in table.slug
        assert table.mean.at["clean", "none"] == pytest.approx(acc)


def test_poison_ratios_get_their_own_tables():
    records = [rec("cwp", c, 0.2, ratio=0.5) for c in ("none", "jpeg")] + [rec("cwp", c, 0.1) for c in ("none", "jpeg")]
    tables = build_tables(records)
    assert [t.slug.endswith("__p0.5") for t in tables] == [True, False]
    assert "poison ratio 0.5" in tables[0].title and "poison ratio 1" in tables[1].title
    assert only_table([rec("cwp", "none", 0.1)]).title.count("poison ratio") == 0


def test_ratios_with_one_countermeasure_are_columns():
    """ConfounderGAN Fig. 5's layout: a column per poison ratio, a row per protection and train-set mix."""
    records = [rec("em", "none", acc, ratio=r) for acc, r in ((0.6, 0.5), (0.3, 0.9))]
    records += [{**rec("clean", "none", acc, ratio=r), "mix": "clean_only"} for acc, r in ((0.5, 0.5), (0.2, 0.9))]
    table = only_table(records)
    assert list(table.mean.columns) == ["p=0.5", "p=0.9", "Mean", "Max"]
    assert table.mean.at["em", "p=0.9"] == pytest.approx(30) and table.mean.at["clean [clean_only]", "p=0.5"] == pytest.approx(50)


def test_a_countermeasure_that_reports_best_shows_its_best_epoch_from_the_record_alone():
    """The record says what its column shows (countermeasure_reports), so no registry is consulted: a name no
    plugin registers still gets its best epoch."""
    records = [rec("cwp", "none", 0.10, best=0.30), rec("cwp", "my_stop", 0.10, best=0.45, reports="best")]
    table = only_table(records)
    assert table.mean.at["cwp", "none"] == pytest.approx(10) and table.mean.at["cwp", "my_stop"] == pytest.approx(45)


def test_records_without_reports_warn_and_show_the_final_epoch():
    old = rec("cwp", "early_stop", 0.10, best=0.45)
    del old["countermeasure_reports"]
    with pytest.warns(UserWarning, match="1 record.*countermeasure_reports"):
        table = only_table([old])
    assert table.mean.at["cwp", "early_stop"] == pytest.approx(10)


def test_a_broken_plugin_does_not_stop_the_leaderboard(tmp_path):
    """Leaderboards are a step over records: a plugin that fails to import leaves them buildable (no record's
    staleness can be judged then), though every command that plans refuses to start."""
    import subprocess
    import sys

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken.py").write_text("raise RuntimeError('broken plugin')\n")
    code = ("import json; from pathlib import Path; from bench.report.leaderboard import leaderboard; "
            f"run = Path({str(tmp_path)!r}) / 'runs' / 'm'; run.mkdir(parents=True); "
            f"(run / 'records.jsonl').write_text(json.dumps({record_json(**rec('clean', 'none'))!r}) + '\\n'); "
            "(run / 'matrix.json').write_text(json.dumps({'axes': {}, 'layout': {'summary': False}})); "
            f"tables, _ = leaderboard(Path({str(tmp_path)!r}), 'm'); "
            "assert len(tables) == 1 and 'Mean' not in tables[0].mean, tables")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "BENCH_PLUGINS": str(plugins)})
    assert result.returncode == 0, result.stderr


def test_metric_best_uses_best_accuracy():
    records = [rec("clean", "none", 0.50, best=0.65), rec("cwp", "none", 0.10, best=0.30)]
    final, best = only_table(records), only_table(records, metric="best")
    assert final.mean.at["clean", "none"] == pytest.approx(50) and best.mean.at["clean", "none"] == pytest.approx(65)
    assert best.mean.at["cwp", "none"] == pytest.approx(30)
    assert "best" in best.title and "final" in final.title


def test_newest_record_stands_for_an_edited_cell():
    """Editing a component's (unswept) parameters gives a new cell key with the same labels: the newest counts."""
    old, new = rec("em", "none", 0.5), {**rec("em", "none", 0.2), "cell": "another key"}
    table = only_table([{**new, "finished_at": 2.0}, {**old, "finished_at": 1.0}])
    assert table.mean.at["em", "none"] == pytest.approx(20) and "±" not in table.display.at["em", "none"]


def test_car_and_gcr_are_leaderboard_values():
    records = [{**rec("cwp", "none", 0.1), "car": 0.9, "gcr": 0.05}, rec("clean", "none", 0.9)]
    car, gcr = only_table(records, metric="car"), only_table(records, metric="gcr")
    assert car.mean.at["cwp", "none"] == pytest.approx(90) and gcr.mean.at["cwp", "none"] == pytest.approx(5)
    assert pd.isna(car.mean.at["clean", "none"]) and "CAR" in car.title and "GCR" in gcr.title


def test_bad_metric_raises():
    with pytest.raises(ValueError, match="metric"):
        build_tables(grid_records(), metric="last")


def test_order_reorders_rows_and_columns():
    records = grid_records() + [rec("cwn", "none", 0.3), rec("cwn", "median_filter", 0.35)]
    order = {"protections": ["cwn", "cwp", "clean"], "countermeasures": ["bdr", "jpeg", "none"]}
    table = only_table(records, order=order)
    assert list(table.mean.index) == ["clean", "cwn", "cwp"]  # clean stays first
    assert list(table.mean.columns) == ["none", "bdr", "jpeg", "median_filter", "Mean", "Max"]  # unlisted last
    assert table.mean.at["cwn", "median_filter"] == pytest.approx(35)
    assert table.display.at["cwp", "jpeg"] == "40.00"


def test_no_records_no_tables():
    assert build_tables([]) == []
    assert build_tables([{"note": "no cell key"}]) == []


# ------------------------------------------------------------------ custom layouts (matrix [layout])

UGE = Layout(rows=("protection", "countermeasure"), columns="victim", summary=False,
             labels={"none": "Normal", "distill": "Distill", "authorized": "Acc. (Authorized)"})


def uge_records(seeds: tuple[int, ...] = (0,)) -> list[dict]:
    """UGE Table 1's shape, listed against the first-ordering rule (uge before clean, distill before none)."""
    return [rec(p, c, acc + s / 100, victim=v, seed=s) for p, base in (("uge", 0.1), ("clean", 0.8))
            for c, shift in (("distill", 0.05), ("none", 0.0)) for v, acc in (("cnn", base + shift), ("authorized", 0.9))
            for s in seeds]


def test_custom_layout_pivots_protection_countermeasure_rows_by_victim_columns():
    table = only_table(uge_records(), layout=UGE)
    assert list(table.mean.index) == ["clean · Normal", "clean · Distill", "uge · Normal", "uge · Distill"]
    assert list(table.mean.columns) == list(table.display.columns) == ["cnn", "Acc. (Authorized)"]  # no Mean, Max
    assert table.mean.index.name == table.display.index.name == "protection · countermeasure"
    assert table.mean.at["uge · Distill", "cnn"] == pytest.approx(15)
    assert table.display.at["uge · Normal", "Acc. (Authorized)"] == "90.00"
    assert table.display.at["clean · Normal", "cnn"] == "80.00"
    assert "cnn" not in table.title and "authorized" not in table.title and table.slug == "digits__quick"
    assert table.title.startswith("digits — test accuracy")


def test_custom_layout_keeps_seed_statistics_errors_and_the_matrix_order():
    records = uge_records(seeds=(0, 1)) + [rec("uge", "none", status="error", victim="cnn", seed=s) for s in (0, 1)]
    order = {"protections": ["uge", "clean"], "countermeasures": ["distill", "none"], "victims": ["authorized", "cnn"]}
    table = only_table(records, order=order, layout=UGE)
    assert list(table.mean.index) == ["clean · Normal", "clean · Distill", "uge · Normal", "uge · Distill"]
    assert list(table.mean.columns) == ["Acc. (Authorized)", "cnn"]  # victims have no first; the matrix's order
    assert table.display.at["uge · Normal", "cnn"] == "error"
    assert table.display.at["uge · Distill", "cnn"] == f"15.50 ± {statistics.stdev([15.0, 16.0]):.2f}"


def test_layout_axes_leave_the_grouping_and_the_others_join_it():
    """rows = victim, columns = countermeasure: one table per protection, whose title and slug name it."""
    tables = build_tables(uge_records(), layout=Layout(rows=("victim",), labels={"authorized": "Auth."}))
    assert [t.slug for t in tables] == ["digits__uge__quick", "digits__clean__quick"]
    assert tables[1].title.startswith("digits × clean — ")
    assert list(tables[1].mean.index) == ["cnn", "Auth."] and tables[1].mean.index.name == "victim"
    assert list(tables[1].mean.columns) == ["none", "distill", "Mean", "Max"]
    assert tables[0].mean.at["Auth.", "Max"] == pytest.approx(90)


def test_labels_rename_rows_keep_mix_suffix_and_ratio_columns():
    records = [{**rec("em", "jpeg", acc, ratio=r), "mix": "ood"} for acc, r in ((0.6, 0.5), (0.3, 0.9))]
    table = only_table(records, layout=Layout(labels={"em": "EM", "jpeg": "JPEG"}, summary=False))
    assert list(table.mean.index) == ["EM [ood]"]
    assert list(table.mean.columns) == ["p=0.5 (JPEG)", "p=0.9 (JPEG)"]


def test_summary_false_on_the_default_axes_drops_only_mean_and_max():
    default, bare = only_table(grid_records()), only_table(grid_records(), layout=Layout(summary=False))
    assert list(bare.mean.columns) == ["none", "jpeg", "bdr"]
    pd.testing.assert_frame_equal(bare.display, default.display.drop(columns=["Mean", "Max"]))


def test_default_layout_is_the_layout_without_one():
    records = grid_records() + [rec("clean", "none", 0.8, seed=1), rec("cwp", "jpeg", status="error")]
    assert [markdown(t) for t in build_tables(records, layout=Layout())] == [markdown(t) for t in build_tables(records)]


def test_leaderboard_reads_the_layout_from_matrix_json(tmp_path):
    """``bench leaderboard`` re-renders with the resolved matrix's layout; records carry none."""
    import dataclasses
    import json

    run = tmp_path / "runs" / "m"
    run.mkdir(parents=True)
    (run / "records.jsonl").write_text("".join(json.dumps(record_json(**r)) + "\n" for r in uge_records()))
    axes = {"protections": [{"label": "uge"}, {"label": "clean"}], "victims": [{"label": "authorized"}, {"label": "cnn"}]}
    (run / "matrix.json").write_text(json.dumps({"axes": axes, "layout": dataclasses.asdict(UGE)}))
    tables, written = leaderboard(tmp_path, "m")
    assert len(tables) == 1 and list(tables[0].mean.columns) == ["Acc. (Authorized)", "cnn"]
    md = tmp_path / "leaderboards" / "m" / "digits__quick.final.md"
    assert md in written and "clean · Normal" in md.read_text() and "Max" not in md.read_text()


# ------------------------------------------------------------------ files


def test_write_tables_csv_and_markdown(tmp_path):
    # a second seed for (clean, none), and a rerun of (cwp, jpeg) that failed (the latest record wins)
    records = grid_records() + [rec("clean", "none", 0.8, seed=1), rec("cwp", "jpeg", status="error")]
    tables = build_tables(records)
    written = write_tables(tables, tmp_path / "out")
    table = tables[0]
    csv, md, std = (tmp_path / "out" / f"{table.slug}.final{ext}" for ext in (".csv", ".md", ".std.csv"))
    assert set(written) == {csv, md, std}
    read = pd.read_csv(csv, index_col=0)
    assert list(read.index) == list(table.mean.index) and list(read.columns) == list(table.mean.columns)
    pd.testing.assert_frame_equal(read, table.mean.round(4), check_names=False)
    assert read.at["clean", "none"] == pytest.approx(85)
    text = md.read_text()
    assert text == markdown(table) and text.startswith(f"### {table.title}\n")
    for cell in ("85.00 ± 7.07", "error", "Mean", "Max", "clean", "cwp"):
        assert cell in text
    stds = pd.read_csv(std, index_col=0)
    assert stds.at["clean", "none"] == pytest.approx(round(statistics.stdev([90, 80]), 4))


def test_write_tables_without_seeds_writes_no_std_and_uses_metric_name(tmp_path):
    tables = build_tables(grid_records(), metric="best")
    written = write_tables(tables, tmp_path, metric="best")
    assert sorted(p.name for p in written) == sorted(f"{tables[0].slug}.best{ext}" for ext in (".csv", ".md"))
    assert not list(tmp_path.glob("*.std.csv"))


def test_write_tables_one_file_pair_per_table(tmp_path):
    records = grid_records() + [rec(p, c, acc, recipe="fast") for (p, c), acc in GRID.items()]
    written = write_tables(build_tables(records), tmp_path)
    assert len(written) == 4 and len({p.name for p in written}) == 4


def test_write_tables_removes_only_its_own_outputs_it_no_longer_produces(tmp_path):
    """Old: a table no longer produced (its records moved to another group) and a std file no longer needed
    stayed beside the fresh ones. Comparisons, records.csv, another metric's tables and other files stay."""
    two_seeds = grid_records() + [rec("clean", "none", 0.8, seed=1)]
    first = write_tables(build_tables(two_seeds + [rec(p, c, a, recipe="fast") for (p, c), a in GRID.items()]),
                         tmp_path)
    others = [tmp_path / name for name in ("digits__cnn__quick.final.vs-paper.md", "records.csv",
                                           "digits__cnn__quick.best.csv", "notes.md", "my.final.csv.bak")]
    for path in others:
        path.write_text("kept")
    second = write_tables(build_tables(grid_records()), tmp_path)
    assert {p.name for p in second} == {"digits__cnn__quick.final.csv", "digits__cnn__quick.final.md"}
    assert {p.name for p in first} - {p.name for p in second} == {
        "digits__cnn__fast.final.csv", "digits__cnn__fast.final.md", "digits__cnn__quick.final.std.csv"}
    assert sorted(tmp_path.iterdir()) == sorted([*second, *others])


def test_a_cell_that_failed_before_its_recipe_shows_as_error_in_its_table_and_leaves_no_phantom(tmp_path):
    """Old: a failed record (no recipe) made a table `digits__cnn__.final.md` ("recipe ?", cells error) that stayed
    after --retry-failed succeeded."""
    import json

    run = tmp_path / "runs" / "m"
    run.mkdir(parents=True)
    (run / "matrix.json").write_text(json.dumps({"axes": {}, "recipe": {"name": "quick", "epochs": 2}}))
    failed = {**rec("cwp", "none", status="error"), "recipe": None}
    log = run / "records.jsonl"
    log.write_text("".join(json.dumps(record_json(**r)) + "\n" for r in [rec("clean", "none"), failed]))
    tables, _ = leaderboard(tmp_path, "m")
    assert [t.slug for t in tables] == ["digits__cnn__quick"] and tables[0].display.at["cwp", "none"] == "error"
    with open(log, "a") as handle:  # --retry-failed: the cell's new record
        handle.write(json.dumps(record_json(**rec("cwp", "none", 0.3))) + "\n")
    tables, _ = leaderboard(tmp_path, "m")
    assert tables[0].display.at["cwp", "none"] == "30.00"
    assert sorted(p.name for p in (tmp_path / "leaderboards" / "m").iterdir()) == [
        "digits__cnn__quick.final.csv", "digits__cnn__quick.final.md", "records.csv"]


def test_variants_sharing_a_label_share_one_column():
    """purification-cpu names both UEraser variants "UEraser" (each row runs one): one column, in the matrix's order."""
    records = [rec("tap", "ueraser[jpeg=True]", 0.3), rec("em", "ueraser[jpeg=False]", 0.2), rec("em", "none", 0.1)]
    layout = Layout(labels={"ueraser[jpeg=False]": "UEraser", "ueraser[jpeg=True]": "UEraser"}, summary=False)
    order = {"countermeasures": ["none", "ueraser[jpeg=False]", "ueraser[jpeg=True]"]}
    table = only_table(records, order=order, layout=layout)
    assert list(table.mean.columns) == ["none", "UEraser"]
    assert table.display.at["tap", "UEraser"] == "30.00" and table.display.at["em", "UEraser"] == "20.00"
