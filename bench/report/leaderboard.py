"""Leaderboards from records, a step over them alone (nothing is trained or loaded): one table per dataset × victim
(× recipe × poison ratio), in DH Table I's
layout: rows = protections (clean first), columns = countermeasures, then ``Mean`` and ``Max`` over the
countermeasures; mean ± std over seeds where there are several. Written as CSV and Markdown.

Rows of cells with another train-set ``mix`` than ``protected`` read ``protection [mix]``. Several poison
ratios with a single countermeasure give ConfounderGAN Fig. 5's layout instead: a column per ratio p.

A matrix's ``[layout]`` (``Layout``, saved in ``runs/<matrix>/matrix.json``) picks other row and column axes
among protection, countermeasure and victim (those leave the grouping), display names, and the summary. A cell
whose record an older version of a component made reads ``45.10 (stale)``, with a line saying why.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from bench.plan.layout import LAYOUT_AXES, Layout
from bench.report.view import matrix_view

GROUP = ("dataset", "victim", "recipe", "poison_ratio")
STALE = " (stale)"  # after a number whose record an older version of a component made
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
    ran: tuple[str, ...] = ()  # what the stages report they ran where it is a choice (weights or alternative)
    cells: pd.DataFrame | None = dataclasses.field(default=None, repr=False)  # its records, labels as shown
    stale: tuple[str, ...] = ()  # why its cells marked STALE are: a component's version or code changed since
    skipped: tuple[str, ...] = ()  # damaged record lines left out (bench.report.view): a cell may lack a seed


def build_tables(records: list[dict[str, Any]], order: dict[str, list[str]] | None = None,
                 metric: str = "final", mix_recipes: bool = False, layout: Layout | None = None) -> list[Table]:
    """Pivot the latest record of each cell into tables; ``metric`` is one of ``METRICS`` (``best``: oracle early
    stop). Records of different recipes go to different tables unless ``mix_recipes`` (the title names them all).
    ``layout`` (default: ``Layout()``) sets the rows, columns, shown names and summary columns.
    """
    layout = layout or Layout()
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    frame = latest_positions(records)
    if frame.empty:
        return []
    if mix_recipes:
        frame["recipe"] = "+".join(sorted(frame["recipe"].unique()))
    frame["value"] = cell_values(frame, metric)
    frame, by_ratio = ratio_columns(frame, layout) if layout.columns == "countermeasure" else (frame, False)
    for axis in layout.axes if layout.labels else ():
        frame[axis] = frame[axis].map(layout.name)
    frame["protection"] = row_labels(frame)
    ratios = not by_ratio and frame["poison_ratio"].nunique() > 1
    return [dataclasses.replace(pivot(group, keys, order or {}, metric, by_ratio, ratios, layout), ran=what_ran(group),
                                cells=group, stale=why_stale(group))
            for keys, group in frame.groupby(grouping(layout), sort=False)]


def why_stale(group: pd.DataFrame) -> tuple[str, ...]:
    """A line per reason its stale records share (``bench.store.records.stale_reasons``), with how many."""
    reasons = group["stale"][group["stale"] != ""].value_counts(sort=False)
    return tuple(f"{n} record(s) made by {why}; `bench run` retrains them" for why, n in reasons.items())


def what_ran(group: pd.DataFrame) -> tuple[str, ...]:
    """``label: …`` for each protection and countermeasure whose stage reported ``ran`` in its info (UGE's encoder:
    CLIP or the documented alternative), so no table hides which weights produced it."""
    lines = []
    for axis, stage in (("protection", "protect_info"), ("countermeasure", "purify_info")):
        if stage in group:
            for label, info in zip(group[axis], group[stage]):
                if isinstance(info, dict) and info.get("ran"):
                    lines.append(f"{label}: {info['ran']}")
    return tuple(dict.fromkeys(lines)) + mixed_settings(group)


def mixed_settings(group: pd.DataFrame) -> tuple[str, ...]:
    """A line when a table's cells ran on different device kinds or precisions (a results folder shared between a
    CPU and a GPU machine): keys do not hold them, since both compute the same cell, but the numbers may differ."""
    ok = group[group["status"] == "ok"]
    kinds = ok.get("device", pd.Series("", index=ok.index)).fillna("").astype(str).str.split(":").str[0]
    settings = (kinds + " " + ok.get("precision", pd.Series("", index=ok.index)).fillna("?").astype(str)).str.strip()
    counts = settings.value_counts()
    if len(counts) < 2:
        return ()
    return ("mixed devices/precisions: " + ", ".join(f"{name} ({n} cells)" for name, n in sorted(counts.items())),)


def grouping(layout: Layout) -> list[str]:
    """The keys that split records into tables: ``GROUP`` with the axes outside the layout, less those in it."""
    return [k for k in ("dataset", *LAYOUT_AXES, "recipe", "poison_ratio") if k not in layout.axes]


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
    frame["recipe"] = frame["recipe"].fillna("?") if "recipe" in frame else "?"  # failed before its recipe
    frame["stale"] = frame.get("stale", pd.Series("", index=frame.index)).fillna("")
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


def ratio_columns(frame: pd.DataFrame, layout: Layout | None = None) -> tuple[pd.DataFrame, bool]:
    """ConfounderGAN Fig. 5's layout where several poison ratios meet a single countermeasure: a column per ratio
    p (``p=0.5 …``) and a row per series; returns the frame and whether that layout applies."""
    if frame["poison_ratio"].nunique() < 2 or frame["countermeasure"].nunique() != 1:
        return frame, False
    frame = frame.copy()
    only = frame["countermeasure"].iloc[0]
    shown = "" if only == "none" else f" ({(layout or Layout()).name(only)})"
    frame["countermeasure"] = "p=" + frame["poison_ratio"].map("{:g}".format) + shown
    frame["poison_ratio"] = "all"
    return frame, True


def pivot(group: pd.DataFrame, keys: tuple, order: dict[str, list[str]], metric: str, by_ratio: bool,
          ratios: bool, layout: Layout | None = None) -> Table:
    """One table: the layout's rows × columns (clean and none first, else the matrix's order), Mean and Max over
    the columns if ``layout.summary``, ``mean ± std`` over seeds where there are several, ``error`` for failed
    cells."""
    layout = layout or Layout()
    names = dict(zip(grouping(layout), keys))
    group = group.assign(row=group[list(layout.rows)].agg(" · ".join, axis=1))
    present = set(group["row"])
    parts = [_axis_order(group, axis, order, by_ratio, layout) for axis in layout.rows]
    rows = [r for r in map(" · ".join, itertools.product(*parts)) if r in present]
    cols = _axis_order(group, layout.columns, order, by_ratio, layout)
    by = ["row", layout.columns]
    stats = group.groupby(by, sort=False)["value"].agg(["mean", "std", "count"])
    failed = group[group["status"] != "ok"].groupby(by).size()
    stale = group[group["stale"] != ""].groupby(by).size()
    mean = stats["mean"].unstack().reindex(index=rows, columns=cols)
    std = stats["std"].unstack().reindex(index=rows, columns=cols)
    count = stats["count"].unstack().reindex(index=rows, columns=cols).fillna(0)
    summary = ("Mean", "Max") if layout.summary else ()
    if summary:
        mean["Mean"], mean["Max"] = mean[cols].mean(axis=1), mean[cols].max(axis=1)
    display = mean.copy().astype(object)
    for r in rows:
        for c in cols:
            m, s, n = mean.at[r, c], std.at[r, c], count.at[r, c]
            display.at[r, c] = ("error" if (r, c) in failed.index else "") if pd.isna(m) else (
                f"{m:.2f} ± {s:.2f}" if n > 1 else f"{m:.2f}") + STALE * ((r, c) in stale.index)
        for c in summary:
            marked = any((r, c) in stale.index for c in cols)
            display.at[r, c] = "" if pd.isna(mean.at[r, c]) else f"{mean.at[r, c]:.2f}" + STALE * marked
    display.index.name = mean.index.name = std.index.name = " · ".join(layout.rows)
    grouped = [names[axis] for axis in LAYOUT_AXES if axis in names]
    suffix = f", poison ratio {names['poison_ratio']:g}" if ratios else ""
    title = f"{' × '.join([names['dataset'], *grouped])} — {METRICS[metric]}, recipe {names['recipe']}{suffix}"
    slug = _slug("__".join([names["dataset"], *grouped, names["recipe"]])
                 + (f"__p{names['poison_ratio']:g}" if ratios else ""))
    return Table(title, slug, mean, std, display)


def markdown(table: Table) -> str:
    ran = "".join(f"\n- ran: {line}" for line in table.ran)
    ran += "".join(f"\n- {STALE.strip()}: {line}" for line in table.stale)
    ran += "".join(f"\n- skipped (damaged record line, its cell counts as not recorded): {line}"
                   for line in table.skipped)
    # numparse off: tabulate would write "90.00" as 90 beside a "90.00 ± 1.20" cell
    shown = table.display.to_markdown(stralign="right", disable_numparse=True)
    return f"### {table.title}\n\n" + shown + "\n" + (ran + "\n" if ran else "")


def write_tables(tables: list[Table], out_dir: Path, metric: str = "final") -> list[Path]:
    """Write ``<slug>.<metric>.csv`` (numeric means; ``.std.csv`` with several seeds) and ``.md`` per table, and
    remove the files of that metric that an earlier call wrote and this one no longer does (``outputs``): a table
    whose records changed group (a failed cell retried) leaves no stale copy."""
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
    for old in set(outputs(out_dir, metric)) - set(written):
        old.unlink(missing_ok=True)
    return written


def outputs(out_dir: Path, metric: str) -> list[Path]:
    """The files in ``out_dir`` named as ``write_tables`` names a table's for ``metric`` (comparisons, which end
    in ``.vs-paper.*``, and ``records.csv`` are not)."""
    named = re.compile(rf"[A-Za-z0-9_.=-]+\.{re.escape(metric)}(\.csv|\.md|\.std\.csv)")
    return [path for path in out_dir.iterdir() if path.is_file() and named.fullmatch(path.name)]


def leaderboard(results: Path, matrix_name: str, metric: str = "final",
                mix_recipes: bool = False) -> tuple[list[Table], list[Path]]:
    """Build and write the leaderboards of a matrix's records (``bench.report.view``), with ``records.csv``: every
    cell's latest record, flat (curves left out), ``stale`` saying why one is stale, for analyses of one's own."""
    view = matrix_view(results, matrix_name)
    tables = [dataclasses.replace(table, skipped=view.skipped)
              for table in build_tables(view.rows, view.order, metric, mix_recipes, view.layout)]
    out_dir = results / "leaderboards" / view.name
    written = write_tables(tables, out_dir, metric)
    flat = pd.json_normalize(list({r["cell"]: r for r in view.rows}.values()))
    flat.drop(columns=[c for c in ("train_acc", "test_acc", "error") if c in flat]).to_csv(out_dir / "records.csv",
                                                                                          index=False)
    return tables, [*written, out_dir / "records.csv"]


def _axis_order(group: pd.DataFrame, axis: str, order: dict[str, list[str]], by_ratio: bool,
                layout: Layout) -> list[str]:
    """An axis's shown labels in a table: ratio columns by p, else clean / none first, then the matrix's order."""
    if axis == "countermeasure" and by_ratio:
        return sorted(set(group[axis]), key=lambda c: float(c[2:].split()[0]))
    first = {"protection": "clean", "countermeasure": "none"}.get(axis)
    preferred = list(dict.fromkeys(layout.name(label) for label in order.get(f"{axis}s", [])))  # labels may share a name
    return _ordered(group[axis], preferred, layout.name(first) if first else None)


def _ordered(labels: pd.Series, preferred: list[str] | None, first: str | None) -> list[str]:
    present = list(dict.fromkeys(labels))
    ordered = [x for x in (preferred or []) if x in present] + [x for x in present if x not in (preferred or [])]
    return sorted(ordered, key=lambda x: x != first)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")
