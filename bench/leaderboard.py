"""Leaderboards from records, a pure step over them (no torch, no plugins: a record carries all the
leaderboard reads): one table per dataset × victim (× recipe × poison ratio), in DH Table I's
layout: rows = protections (clean first), columns = countermeasures, then ``Mean`` and ``Max`` over the
countermeasures; mean ± std over seeds where there are several. Written as CSV and Markdown.

Rows of cells with another train-set ``mix`` than ``protected`` read ``protection [mix]``. Several poison
ratios with a single countermeasure give ConfounderGAN Fig. 5's layout instead: a column per ratio p.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from bench.records import RecordLog

GROUP = ("dataset", "victim", "recipe", "poison_ratio")
METRICS = {"final": "test accuracy (%, final)", "best": "test accuracy (%, best)",
           "car": "CAR (%, ConfounderGAN App. A Eq. 6)", "gcr": "GCR (%, ConfounderGAN App. A Eq. 7)"}


@dataclasses.dataclass(frozen=True)
class Table:
    """One leaderboard: numeric means and stds (percent), seed counts, and the display frame."""

    title: str
    slug: str
    mean: pd.DataFrame
    std: pd.DataFrame
    display: pd.DataFrame


def build_tables(records: list[dict[str, Any]], order: dict[str, list[str]] | None = None,
                 metric: str = "final", mix_recipes: bool = False) -> list[Table]:
    """Pivot the latest record of each cell into tables; ``metric`` is one of ``METRICS`` (``best``: oracle early
    stop). Records of different recipes go to different tables unless ``mix_recipes`` (the title names them all).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    frame = latest_positions(records)
    if frame.empty:
        return []
    if mix_recipes:
        frame["recipe"] = "+".join(sorted(frame["recipe"].unique()))
    frame["value"] = cell_values(frame, metric)
    frame["protection"] = row_labels(frame)
    frame, by_ratio = ratio_columns(frame)
    ratios = not by_ratio and frame["poison_ratio"].nunique() > 1
    return [pivot(group, keys, order or {}, metric, by_ratio, ratios)
            for keys, group in frame.groupby(list(GROUP), sort=False)]


def latest_positions(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per table position: the latest record of each cell key, and where a matrix edited between runs
    left several keys at one position (same labels and seed), the newest of them."""
    latest = {r["cell"]: r for r in records if "cell" in r}
    frame = pd.DataFrame(list(latest.values()))
    if frame.empty:
        return frame
    position = [c for c in (*GROUP, "mix", "protection", "countermeasure", "seed") if c in frame]
    recency = frame["finished_at"] if "finished_at" in frame else pd.Series(range(len(frame)), index=frame.index)
    frame = frame.loc[recency.sort_values(kind="stable").index].drop_duplicates(position, keep="last")
    frame["recipe"] = frame.get("recipe", pd.Series(dtype=object)).fillna("?")
    return frame


def cell_values(frame: pd.DataFrame, metric: str) -> pd.Series:
    """Each row's number in percent: ``metric``, or the best epoch where the record's countermeasure reports it
    (``countermeasure_reports = "best"``: early_stop); NaN for failed cells."""
    column = f"test_acc_{metric}" if metric in ("final", "best") else metric
    value = pd.to_numeric(frame[column], errors="coerce") * 100 if column in frame else \
        pd.Series(float("nan"), index=frame.index)
    reports = frame.get("countermeasure_reports", pd.Series(index=frame.index, dtype=object))
    if reports.isna().any():
        warnings.warn(f"{int(reports.isna().sum())} record(s) carry no countermeasure_reports (written by an older "
                      "bench): their columns show the final epoch even for a countermeasure that reports its best "
                      "(early_stop); rerun those cells into a fresh --results folder to refresh them", stacklevel=2)
    best = reports == "best"
    if "test_acc_best" in frame and best.any():  # oracle early stopping: the best epoch, whatever the metric
        value[best] = pd.to_numeric(frame.loc[best, "test_acc_best"], errors="coerce") * 100
    value[frame["status"] != "ok"] = float("nan")
    return value


def row_labels(frame: pd.DataFrame) -> pd.Series:
    """``protection``, or ``protection [mix]`` for cells with another train-set mix than ``protected``."""
    mix = frame["mix"].fillna("protected") if "mix" in frame else pd.Series("protected", index=frame.index)
    return frame["protection"].where(mix == "protected", frame["protection"] + " [" + mix + "]")


def ratio_columns(frame: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """ConfounderGAN Fig. 5's layout where several poison ratios meet a single countermeasure: a column per ratio
    p (``p=0.5 …``) and a row per series; returns the frame and whether that layout applies."""
    if frame["poison_ratio"].nunique() < 2 or frame["countermeasure"].nunique() != 1:
        return frame, False
    frame = frame.copy()
    only = frame["countermeasure"].iloc[0]
    frame["countermeasure"] = "p=" + frame["poison_ratio"].map("{:g}".format) + ("" if only == "none" else f" ({only})")
    frame["poison_ratio"] = "all"
    return frame, True


def pivot(group: pd.DataFrame, keys: tuple, order: dict[str, list[str]], metric: str, by_ratio: bool,
          ratios: bool) -> Table:
    """One table: protections × countermeasures (clean and none first, else the matrix's order), Mean and Max
    over the countermeasures, ``mean ± std`` over seeds where there are several, ``error`` for failed cells."""
    dataset, victim, recipe, ratio = keys
    stats = group.groupby(["protection", "countermeasure"], sort=False)["value"].agg(["mean", "std", "count"])
    failed = group[group["status"] != "ok"].groupby(["protection", "countermeasure"]).size()
    rows = _ordered(group["protection"], order.get("protections"), first="clean")
    cols = sorted(set(group["countermeasure"]), key=lambda c: float(c[2:].split()[0])) if by_ratio else \
        _ordered(group["countermeasure"], order.get("countermeasures"), first="none")
    mean = stats["mean"].unstack().reindex(index=rows, columns=cols)
    std = stats["std"].unstack().reindex(index=rows, columns=cols)
    count = stats["count"].unstack().reindex(index=rows, columns=cols).fillna(0)
    mean["Mean"], mean["Max"] = mean[cols].mean(axis=1), mean[cols].max(axis=1)
    display = mean.copy().astype(object)
    for r in rows:
        for c in cols:
            m, s, n = mean.at[r, c], std.at[r, c], count.at[r, c]
            display.at[r, c] = ("error" if (r, c) in failed.index else "") if pd.isna(m) else (
                f"{m:.2f} ± {s:.2f}" if n > 1 else f"{m:.2f}")
        for c in ("Mean", "Max"):
            display.at[r, c] = "" if pd.isna(mean.at[r, c]) else f"{mean.at[r, c]:.2f}"
    display.index.name = mean.index.name = std.index.name = "protection"
    suffix = f", poison ratio {ratio:g}" if ratios else ""
    title = f"{dataset} × {victim} — {METRICS[metric]}, recipe {recipe}{suffix}"
    slug = _slug(f"{dataset}__{victim}__{recipe}" + (f"__p{ratio:g}" if ratios else ""))
    return Table(title, slug, mean, std, display)


def markdown(table: Table) -> str:
    return f"### {table.title}\n\n" + table.display.to_markdown(stralign="right") + "\n"


def write_tables(tables: list[Table], out_dir: Path, metric: str = "final") -> list[Path]:
    """Write ``<slug>.<metric>.csv`` (numeric means; ``.std.csv`` with several seeds) and ``.md`` per table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables:
        csv, md, std = (out_dir / f"{table.slug}.{metric}{ext}" for ext in (".csv", ".md", ".std.csv"))
        table.mean.round(4).to_csv(csv)
        md.write_text(markdown(table))
        written += [csv, md]
        if table.std.notna().any().any():
            table.std.round(4).to_csv(std)
            written.append(std)
    return written


def leaderboard(results: Path, matrix_name: str, metric: str = "final",
                mix_recipes: bool = False) -> tuple[list[Table], list[Path]]:
    """Build and write the leaderboards of a matrix's recorded runs."""
    run_dir = results / "runs" / matrix_name
    records = RecordLog(run_dir / "records.jsonl").read()
    resolved = run_dir / "matrix.json"
    order = None
    if resolved.is_file():
        axes = json.loads(resolved.read_text())["axes"]
        order = {axis: [c["label"] for c in choices] for axis, choices in axes.items()}
    tables = build_tables(records, order, metric, mix_recipes)
    out_dir = results / "leaderboards" / matrix_name
    written = write_tables(tables, out_dir, metric)
    if records:  # every cell's latest record, flat (curves left out), for analyses of one's own
        flat = pd.json_normalize(list({r["cell"]: r for r in records if "cell" in r}.values()))
        flat.drop(columns=[c for c in ("train_acc", "test_acc", "error") if c in flat]).to_csv(out_dir / "records.csv", index=False)
        written.append(out_dir / "records.csv")
    return tables, written


def _ordered(labels: pd.Series, preferred: list[str] | None, first: str) -> list[str]:
    present = list(dict.fromkeys(labels))
    ordered = [x for x in (preferred or []) if x in present] + [x for x in present if x not in (preferred or [])]
    return sorted(ordered, key=lambda x: x != first)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")
