"""The papers' published numbers (bench/references) load, are well-formed and match the papers' text."""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from bench.core.registry import ConfigError
from bench.report.references import COLUMNS, KEY, REFERENCES, TABLES, load_reference, reference_pivot

PAPERS = Path(__file__).resolve().parents[1].parent / "shared" / "papers"
TEXT = {"dh": "dh-semantic-deep-hiding.txt", "confoundergan": "confoundergan.txt",
        "uge": "uge-ungeneralizable-examples.txt"}
DELTA = re.compile(r"\(\s*[-+]?\d+(?:\.\d+)?,?\s*\)?")  # UGE Table 1's "(-72.46)" changes, some unclosed


def paper_lines(paper: str) -> list[str]:
    """The paper's text lines with printed changes and % signs removed, whitespace collapsed."""
    if not PAPERS.is_dir():
        pytest.skip(f"the papers' text is not here ({PAPERS})")
    text = (PAPERS / TEXT[paper]).read_text()
    return [" ".join(DELTA.sub(" ", line).replace("%", " ").split()) for line in text.splitlines()]


def raw_rows(table: str) -> list[dict[str, str]]:
    """The CSV's rows with the values as printed (strings)."""
    with open(REFERENCES / f"{table}.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_table_loads_and_is_well_formed() -> None:
    assert sorted(TABLES) == sorted(p.stem for p in REFERENCES.glob("*.csv"))
    for table in TABLES:
        frame = load_reference(table)
        assert list(frame.columns) == COLUMNS and len(frame) > 0
        assert not frame.duplicated(KEY).any()
        assert frame["value"].dtype == float and frame["value"].between(0, 100).all()
        assert set(frame["paper"]) == {table.split("-")[0]} and set(frame["table"]) == {table}


@pytest.mark.parametrize(("table", "dataset", "victim", "row", "column", "value"), [
    ("dh-table1", "cifar10", "resnet18", "DH(C)", "Mean", 33.01),
    ("dh-table1", "cifar10", "resnet18", "EM", "Mean", 41.11),
    ("dh-table1", "cifar10", "resnet18", "DH(C)", "Vanilla", 10.08),
    ("dh-table1", "cifar10", "resnet18", "DH(C)", "JPEG10", 83.98),
    ("dh-table1", "cifar10", "resnet18", "OPS", "AT(L∞)", 9.42),
    ("dh-table1", "cifar100", "resnet18", "DH(C)", "Vanilla", 1.22),
    ("dh-table1", "imagenet-subset", "resnet18", "DH(C)", "Mean", 11.39),
    ("dh-table1", "imagenet-subset", "resnet18", "LSP", "Max", 52.66),
    ("dh-table2", "cifar10", "resnet18", "DH(S)", "OP", 14.44),
    ("dh-table3", "cifar10", "vit", "DH(S)", "ViT", 65.70),
    ("dh-table3", "cifar100", "densenet121", "EM", "D121", 64.87),
    ("confoundergan-table1", "cifar10", "vgg11", "VGG11", "Ours", 16.9),
    ("confoundergan-table1", "isic", "densenet121", "DenseNet121", "EMN", 26.7),
    ("confoundergan-table2", "cifar10", "resnet18", "Ours", "FA", 39.3),
    ("confoundergan-table3", "cifar10", "resnet18", "Test accuracy", "Denoised images", 77.9),
    ("uge-table1", "cifar10", "authorized", "UGEs | Normal", "Acc. (Authorized)", 93.89),
    ("uge-table1", "cifar10", "resnet32", "UGEs | Normal", "ResNetC-32", 36.08),
    ("uge-table1", "cifar100", "shufflenetv2", "UGEs | Distill", "ShuffleNetV2", 25.34),
    ("uge-table2", "cifar10", "authorized", "UGEs | Normal", "Net-2", 93.83),
    ("uge-table3", "cifar100", "resnet18", "Ours (L_fd)", "ULEs", 9.35),
])
def test_spot_values(table: str, dataset: str, victim: str, row: str, column: str, value: float) -> None:
    frame = load_reference(table)
    cell = frame[(frame.dataset == dataset) & (frame.victim == victim) & (frame.row == row) & (frame.column == column)]
    assert cell["value"].tolist() == [value]


def test_every_printed_line_is_in_the_paper() -> None:
    """Each run of cells transcribed from one printed table line appears, in order, on a line that names the row."""
    for table in TABLES:
        lines = paper_lines(table.split("-")[0])
        rows = raw_rows(table)
        runs: list[list[dict[str, str]]] = []
        for r in rows:
            if runs and runs[-1][0]["row"] == r["row"]:  # the CSVs keep each printed line's cells together
                runs[-1].append(r)
            else:
                runs.append([r])
        for run in runs:
            seq = " ".join(r["value"] for r in run)
            label_words = [part.split()[0] for part in run[0]["row"].split(" | ")]
            hits = [ln for ln in lines if re.search(rf"(^| ){re.escape(seq)}( |$)", ln)
                    and all(w in ln for w in label_words)]
            assert hits, f"{table}: {run[0]['row']!r} {seq!r} is not on a paper line naming the row"


def test_prose_agrees_with_dh_table1() -> None:
    """§IV-C/§IV-D quote DH(C)'s Vanilla, Mean and Max on the three datasets."""
    text = " ".join(paper_lines("dh"))
    assert "degrades the test accuracy to 10.08 , 1.22 , and 2.42 for three datasets" in text
    assert "mean test accuracy of 33.01 , 18.91 , and 11.39 on CIFAR-10, CIFAR-100, and ImageNet subset" in text
    assert "maximum test accuracies of 83.98 , 56.91 , and 42.14 on CIFAR-10" in text
    grid = {ds: reference_pivot("dh-table1", dataset=ds).loc["DH(C)"]
            for ds in ("cifar10", "cifar100", "imagenet-subset")}
    assert [grid[ds]["Vanilla"] for ds in grid] == [10.08, 1.22, 2.42]
    assert [grid[ds]["Mean"] for ds in grid] == [33.01, 18.91, 11.39]
    assert [grid[ds]["Max"] for ds in grid] == [83.98, 56.91, 42.14]


def test_pivot_blocks_and_errors() -> None:
    grid = reference_pivot("dh-table1", dataset="cifar10")
    assert grid.shape == (10, 16) and list(grid.columns[:2]) == ["Vanilla", "Cutout"] and grid.index[0] == "Clean"
    by_model = reference_pivot("dh-table3", dataset="cifar100")
    assert list(by_model.columns) == ["R18", "R50", "V19", "D121", "ViT"] and by_model.loc["DH(C)", "V19"] == 0.93
    assert reference_pivot("dh-table3", dataset="cifar10", victim="vgg19").shape == (9, 1)
    uge = reference_pivot("uge-table1", dataset="cifar10")
    assert uge.loc["Original | Normal", "CNN"] == 86.57 and uge.isna().loc["UGEs | Distill", "Acc. (Authorized)"]
    with pytest.raises(ConfigError, match="several blocks.*cifar100/resnet18"):
        reference_pivot("dh-table1")
    with pytest.raises(ConfigError, match="no block"):
        reference_pivot("dh-table2", dataset="svhn")
    with pytest.raises(ConfigError, match="did you mean dh-table1"):
        load_reference("dh-tabel1")
