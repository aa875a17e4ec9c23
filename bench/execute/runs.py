"""``bench run``: its options and the command (the scheduler is ``bench.execute.scheduler``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from bench.core.registry import ConfigError
from bench.execute.claims import DEFAULT_STALE
from bench.plan.validate import MAX_CELLS


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench run`` and its options."""
    run = commands.add_parser("run", help="run a matrix (cached, resumable) and print its leaderboards")
    run.add_argument("--matrix", default="smoke", help="a name in bench/matrices/ or a .toml path (default: smoke)")
    run.add_argument("--jobs", type=int, default=0,
                     help="parallel jobs (default: one per listed GPU, else one per --threads CPU cores); each runs in "
                          "its own worker process (pinned to one GPU) unless --jobs 1 on a CPU")
    run.add_argument("--device", default="auto",
                     help="auto (every GPU, else the CPU), cpu, cuda (every GPU), cuda:N or cuda:N,M (those GPUs)")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic algorithms on CUDA (slower; no cuDNN autotuning); the planner names the "
                          "components that cannot honour it, and each record says it")
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
                     help="take over another worker's claim on a key after S seconds without its heartbeat (a killed "
                          f"run); default $BENCH_CLAIM_STALE or {DEFAULT_STALE:g}")
    run.add_argument("--max-cells", type=int, metavar="N", default=MAX_CELLS,
                     help=f"refuse (exit 2, before planning) a matrix of more than N cells (default: {MAX_CELLS:,}; "
                          "counted from its axes and --only, before its [[exclude]] rules)")
    run.add_argument("--data-root", help="an existing folder holding dataset files (sets $BENCH_DATA_ROOT)")
    run.add_argument("--backend", default="local",
                     help="local (joblib processes, the default), submitit (Slurm job arrays; submitit's local executor "
                          "without sbatch) or ray (a Ray cluster); submitit and ray: pip install -e '.[cluster]'")
    run.add_argument("--slurm-partition", help="submitit: the Slurm partition")
    run.add_argument("--slurm-time-min", type=int, metavar="MIN",
                     help="submitit: each task's time limit (default: 3× the stage's longest estimated job, ≥ 30)")
    run.add_argument("--mem-gb", type=int, metavar="GB",
                     help="submitit, ray: host memory per task (default: from the device and the images)")
    run.add_argument("--cpus-per-task", type=int, metavar="N",
                     help="submitit, ray: CPUs per task (default: --threads; at least 4 for a GPU task)")
    run.add_argument("--submitit-folder", type=Path, metavar="DIR",
                     help="submitit: its job pickles and logs, a folder only you can write (default: "
                          "~/.cache/bench/submitit; never the results folder, which other users may write)")
    run.add_argument("--gpus-per-task", type=float, metavar="G",
                     help="submitit, ray: GPUs per job (ray allows fractions; default 1 on a CUDA device, else 0)")
    run.add_argument("--ray-address", help="ray: the cluster's address (default: a Ray instance started here)")
    return run


def cmd_run(args: argparse.Namespace) -> int:
    from bench import cli
    from bench.execute import devices
    from bench.execute.backends import BackendOptions
    from bench.execute.scheduler import RunOptions, run_matrix
    from bench.plan.matrix import load_matrix

    if args.data_root:
        if not Path(args.data_root).is_dir():
            raise ConfigError(f"--data-root {args.data_root}: no such folder; name the folder that holds the dataset "
                              "files (or omit it: $BENCH_DATA_ROOT, else ~/.cache/bench/data)")
        os.environ["BENCH_DATA_ROOT"] = str(Path(args.data_root).resolve())
    # SIGTERM (kill, a cluster's time limit) unwinds like Ctrl-C, so the worker processes are stopped with the run
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.jobs < 0:
        raise ConfigError("--jobs must be ≥ 0 (0 = automatic)")
    backend = BackendOptions(args.backend, args.slurm_partition, args.slurm_time_min, args.gpus_per_task,
                             args.ray_address, args.mem_gb, args.cpus_per_task, args.submitit_folder)
    backend.check(args.device)
    jobs = args.jobs or devices.default_jobs(devices.parse(args.device), args.threads)
    start = time.perf_counter()
    options = RunOptions(args.results, jobs, args.device, args.threads, tuple(args.only), args.dry_run,
                         args.retry_failed, tuple(args.rerun), args.force, args.rebuild_sets, stale=_stale(args),
                         backend=backend, deterministic=args.deterministic, max_cells=args.max_cells,
                         **({"max_hours": args.max_hours} if args.max_hours is not None else {}))
    matrix = load_matrix(args.matrix)
    counts = run_matrix(matrix, options)
    if args.dry_run:
        return 0
    print(f"matrix {matrix.name}: {counts.cells} cells — {counts.trained} trained, {counts.skipped} already recorded, "
          f"{counts.failed} failed — {time.perf_counter() - start:.1f} s (jobs={jobs}, backend={args.backend}); built "
          f"{counts.protected} protected and {counts.purified} purified sets")
    cli.print_leaderboard(args.results, matrix.name, "final")
    return _report_failures(args.results / "runs" / matrix.name / "records.jsonl", counts.failed)


def _stale(args: argparse.Namespace) -> float:
    """--stale-after, else $BENCH_CLAIM_STALE, else the default (RunOptions checks the range)."""
    if args.stale_after is not None:
        return args.stale_after
    try:
        return float(os.environ.get("BENCH_CLAIM_STALE", DEFAULT_STALE))
    except ValueError:
        raise ConfigError(f"$BENCH_CLAIM_STALE={os.environ['BENCH_CLAIM_STALE']!r} is not a number of seconds; unset "
                          f"it for {DEFAULT_STALE:g}") from None


def _report_failures(log: Path, failed: int) -> int:
    """Exit status of a run: 1 if any cell failed, naming each failed cell and its error's last line on stderr."""
    if not failed:
        return 0
    from bench.store.integrity import error_line
    from bench.store.records import RecordLog

    bad = sorted((f"{r.protection} × {r.countermeasure} × {r.victim} (seed {r.seed}, cell {r.cell})",
                  error_line(r.error))
                 for r in RecordLog(log).latest().values() if not r.ok)
    print(f"bench: {failed} cell(s) failed; full tracebacks in {log}; fix the cause and rerun with --retry-failed:",
          file=sys.stderr)
    for cell, line in bad:
        print(f"  {cell}: {line}", file=sys.stderr)
    return 1
