"""The figures of ``bench report`` and of ``bench.api`` (matplotlib Figures; ``png`` turns one into PNG bytes) and the
image statistics of a cached protected set against its clean train set.

Figures: per-epoch train / test accuracy (a panel per table row, a line per column, where early stopping and
shortcut learning show), a clean / protected / amplified-perturbation grid, and ConfounderGAN Fig. 5's
accuracy-vs-poison-ratio polylines.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: figures are only ever written as PNG
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SSIM_LIMIT = 2000  # images (evenly spaced) over which SSIM is averaged


@dataclasses.dataclass(frozen=True)
class ProtectedSet:
    """A cached protected set beside its clean train set (uint8 N×C×H×W), with their statistics."""

    clean: np.ndarray
    protected: np.ndarray
    labels: np.ndarray
    stats: dict[str, float | None]


def png(fig: plt.Figure) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def curve_figure(cells: pd.DataFrame, row_axes: list[str], column_axis: str, title: str) -> plt.Figure | None:
    """Per-epoch accuracy: a panel per row label (``row_axes`` joined by `` · ``), a line per ``column_axis``
    label, test solid and train dashed, mean over seeds; ``None`` when no record carries curves."""
    cells = cells[cells["status"] == "ok"] if "status" in cells else cells
    if "test_acc" not in cells or cells.empty:
        return None
    rows = cells[row_axes].astype(str).agg(" · ".join, axis=1)
    names = list(dict.fromkeys(rows))
    columns = list(dict.fromkeys(cells[column_axis]))
    colors = {c: plt.get_cmap("tab20")(i % 20) for i, c in enumerate(columns)}
    ncols = min(4, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.5 * nrows + 0.6), squeeze=False,
                             sharex=True, sharey=True)
    for ax, name in zip(axes.flat, names):
        for column in columns:
            group = cells[(rows == name) & (cells[column_axis] == column)]
            for key, style in (("test_acc", "-"), ("train_acc", "--")):
                curve = _mean_curve(group[key]) if key in group else None
                if curve is not None:  # epochs without an evaluation (NaN) are left out, so the line joins the rest
                    epochs = np.flatnonzero(~np.isnan(curve))
                    ax.plot(epochs + 1, 100 * curve[epochs], style, color=colors[column], lw=1.2,
                            label=str(column) if key == "test_acc" else None)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 101)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy (%)", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("epoch", fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(7, len(columns)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02 - 0.025 * math.ceil(len(columns) / 7)))
    fig.suptitle(f"{title}\ntest accuracy (solid) and train accuracy (dashed) per epoch", fontsize=10)
    fig.tight_layout()
    return fig


def _mean_curve(curves: pd.Series) -> np.ndarray | None:
    """The mean of the equally long curves among ``curves`` (the longest length wins), or None."""
    lists = [np.asarray(c, dtype=float) for c in curves if isinstance(c, list) and c]
    lists = [c for c in lists if not np.isnan(c).all()]  # a recipe that tests only at the end has no test curve
    if not lists:
        return None
    length = max(len(c) for c in lists)
    return pd.DataFrame([c for c in lists if len(c) == length]).mean(axis=0).to_numpy()  # skips NaN, no warning


def ratio_figure(frame: pd.DataFrame, title: str) -> plt.Figure:
    """ConfounderGAN Fig. 5: final test accuracy (%) against the poison ratio, a polyline per ``series``;
    ``frame`` has columns ``series``, ``poison_ratio`` and ``value`` (percent, NaN for failed cells)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for series, group in frame.groupby("series", sort=False):
        points = group.groupby("poison_ratio")["value"].mean().sort_index()
        ax.plot(points.index, points.values, "o-", lw=1.4, ms=4, label=series)
    ax.set_xlabel("poison ratio p")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def image_grid(data: ProtectedSet, title: str, count: int = 8) -> plt.Figure:
    """Clean, protected and amplified perturbation (δ/(2·max|δ|) + 0.5) rows of ``count`` images, one per class first."""
    index = sample_index(data.labels, count)
    delta = data.protected[index].astype(np.float32) - data.clean[index].astype(np.float32)
    scale = 2 * max(float(np.abs(delta).max()), 1e-12)
    rows = {"clean": data.clean[index] / 255.0, "protected": data.protected[index] / 255.0,
            "δ amplified": delta / scale + 0.5}
    fig, axes = plt.subplots(3, len(index), figsize=(0.75 * len(index), 2.7), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c, image in enumerate(images):
            ax = axes[r, c]
            chw = np.clip(image, 0, 1)
            if chw.shape[0] == 1:
                ax.imshow(chw[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(chw.transpose(1, 2, 0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def sample_index(labels: np.ndarray, count: int) -> np.ndarray:
    """``count`` indices: the first image of each class in turn, then evenly spaced others."""
    first = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:count]
    rest = [i for i in np.linspace(0, len(labels) - 1, count).astype(int) if i not in first]
    return np.array((first + rest)[:min(count, len(labels))])


def image_stats(clean: np.ndarray, protected: np.ndarray) -> dict[str, float | None]:
    """L∞ and mean per-image L2 of protected − clean in [0, 1] units, mean PSNR (dB, changed images;
    ``bench.execute.metrics.perturbation_metrics``) and mean SSIM (scikit-image; at most ``SSIM_LIMIT`` images)."""
    import torch
    from skimage.metrics import structural_similarity

    from bench.execute.metrics import perturbation_metrics

    stats = perturbation_metrics(torch.from_numpy(np.ascontiguousarray(clean)),
                                 torch.from_numpy(np.ascontiguousarray(protected)))
    index = np.linspace(0, len(clean) - 1, min(SSIM_LIMIT, len(clean))).astype(int)
    window = min(7, *clean.shape[2:]) // 2 * 2 + 1 if min(clean.shape[2:]) >= 3 else None
    ssim = [structural_similarity(clean[i], protected[i], channel_axis=0, data_range=255, win_size=window)
            for i in index] if window else []
    return {**stats, "ssim": float(np.mean(ssim)) if ssim else None, "ssim_images": len(ssim)}


def load_protected(cache: Path, record: dict[str, Any]) -> ProtectedSet | str:
    """The protected set of ``record`` (its ``protection_key``) and the clean train set it was made from (the
    record's ``dataset_key``, else the dataset entry whose key reproduces the protection key), both verified, or a
    sentence saying which cache entry is missing or does not verify (nothing of it is shown)."""
    from bench.store.cache import read_entry

    key, matrix = record["protection_key"], record["matrix"]
    folder = cache / "protected" / key
    if not os.path.lexists(folder):
        return (f"cache entry protected/{key} is missing under {cache}; `bench run --matrix {matrix} "
                "--rebuild-sets` builds it (and retrains no recorded cell)")
    try:
        manifest, protected, _ = read_entry(folder)
    except ValueError as err:
        return (f"cache entry protected/{key} did not verify ({err}), so it is not shown; `bench run --matrix "
                f"{matrix} --rebuild-sets` moves it aside and rebuilds it (and retrains no recorded cell)")
    dataset = record.get("dataset_key")  # NaN in a frame where other records carry one
    if not isinstance(dataset, str):
        dataset = _dataset_key(cache, manifest, record)
    clean_folder = cache / "dataset" / f"{dataset}-train"
    if dataset is None or not os.path.lexists(clean_folder):
        return f"the clean train set of protected/{key} is missing under {cache / 'dataset'}; rerun `bench run`"
    try:
        _, clean, labels = read_entry(clean_folder)
    except ValueError as err:
        return (f"the clean train set of protected/{key} (dataset/{dataset}-train) did not verify ({err}), so it is "
                f"not shown; `bench run --matrix {matrix}` moves it aside and rebuilds it")
    if clean.shape != protected.shape:
        return f"protected/{key} {protected.shape} does not match its clean train set {clean.shape}"
    return ProtectedSet(clean, protected, labels, image_stats(clean, protected))


def _dataset_key(cache: Path, manifest: dict[str, Any], record: dict[str, Any]) -> str | None:
    """The dataset key that, with the manifest's spec and seed, gives the protection key (``bench.plan.planner``)."""
    from bench.data.mixes import fitted_on
    from bench.store.keys import make_key

    ratio = fitted_on(record.get("mix") or "protected", record["poison_ratio"])
    for entry in sorted((cache / "dataset").glob("*-train")):
        dataset = entry.name.removesuffix("-train")
        spec = {"dataset": dataset, "protection": manifest["spec"], "seed": manifest["seed"],
                **({"fitted_on": ratio} if ratio is not None else {})}
        if make_key(spec) == record["protection_key"]:
            return dataset
    return None
