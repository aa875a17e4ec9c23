"""``bench leaderboard --compare paper``: ours | paper | Δ from synthetic records and a fixture reference table."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from bench.cli import main
from bench.core.registry import ConfigError
from bench.plan.matrix import parse_matrix
from bench.report import compare as C
from bench.report import references
from bench.store.records import RecordLog
from tests.conftest import make_record

PAPER = [("Clean", "Vanilla", 94.0), ("Clean", "JPEG10", 85.0), ("Clean", "Mean", 89.5), ("Clean", "Max", 94.0),
         ("EM", "Vanilla", 10.0), ("EM", "JPEG10", 84.0), ("EM", "Gray", 69.0), ("EM", "Mean", 54.33),
         ("EM", "Max", 84.0), ("EntF", "Vanilla", 91.5)]
LABELS = {"clean": "Clean", "em": "EM", "none": "Vanilla", "jpeg[quality=10]": "JPEG10"}
OURS = {("clean", "none"): 0.90, ("clean", "jpeg[quality=10]"): 0.80, ("em", "none"): 0.20,
        ("em", "jpeg[quality=10]"): 0.70, ("cwp", "none"): 0.15}


@pytest.fixture
def paper(monkeypatch):
    """A fixture reference table ``t-table1`` (cifar10 / resnet18) in place of the package's tables."""
    frame = pd.DataFrame([("t", "t-table1", "cifar10", "resnet18", r, c, v, "") for r, c, v in PAPER],
                         columns=references.COLUMNS)
    monkeypatch.setattr(references, "TABLES", {"t-table1": "Test paper, Table 1", **references.TABLES})
    monkeypatch.setattr(references, "load_reference", lambda table: frame.copy())
    return frame


def rec(protection, countermeasure, acc, *, dataset="cifar10", victim="resnet18", recipe="t", per_class=None,
        protection_params=None, status="ok"):
    cm_name = countermeasure.split("[")[0]
    return {"cell": f"{dataset}|{victim}|{protection}|{countermeasure}", "status": status, "dataset": dataset,
            "dataset_name": dataset, "dataset_params": {"per_class": per_class, "test_per_class": None},
            "victim": victim, "recipe": recipe, "poison_ratio": 1.0, "mix": "protected", "seed": 0,
            "protection": protection, "protection_name": protection, "protection_params": protection_params or {},
            "countermeasure": countermeasure, "countermeasure_name": cm_name,
            "countermeasure_params": {"quality": 10} if cm_name == "jpeg" else {}, "countermeasure_reports": "final",
            "test_acc_final": acc if status == "ok" else None, "test_acc_best": acc, "error": None}


def write_run(tmp_path, records, reference="t-table1", labels=LABELS, layout=None):
    run = tmp_path / "runs" / "m"
    run.mkdir(parents=True)
    for record in records:
        RecordLog(run / "records.jsonl").append(make_record(**record))
    order = {"protections": ["clean", "em", "cwp"], "countermeasures": ["none", "jpeg[quality=10]"]}
    (run / "matrix.json").write_text(json.dumps({
        "name": "m", "reference": reference, "layout": {**(layout or {}), "labels": labels},
        "axes": {axis: [{"label": label} for label in labels_] for axis, labels_ in order.items()}}))
    return tmp_path


def only(results):
    frames = C.comparison_tables(results, "m")
    assert len(frames) == 1
    return frames[0]


def test_delta_is_ours_minus_paper_exactly(paper, tmp_path):
    frame = only(write_run(tmp_path, [rec(p, c, a) for (p, c), a in OURS.items()]))
    assert frame.columns.names == ["countermeasure", "value"]
    for (p, c), acc in OURS.items():
        row, col = LABELS.get(p, p), LABELS[c]
        theirs = dict(((r, k), v) for r, k, v in PAPER).get((row, col), math.nan)
        assert frame.at[row, (col, "ours")] == pytest.approx(acc * 100)
        if math.isnan(theirs):  # a row the paper lacks: no paper value, no Δ
            assert math.isnan(frame.at[row, (col, "paper")]) and math.isnan(frame.at[row, (col, "Δ")])
        else:
            assert frame.at[row, (col, "paper")] == theirs
            assert frame.at[row, (col, "Δ")] == frame.at[row, (col, "ours")] - theirs
    assert frame.at["EM", ("Vanilla", "Δ")] == pytest.approx(20.0 - 10.0)


def test_mean_and_max_are_ours_over_our_columns_beside_the_papers(paper, tmp_path):
    frame = only(write_run(tmp_path, [rec(p, c, a) for (p, c), a in OURS.items()]))
    assert list(dict.fromkeys(frame.columns.get_level_values(0))) == ["Vanilla", "JPEG10", "Gray", "Mean", "Max"]
    assert frame.at["EM", ("Mean", "ours")] == pytest.approx((20 + 70) / 2)  # our two columns, not the paper's Gray
    assert frame.at["EM", ("Max", "ours")] == pytest.approx(70)
    assert frame.at["EM", ("Mean", "paper")] == 54.33
    assert frame.at["EM", ("Max", "Δ")] == pytest.approx(70 - 84.0)
    assert any("Mean and Max over our 2 columns, the paper's over its 3" in line for line in frame.attrs["legend"])


def test_cells_a_side_lacks_show_a_dash(paper, tmp_path):
    frame = only(write_run(tmp_path, [rec(p, c, a) for (p, c), a in OURS.items()]))
    assert list(frame.index) == ["Clean", "EM", "cwp", "EntF"]  # ours in order, then the paper's others
    assert C._cell(frame, "cwp", "Vanilla") == ("15.00", "—", "—")  # the paper has no such row
    assert C._cell(frame, "EntF", "Vanilla") == ("—", "91.50", "—")  # we have no such row
    assert C._cell(frame, "EM", "Gray") == ("—", "69.00", "—")  # nor such a column
    assert C._cell(frame, "EM", "Vanilla") == ("20.00", "10.00", "+10.00")
    text = C.markdown(frame)
    assert "| 20.00 / 10.00 / +10.00 |" in text and "— / 91.50 / —" in text


def test_failed_cell_shows_error(paper, tmp_path):
    records = [rec("em", "none", 0.2), rec("em", "jpeg[quality=10]", None, status="error")]
    frame = only(write_run(tmp_path, records))
    assert C._cell(frame, "EM", "JPEG10") == ("error", "84.00", "—")


def test_paper_setting_has_no_marks(paper, tmp_path):
    frame = only(write_run(tmp_path, [rec("em", "none", 0.2), rec("em", "jpeg[quality=10]", 0.7)]))
    assert frame.attrs["setting"] == "the paper's dataset, victim and recipe"
    assert C._cell(frame, "EM", "Vanilla")[0] == "20.00"


def test_reduced_data_other_victim_and_recipe_are_named(paper, tmp_path):
    records = [rec("em", c, 0.2, dataset="cifar10-jpeg", victim="cnn", recipe="cpu", per_class=50)
               for c in ("none", "jpeg[quality=10]")]
    frame = only(write_run(tmp_path, records))
    setting = frame.attrs["setting"]
    assert setting.startswith("reduced setting, not a reproduction: ")
    assert "cifar10-jpeg (a JPEG q75 copy) 50/class vs the paper's full cifar10" in setting
    assert "cnn vs the paper's resnet18" in setting and "recipe cpu vs t" in setting
    assert frame.at["EM", ("Vanilla", "paper")] == 10.0  # still compared with the cifar10 / resnet18 block
    assert setting in C.markdown(frame)


def test_component_off_the_papers_setting_is_marked_with_a_legend(paper, tmp_path):
    off = {"surrogate": "cnn", "epsilon": 8.0}
    records = [rec("em", c, 0.2, protection_params=off) for c in ("none", "jpeg[quality=10]")]
    records.append(rec("clean", "none", 0.9))
    frame = only(write_run(tmp_path, records))
    assert frame.attrs["legend"][0] == "* EM: surrogate = 'cnn' (paper: 'resnet18')"
    assert C._cell(frame, "EM", "Vanilla")[0] == "20.00*"
    assert C._cell(frame, "EM", "Mean")[0].startswith("20.00*")  # the row's marks on its summary
    assert C._cell(frame, "Clean", "Vanilla")[0] == "90.00"
    assert "- * EM: surrogate = 'cnn' (paper: 'resnet18')" in C.markdown(frame)


def test_compound_paper_rows_join_our_multi_axis_rows(monkeypatch, tmp_path):
    frame = pd.DataFrame([("u", "u-table1", "cifar10", "cnn", "UGEs | Normal", "CNN", 26.0, "")],
                         columns=references.COLUMNS)
    monkeypatch.setattr(references, "TABLES", {"u-table1": "Test paper, Table 1"})
    monkeypatch.setattr(references, "load_reference", lambda table: frame.copy())
    records = [rec("uge", "none", 0.3, victim="cnn", recipe="u")]
    layout = {"rows": ["protection", "countermeasure"], "columns": "victim", "summary": False}
    out = only(write_run(tmp_path, records, "u-table1", {"uge": "UGEs", "none": "Normal", "cnn": "CNN"}, layout))
    assert out.at["UGEs · Normal", ("CNN", "Δ")] == pytest.approx(30.0 - 26.0)


def test_no_reference_names_matrices_that_have_one(paper, tmp_path):
    write_run(tmp_path, [rec("em", "none", 0.2)], reference=None)
    with pytest.raises(ConfigError, match=r"names no published table.*reference = .*dh-table1"):
        C.comparison_tables(tmp_path, "m")


def test_unknown_reference_in_a_matrix_raises_with_close_matches(paper):
    raw = {"datasets": ["digits"], "protections": ["clean"], "countermeasures": ["none"], "victims": ["cnn"]}
    assert parse_matrix({**raw, "reference": "t-table1"}, "m").reference == "t-table1"
    with pytest.raises(ConfigError, match=r"key 'reference': unknown table 't-tabel1'; did you mean 't-table1'"):
        parse_matrix({**raw, "reference": "t-tabel1"}, "m")
    assert parse_matrix(raw, "m").reference is None


def test_cli_prints_and_writes_csv_markdown_latex(paper, tmp_path, capsys):
    write_run(tmp_path, [rec(p, c, a) for (p, c), a in OURS.items()])
    assert main(["leaderboard", "--matrix", "m", "--compare", "paper", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "vs t-table1" in out and "paper: Test paper, Table 1" in out and "each cell: ours / paper / Δ" in out
    out_dir = tmp_path / "leaderboards" / "m"
    stem = "cifar10__resnet18__t.final.vs-paper"
    for ext in (".csv", ".md", ".tex"):
        assert str(out_dir / f"{stem}{ext}") in out
    back = pd.read_csv(out_dir / f"{stem}.csv", header=[0, 1], index_col=0)
    assert back.at["EM", ("Vanilla", "Δ")] == pytest.approx(10.0)
    tex = (out_dir / f"{stem}.tex").read_text()
    assert "\\begin{tabular}" in tex and "\\multicolumn{3}{c}{Vanilla}" in tex and "+10.00" in tex
    assert not list(out_dir.glob("*.tmp*"))


def test_paper_setting_is_declared_by_the_components_that_change_weights_or_budgets():
    from bench.core.components import COUNTERMEASURES, PROTECTIONS

    assert PROTECTIONS.get("dh").paper_setting == ("source", "extractor", "blocks", "iterations")
    assert "mode" not in PROTECTIONS.get("dh").paper_setting  # a variant of the paper, not a departure
    assert COUNTERMEASURES.get("adv_training").paper_setting == ("steps",)
    dh_cell = {"protection": "dh[mode=sample]", "protection_name": "dh", "countermeasure": "none",
               "protection_params": {"mode": "sample", "blocks": 4, "source": "diffusion"},
               "countermeasure_name": "none", "countermeasure_params": {}}
    assert C.deviations(dh_cell) == [("dh[mode=sample]", "blocks = 4 (paper: 16)")]
    assert C.deviations({**dh_cell, "protection_params": {"mode": "sample"}}) == []
    assert C.deviations({**dh_cell, "protection_name": "gone"}) == []


def test_a_paper_setting_that_is_no_parameter_is_refused():
    import dataclasses
    from typing import ClassVar

    from bench.core.components import Protection

    @dataclasses.dataclass(frozen=True)
    class Typo(Protection):
        surrogate: str = "resnet18"
        paper_setting: ClassVar[tuple[str, ...]] = ("surogate",)

    with pytest.raises(TypeError, match="surogate"):
        Typo.check_declaration()


def test_real_dh_table1_joins_the_matrix_labels():
    from bench.plan.matrix import load_matrix

    matrix = load_matrix("dh-table1")
    paper = references.reference_pivot("dh-table1", "cifar10", "resnet18")
    shown = {matrix.layout.name(c.label) for c in matrix.axes["countermeasures"]}
    assert shown == set(paper.columns) - {"Mean", "Max"}
    rows = {matrix.layout.name(p.label) for p in matrix.axes["protections"]}
    assert set(paper.index) - rows == {"EntF"}  # not a bench protection


def test_save_resolved_keeps_the_reference(paper, tmp_path):
    from bench.execute.scheduler import save_resolved

    raw = {"datasets": ["digits"], "protections": ["clean"], "countermeasures": ["none"], "victims": ["cnn"]}
    save_resolved(parse_matrix({**raw, "reference": "t-table1"}, "m"), ["k1"], tmp_path / "matrix.json")
    save_resolved(parse_matrix({**raw, "reference": "t-table1"}, "m"), ["k2", "k1"], tmp_path / "matrix.json")
    saved = json.loads((tmp_path / "matrix.json").read_text())
    assert saved["reference"] == "t-table1" and saved["cells"] == ["k1", "k2"]  # every run's cells, once


@pytest.mark.parametrize("name", C.with_reference())
def test_every_matrix_with_a_reference_joins_some_rows_and_columns(name):
    import itertools

    from bench.plan.matrix import load_matrix

    matrix = load_matrix(name)
    paper = references.load_reference(matrix.reference)
    shown = {axis: {matrix.layout.name(c.label) for c in matrix.axes[f"{axis}s"]} for axis in matrix.layout.axes}
    rows = {" · ".join(parts) for parts in itertools.product(*(shown[a] for a in matrix.layout.rows))}
    assert rows & set(paper["row"].str.replace(" | ", " · ", regex=False)), name
    assert shown[matrix.layout.columns] & set(paper["column"]), name


def test_mean_is_marked_per_row_where_that_row_lacks_columns(paper, tmp_path):
    """A row's Mean is marked when its own columns differ from the paper's row (a cell not yet run), not others."""
    records = [rec(p, c, a) for (p, c), a in OURS.items() if (p, c) != ("clean", "jpeg[quality=10]")]
    frame = only(write_run(tmp_path, records))
    marks, legend = frame.attrs["marks"], frame.attrs["legend"]
    assert any("our 1 columns, the paper's over its 2" in line for line in legend)  # Clean: JPEG10 missing
    assert any("our 2 columns, the paper's over its 3" in line for line in legend)  # EM: Gray not in the matrix
    assert marks.get(("Clean", "Mean")) and marks.get(("EM", "Mean")) and marks[("Clean", "Mean")] != marks[("EM", "Mean")]
    full = only(write_run(tmp_path / "all", [rec(p, c, a) for (p, c), a in OURS.items()]))
    assert ("Clean", "Mean") not in full.attrs["marks"]  # Clean has every column the paper prints for it


def test_a_poison_crafted_on_more_images_is_named(paper, tmp_path):
    records = [{**rec("em", c, 0.2, dataset="cifar10-jpeg", per_class=50),
                "dataset_params": {"per_class": 50, "test_per_class": None, "protect_per_class": 500}}
               for c in ("none", "jpeg[quality=10]")]
    setting = only(write_run(tmp_path, records)).attrs["setting"]
    assert "cifar10-jpeg (a JPEG q75 copy) 50/class, protected on 500/class vs the paper's full cifar10" in setting
