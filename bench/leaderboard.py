"""Leaderboards from records: one table per dataset × victim (× recipe × poison ratio), in DH Table I's
layout: rows = protections (clean first), columns = countermeasures, then ``Mean`` and ``Max`` over the
countermeasures; mean ± std over seeds where there are several. Written as CSV and Markdown.

Rows of cells with another train-set ``mix`` than ``protected`` read ``protection [mix]``. Several poison
ratios with a single countermeasure give ConfounderGAN Fig. 5's layout instead: a column per ratio p.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from bench.components import COUNTERMEASURES
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
    """Pivot the latest record of each cell into tables; ``metric`` is ``final`` or ``best`` (oracle early stop).

    Records of different recipes go to different tables unless ``mix_recipes`` (then the title names them all).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    latest = {r["cell"]: r for r in records if "cell" in r}
    if not latest:
        return []
    frame = pd.DataFrame(list(latest.values()))
    # A matrix edited between runs leaves records of cells that share a table position (same labels and seed)
    # but not the key: the newest one stands for that position.
    position = [c for c in (*GROUP, "mix", "protection", "countermeasure", "seed") if c in frame]
    recency = frame["finished_at"] if "finished_at" in frame else pd.Series(range(len(frame)), index=frame.index)
    frame = frame.loc[recency.sort_values(kind="stable").index].drop_duplicates(position, keep="last")
    frame["recipe"] = frame.get("recipe", pd.Series(dtype=object)).fillna("?")
    if mix_recipes:
        frame["recipe"] = "+".join(sorted(frame["recipe"].unique()))
    column = f"test_acc_{metric}" if metric in ("final", "best") else metric
    frame["value"] = pd.to_numeric(frame[column] if column in frame else None, errors="coerce") * 100
    best = frame.get("countermeasure_name", pd.Series(index=frame.index, dtype=object)).map(_reports_best)
    if "test_acc_best" in frame and best.any():  # oracle early stopping: the best epoch, whatever the metric
        frame.loc[best, "value"] = pd.to_numeric(frame.loc[best, "test_acc_best"], errors="coerce") * 100
    frame.loc[frame["status"] != "ok", "value"] = float("nan")
    mix = frame["mix"].fillna("protected") if "mix" in frame else pd.Series("protected", index=frame.index)
    frame["protection"] = frame["protection"].where(mix == "protected", frame["protection"] + " [" + mix + "]")
    ratios = frame["poison_ratio"].nunique() > 1
    by_ratio = ratios and frame["countermeasure"].nunique() == 1
    if by_ratio:  # ConfounderGAN Fig. 5's layout: one column per poison ratio p, a row per series
        only = frame["countermeasure"].iloc[0]
        frame["countermeasure"] = "p=" + frame["poison_ratio"].map("{:g}".format) + ("" if only == "none" else f" ({only})")
        frame["poison_ratio"], ratios = "all", False
    tables = []
    for keys, group in frame.groupby(list(GROUP), sort=False):
        dataset, victim, recipe, ratio = keys
        stats = group.groupby(["protection", "countermeasure"], sort=False)["value"].agg(["mean", "std", "count"])
        failed = group[group["status"] != "ok"].groupby(["protection", "countermeasure"]).size()
        rows = _ordered(group["protection"], (order or {}).get("protections"), first="clean")
        cols = sorted(set(group["countermeasure"]), key=lambda c: float(c[2:].split()[0])) if by_ratio else \
            _ordered(group["countermeasure"], (order or {}).get("countermeasures"), first="none")
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
        tables.append(Table(title, slug, mean, std, display))
    return tables


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


def _reports_best(name: Any) -> bool:
    """Whether a countermeasure's column shows ``test_acc_best`` (``reports = "best"``, e.g. ``early_stop``)."""
    return isinstance(name, str) and name in COUNTERMEASURES and COUNTERMEASURES.get(name).reports == "best"


def _ordered(labels: pd.Series, preferred: list[str] | None, first: str) -> list[str]:
    present = list(dict.fromkeys(labels))
    ordered = [x for x in (preferred or []) if x in present] + [x for x in present if x not in (preferred or [])]
    return sorted(ordered, key=lambda x: x != first)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")
