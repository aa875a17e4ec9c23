"""`make mutate [MODULE=path]`: mutation testing (mutmut 3) of the harness modules that decide results.

Each module is mutated in its own copy of the checkout (``build/mutate/<module>/``) against the fast tests that
exercise it, so that mutmut's per-function test selection stays small; a module's result is kept there and a rerun
tests only what changed. The script prints the score and the run time of each module, and every surviving mutant
that ``tests/equivalent_mutants.toml`` does not list as equivalent (with its diff). It exits 1 when a module kills
fewer than ``THRESHOLD`` of its non-equivalent mutants or a survivor is unexplained.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
THRESHOLD = 0.85
COPIED = ("bench", "protections", "countermeasures", "victims", "tests", "pyproject.toml", "README.md")
RECORDS = "results/runs"  # the committed records some tests read (results/README.md)
PIPELINE = [f"test_pipeline.py::test_{name}" for name in (
    "record_fields", "run_then_rerun_trains_nothing", "rebuild_sets_builds_a_recorded_cells_missing_set_without_retraining")]
# module → the fast tests that exercise it (mutmut runs, per mutant, those of them that reach the mutated function)
MODULES = {
    "bench/store/keys.py": ["test_key_properties.py", "test_cache.py"],
    "bench/plan/planner.py": ["test_key_properties.py", "test_matrix.py", "test_validation.py", "test_cache.py"],
    "bench/store/cache.py": ["test_cache.py", "test_cache_integrity.py"],
    "bench/store/records.py": ["test_records.py", "test_records_integrity.py"],
    # end-to-end runs in one process only: the multi-process ones take minutes a mutant on 2 cores, and a `bench`
    # subprocess under mutmut's stats collection fails
    "bench/execute/stages.py": ["test_loop_guards.py", *PIPELINE],
    "bench/execute/scheduler.py": [*PIPELINE, "test_pipeline.py::test_dry_run_only_and_leaderboard_command"],
    "bench/execute/train.py": ["test_train.py", "test_loop_guards.py"],
    "bench/data/mixes.py": ["test_mix.py"],
    "bench/data/datasets.py": ["test_data.py", "test_file_datasets.py"],
    "bench/report/leaderboard.py": ["test_leaderboard.py", "test_report.py"],
    "bench/report/compare.py": ["test_compare.py"],
}
CAUGHT = {"killed", "timeout", "segfault", "caught by type checker"}


def properties(module: str) -> str:
    """``test_<module>_properties.py``: the tests a module's survivors asked for. Always in the selection (an empty
    one in the copy until written), since mutmut forgets every verdict when the selection changes."""
    return f"test_{Path(module).stem}_properties.py"


def mutmut_config(module: str) -> str:
    """The ``[tool.mutmut]`` table of one module's copy."""
    names = [*MODULES[module], properties(module)]
    tests = ", ".join(f'"tests/{name}"' for name in dict.fromkeys(names))
    return (f'\n[tool.mutmut]\nsource_paths = ["bench"]\nonly_mutate = ["{module}"]\n'
            f'also_copy = ["protections", "countermeasures", "victims", "README.md", "{RECORDS}"]\n'
            f'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:xdist", "-o", "addopts=",'
            f' "-m", "not slow and not gpu"]\npytest_add_cli_args_test_selection = [{tests}]\n'
            # each mutant's process forked from one that ran no torch op: a child forked after torch's OpenMP
            # pool started deadlocks in its first parallel op (seen as mutmut "timeouts" of passing mutants)
            'process_isolation = "forkserver"\n')


def prepare(module: str) -> Path:
    """Refreshes the module's copy from the checkout (mutmut reruns only the mutants whose code changed)."""
    copy = REPO / "build" / "mutate" / module.replace("/", "_").removesuffix(".py")
    for name in (*COPIED, RECORDS):
        source, target = REPO / name, copy / name
        if not source.exists():
            continue
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    placeholder = copy / "tests" / properties(module)
    if not placeholder.exists():
        placeholder.write_text('"""No tests yet."""\n')
    pyproject = copy / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + mutmut_config(module))
    return copy


# one process for every survivor's diff (``mutmut show`` starts Python once per mutant): mutmut's own function
DIFFS = ("import sys\nfrom mutmut.mutation.diff_apply import get_diff_for_mutant\n"
         "print('\\0'.join(get_diff_for_mutant(name) for name in sys.stdin.read().split()))")


def survivor_changes(copy: Path, names: list[str]) -> dict[str, str]:
    """Each mutant's changed lines, stripped: the key under which an equivalent mutant is listed (stable when the
    module's other code moves, unlike mutmut's numbered names)."""
    if not names:
        return {}
    diffs = subprocess.run([sys.executable, "-c", DIFFS], cwd=copy, input=" ".join(names), capture_output=True,
                           text=True, check=True).stdout.split("\0")
    changed = ([line for line in diff.splitlines() if line[:1] in "+-" and not line.startswith(("+++", "---"))]
               for diff in diffs)
    return {name: "\n".join(line[0] + " " + line[1:].strip() for line in lines) for name, lines in zip(names, changed)}


def equivalents(module: str) -> dict[tuple[str, str], str]:
    """(function, change) → reason, from ``tests/equivalent_mutants.toml``."""
    listed = tomllib.loads((REPO / "tests" / "equivalent_mutants.toml").read_text()).get("equivalent", [])
    return {(item["function"], item["change"].strip()): item["reason"] for item in listed if item["module"] == module}


def mutmut(copy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m mutmut ARGS`` in a module's copy (one thread per test process: the workers are the parallelism)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=copy, env=env, capture_output=True,
                          text=True, check=False)


def statuses(copy: Path) -> dict[str, str]:
    """Each mutant's name → its status (killed, survived, no tests, timeout …)."""
    lines = mutmut(copy, "results", "--all", "true").stdout.splitlines()
    return dict(line.strip().rsplit(": ", 1) for line in lines if ": " in line)


def mutate(module: str, workers: int) -> bool:
    """Runs one module; prints its score and unexplained survivors; True when it meets the bar."""
    copy = prepare(module)
    # mutmut keeps a mutant's earlier verdict even when the tests changed: retry the earlier survivors by name
    earlier = [name for name, state in statuses(copy).items() if state not in CAUGHT] if (copy / "mutants").is_dir() else []
    started = time.monotonic()
    for args in (["run", "--max-children", str(workers)], *([["run", "--max-children", str(workers), *earlier]]
                                                             if earlier else [])):
        run = mutmut(copy, *args)
        if run.returncode != 0:
            print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
            print(f"{module}: mutmut failed (exit {run.returncode})")
            return False
    seconds = time.monotonic() - started
    status = statuses(copy)
    listed, unexplained, equivalent = equivalents(module), [], 0
    survivors = sorted(name for name, state in status.items() if state not in CAUGHT)
    for name, change in survivor_changes(copy, survivors).items():
        function = re.sub(r"__mutmut_\d+$", "", name.rsplit(".", 1)[-1]).removeprefix("x_")
        if (function, change) in listed:
            equivalent += 1
        else:
            unexplained.append((name, status[name], change))
    caught = sum(state in CAUGHT for state in status.values())
    scored = len(status) - equivalent
    score = caught / scored if scored else 1.0
    print(f"{module}: {caught}/{scored} killed = {score:.1%} ({len(status)} mutants, {equivalent} equivalent, "
          f"{len(unexplained)} unexplained survivors) in {seconds / 60:.1f} min")
    for name, state, change in unexplained:
        print(f"  {state}: {name}\n    " + change.replace("\n", "\n    "))
    return score >= THRESHOLD and not unexplained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", action="append", choices=sorted(MODULES), help="one module (default: all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    passed = [mutate(module, args.workers) for module in args.module or MODULES]
    return 0 if all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())
