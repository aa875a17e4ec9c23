"""``bench selfcheck``: is this machine (a GPU above all) ready for bench? One table of checks, each ok, skipped
(saying why) or FAIL, written as Markdown and JSON under ``<results>/selfcheck/``; exit status 1 if any failed.

Sections: ``env``; ``protect``, ``purify``, ``hooks``, ``victims``: every registered component (plugins too) at
its ``test_params`` on the device (``bench.execute.selfcheck_checks``), byte-compared with a CPU run where the
output must not depend on the device; ``loop``: host syncs per training step (CUDA); ``perf``: bench's loop
against the reference and plain loops (``bench.execute.perf``); ``pipeline``: a real ``bench run --jobs 2``;
``faults``: a worker killed by SIGKILL must become one failed cell ("worker died") with every other cell ok,
and a CUDA device-side assert must fail its cell only. ``--quick``: the smallest sizes (``bench selfcheck
--device cpu --quick`` checks the command itself in about 2 minutes on 2 cores); on one H100 the full run
takes under 8 minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import bench
from bench.execute import devices

if TYPE_CHECKING:
    from bench.execute import selfcheck_checks as checks

DIED = re.compile(r"worker (process )?died")  # how bench run names a cell whose worker was killed
SECTIONS = ("env", "protect", "purify", "hooks", "victims", "loop", "perf", "pipeline", "faults")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each section runs: images per class (components, ``bench run``), optimiser steps, perf sizes."""

    per_class: int
    test_per_class: int
    steps: tuple[int, int]  # optimiser steps and batch size of each victim and train-stage check
    sync_steps: int
    perf_victims: tuple[str, ...]
    perf_per_class: int
    perf_epochs: int
    perf_repeats: int
    perf_workers: int
    full_pipeline: bool


QUICK = Sizes(4, 2, (1, 8), 10, ("cnn",), 10, 1, 1, 0, False)
FULL = Sizes(10, 5, (3, 32), 20, ("resnet18", "cnn"), 1000, 2, 3, 4, True)


@dataclasses.dataclass(frozen=True)
class Result:
    """One check's outcome: ``ok``, ``skipped`` or ``FAIL``, with its time and a one-line summary or error."""

    section: str
    check: str
    status: str
    seconds: float
    info: str


class Runner:
    """Runs checks one by one, timing them and keeping their results; on CUDA, a check that leaves the context
    unusable (a sticky error) fails, and later in-process checks are skipped naming it."""

    def __init__(self, device: torch.device, echo: Callable[[str], None]) -> None:
        self.device, self.echo, self.results, self.poisoned = device, echo, [], ""

    def run(self, section: str, check: str, fn: Callable[..., str], *args: Any, isolated: bool = False) -> None:
        from bench.execute import selfcheck_checks as checks

        start, status = time.perf_counter(), "ok"
        try:
            if self.poisoned and not isolated:
                raise checks.Skipped(f"the CUDA context was left unusable by {self.poisoned}")
            info = fn(*args)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except checks.Skipped as why:
            status, info = "skipped", str(why)
        except Exception as err:  # noqa: BLE001 - every failure is a finding, reported in the table
            status, info = "FAIL", f"{type(err).__name__}: {err}".strip()
            self.echo(traceback.format_exc())
            if self.device.type == "cuda" and not self._cuda_usable():
                self.poisoned = f"{section}/{check}"
        result = Result(section, check, status, round(time.perf_counter() - start, 2), " ".join(info.split()))
        self.results.append(result)
        self.echo(f"[{status:>7}] {section:9} {check:24} {result.seconds:7.1f} s  {result.info[:150]}")

    def _cuda_usable(self) -> bool:
        return devices.context_usable(str(self.device))


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Register ``bench selfcheck`` on the CLI's subparsers."""
    parser = commands.add_parser("selfcheck", help="check this machine (a GPU above all): every component on the "
                                 "device, bench run --jobs 2, worker death, CUDA errors, host syncs, throughput")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--quick", action="store_true", help="the smallest sizes (a check of the command itself)")
    parser.add_argument("--skip", default="", metavar="SECTIONS", help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, help="output folder (default: <results>/selfcheck)")
    parser.add_argument("--results", type=Path, default=Path(os.environ.get("BENCH_RESULTS", "results")),
                        help="results folder (default: ./results or $BENCH_RESULTS)")
    parser.add_argument("--plugins", action="append", default=[], metavar="PATH|MODULE",
                        help="load these plugins too (repeatable), as bench run does")
    return parser


def cmd_selfcheck(args: argparse.Namespace) -> int:
    """Run the self-check as ``args`` say; print the table; 0 when nothing failed, else 1."""
    from bench.core.registry import ConfigError

    skip = {s for s in args.skip.split(",") if s}
    if unknown := skip - set(SECTIONS):
        raise ConfigError(f"--skip {','.join(sorted(unknown))}: sections are {', '.join(SECTIONS)}")
    device = devices.single(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-selfcheck-") as tmp:
        results = run_selfcheck(device, QUICK if args.quick else FULL, skip, Path(tmp))
    out = args.out or args.results / "selfcheck"
    table = write(results, out, device)
    print(table)
    failed = sum(r.status == "FAIL" for r in results)
    print(f"{len(results)} checks: {len(results) - failed} passed or skipped, {failed} failed; written to {out}/")
    return 1 if failed else 0


def run_selfcheck(device: torch.device, sizes: Sizes, skip: set[str], tmp: Path) -> list[Result]:
    """Every section not in ``skip``, in order; the results."""
    from bench.core.components import COUNTERMEASURES, PROTECTIONS, VICTIMS
    from bench.execute import selfcheck_checks as checks

    runner = Runner(device, lambda line: print(line, file=sys.stderr, flush=True))
    train, test, dataset = checks.load_data(sizes.per_class, sizes.test_per_class)
    found, steps = checks.Found(), sizes.steps
    sections: dict[str, list[tuple[str, Callable[..., str], tuple]]] = {
        "env": [("environment", lambda: f"{checks.environment(device)}, data {dataset}", ())],
        "protect": [(n, checks.protect, (n, train, device, found, str(tmp))) for n in PROTECTIONS.names()],
        "purify": [(n, lambda n: checks.purify(n, _protected(found, train), device, found, str(tmp)), (n,))
                   for n in COUNTERMEASURES.names()],
        "hooks": [(n, lambda n: checks.hooks(n, _protected(found, train), test, device, found, steps, str(tmp)), (n,))
                  for n in COUNTERMEASURES.names() if "train" in COUNTERMEASURES.get(n).stages],
        "victims": [(n, checks.victim, (n, train, test, device, found, steps, str(tmp))) for n in VICTIMS.names()],
        "loop": [("host syncs per step", checks.host_syncs, (train, test, device, sizes.sync_steps))],
        "perf": [(v, checks.perf, (v, device, sizes)) for v in sizes.perf_victims],
        "pipeline": [("bench run --jobs 2", pipeline, (tmp, dataset, device, sizes))],
        "faults": [("worker death (SIGKILL)", worker_death, (tmp, dataset, device, sizes)),
                   ("CUDA device-side assert", device_assert, (tmp, dataset, device, sizes))]}
    for section, items in sections.items():
        if section in skip:
            continue
        if section in ("pipeline", "faults") and device.type == "cuda":
            torch.cuda.empty_cache()  # the subprocesses share the GPU with this process
        for name, fn, fn_args in items:
            runner.run(section, name, fn, *fn_args, isolated=section in ("pipeline", "faults"))
    return runner.results


def _protected(found: checks.Found, train: Any) -> Any:
    """The countermeasures' input: ``cwn``'s protected set where it ran, else the clean set."""
    return found.protected["cwn"].data if "cwn" in found.protected else train


def _inline(params: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in params.items()) + " }"


def _matrix(tmp: Path, name: str, dataset: str, sizes: Sizes, protections: list[str], countermeasures: list[str],
            victims: list[str]) -> Path:
    """A matrix file of the components named, each at its ``test_params``, one epoch of the quick recipe."""
    from bench.core.components import COUNTERMEASURES, PROTECTIONS

    data = {"per_class": sizes.per_class, "test_per_class": sizes.test_per_class, **({"size": 32} if dataset ==
                                                                                        "digits" else {})}
    lines = [f'description = "bench selfcheck: {name}"', "seeds = [0]", f"victims = {json.dumps(victims)}",
             "[recipe]", 'name = "quick"', "epochs = 1", "batch_size = 32", f'[datasets."{dataset}"]',
             *(f"{k} = {v}" for k, v in data.items()), "[protections]",
             *(f"{p} = {_inline(PROTECTIONS.get(p).test_params)}" for p in protections), "[countermeasures]",
             *(f"{c} = {_inline(COUNTERMEASURES.get(c).test_params)}" for c in countermeasures)]
    path = tmp / f"selfcheck-{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_run(tmp: Path, matrix: Path, device: torch.device, jobs: int, plugins: bool = False,
              timeout: float = 420) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    """``python -m bench run`` of ``matrix`` in a subprocess; its outcome and its records by victim/protection/
    countermeasure label."""
    from bench.execute import selfcheck_checks as checks
    from bench.store.records import RecordLog

    if plugins:
        (tmp / "selfcheck_faults.py").write_text(checks.FAULTS_PLUGIN)
    results = tmp / f"results-{matrix.stem}"
    command = [sys.executable, "-m", "bench", "run", "--matrix", str(matrix), "--results", str(results),
               "--device", str(device), "--jobs", str(jobs), *(["--plugins", str(tmp / "selfcheck_faults.py")]
                                                               if plugins else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(bench.__file__).parents[1]),
                                                                      os.environ.get("PYTHONPATH", "")]))}
    proc = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
    log = results / "runs" / matrix.stem / "records.jsonl"
    records = RecordLog(log).latest().values() if log.is_file() else []
    return proc, {f"{r.protection}/{r.countermeasure}/{r.victim}": r for r in records}


def _tail(proc: subprocess.CompletedProcess) -> str:
    return " | ".join(proc.stderr.strip().splitlines()[-3:])


def pipeline(tmp: Path, dataset: str, device: torch.device, sizes: Sizes) -> str:
    """Two worker processes on the device: protect → purify (an adaptive attacker in the full run) → train."""
    protections, countermeasures = ["clean", "cwn"], ["none", "jpeg"]
    if sizes.full_pipeline:
        protections, countermeasures = ["cwn", "confoundergan", "dh"], ["none", "jpeg", "dncnn", "adv_training"]
    matrix = _matrix(tmp, "pipeline", dataset, sizes, protections, countermeasures, ["cnn"])
    proc, records = bench_run(tmp, matrix, device, 2)
    bad = {cell: (r.error or "").strip().splitlines()[-1:] for cell, r in records.items() if not r.ok}
    expected = len(protections) * len(countermeasures)
    assert proc.returncode == 0 and len(records) == expected and not bad, (
        f"exit {proc.returncode}, {len(records)} of {expected} cells recorded, failed: {bad}; {_tail(proc)}")
    return f"{expected} cells ok on {', '.join(sorted({r.device for r in records.values()}))}"


def worker_death(tmp: Path, dataset: str, device: torch.device, sizes: Sizes) -> str:
    """``--jobs 2`` where one cell's worker is killed: exit 1, that cell failed ("worker died"), the rest ok."""
    matrix = _matrix(tmp, "worker-death", dataset, sizes, ["clean"], ["none"], ["cnn", "lenet", "selfcheck_sigkill"])
    proc, records = bench_run(tmp, matrix, device, 2, plugins=True)
    killed = records.get("clean/none/selfcheck_sigkill")
    others = {cell: r.status for cell, r in records.items() if cell != "clean/none/selfcheck_sigkill"}
    assert proc.returncode == 1, f"exit {proc.returncode}, not 1; {_tail(proc)}"
    assert killed is not None and not killed.ok and DIED.search(killed.error or ""), (
        f"the killed cell is {'not recorded' if killed is None else repr((killed.error or '')[-200:])}; {_tail(proc)}")
    assert DIED.search(proc.stderr), f"bench run does not say the worker died: {_tail(proc)}"
    assert len(others) == 2 and all(s == "ok" for s in others.values()), f"other cells: {others}; {_tail(proc)}"
    return "exit 1; the killed cell recorded failed (worker died), the 2 others ok"


def device_assert(tmp: Path, dataset: str, device: torch.device, sizes: Sizes) -> str:
    """``--jobs 1`` where one cell triggers a device-side assert: that cell fails, the cells after it are ok."""
    from bench.execute import selfcheck_checks as checks

    if device.type != "cuda":
        raise checks.Skipped("needs CUDA")
    matrix = _matrix(tmp, "device-assert", dataset, sizes, ["clean"], ["none"], ["selfcheck_assert", "cnn", "lenet"])
    proc, records = bench_run(tmp, matrix, device, 1, plugins=True)
    status = {cell.split("/")[-1]: (r.status, (r.error or "").strip().splitlines()[-1:]) for cell, r in records.items()}
    assert proc.returncode == 1 and status.get("selfcheck_assert", ("",))[0] != "ok", f"{status}; {_tail(proc)}"
    assert all(status.get(v, ("",))[0] == "ok" for v in ("cnn", "lenet")), f"cells after the assert: {status}"
    return "exit 1; the assert's cell failed, the 2 others ok"


def write(results: list[Result], out: Path, device: torch.device) -> str:
    """The table as Markdown (returned) and JSON, written to ``out/selfcheck-<device type>.{md,json}``."""
    lines = ["| section | check | status | s | info |", "|---|---|---|---|---|"]
    lines += [f"| {r.section} | {r.check} | {r.status} | {r.seconds:.1f} | {r.info.replace('|', '/')} |"
              for r in results]
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"selfcheck-{device.type}.md").write_text(table)
    (out / f"selfcheck-{device.type}.json").write_text(json.dumps(
        {"device": str(device), "results": [dataclasses.asdict(r) for r in results]}, indent=1))
    return table
