"""Properties of the comparisons with published tables that readers rely on: the setting note's exact words, which
paper block joins (dataset, victim), the marks and legend of deviations and stale records, the Markdown / LaTeX /
CSV layouts and file names, and the error for a matrix without a reference (mutation testing, issue 39)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from bench.core.registry import ConfigError
from bench.plan.layout import Layout
from bench.report import compare as C
from bench.report import references
from bench.report.leaderboard import Table, build_tables
from bench.report.view import matrix_view
from bench.store.records import RecordLog
from tests.conftest import make_record, record_json

LABELS = {"clean": "Clean", "em": "EM", "tap": "TAP", "none": "Vanilla", "jpeg[quality=10]": "JPEG10"}
ROWS = [("t-table1", "cifar10", "resnet18", r, c, v) for r, c, v in (
    ("Clean", "Vanilla", 94.0), ("Clean", "JPEG10", 85.0), ("Clean", "Mean", 89.5), ("Clean", "Max", 94.0),
    ("TAP", "Vanilla", 30.0), ("TAP", "JPEG10", 40.0), ("TAP", "Mean", 35.0), ("TAP", "Max", 40.0),
    ("EM", "Vanilla", 10.0), ("EM", "JPEG10", 84.0), ("EM", "Gray", 69.0), ("EM", "Mean", 54.33),
    ("EM", "Max", 84.0))] + [
    ("t-table1", "cifar100", "resnet18", "Clean", "Vanilla", 70.0),  # a second dataset: the block must be chosen
    # victims split this table: one (dataset, victim) block each
    ("v-table1", "cifar10", "resnet18", "Clean", "Vanilla", 94.0), ("v-table1", "cifar10", "vgg", "Clean", "Vanilla", 92.0),
    # victims are this table's columns: each cell carries its own
    ("x-table1", "cifar10", "resnet18", "Clean", "resnet18", 94.0), ("x-table1", "cifar10", "vgg", "Clean", "vgg", 92.0),
    ("x-table1", "cifar10", "resnet18", "TAP · Vanilla", "resnet18", 31.0)]
TABLES = {"t-table1": "T paper, Table 1", "v-table1": "V paper, Table 1", "x-table1": "X paper, Table 1"}


@pytest.fixture
def papers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fixture reference tables in place of the package's; an unknown name is refused as the real loader does."""
    frame = pd.DataFrame([("p", *row, "") for row in ROWS], columns=references.COLUMNS)

    def load(table: str) -> pd.DataFrame:
        if table not in TABLES:
            raise ConfigError(f"unknown reference table {table!r}")
        return frame[frame["table"] == table].reset_index(drop=True)

    monkeypatch.setattr(references, "TABLES", dict(TABLES))
    monkeypatch.setattr(references, "load_reference", load)


def rec(protection: str, countermeasure: str, acc: float, *, dataset: str = "cifar10", victim: str = "resnet18",
        recipe: str = "t", dataset_params: dict[str, Any] | None = None, protection_params: dict[str, Any] | None = None,
        **extra: Any) -> dict[str, Any]:
    cm_name = countermeasure.split("[")[0]
    return {"cell": f"{dataset}|{victim}|{protection}|{countermeasure}", "dataset": dataset, "dataset_name": dataset,
            "dataset_params": dataset_params or {}, "victim": victim, "victim_name": victim, "recipe": recipe,
            "protection": protection, "protection_name": protection, "protection_params": protection_params or {},
            "countermeasure": countermeasure, "countermeasure_name": cm_name,
            "countermeasure_params": {"quality": 10} if cm_name == "jpeg" else {},
            "test_acc_final": acc, "test_acc_best": acc, **extra}


def write_run(root: Path, records: list[dict[str, Any]], reference: str | None = "t-table1",
              layout: dict[str, Any] | None = None, order: list[str] | None = None) -> Path:
    run = root / "runs" / "m"
    run.mkdir(parents=True)
    for record in records:
        RecordLog(run / "records.jsonl").append(make_record(**record))
    axes = {"protections": order or ["clean", "tap", "em"], "countermeasures": ["none", "jpeg[quality=10]"]}
    (run / "matrix.json").write_text(json.dumps({
        "name": "m", "reference": reference, "layout": {**(layout or {}), "labels": LABELS},
        "axes": {axis: [{"label": label} for label in labels] for axis, labels in axes.items()}}))
    return root


def only(root: Path, metric: str = "final") -> pd.DataFrame:
    frames = C.comparison_tables(root, "m", metric)
    assert len(frames) == 1
    return frames[0]


def level0(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame.columns.get_level_values(0)))


# ------------------------------------------------------------------ the matrix's records and its reference


def test_a_matrix_without_reference_is_told_the_tables_the_fix_and_the_matrices_with_one(
        papers: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The error lists the known tables, the TOML key to add, that `bench run` rewrites matrix.json, and the named
    matrices that have a reference ("none" where none has)."""
    write_run(tmp_path, [rec("em", "none", 0.2)], reference=None)
    monkeypatch.setattr(C, "with_reference", lambda: ["dh-table1", "uge-table1"])
    with pytest.raises(ConfigError) as error:
        C.comparison_tables(tmp_path, "m")
    assert str(error.value) == (
        "matrix 'm' names no published table (its matrix has no 'reference'): add a top-level reference = "
        "\"<table>\" (one of t-table1, v-table1, x-table1) to its TOML and rerun `bench run` (recorded cells are "
        "skipped, matrix.json is rewritten); matrices with one: dh-table1, uge-table1")
    monkeypatch.setattr(C, "with_reference", list)
    with pytest.raises(ConfigError, match=r"; matrices with one: none$"):
        C.comparison_tables(tmp_path, "m")


def test_rows_follow_the_matrix_order_and_the_metric_is_the_one_asked(papers: None, tmp_path: Path) -> None:
    """Rows are in the matrix's order (clean first), not the records' order; ``metric`` picks the accuracy shown."""
    records = [rec("em", c, 0.2, test_acc_best=0.6) for c in ("none", "jpeg[quality=10]")]
    records += [rec("tap", "none", 0.3, test_acc_best=0.5), rec("clean", "none", 0.9, test_acc_best=0.95)]
    write_run(tmp_path, records)
    final, best = only(tmp_path), only(tmp_path, "best")
    assert list(final.index) == ["Clean", "TAP", "EM"]
    assert final.at["EM", ("Vanilla", "ours")] == pytest.approx(20.0)
    assert best.at["EM", ("Vanilla", "ours")] == pytest.approx(60.0)
    assert best.at["EM", ("Vanilla", "Δ")] == pytest.approx(60.0 - 10.0)


# ------------------------------------------------------------------ the setting note


def test_a_subset_of_the_papers_dataset_alone_is_a_reduced_setting(papers: None, tmp_path: Path) -> None:
    """Fewer images per class, with the paper's dataset, victim and recipe, still makes it 'reduced'."""
    write_run(tmp_path, [rec("em", "none", 0.2, dataset_params={"per_class": 50, "test_per_class": None})])
    setting = only(tmp_path).attrs["setting"]
    assert setting == "reduced setting, not a reproduction: cifar10 50/class vs the paper's full cifar10"


def test_every_difference_is_named_in_order_joined_by_semicolons(papers: None, tmp_path: Path) -> None:
    """Dataset (copy, train / test / protected per class), victim and recipe each get a clause, in that order."""
    params = {"per_class": 50, "test_per_class": 20, "protect_per_class": 500}
    write_run(tmp_path, [rec("em", "none", 0.2, dataset="cifar10-jpeg", victim="cnn", recipe="cpu",
                             dataset_params=params)])
    frame = only(tmp_path)
    assert frame.attrs["setting"] == (
        "reduced setting, not a reproduction: cifar10-jpeg (a JPEG q75 copy) 50/class, test 20/class, protected on "
        "500/class vs the paper's full cifar10; cnn vs the paper's resnet18; recipe cpu vs t")
    assert frame.at["EM", ("Vanilla", "paper")] == 10.0  # compared with the cifar10 block all the same


@pytest.mark.parametrize("params", [None, math.nan], ids=["no-column", "nan"])
def test_records_without_dataset_params_compare_as_the_full_dataset(papers: None, tmp_path: Path,
                                                                    params: Any) -> None:
    """Older records (no ``dataset_params`` field, or NaN beside newer ones) read as the paper's full dataset."""
    view = matrix_view(write_run(tmp_path, [rec("em", "none", 0.2)]), "m")
    table = build_tables(view.rows, view.order, layout=view.layout)[0]
    assert table.cells is not None
    cells = table.cells.drop(columns="dataset_params") if params is None else table.cells.assign(dataset_params=params)
    frame = C.compare(dataclasses.replace(table, cells=cells), "t-table1", view.layout)
    assert frame.attrs["setting"] == "the paper's dataset, victim and recipe"
    assert frame.at["EM", ("Vanilla", "paper")] == 10.0


def test_a_table_without_its_cells_is_refused_by_name(papers: None) -> None:
    """compare() needs the records behind a table (build_tables keeps them); a hand-made one without says so."""
    mean = pd.DataFrame({"Vanilla": [20.0]}, index=["EM"])
    with pytest.raises(AssertionError, match="^tables from build_tables carry their cells$"):
        C.compare(Table("t", "t", mean, mean, mean.astype(str)), "t-table1", Layout())


def test_a_dataset_the_paper_lacks_has_no_paper_numbers_and_says_so(papers: None, tmp_path: Path) -> None:
    """No block for our dataset: one note (no victim clause), every paper cell NaN, our Mean and Max kept."""
    write_run(tmp_path, [rec("em", "none", 0.2, dataset="digits")])
    frame = only(tmp_path)
    assert frame.attrs["setting"] == "reduced setting, not a reproduction: the paper has no digits block"
    assert level0(frame) == ["Vanilla", "Mean", "Max"]
    assert frame.xs("paper", axis=1, level="value").isna().all().all()
    assert frame.at["EM", ("Max", "ours")] == pytest.approx(20.0)


# ------------------------------------------------------------------ which victim's block joins


def test_where_victims_split_tables_ours_joins_its_own_block(papers: None, tmp_path: Path) -> None:
    """Our victim among the paper's: its block alone joins (not the other victim's), and no victim clause."""
    write_run(tmp_path, [rec("clean", "none", 0.9, recipe="v")], reference="v-table1")
    frame = only(tmp_path)
    assert frame.attrs["setting"] == "the paper's dataset, victim and recipe"
    assert frame.at["Clean", ("Vanilla", "paper")] == 94.0


def test_a_victim_the_paper_lacks_among_several_joins_none_and_names_them_all(papers: None, tmp_path: Path) -> None:
    """Our victim is none of the paper's several: no block is guessed, the note names every one of them."""
    write_run(tmp_path, [rec("clean", "none", 0.9, victim="cnn", recipe="v")], reference="v-table1")
    frame = only(tmp_path)
    assert frame.attrs["setting"] == "reduced setting, not a reproduction: cnn vs the paper's resnet18 / vgg"
    assert math.isnan(frame.at["Clean", ("Vanilla", "paper")])


def test_where_victims_are_columns_every_victims_numbers_join(papers: None, tmp_path: Path) -> None:
    """A layout with victims as columns joins the whole dataset block: each victim column gets its paper value."""
    records = [rec("clean", "none", 0.9, recipe="x"), rec("clean", "none", 0.8, victim="vgg", recipe="x")]
    write_run(tmp_path, records, reference="x-table1",
              layout={"rows": ["protection"], "columns": "victim"})
    frame = only(tmp_path)
    assert frame.attrs["setting"] == "the paper's dataset, victim and recipe"
    assert (frame.at["Clean", ("resnet18", "paper")], frame.at["Clean", ("vgg", "paper")]) == (94.0, 92.0)
    assert frame.at["Clean", ("vgg", "Δ")] == pytest.approx(80.0 - 92.0)


def test_multi_axis_rows_carry_their_marks_and_no_summary_when_off(papers: None, tmp_path: Path) -> None:
    """Rows of several axes join with " · " (the paper's "A | B") and their deviation marks show on the cell; with
    the summary off, neither side gets Mean or Max columns."""
    write_run(tmp_path, [rec("tap", "none", 0.3, recipe="x", protection_params={"surrogate": "cnn"})], "x-table1",
              layout={"rows": ["protection", "countermeasure"], "columns": "victim", "summary": False})
    frame = only(tmp_path)
    assert level0(frame) == ["resnet18", "vgg"]  # the paper's other victim, too
    assert frame.attrs["marks"] == {("TAP · Vanilla", "resnet18"): "*"}
    assert C._cell(frame, "TAP · Vanilla", "resnet18") == ("30.00*", "31.00", "-1.00")


def test_join_keeps_a_summary_either_side_has() -> None:
    """Mean and Max columns appear where ours or the paper's has them, after the other columns, and nowhere else."""
    ours = pd.DataFrame({"A": [1.0]}, index=pd.Index(["r"], name="protection"))
    paper = pd.DataFrame({"A": [2.0], "B": [3.0], "Mean": [2.5]}, index=["r"])
    frame = C._join(ours, paper, Layout())
    assert level0(frame) == ["A", "B", "Mean"]
    assert math.isnan(frame.at["r", ("Mean", "ours")]) and frame.at["r", ("Mean", "paper")] == 2.5
    assert level0(C._join(ours.assign(Max=1.0), pd.DataFrame(), Layout())) == ["A", "Max"]
    assert level0(C._join(ours, paper.drop(columns="Mean"), Layout())) == ["A", "B"]
    assert frame.index.name == "protection" and frame.columns.names == ["countermeasure", "value"]


# ------------------------------------------------------------------ marks and legend


def test_one_symbol_per_deviation_shared_by_components_and_the_rows_summary(papers: None, tmp_path: Path) -> None:
    """Components off the paper's setting the same way share one symbol and legend line; a row's Mean and Max carry
    its own marks (not other rows') and, where its columns differ from the paper's row, a second symbol."""
    off = {"surrogate": "cnn"}
    records = [rec("clean", c, 0.9) for c in ("none", "jpeg[quality=10]")]
    records += [rec(p, c, 0.3, protection_params=off) for p in ("tap", "em") for c in ("none", "jpeg[quality=10]")]
    frame = only(write_run(tmp_path, records))
    assert frame.attrs["legend"] == ["* TAP, EM: surrogate = 'cnn' (paper: 'resnet18')",
                                     "† Mean and Max over our 2 columns, the paper's over its 3"]
    star = {(row, col): "*" for row in ("TAP", "EM") for col in ("Vanilla", "JPEG10", "Mean", "Max")}
    assert frame.attrs["marks"] == {**star, ("EM", "Mean"): "*†", ("EM", "Max"): "*†"}


def test_symbols_are_given_in_the_tables_order(papers: None, tmp_path: Path) -> None:
    """The first deviating row of the table gets *, the next †, whatever their names' alphabetical order."""
    records = [rec("tap", "none", 0.3, protection_params={"surrogate": "cnn"}),
               rec("em", "none", 0.2, protection_params={"surrogate": "vgg"})]
    frame = only(write_run(tmp_path, records))
    assert list(frame.index) == ["TAP", "EM", "Clean"]
    assert frame.attrs["legend"][:2] == ["* TAP: surrogate = 'cnn' (paper: 'resnet18')",
                                         "† EM: surrogate = 'vgg' (paper: 'resnet18')"]
    assert (frame.attrs["marks"][("TAP", "Vanilla")], frame.attrs["marks"][("EM", "Vanilla")]) == ("*", "†")


def test_a_stale_record_is_marked_and_the_legend_says_how_to_refresh_it(papers: None, tmp_path: Path) -> None:
    """A record made by an older component version is marked on its cell and its row's summary; the legend names
    why and the command that retrains it."""
    stale = rec("em", "none", 0.2)
    components = record_json(**stale)["components"]
    stale["components"] = {**components, "protection": {**components["protection"], "version": 0}}
    frame = only(write_run(tmp_path, [stale, rec("em", "jpeg[quality=10]", 0.7)]))
    first = frame.attrs["legend"][0]
    assert first.startswith("* EM: stale: em v0 (now v") and first.endswith("); `bench run` retrains it")
    assert frame.attrs["marks"][("EM", "Vanilla")] == "*" and ("EM", "JPEG10") not in frame.attrs["marks"]
    assert frame.attrs["marks"][("EM", "Mean")].startswith("*")


def test_symbols_after_the_sixth_are_numbered() -> None:
    """Six classic symbols, then [7], [8], … so that any number of notes stays distinguishable."""
    assert [C._symbol(i) for i in range(8)] == ["*", "†", "‡", "§", "¶", "‖", "[7]", "[8]"]


def test_deviations_cover_both_components_and_every_parameter_off() -> None:
    """A countermeasure off its paper's setting is named like a protection; several parameters of one component
    make one text; a protection no longer installed does not hide the countermeasure's; NaN params are none."""
    cm = {"countermeasure": "adv_training[steps=2]", "countermeasure_name": "adv_training",
          "countermeasure_params": {"steps": 2}}
    gone = {"protection": "gone", "protection_name": "gone", "protection_params": {"x": 1}, **cm}
    assert C.deviations(gone) == [("adv_training[steps=2]", "steps = 2 (paper: 10)")]
    tap = {"protection": "tap[restarts=1]", "protection_name": "tap",
           "protection_params": {"surrogate": "cnn", "restarts": 1}, "countermeasure": "none",
           "countermeasure_name": "none", "countermeasure_params": {}}
    assert C.deviations(tap) == [("tap[restarts=1]", "surrogate = 'cnn' (paper: 'resnet18'), restarts = 1 (paper: 8)")]
    assert C.deviations({**tap, "protection_params": math.nan}) == []


# ------------------------------------------------------------------ Markdown, LaTeX, CSV


def small_frame(em: float = 20.0, **attrs: Any) -> pd.DataFrame:
    """A two-row comparison (EM marked, its Δ signed; Clean has no paper value) with the given attrs."""
    ours = pd.DataFrame({"adv_training": [em, 91.5]}, index=pd.Index(["EM_v2", "Clean"], name="protection"))
    paper = pd.DataFrame({"adv_training": [10.0, math.nan]}, index=["EM_v2", "Clean"])
    frame = C._join(ours, paper, Layout())
    frame.attrs.update({"title": "cifar10 — final, recipe t vs t-table1", "slug": "cifar10__t", "source": "T paper",
                        "setting": "the paper's dataset, victim and recipe", "marks": {("EM_v2", "adv_training"): "*"},
                        "legend": ["* EM_v2: surrogate = 'cnn' (paper: 'resnet18')"], "failed": set(), "ran": (),
                        **attrs})
    return frame


def test_markdown_layout(papers: None) -> None:
    """Title, source, setting, the cell key, the right-aligned table with row labels, then one bullet per legend
    line and ran line, each on its own line; without notes the text ends right after the table."""
    text = C.markdown(small_frame(ran=("EM_v2: official code",)))
    assert text == (
        "### cifar10 — final, recipe t vs t-table1\n\npaper: T paper\n\nthe paper's dataset, victim and recipe\n\n"
        "each cell: ours / paper / Δ (ours − paper); — where a side has no value\n\n"
        "|   protection |            adv_training |\n"
        "|-------------:|------------------------:|\n"
        "|        EM_v2 | 20.00* / 10.00 / +10.00 |\n"
        "|        Clean |           91.50 / — / — |\n"
        "\n- * EM_v2: surrogate = 'cnn' (paper: 'resnet18')\n- ran: EM_v2: official code\n")
    bare = C.markdown(small_frame(legend=[], marks={}))
    assert bare.endswith("|        Clean |          91.50 / — / — |\n") and not bare.endswith("\n\n")


def test_latex_layout(papers: None) -> None:
    """booktabs table with three centred sub-columns per column, l + r column format, escaped labels, the notes
    as its caption (". "-joined, LaTeX specials escaped, letters untouched) and a label from the slug."""
    tex = C.latex(small_frame(title="X & Y: 50% of $a_b #1", legend=["* EM_v2: eXtra"]))
    assert tex == (
        "\\begin{table}\n"
        "\\caption{X \\& Y: 50\\% of \\$a\\_b \\#1. T paper. the paper's dataset, victim and recipe. * EM\\_v2: eXtra}\n"
        "\\label{tab:cifar10__t-vs-paper}\n"
        "\\begin{tabular}{lrrr}\n"
        "\\toprule\n"
        "countermeasure & \\multicolumn{3}{c}{adv\\_training} \\\\\n"
        "value & ours & paper & Δ \\\\\n"
        "protection &  &  &  \\\\\n"
        "\\midrule\n"
        "EM\\_v2 & 20.00* & 10.00 & +10.00 \\\\\n"
        "Clean & 91.50 & — & — \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}\n"
        "\\end{table}\n")


def test_written_files_names_rounding_and_existing_folder(papers: None, tmp_path: Path) -> None:
    """``<slug>.final.vs-paper.{csv,md,tex}`` by default, into a folder that may exist already; the CSV keeps 4
    decimals, two header rows (column, part) and the row axis's name."""
    frame = small_frame(em=20.123456)
    out = tmp_path / "out"
    out.mkdir()
    written = C.write_comparisons([frame], out)
    assert written == [out / f"cifar10__t.final.vs-paper{ext}" for ext in (".csv", ".md", ".tex")]
    assert C.write_comparisons([frame], out) == written  # a rerun overwrites in place
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    back = pd.read_csv(written[0], header=[0, 1], index_col=0)
    assert back.index.name == "protection" and back.columns.names == ["countermeasure", "value"]
    assert back.at["EM_v2", ("adv_training", "ours")] == 20.1235
    assert back.at["EM_v2", ("adv_training", "Δ")] == 10.1235
    assert written[1].read_text() == C.markdown(frame) and written[2].read_text() == C.latex(frame)


def test_with_reference_lists_the_toml_matrices_that_declare_one(tmp_path: Path) -> None:
    """Only ``*.toml`` files whose top level has ``reference``, by name, sorted."""
    (tmp_path / "b.toml").write_text('reference = "dh-table1"\n')
    (tmp_path / "a.toml").write_text('reference = "uge-table1"\n')
    (tmp_path / "c.toml").write_text('name = "c"\n')
    (tmp_path / "d.txt").write_text('reference = "dh-table1"\n')
    assert C.with_reference(tmp_path) == ["a", "b"]
