"""``bench report``: one matrix's records as a self-contained HTML page (figures as base64 PNG, inline CSS, no
external links) and the same content as Markdown beside its PNG files, built from records and cache alone.

Sections: header (matrix, description, cell counts), leaderboards (``bench.report.leaderboard``'s tables; ours | paper
| Δ from ``bench.report.compare`` where the matrix declares a ``reference``), per-epoch accuracy curves, each
protection's clean / protected / perturbation images with L∞, L2, PSNR and SSIM, ConfounderGAN Fig. 5's
polylines where there are several poison ratios, CAR / GCR tables, and the environment (device, versions,
recipe, seeds, cache keys) that makes the page a reproducibility record.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from bench.plan.layout import Layout
from bench.report import figures
from bench.report.leaderboard import build_tables, cell_values, latest_positions, row_labels
from bench.report.view import matrix_view
from bench.store.integrity import error_line

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#eef}
tr:nth-child(even) td{background:#f7f7f7}img{max-width:100%;border:1px solid #ddd}div.wide{overflow-x:auto}
figure{display:inline-block;vertical-align:top;margin:.4em .8em .4em 0;max-width:100%}figcaption{font-size:12px}
p.note{color:#555;font-size:13px}pre{background:#f4f4f4;padding:.6em;overflow-x:auto;font-size:12px}"""


@dataclasses.dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclasses.dataclass(frozen=True)
class Text:
    text: str
    note: bool = False


@dataclasses.dataclass(frozen=True)
class Frame:
    """A table; its index is shown when ``index``."""

    frame: pd.DataFrame
    index: bool = True


@dataclasses.dataclass(frozen=True)
class Figure:
    """A PNG figure, written as ``<name>.png`` beside the Markdown."""

    name: str
    data: bytes
    caption: str


Block = Heading | Text | Frame | Figure


def build_report(results: Path, matrix: str, out: Path | None = None) -> list[Path]:
    """Write ``report.html``, ``report.md`` and the PNG figures of ``matrix``'s records under ``out``
    (default ``<results>/reports/<matrix>``); returns the written paths."""
    view = matrix_view(results, matrix)
    blocks = sections(results, view.name, view.rows, view.saved, view.skipped)
    return write(blocks, out or results / "reports" / view.name, f"bench report — {view.name}")


def sections(results: Path, matrix: str, records: list[dict[str, Any]], saved: dict[str, Any],
             skipped: tuple[str, ...] = ()) -> list[Block]:
    """Every section of the page, in order (``skipped``: damaged record lines, listed in the header)."""
    order = {axis: [c["label"] for c in choices] for axis, choices in saved.get("axes", {}).items()}
    layout = Layout.parse(saved.get("layout", {}))
    latest = latest_positions(records)
    return [*header(matrix, saved, latest, skipped), *leaderboards(results, matrix, records, order, layout, saved),
            *curves(records, order, layout), *protections(results / "cache", latest, order),
            *ratios(latest, layout), *gradients(records, order, layout), *environment(latest, saved)]


def header(matrix: str, saved: dict[str, Any], latest: pd.DataFrame, skipped: tuple[str, ...] = ()) -> list[Block]:
    ok = int((latest["status"] == "ok").sum())
    built = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    stale = int((latest["stale"] != "").sum())
    lines = [f"Matrix {matrix}: {saved.get('description') or '(no description)'}",
             f"Source: {saved.get('source', '?')}. Built {built} from records only (no training).",
             f"Cells recorded: {len(latest)} — {ok} ok, {len(latest) - ok} failed"
             + (f"; {stale} stale (an older version of a component made them, marked (stale); `bench run --matrix "
                f"{matrix}` retrains them)." if stale else ".")]
    notes = [Text(f"Skipped a damaged record line (its cell counts as not recorded; `bench run` trains it again): "
                  f"{line}", note=True) for line in skipped]
    return [Heading(1, f"bench report — {matrix}"), *(Text(line) for line in lines), *notes]


def leaderboards(results: Path, matrix: str, records: list[dict[str, Any]], order: dict[str, list[str]],
                 layout: Layout, saved: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Leaderboards")]
    for metric, note in (("final", "final epoch"), ("best", "best epoch (oracle early stopping)")):
        for table in build_tables(records, order, metric, layout=layout):
            blocks += [Heading(3, table.title), Frame(table.display),
                       *(Text(f"ran: {line}", note=True) for line in table.ran),
                       *(Text(f"stale: {line}", note=True) for line in table.stale)]
    if saved.get("reference"):  # ours | paper | Δ for a matrix that declares the paper table it follows
        from bench.report.compare import comparison_tables

        blocks.append(Heading(2, f"Against the paper ({saved['reference']}): ours | paper | Δ"))
        for frame in comparison_tables(results, matrix):
            blocks += [Heading(3, frame.attrs["title"]), Text(frame.attrs["setting"], note=True), Frame(frame.round(2)),
                       *(Text(line, note=True) for line in frame.attrs.get("legend", []))]
    return blocks


def curves(records: list[dict[str, Any]], order: dict[str, list[str]], layout: Layout) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Training curves"),
                           Text("A panel per table row, a line per column: early stopping and shortcut learning "
                                "show here (train accuracy near 100 % with test accuracy low).", note=True)]
    for i, table in enumerate(build_tables(records, order, "final", layout=layout)):
        image = figures.curve_figure(table.cells, list(layout.rows), layout.columns, table.title) \
            if table.cells is not None else None
        blocks.append(Figure(f"curves-{i}-{table.slug}", figures.png(image), table.title) if image else
                      Text(f"{table.title}: no record carries per-epoch curves", note=True))
    return blocks


def protections(cache: Path, latest: pd.DataFrame, order: dict[str, list[str]]) -> list[Block]:
    """Each protected set (one per protection key): an image grid and its statistics against the clean set."""
    if "protection_key" not in latest:
        return []
    keyed = latest[latest["protection_key"].notna()].drop_duplicates("protection_key")
    rank = {label: i for i, label in enumerate(order.get("protections", []))}
    keyed = keyed.sort_values("protection", key=lambda s: s.map(lambda p: rank.get(p, len(rank))), kind="stable")
    blocks: list[Block] = [Heading(2, "Protected images")]
    stats = []
    for record in keyed.to_dict("records"):
        name = f"{record['protection']} (seed {record['seed']}, {record['dataset']})"
        data = figures.load_protected(cache, record)
        if isinstance(data, str):
            blocks.append(Text(f"{name}: {data}", note=True))
            continue
        blocks.append(Figure(f"images-{record['protection_key']}", figures.png(figures.image_grid(data, name)),
                             name))
        s = data.stats
        stats.append({"protection": name, "L∞ (/255)": s["linf"] * 255, "L2 (mean)": s["l2"], "PSNR (dB)": s["psnr"],
                      f"SSIM (mean of {s['ssim_images']})": s["ssim"], "images": len(data.clean),
                      "protection_key": record["protection_key"]})
    if stats:
        blocks += [Text("Protected vs clean train set, in [0, 1] units (L∞ also in 1/255 steps); PSNR over changed "
                        "images; perturbations shown as δ/(2·max|δ|) + 0.5.", note=True),
                   Frame(pd.DataFrame(stats).round(4), index=False)]
    return blocks if len(blocks) > 1 else []


def ratios(latest: pd.DataFrame, layout: Layout) -> list[Block]:
    """ConfounderGAN Fig. 5 polylines: final test accuracy against the poison ratio, per dataset × victim × recipe
    × countermeasure."""
    if latest["poison_ratio"].nunique() < 2:
        return []
    frame = latest.assign(value=cell_values(latest, "final"), protection=latest["protection"].map(layout.name))
    frame["series"] = row_labels(frame)
    blocks: list[Block] = [Heading(2, "Accuracy against poison ratio (ConfounderGAN Fig. 5)")]
    keys = ["dataset", "victim", "recipe", "countermeasure"]
    for i, (names, group) in enumerate(frame.groupby(keys, sort=False)):
        title = " × ".join(map(str, names[:2])) + f", recipe {names[2]}, countermeasure {layout.name(names[3])}"
        blocks.append(Figure(f"ratios-{i}", figures.png(figures.ratio_figure(group, title)), title))
    return blocks


def gradients(records: list[dict[str, Any]], order: dict[str, list[str]], layout: Layout) -> list[Block]:
    """CAR and GCR tables (ConfounderGAN App. A) where records carry them."""
    if not any(r.get("car") is not None for r in records):
        return []
    blocks: list[Block] = [Heading(2, "Gradient analysis (CAR / GCR)"), Text(
        "Measured on the final victim (the paper: a checkpoint drawn during training), on up to 2,000 protected "
        "train images. GCR is Eq. 7's mean of per-image ratios: where the victim fits some clean originals "
        "(their gradient ≈ 0) a few images dominate it, and it reaches thousands of per cent.", note=True)]
    for metric in ("car", "gcr"):
        blocks += [b for t in build_tables(records, order, metric, layout=layout)
                   for b in (Heading(3, t.title), Frame(t.display))]
    return blocks


def environment(latest: pd.DataFrame, saved: dict[str, Any]) -> list[Block]:
    """Device, library versions, recipe, seeds and every cell's cache keys."""
    blocks: list[Block] = [Heading(2, "Environment and reproducibility")]
    runs = {column: _distinct(latest[column]) for column in ("device", "threads", "precision", "augment", "recipe")
            if column in latest}
    runs["seeds"] = ", ".join(map(str, sorted(latest["seed"].unique()))) if "seed" in latest else "?"
    runs["poison ratios"] = ", ".join(f"{p:g}" for p in sorted(latest["poison_ratio"].unique()))
    blocks += [Heading(3, "Runs"), Frame(pd.DataFrame({"value": runs}))]
    if "versions" in latest:
        versions = pd.json_normalize([v for v in latest["versions"] if isinstance(v, dict)])
        blocks += [Heading(3, "Library versions"), Frame(pd.DataFrame(
            {"version(s)": {lib: _distinct(versions[lib]) for lib in versions}}))]
    if "recipe_params" in latest:
        recipes = {json.dumps(p, sort_keys=True) for p in latest["recipe_params"] if isinstance(p, dict)}
        # a parameter per row (a recipe per column): one wide row of two dozen parameters does not fit a page
        frame = pd.DataFrame({f"recipe {i + 1}": {k: _shown(v) for k, v in json.loads(r).items()}
                              for i, r in enumerate(sorted(recipes))})
        blocks += [Heading(3, "Recipe"), Frame(frame.rename_axis("parameter"))]
    if saved.get("recipe"):
        blocks.append(Text(f"matrix recipe: {json.dumps(saved['recipe'], sort_keys=True)}", note=True))
    blocks += [Heading(3, "Cells and cache keys"), Frame(cell_table(latest), index=False)]
    return blocks


def _shown(value: Any) -> str:
    """A recipe value as one short line (lists and dicts as compact JSON)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))


def cell_table(latest: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: labels, status, accuracies, stage seconds and cache keys (dataset, protection,
    purification, cell)."""
    columns = ["dataset", "protection", "countermeasure", "victim", "seed", "poison_ratio", "mix", "status",
               "test_acc_final", "test_acc_best", "best_epoch", "dataset_key", "protection_key", "purify_key", "cell"]
    table = latest.reindex(columns=columns).copy()
    for column in ("test_acc_final", "test_acc_best"):
        table[column] = (pd.to_numeric(table[column], errors="coerce") * 100).round(2)
    seconds = pd.json_normalize([s if isinstance(s, dict) else {} for s in latest.get("seconds", [])])
    for stage in ("protect", "purify", "train"):
        if stage in seconds:
            table.insert(table.columns.get_loc("dataset_key"), f"{stage} s", seconds[stage].round(1).to_numpy())
    if "error" in latest and latest["error"].notna().any():
        table["error"] = [error_line(e) if isinstance(e, str) else "" for e in latest["error"]]
    return table.astype(object).fillna("")


def _distinct(values: pd.Series) -> str:
    counts = values.astype(str).value_counts()
    return "; ".join(name if len(counts) == 1 else f"{name} ({n} cells)" for name, n in counts.items())


# ---------------------------------------------------------------- rendering


def write(blocks: list[Block], out: Path, title: str) -> list[Path]:
    """``report.html`` (self-contained), ``report.md`` and a PNG per figure under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for block in blocks:
        if isinstance(block, Figure):
            (out / f"{block.name}.png").write_bytes(block.data)
            written.append(out / f"{block.name}.png")
    (out / "report.html").write_text(to_html(blocks, title))
    (out / "report.md").write_text(to_markdown(blocks))
    return [out / "report.html", out / "report.md", *written]


def to_html(blocks: list[Block], title: str) -> str:
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            text = html.escape(block.text)
            body.append(f'<p class="note">{text}</p>' if block.note else f"<p>{text}</p>")
        elif isinstance(block, Frame):
            body.append(f'<div class="wide">{block.frame.to_html(index=block.index, na_rep="", border=0)}</div>')
        else:
            data = base64.b64encode(block.data).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.caption)}">'
                        f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def to_markdown(blocks: list[Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            parts.append(f"*{block.text}*" if block.note else block.text)
        elif isinstance(block, Frame):
            frame = block.frame  # a comparison's (column, part) header reads "none ours" in Markdown
            if isinstance(frame.columns, pd.MultiIndex):
                frame = frame.set_axis([" ".join(map(str, c)) for c in frame.columns], axis=1)
            parts.append(frame.to_markdown(index=block.index))
        else:
            parts.append(f"![{block.caption}]({block.name}.png)")
    return "\n\n".join(parts) + "\n"
