"""Command line: ``bench run``, ``weights``, ``selfcheck``, ``list``, ``show``, ``leaderboard``, ``perf``, ``protect``,
``report``.

Configuration errors (unknown component, parameter or value; missing data) exit with code 2 and a message
naming the file, the key and close matches, before anything runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from pathlib import Path

from bench.core.registry import BenchWarning, ConfigError
from bench.execute import runs, selfcheck
from bench.plan import weights
# the listing's helpers live in bench.report.catalog; the README test and older scripts import them from here
from bench.report.catalog import KINDS, component_table
from bench.store.locks import LockTimeout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = runs.add_parser(commands)
    weights.offline_flag(run)
    weights.add_parser(commands)
    selfcheck.add_parser(commands)
    listing = commands.add_parser("list", help="list components (parameters, papers, capabilities), named matrices "
                                  "and recipes")
    listing.add_argument("kind", nargs="?", choices=KINDS, help="one kind (default: all)")
    listing.add_argument("--markdown", action="store_true", help="print the README's component table (built-ins)")
    listing.add_argument("--update", type=Path, metavar="FILE",
                         help="with --markdown: replace the component table in FILE (make docs: README.md)")
    show = commands.add_parser("show", help="everything about one component, named matrix or recipe: docstring, "
                               "parameters (types, defaults, units), capabilities, paper, version, file")
    show.add_argument("name", help="a name from `bench list`, KIND/NAME where kinds share it (protections/em, "
                                   "recipes/dh), or a matrix .toml path")
    board = commands.add_parser("leaderboard", help="build leaderboards from a matrix's records")
    board.add_argument("--matrix", default="smoke")
    board.add_argument("--metric", choices=("final", "best", "car", "gcr"), default="final",
                       help="final-epoch or best-epoch (oracle early stop) test accuracy, or the trained victim's "
                            "CAR / GCR on the protected train images (ConfounderGAN App. A)")
    board.add_argument("--mix-recipes", action="store_true",
                       help="put records of different recipes in one table (by default each recipe gets its own)")
    board.add_argument("--compare", choices=("paper",),
                       help="paper: each cell beside the published table the matrix names (its `reference`), with "
                            "ours | paper | Δ and marks where the setting differs; written as .vs-paper.csv/.md/.tex")
    perf = commands.add_parser("perf", help="benchmarks: `perf train` times bench's loop against a reference loop")
    perf.add_argument("what", choices=("train",))
    perf.add_argument("--victims", default="resnet18,cnn", help="comma-separated victims (default: resnet18,cnn)")
    perf.add_argument("--dataset", default="cifar10-jpeg")
    perf.add_argument("--per-class", type=int, help="train images per class, ≥ 1 (default: 100 on a CPU, 1,000 on CUDA)")
    perf.add_argument("--epochs", type=int, help="default: 2 on a CPU, 3 on CUDA")
    perf.add_argument("--batch-size", type=int, default=128)
    perf.add_argument("--repeats", type=int, default=3, help="alternating runs of each loop (median reported)")
    perf.add_argument("--workers", type=int, help="DataLoader workers of the reference loop (default: 2 on a CPU, 4 on CUDA)")
    perf.add_argument("--device", default="auto")
    protect = commands.add_parser("protect", help="encrypt a folder of images with a protection's fitted models "
                                  "(fast encryption, ConfounderGAN §4.3): one forward pass per batch")
    protect.add_argument("--model", "--generator", dest="model", required=True,
                         help="the protected set whose models encrypt: a key under <results>/cache/protected/ "
                              "(records: protection_key) or its folder")
    protect.add_argument("--protection", help="check that this protection made the models (default: any that "
                                              "declares encrypts_unseen)")
    protect.add_argument("--input", type=Path, required=True, help="folder of .png/.jpg images (one size)")
    protect.add_argument("--output", type=Path, required=True, help="folder for the protected PNGs (same names)")
    protect.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    protect.add_argument("--batch-size", type=int, default=256)
    protect.add_argument("--overwrite", action="store_true",
                         help="replace files already in --output (by default bench protect refuses to overwrite any)")
    protect.add_argument("--label", type=int, help="the folder's class, for a protection that encrypts an image "
                                                   "for its class (encrypt_needs_labels, e.g. dh); else left out")
    report = commands.add_parser("report", help="one self-contained HTML page (and Markdown + PNG) of a matrix's "
                                 "records: leaderboards, curves, protected images, environment")
    report.add_argument("--matrix", default="smoke")
    report.add_argument("--out", type=Path, help="output folder (default: <results>/reports/<matrix>)")
    for sub in (run, board, perf, protect, report):
        sub.add_argument("--results", type=Path, default=Path(os.environ.get("BENCH_RESULTS", "results")),
                         help="output folder (default: ./results or $BENCH_RESULTS)")
    for sub in (run, listing, show, board, perf, protect, report):
        sub.add_argument("--plugins", action="append", default=[], metavar="PATH|MODULE",
                         help="load these plugins too (repeatable): a .py file, a package folder, a folder of plugins "
                              "or a module name; beside $BENCH_PLUGINS and installed `bench.plugins` entry points")
    args = parser.parse_args(argv)
    warnings.formatwarning = _warning_line
    if args.plugins:  # loaded with the rest on the first registry call
        from bench.core import plugins

        plugins.use(*args.plugins)
    weights.apply_offline(args)
    for flag in ("results", "out"):  # a file there would end in NotADirectoryError/FileExistsError mid-run
        folder = getattr(args, flag, None)
        if folder is not None and folder.exists() and not folder.is_dir():
            print(f"bench: error: --{flag} {folder} is a file, not a folder: name a folder (it is created if "
                  "missing)", file=sys.stderr)
            return 2
    if args.command in ("perf", "protect", "selfcheck"):  # `run` does it in each job's process
        from bench.execute.train import keep_freed_memory

        keep_freed_memory()
    try:
        return {"run": runs.cmd_run, "weights": weights.cmd_weights, "selfcheck": selfcheck.cmd_selfcheck,
                "list": cmd_list, "show": cmd_show, "leaderboard": cmd_leaderboard, "perf": cmd_perf,
                "protect": cmd_protect, "report": cmd_report}[args.command](args)
    except ConfigError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `bench list | head`: the reader left; exit quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except LockTimeout as err:  # names the lock, its holder and the fix already
        print(f"bench: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # disk full, permission denied, a lock held too long: one line, not a traceback
        print(f"bench: error: {os_error_line(err, getattr(args, 'results', None))}", file=sys.stderr)
        return 1


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  line: str | None = None) -> str:
    """bench's own warnings (damaged record lines …) as one line a user reads; others as Python shows them."""
    if issubclass(category, BenchWarning):
        return f"bench: warning: {message}\n"
    return _python_warning_line(message, category, filename, lineno, line)


_python_warning_line = warnings.formatwarning


def os_error_line(err: OSError, results: Path | None) -> str:
    """One line for an OS error: what failed, on which path (the error's, else the results folder) and the free
    space of that path's file system, so that a full disk or a read-only mount is told apart from a bug."""
    path = Path(err.filename) if err.filename else results
    what = err.strerror or str(err) or type(err).__name__
    if path is None:
        return what
    try:  # the path itself may be what failed (a name too long): measure its nearest existing folder
        existing = next((p for p in path.absolute().parents if p.is_dir()), Path("/"))
        free = f"{shutil.disk_usage(existing).free / 2**30:.2f} GiB free there"
    except OSError:
        free = "free space unknown"
    where = "on" if err.filename else "under"
    return f"{what} {where} {path} ({free}); free space or fix permissions, then rerun: finished work is kept"


def cmd_perf(args: argparse.Namespace) -> int:
    from bench.core.components import VICTIMS
    from bench.execute.perf import PerfSettings, markdown, run_perf

    victims = tuple(v for v in args.victims.split(",") if v)
    for victim in victims:
        VICTIMS.get(victim)
    settings = PerfSettings(victims, args.dataset, args.per_class, args.epochs, args.batch_size, args.repeats,
                            args.workers, args.device)
    rows = run_perf(settings, args.results)
    print(markdown(rows))
    print(f"written to {args.results / 'perf'}/")
    return 0


def cmd_protect(args: argparse.Namespace) -> int:
    from bench.execute.encrypt import protect_folder

    print(protect_folder(args.model, args.input, args.output, results=args.results, protection=args.protection,
                         device=args.device, batch_size=args.batch_size, label=args.label,
                         overwrite=args.overwrite))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.report.page import build_report
    from bench.report.view import run_name

    print(f"report written: {build_report(args.results, run_name(args.results, args.matrix), args.out)[0]}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from bench.report.view import run_name

    if args.compare and args.mix_recipes:
        raise ConfigError("--compare paper compares one recipe per table, as the paper's: drop --mix-recipes")
    print_leaderboard(args.results, run_name(args.results, args.matrix), args.metric, args.mix_recipes, args.compare)
    return 0


def print_leaderboard(results: Path, name: str, metric: str, mix_recipes: bool = False,
                       compare: str | None = None) -> None:
    from bench.report.leaderboard import leaderboard, markdown

    if compare == "paper":
        from bench.report import compare as paper

        frames = paper.comparison_tables(results, name, metric)
        print("".join("\n" + paper.markdown(frame) for frame in frames))
        written = paper.write_comparisons(frames, results / "leaderboards" / name, metric)
        print("\n".join(["comparisons written:", *map(str, written)]) if written else "no records to compare")
        return
    tables, paths = leaderboard(results, name, metric, mix_recipes)
    for table in tables:
        print("\n" + markdown(table))
    if paths:
        print(f"leaderboards written to {paths[0].parent}/")


def cmd_list(args: argparse.Namespace) -> int:
    from bench.report import catalog

    kinds = [args.kind] if args.kind else list(KINDS)
    if args.markdown:
        if args.kind and args.kind not in catalog.COMPONENT_KINDS:
            raise ConfigError(f"--markdown prints the README's component table: drop {args.kind!r}, or give one of "
                              f"{', '.join(catalog.COMPONENT_KINDS)}")
        table = component_table(catalog.registries(), [k for k in kinds if k in catalog.COMPONENT_KINDS])
        if args.update is None:
            print(table)
        else:
            print(f"{args.update}: component table {'updated' if catalog.update_readme(args.update, table) else 'current'}")
        return 0
    if args.update is not None:
        raise ConfigError("--update FILE writes the component table: add --markdown")
    for kind in kinds:  # kind by kind, so that `bench list | head` reads the first before the last is built
        print(catalog.listing(kind), flush=True)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from bench.report.show import show

    print(show(args.name))
    return 0
