"""The papers' published numbers, as data: one long-format CSV per table under ``bench/report/tables/``.

The values are transcribed from the papers' text in ``../shared/papers`` (DH: dh-semantic-deep-hiding.txt,
ConfounderGAN: confoundergan.txt, UGE: uge-ungeneralizable-examples.txt), exactly as printed (``10.00`` stays
``10.00`` in the CSV). Columns: ``paper,table,dataset,victim,row,column,value,note``; ``row`` and ``column`` are the
paper's labels (citations such as ``[6]`` dropped; two-level row headers joined as ``"Method | Scheme"``), ``dataset``
and ``victim`` bench's names where bench has one (else the paper's name, lower-cased). Where the victim varies along a
table's columns or rows (DH Table III, ConfounderGAN Table 1, UGE Tables 1-2) each cell carries its own victim.
Internal inconsistencies of a paper are kept as printed and flagged in ``note``; cells whose meaning is ambiguous
are left out (see ``TABLES``). ConfounderGAN Fig. 5 prints no numbers, so it has no file.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

from bench.core.registry import ConfigError

if TYPE_CHECKING:  # pandas loads where a table is read: matrices name tables without reading them
    import pandas as pd

REFERENCES = Path(__file__).parent / "tables"
COLUMNS = ["paper", "table", "dataset", "victim", "row", "column", "value", "note"]
KEY = ["dataset", "victim", "row", "column"]

TABLES: dict[str, str] = {
    "dh-table1": "DH paper, Table I: test accuracy (%) of ResNet-18 on CIFAR-10, CIFAR-100 and the ImageNet subset "
                 "under 14 countermeasures, with Mean/Max, §IV-D (CIFAR-10 DH(S) Mean 37.47 and CIFAR-100 OPS Max "
                 "64.25 are as printed though they disagree with their rows)",
    "dh-table2": "DH paper, Table II: test accuracy (%) of ResNet-18 on CIFAR-10 against OP, UEraser, AVATAR and "
                 "SimCLR, with Mean/Max, §IV-D",
    "dh-table3": "DH paper, Table III: test accuracy (%) on CIFAR-10 and CIFAR-100 across R18/R50/V19/D121/ViT, no "
                 "countermeasure, §IV-E1 (its R18 column differs from Table I's Vanilla for several rows, as printed)",
    "confoundergan-table1": "ConfounderGAN paper, Table 1: transferability, test accuracy (%) of VGG11/ResNet50/"
                            "DenseNet121 on Natural/EMN/Ours data (noise made against ResNet18), six datasets, §5.3.1",
    "confoundergan-table2": "ConfounderGAN paper, Table 2: test accuracy (%) of ResNet18 on unlearnable CIFAR-10 under "
                            "8 augmentation settings, §5.3.2",
    "confoundergan-table3": "ConfounderGAN paper, Table 3: test accuracy (%) on CIFAR-10 trained on natural, "
                            "DnCNN-denoised and encrypted images (adaptive setting), App. D",
    "uge-table1": "UGE paper, Table 1: ablation, test accuracy (%) of the ResNet-18 authorized network and hacker "
                  "networks under Normal/Distill, CIFAR-10/CIFAR-100/TinyImageNet, §4.2; the 7 TinyImageNet Distill "
                  "cells whose printed changes contradict their columns (Original | Distill all three, UGEs w/o UD "
                  "and UGEs | Distill MobileNetV2/ShuffleNetV2) are left out",
    "uge-table2": "UGE paper, Table 2: two authorized ResNet-18 (Net-1/Net-2), CNN and ResNetC-20 hackers under "
                  "Normal/Distill-1/Distill-2, CIFAR-10, §4.2 (Original | Normal ResNetC-20 93.04 as printed; "
                  "Table 1 has 92.28)",
    "uge-table3": "UGE paper, Table 3: test accuracy (%) of models trained on clean data and on ULEs (EM, TAP, NTGA, "
                  "REM, CUDA, Ours (L_fd)), CIFAR-10/CIFAR-100, CUDA's setup (ResNet-18 assumed), §4.2",
}


def _unknown(table: str) -> ConfigError:
    close = difflib.get_close_matches(table, TABLES, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown reference table {table!r}{hint} (known: {', '.join(sorted(TABLES))})")


def load_reference(table: str) -> pd.DataFrame:
    """Read and validate one reference table.

    Args:
        table: a name in ``TABLES``, e.g. ``"dh-table1"``.

    Returns:
        The long-format frame (columns ``COLUMNS``; ``value`` float, ``note`` "" where empty).

    Raises:
        ConfigError: the table is unknown, or its file is malformed.
    """
    import pandas as pd

    if table not in TABLES:
        raise _unknown(table)
    path = REFERENCES / f"{table}.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(frame.columns) != COLUMNS:
        raise ConfigError(f"{path}: columns {list(frame.columns)}, expected {COLUMNS}")
    if (frame["table"] != table).any():
        raise ConfigError(f"{path}: rows name another table: {sorted(set(frame['table']) - {table})}")
    dup = frame[frame.duplicated(KEY, keep=False)]
    if not dup.empty:
        raise ConfigError(f"{path}: (dataset, victim, row, column) repeats: {dup[KEY].values.tolist()[:3]}")
    values = pd.to_numeric(frame["value"], errors="coerce")
    if values.isna().any():
        raise ConfigError(f"{path}: non-numeric values: {frame.loc[values.isna(), 'value'].tolist()[:3]}")
    return frame.assign(value=values.astype(float))


def reference_pivot(table: str, dataset: str | None = None, victim: str | None = None) -> pd.DataFrame:
    """Rows × columns of one (dataset, victim) block, in the paper's order.

    Where the victim varies along the table's columns or rows (DH Table III, UGE Table 1, ...), a dataset alone
    selects the whole printed block, as long as no (row, column) cell repeats in it.

    Args:
        table: a name in ``TABLES``.
        dataset: bench's dataset name; needed when the table has several datasets.
        victim: bench's victim name; needed when the block would otherwise repeat a cell.

    Returns:
        A frame indexed by ``row`` with one column per paper column; NaN where the paper prints no number.

    Raises:
        ConfigError: the table is unknown, the selection is empty, or it spans several blocks.
    """

    frame = load_reference(table)
    blocks = sorted(set(zip(frame["dataset"], frame["victim"])))
    if dataset is not None:
        frame = frame[frame["dataset"] == dataset]
    if victim is not None:
        frame = frame[frame["victim"] == victim]
    named = ", ".join(f"{d}/{v}" for d, v in blocks)
    if frame.empty:
        raise ConfigError(f"{table}: no block for dataset={dataset!r}, victim={victim!r} (blocks: {named})")
    if frame["dataset"].nunique() > 1 or frame.duplicated(["row", "column"]).any():
        raise ConfigError(f"{table} has several blocks; pass dataset= and/or victim= (blocks: {named})")
    grid = frame.pivot(index="row", columns="column", values="value")
    grid = grid.reindex(index=frame["row"].unique(), columns=frame["column"].unique())
    grid.index.name, grid.columns.name = "row", "column"
    return grid
