"""The public API of bench: what notebooks, scripts and plugins import (each name is also ``bench.<name>``).

Everything else under ``bench`` is internal and may change. A plugin imports only this module from the harness
(bench's own components are plugins too, and a test holds them to it).

Evaluate your own countermeasure in a script::

    import bench
    from bench.api import COUNTERMEASURES, Countermeasure, ImageSet

    @COUNTERMEASURES.register("invert")
    class Invert(Countermeasure):
        \"\"\"Invert every pixel (a toy data-stage countermeasure).\"\"\"
        stages = frozenset({"data"})

        def purify(self, train: ImageSet, *, seed: int, device) -> ImageSet:
            return train.with_images(255 - train.images)

    result = bench.run({"name": "mine", "datasets": ["digits"], "protections": ["clean", "cwp"],
                        "countermeasures": ["none", "invert"], "victims": ["cnn"]}, jobs=2)
    print(result.leaderboard()[0].display)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bench.core.components import (COUNTERMEASURES, DATA, PROTECTIONS, TRAIN, VICTIMS, Attacker, Countermeasure, Fitted,
                                   Generator, ImageSet, Models, Pretrained, Protection, TrainHooks, Victim)
from bench.core.plugins import use
from bench.core.registry import Component, ConfigError, Registry, code_fingerprint, component_identity
from bench.core.units import pixel_steps
from bench.data.datasets import DATASETS, Dataset, fingerprint, train_images_like
from bench.data.mixes import ATTACKER_SEED, class_mask
from bench.execute.augment import KINDS as AUGMENTATIONS
from bench.execute.augment import host_to_device, random_crop, random_flip, standard_augment
from bench.execute.train import Normalize, autocast, channel_stats, resolve_precision, train_and_evaluate
from bench.plan.matrix import Matrix, load_matrix, parse_matrix
from bench.plan.recipes import RECIPES, Recipe, make_recipe
from bench.store.cache import umask
from bench.store.keys import make_key
from bench.store.locks import locked
from bench.store.records import Record

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from bench.execute.scheduler import RunCounts
    from bench.report.leaderboard import Table

__all__ = [
    # running and reading
    "Matrix", "Record", "RunCounts", "RunResult", "leaderboard", "load_matrix", "plot_curves", "plot_protected",
    "records", "run", "use",
    # component families, their registries and the types they exchange
    "COUNTERMEASURES", "DATA", "DATASETS", "PROTECTIONS", "TRAIN", "VICTIMS", "Attacker", "Component", "Countermeasure",
    "Dataset", "Fitted", "Generator", "ImageSet", "Models", "Pretrained", "Protection", "Registry", "TrainHooks",
    "Victim", "ConfigError", "code_fingerprint", "component_identity",
    # helpers components use: training, augmentation, recipes, data, keys, units
    "AUGMENTATIONS", "ATTACKER_SEED", "Normalize", "RECIPES", "Recipe", "autocast", "channel_stats", "class_mask",
    "fingerprint", "host_to_device", "make_key", "make_recipe", "pixel_steps", "random_crop", "random_flip",
    "locked", "resolve_precision", "standard_augment", "train_and_evaluate", "train_images_like", "umask",
]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What ``run`` did (``counts``) and where its records are: ``records()`` and ``leaderboard()`` read them."""

    matrix: str
    results: Path
    counts: RunCounts

    def records(self) -> pd.DataFrame:
        return records(self.matrix, self.results)

    def leaderboard(self, metric: str = "final") -> list[Table]:
        return leaderboard(self.matrix, self.results, metric)


def run(matrix: str | Path | dict[str, Any] | Matrix, *, results: str | Path = "results", jobs: int = 1,
        device: str = "auto", threads: int = 1, only: tuple[str, ...] = (), rerun: tuple[str, ...] = (),
        force: bool = False, retry_failed: bool = False, dry_run: bool = False, max_hours: float | None = None,
        backend: str = "local", plugins: tuple[str, ...] = (), deterministic: bool = False,
        out: Callable[[str], None] = print) -> RunResult:
    """Run a matrix as ``bench run`` does: every cell not yet recorded under ``results`` (cached, resumable).

    Args:
        matrix: a named matrix (``"smoke"``), a TOML path, a dict in the TOML's shape (``name`` defaults to
            ``"api"``), or a ``Matrix``.
        jobs, device, threads, only, rerun, force, retry_failed, dry_run, max_hours, backend, deterministic: as
            the ``bench run`` options of the same names (``only``/``rerun``: ``KEY=GLOB`` strings; ``device``
            also ``cuda:N,M``; with ``jobs`` ≥ 2 or a GPU, jobs run in worker processes).
        plugins: plugin specs to load first (``use``).
        out: where the estimate and progress lines go.

    Example::

        >>> result = bench.run("smoke", results="/tmp/results")  # doctest: +SKIP
        >>> result.counts.failed
        0
    """
    from bench.execute.backends import BackendOptions
    from bench.execute.scheduler import RunOptions, run_matrix

    if plugins:
        use(*plugins)
    resolved = _matrix(matrix)
    options = RunOptions(Path(results), jobs, device, threads, tuple(only), dry_run, retry_failed, tuple(rerun), force,
                         backend=BackendOptions(backend), deterministic=deterministic,
                         **({"max_hours": max_hours} if max_hours is not None else {}))
    return RunResult(resolved.name, Path(results), run_matrix(resolved, options, out))


def records(matrix: str | None = None, results: str | Path = "results") -> pd.DataFrame:
    """The latest record of each cell as a DataFrame, one row per cell, nested fields flattened
    (``components.protection.version``, ``seconds.train`` …), and ``stale``: why a record no longer shows what
    bench computes ("" when it does). ``matrix``: that matrix's view (its log and its cells recorded elsewhere);
    ``None``: every record under ``results``.

    Example::

        >>> frame = bench.records("smoke", results="/tmp/results")  # doctest: +SKIP
        >>> frame.groupby("protection")["test_acc_final"].mean()  # doctest: +SKIP
    """
    import pandas as pd

    from bench.report.view import matrix_view, row, run_name
    from bench.store.records import RecordStore

    folder = Path(results)
    rows = matrix_view(folder, run_name(folder, matrix)).rows if matrix is not None else \
        [row(r) for r in RecordStore(folder).latest().values()]
    return pd.json_normalize(list({r["cell"]: r for r in rows}.values()))


def leaderboard(matrix: str, results: str | Path = "results", metric: str = "final") -> list[Table]:
    """The matrix's leaderboards as ``bench leaderboard`` writes them (``Table.display``: the shown frame,
    ``.mean``/``.std``: numbers in percent). ``metric``: final, best, car or gcr.

    Example::

        >>> tables = bench.leaderboard("smoke", results="/tmp/results")  # doctest: +SKIP
        >>> tables[0].display
    """
    from bench.report.leaderboard import leaderboard as build
    from bench.report.view import run_name

    folder = Path(results)
    return build(folder, run_name(folder, matrix), metric)[0]


def plot_curves(matrix: str, results: str | Path = "results") -> list[Figure]:
    """Per-epoch train (dashed) and test accuracy, a figure per leaderboard table: a panel per row, a line per
    column (``bench report``'s curves).

    Example::

        >>> bench.plot_curves("smoke", results="/tmp/results")[0].savefig("curves.png")  # doctest: +SKIP
    """
    from bench.report.figures import curve_figure
    from bench.report.leaderboard import build_tables
    from bench.report.view import matrix_view, run_name

    view = matrix_view(Path(results), run_name(Path(results), matrix))
    figures = [curve_figure(t.cells, list(view.layout.rows), view.layout.columns, t.title)
               for t in build_tables(view.rows, view.order, "final", layout=view.layout) if t.cells is not None]
    return [figure for figure in figures if figure is not None]


def plot_protected(matrix: str, results: str | Path = "results") -> list[Figure]:
    """Clean, protected and amplified-perturbation images, a figure per protected set in the cache that the
    matrix's records name (``bench report``'s image grids).

    Example::

        >>> bench.plot_protected("smoke", results="/tmp/results")[0].savefig("cwp.png")  # doctest: +SKIP
    """
    from bench.report.figures import ProtectedSet, image_grid, load_protected
    from bench.report.view import matrix_view, run_name

    folder = Path(results)
    view = matrix_view(folder, run_name(folder, matrix))
    shown = {r["protection_key"]: r for r in view.rows if r.get("protection_key")}
    found = {key: load_protected(folder / "cache", r) for key, r in shown.items()}
    return [image_grid(data, f"{shown[key]['protection']} (seed {shown[key]['seed']})")
            for key, data in found.items() if isinstance(data, ProtectedSet)]


def __getattr__(name: str) -> Any:
    """``RunCounts`` loads with the scheduler (joblib, tqdm): plugins import this module, and listing them stays
    cheap."""
    if name == "RunCounts":
        from bench.execute.scheduler import RunCounts

        return RunCounts
    raise AttributeError(f"module 'bench.api' has no attribute {name!r}")


def _matrix(matrix: str | Path | dict[str, Any] | Matrix) -> Matrix:
    if isinstance(matrix, Matrix):
        return matrix
    if isinstance(matrix, dict):
        return parse_matrix(matrix, str(matrix.get("name", "api")), "<dict>")
    return load_matrix(str(matrix))
