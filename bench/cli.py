"""Command line: ``bench run``, ``bench list``, ``bench show``, ``bench leaderboard``, ``bench protect``, ``bench report``.

Configuration errors (unknown component, parameter or value; missing data) exit with code 2 and a message
naming the file, the key and close matches, before anything runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from bench.core.registry import ConfigError
from bench.execute.claims import DEFAULT_STALE
# the listing's helpers live in bench.report.catalog; the README test and older scripts import them from here
from bench.report.catalog import KINDS, component_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a matrix (cached, resumable) and print its leaderboards")
    run.add_argument("--matrix", default="smoke", help="a name in bench/matrices/ or a .toml path (default: smoke)")
    run.add_argument("--jobs", type=int, default=0, help="parallel cells (default: one per GPU, else one per CPU core)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    run.add_argument("--threads", type=int, default=1,
                     help="CPU threads per job; fixed so that results do not depend on --jobs (default: 1)")
    run.add_argument("--only", action="append", default=[], metavar="KEY=GLOB",
                     help="keep cells whose KEY (dataset, protection, countermeasure, victim, seed, poison_ratio) "
                          "label matches GLOB; repeatable")
    run.add_argument("--dry-run", action="store_true", help="print every cell and whether it is cached, run nothing")
    run.add_argument("--retry-failed", action="store_true", help="rerun cells recorded as failed")
    run.add_argument("--rerun", action="append", default=[], metavar="KEY=GLOB",
                     help="retrain the cells matching KEY=GLOB (as --only) and rebuild their protected and purified "
                          "sets, even where recorded and cached (after editing a component's code); repeatable")
    run.add_argument("--force", action="store_true", help="as --rerun of every (selected) cell")
    run.add_argument("--rebuild-sets", action="store_true",
                     help="also build the protected sets of recorded cells missing from the cache (records kept from "
                          "another machine), so that `bench report` shows their images; no cell is retrained")
    run.add_argument("--max-hours", type=float, metavar="H",
                     help="on a CPU, refuse (exit 2, before any work) a run whose estimated remaining wall time exceeds "
                          "H hours (default: 12); --dry-run only prints the estimate")
    run.add_argument("--stale-after", type=float, metavar="S",
                     default=float(os.environ.get("BENCH_CLAIM_STALE", DEFAULT_STALE)),
                     help="take over another worker's claim on a key after S seconds without its heartbeat (a killed "
                          f"run); default $BENCH_CLAIM_STALE or {DEFAULT_STALE:g}")
    run.add_argument("--data-root", help="folder holding dataset files (sets $BENCH_DATA_ROOT)")
    run.add_argument("--backend", default="local",
                     help="local (joblib processes, the default), submitit (Slurm job arrays; submitit's local executor "
                          "without sbatch) or ray (a Ray cluster); submitit and ray: pip install -e '.[cluster]'")
    run.add_argument("--slurm-partition", help="submitit: the Slurm partition")
    run.add_argument("--slurm-time-min", type=int, metavar="MIN", help="submitit: each job's time limit in minutes")
    run.add_argument("--gpus-per-task", type=float, metavar="G",
                     help="submitit, ray: GPUs per job (ray allows fractions; default 1 on a CUDA device, else 0)")
    run.add_argument("--ray-address", help="ray: the cluster's address (default: a Ray instance started here)")
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
    perf.add_argument("--per-class", type=int, default=100, help="train images per class, ≥ 1 (default: 100)")
    perf.add_argument("--epochs", type=int, default=2)
    perf.add_argument("--batch-size", type=int, default=128)
    perf.add_argument("--repeats", type=int, default=3, help="alternating runs of each loop (median reported)")
    perf.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
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
    if args.plugins:  # loaded with the rest on the first registry call
        from bench.core import plugins

        plugins.use(*args.plugins)
    if args.command in ("perf", "protect"):  # `run` does it in each job's process
        from bench.execute.train import keep_freed_memory

        keep_freed_memory()
    try:
        return {"run": cmd_run, "list": cmd_list, "show": cmd_show, "leaderboard": cmd_leaderboard, "perf": cmd_perf,
                "protect": cmd_protect, "report": cmd_report}[args.command](args)
    except ConfigError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `bench list | head`: the reader left; exit quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from bench.execute.backends import BackendOptions
    from bench.execute.scheduler import RunOptions, run_matrix
    from bench.plan.matrix import load_matrix

    if args.data_root:
        os.environ["BENCH_DATA_ROOT"] = str(Path(args.data_root).resolve())
    # SIGTERM (kill, a cluster's time limit) unwinds like Ctrl-C, so the worker processes are stopped with the run
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.jobs < 0:
        raise ConfigError("--jobs must be ≥ 0 (0 = automatic)")
    backend = BackendOptions(args.backend, args.slurm_partition, args.slurm_time_min, args.gpus_per_task,
                             args.ray_address)
    backend.check(args.device)
    gpus = torch.cuda.device_count() if args.device in ("auto", "cuda") else 0
    jobs = args.jobs or gpus or max(1, (os.cpu_count() or 1) // max(1, args.threads))
    start = time.perf_counter()
    options = RunOptions(args.results, jobs, args.device, args.threads, tuple(args.only), args.dry_run,
                         args.retry_failed, tuple(args.rerun), args.force, args.rebuild_sets, stale=args.stale_after,
                         backend=backend, **({"max_hours": args.max_hours} if args.max_hours is not None else {}))
    matrix = load_matrix(args.matrix)
    counts = run_matrix(matrix, options)
    if args.dry_run:
        return 0
    print(f"matrix {matrix.name}: {counts.cells} cells — {counts.trained} trained, {counts.skipped} already recorded, "
          f"{counts.failed} failed — {time.perf_counter() - start:.1f} s (jobs={jobs}, backend={args.backend}); built "
          f"{counts.protected} protected and {counts.purified} purified sets")
    _print_leaderboard(args.results, matrix.name, "final")
    return _report_failures(args.results / "runs" / matrix.name / "records.jsonl", counts.failed)


def _report_failures(log: Path, failed: int) -> int:
    """Exit status of a run: 1 (with each distinct error's last line on stderr) if any cell failed."""
    if not failed:
        return 0
    from bench.store.records import RecordLog

    errors = {(r.error or "").strip().splitlines()[-1] for r in RecordLog(log).latest().values() if not r.ok}
    print(f"bench: {failed} cell(s) failed; full tracebacks in {log}; fix the cause and rerun with --retry-failed:",
          file=sys.stderr)
    for line in sorted(errors):
        print(f"  {line}", file=sys.stderr)
    return 1


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
                         device=args.device, batch_size=args.batch_size, label=args.label))
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
    _print_leaderboard(args.results, run_name(args.results, args.matrix), args.metric, args.mix_recipes, args.compare)
    return 0


def _print_leaderboard(results: Path, name: str, metric: str, mix_recipes: bool = False,
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
