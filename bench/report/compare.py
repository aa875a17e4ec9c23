"""Leaderboards beside the published tables they reproduce: ours | paper | Δ (ours − paper) per cell.

A matrix names its table (``reference = "dh-table1"``, saved in ``runs/<matrix>/matrix.json``) and shows labels
as the paper prints them (``[layout.labels]``): cells join on shown labels. A comparison is a DataFrame: our rows
then the paper's others, columns a MultiIndex (column, part in ``PARTS``), NaN where a side has none; Mean and Max
ours over our columns (as the leaderboard) beside the paper's. ``attrs``: title, slug, source, ``setting`` (how
data, victim and recipe differ from the paper's), ``marks`` (cell → symbols), ``legend`` (a line per symbol: a
component off the paper's setting: a parameter it declares in ``paper_setting`` away from its default,
which follows its paper), ``failed``, ``ran``. Markdown puts ``ours / paper / Δ``
in each cell; LaTeX three sub-columns under each column; CSV the numbers under two header rows.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

import pandas as pd

from bench.core.components import COUNTERMEASURES, PROTECTIONS
from bench.core.registry import ConfigError
from bench.plan.layout import Layout
from bench.report import references
from bench.report.leaderboard import Table, build_tables
from bench.report.view import matrix_view

PARTS = ("ours", "paper", "Δ")
SUMMARY = ("Mean", "Max")
SYMBOLS = ("*", "†", "‡", "§", "¶", "‖")
PAPERS_SETTING = "the paper's dataset, victim and recipe"
# our dataset → (the paper's, what ours is): compared as that dataset, and said so in the setting note
SAME_DATA = {"cifar10-jpeg": ("cifar10", "a JPEG q75 copy")}


def comparison_tables(results: Path, matrix: str, metric: str = "final") -> list[pd.DataFrame]:
    """Each leaderboard table of ``matrix``'s records (``bench.report.view``) joined with its reference table's
    (dataset, victim) block."""
    view = matrix_view(results, matrix)
    if view.reference is None:
        raise ConfigError(f"matrix {matrix!r} names no published table (its matrix has no 'reference'): add a "
                          f"top-level reference = \"<table>\" (one of {', '.join(references.TABLES)}) to its TOML "
                          "and rerun `bench run` (recorded cells are skipped, matrix.json is rewritten); matrices "
                          f"with one: {', '.join(with_reference()) or 'none'}")
    tables = build_tables(view.rows, view.order, metric, layout=view.layout)
    return [compare(table, view.reference, view.layout) for table in tables]


def compare(table: Table, reference: str, layout: Layout) -> pd.DataFrame:
    """One leaderboard table beside its block of ``reference`` (see the module docstring for the frame)."""
    assert table.cells is not None, "tables from build_tables carry their cells"
    cells, notes = table.cells, []
    dataset, params = cells["dataset"].iloc[0], cells.get("dataset_params", pd.Series([{}])).iloc[0]
    params = params if isinstance(params, dict) else {}  # NaN where older records lack the field
    paper_dataset, copy = SAME_DATA.get(dataset, (dataset, ""))
    words = {"per_class": "{n}/class", "test_per_class": "test {n}/class", "protect_per_class": "protected on {n}/class"}
    subset = [text.format(n=n) for key, text in words.items() if (n := params.get(key)) is not None]
    if copy or subset:
        what = " ".join([dataset, *([f"({copy})"] if copy else []), *subset[:1]]) + "".join(f", {s}" for s in subset[1:])
        notes.append(f"{what} vs the paper's {'full ' * bool(subset)}{paper_dataset}")
    block = references.load_reference(reference)
    block = block[block["dataset"] == paper_dataset]
    victim = None  # the block's victim where victims split tables (where they are columns, all of them)
    if "victim" not in layout.axes and not block.empty:
        ours, theirs = cells["victim"].iloc[0], list(dict.fromkeys(block["victim"]))
        victim = ours if ours in theirs else theirs[0] if len(theirs) == 1 else None
        if victim != ours:
            notes.append(f"{ours} vs the paper's {victim or ' / '.join(theirs)}")
    if block.empty:
        notes.append(f"the paper has no {paper_dataset} block")
    recipe, paper_recipe = cells["recipe"].iloc[0], reference.split("-")[0]
    if recipe != paper_recipe:
        notes.append(f"recipe {recipe} vs {paper_recipe}")
    usable = not block.empty and ("victim" in layout.axes or victim is not None)
    paper = references.reference_pivot(reference, paper_dataset, victim) if usable else pd.DataFrame()
    paper.index = paper.index.astype(str).str.replace(" | ", " · ", regex=False)  # "Method | Scheme": our rows' join
    frame = _join(table.mean, paper, layout)
    marks, legend = _marks(table, cells, layout, paper)
    failed = {(r, c) for r in table.display.index for c in table.display.columns if table.display.at[r, c] == "error"}
    setting = f"reduced setting, not a reproduction: {'; '.join(notes)}" if notes else PAPERS_SETTING
    frame.attrs.update(title=f"{table.title} vs {reference}", slug=table.slug, source=references.TABLES[reference],
                       setting=setting, marks=marks, legend=legend, failed=failed, ran=table.ran)
    return frame


def _join(ours: pd.DataFrame, paper: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """Ours and the paper's numbers on the union of rows and columns, Δ = ours − paper, columns (column, part)."""
    cols = [c for c in ours.columns if c not in SUMMARY]
    cols += [c for c in paper.columns if c not in SUMMARY and c not in cols]
    cols += [s for s in SUMMARY if s in ours.columns or s in paper.columns]
    rows = list(ours.index) + [r for r in paper.index if r not in ours.index]
    mine, theirs = (f.reindex(index=rows, columns=cols).astype(float) for f in (ours, paper))
    parts = dict(zip(PARTS, (mine, theirs, mine - theirs)))
    frame = pd.DataFrame({(c, p): parts[p][c] for c in cols for p in PARTS}, index=rows)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=[layout.columns, "value"])
    frame.index.name = ours.index.name
    return frame


def _marks(table: Table, cells: pd.DataFrame, layout: Layout,
           paper: pd.DataFrame) -> tuple[dict[tuple[str, str], str], list[str]]:
    """Symbols per cell for components off the paper's setting and for stale records (their Mean and Max get the
    row's), the legend."""
    who: dict[str, list[str]] = {}  # each deviation → the components that ran with it (one symbol for all)
    found: dict[tuple[str, str], list[str]] = {}
    rows = cells[list(layout.rows)].agg(" · ".join, axis=1)
    for (row, col), group in cells.groupby([rows, cells[layout.columns]], sort=False):
        off = [d for record in group.to_dict("records") for d in deviations(record)]
        off += [(row, f"stale: {record['stale']}; `bench run` retrains it") for record in group.to_dict("records")
                if record.get("stale")]
        found[(row, col)] = list(dict.fromkeys(text for _, text in off))
        for label, text in off:
            who[text] = list(dict.fromkeys([*who.get(text, []), label]))
    reasons = [f"{', '.join(labels)}: {text}" for text, labels in who.items()]
    found = {at: [reasons[list(who).index(text)] for text in texts] for at, texts in found.items()}
    summary = [s for s in SUMMARY if s in table.mean.columns]
    ours, theirs = ([c for c in f.columns if c not in SUMMARY] for f in (table.mean, paper))
    for row in table.mean.index:  # per row: a row may lack cells (not yet run) that another row has
        mine = set(table.mean.loc[row, ours].dropna().index)
        printed = set(paper.loc[row, theirs].dropna().index) if row in paper.index else set(theirs)
        differ = bool(summary) and not paper.empty and mine != printed
        reason = f"Mean and Max over our {len(mine)} columns, the paper's over its {len(printed)}"
        reasons += [reason] * (differ and reason not in reasons)
        in_row = [r for (at, _), rs in found.items() if at == row for r in rs] + [reason] * differ
        found.update({(row, s): list(dict.fromkeys(in_row)) for s in summary})
    marks = {at: "".join(_symbol(reasons.index(r)) for r in rs) for at, rs in found.items() if rs}
    return marks, [f"{_symbol(i)} {reason}" for i, reason in enumerate(reasons)]


def deviations(record: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, ``param = value (paper: …)``) for a record's protection and countermeasure: each parameter the
    component declares in ``paper_setting`` whose value is not its default (the paper's)."""
    found = []
    for axis, registry in (("protection", PROTECTIONS), ("countermeasure", COUNTERMEASURES)):
        params, name = record.get(f"{axis}_params"), str(record.get(f"{axis}_name"))
        params = params if isinstance(params, dict) else {}  # NaN where older records lack the field
        if name not in registry:
            continue  # a plugin no longer installed: nothing to compare its parameters with
        component = registry.get(name)
        defaults = {f.name: f.default for f in dataclasses.fields(component)}
        off = [f"{k} = {params[k]!r} (paper: {defaults[k]!r})" for k in component.paper_setting
               if k in params and params[k] != defaults[k]]
        found += [(record[axis], ", ".join(off))] if off else []
    return found


def markdown(frame: pd.DataFrame) -> str:
    """The comparison as Markdown: title, setting, one column per paper column (``ours / paper / Δ``), legend."""
    cols = list(dict.fromkeys(frame.columns.get_level_values(0)))
    shown = pd.DataFrame({c: [" / ".join(_cell(frame, r, c)) for r in frame.index] for c in cols}, index=frame.index)
    notes = [f"\n- {line}" for line in (*frame.attrs["legend"], *(f"ran: {x}" for x in frame.attrs["ran"]))]
    head = f"### {frame.attrs['title']}\n\npaper: {frame.attrs['source']}\n\n{frame.attrs['setting']}\n\n"
    return (head + "each cell: ours / paper / Δ (ours − paper); — where a side has no value\n\n"
            + shown.to_markdown(stralign="right") + "\n" + "".join(notes) + ("\n" if notes else ""))


def latex(frame: pd.DataFrame) -> str:
    """The comparison as a LaTeX table (booktabs; ours, paper, Δ under each column), the notes in its caption."""
    shown = pd.DataFrame([[_cell(frame, r, c)[PARTS.index(p)] for c, p in frame.columns] for r in frame.index],
                         index=frame.index, columns=frame.columns)
    caption = ". ".join([frame.attrs["title"], frame.attrs["source"], frame.attrs["setting"], *frame.attrs["legend"]])
    for char in "&%$#_":
        caption = caption.replace(char, "\\" + char)
    return shown.to_latex(multicolumn=True, multicolumn_format="c", caption=caption, column_format="l" + "r" *
                          len(shown.columns), label=f"tab:{frame.attrs['slug']}-vs-paper", escape=True)


def write_comparisons(frames: list[pd.DataFrame], out_dir: Path, metric: str = "final") -> list[Path]:
    """Write ``<slug>.<metric>.vs-paper.csv`` / ``.md`` / ``.tex`` per comparison, each atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for frame in frames:
        for ext, text in ((".csv", frame.round(4).to_csv()), (".md", markdown(frame)), (".tex", latex(frame))):
            path = out_dir / f"{frame.attrs['slug']}.{metric}.vs-paper{ext}"
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
            written.append(path)
    return written


def with_reference(matrix_dir: Path = Path(__file__).resolve().parents[1] / "matrices") -> list[str]:
    """The named matrices that declare a ``reference`` table."""
    return [p.stem for p in sorted(matrix_dir.glob("*.toml")) if "reference" in tomllib.loads(p.read_text())]


def _cell(frame: pd.DataFrame, row: str, col: str) -> tuple[str, str, str]:
    """(ours with its marks, paper, Δ) as shown: two decimals, Δ signed, — where missing, error where it failed."""
    ours, paper, delta = (frame.at[row, (col, p)] for p in PARTS)
    mine = "error" if (row, col) in frame.attrs["failed"] else "—" if pd.isna(ours) else f"{ours:.2f}"
    return (mine + frame.attrs["marks"].get((row, col), ""), "—" if pd.isna(paper) else f"{paper:.2f}",
            "—" if pd.isna(delta) else f"{delta:+.2f}")


def _symbol(i: int) -> str:
    return SYMBOLS[i] if i < len(SYMBOLS) else f"[{i + 1}]"
