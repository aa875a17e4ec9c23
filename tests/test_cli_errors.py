"""How commands end on OS errors and on paths that are files (issue 35; ../shared/audits/reliability.md defects 13
and 14): one line naming the path and its free space with exit 1, or a usage error with exit 2; never a traceback."""

from __future__ import annotations

import errno

import pytest

from bench import cli
from bench.execute import runs


@pytest.mark.parametrize("command", [["run", "--matrix", "smoke", "--dry-run"], ["leaderboard"], ["report"]])
def test_results_naming_a_file_is_a_usage_error(command, tmp_path, capsys):
    """``--results /etc/hostname`` ended in NotADirectoryError deep in a run; now it is refused before anything."""
    file = tmp_path / "hostname"
    file.write_text("x")
    assert cli.main([*command, "--results", str(file)]) == 2
    err = capsys.readouterr().err
    assert f"--results {file} is a file, not a folder" in err and "Traceback" not in err
    assert file.read_text() == "x"


def test_report_out_naming_a_file_is_a_usage_error(tmp_path, capsys):
    """``bench report --out <file>`` ended in FileExistsError."""
    file = tmp_path / "out"
    file.write_text("x")
    assert cli.main(["report", "--results", str(tmp_path / "r"), "--out", str(file)]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("code, why", [(errno.ENOSPC, "No space left on device"), (errno.EACCES, "Permission denied"),
                                       (errno.EROFS, "Read-only file system")])
def test_os_errors_end_with_one_line_and_exit_1(code, why, tmp_path, monkeypatch, capsys):
    """A full disk (or a read-only or forbidden folder) mid-run: exit 1, one line naming the path and the free space
    of its file system, instead of a traceback."""
    path = tmp_path / "results" / "runs" / "smoke" / "records.jsonl"

    def fails(args):
        raise OSError(code, why, str(path))

    monkeypatch.setattr(runs, "cmd_run", fails)
    assert cli.main(["run", "--results", str(tmp_path / "results")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err and str(path) in err and "GiB free there" in err


def test_an_os_error_without_a_path_names_the_results_folder(tmp_path, monkeypatch, capsys):
    """numpy's short write on a full disk carries no file name: the line names the results folder instead."""
    def fails(args):
        raise OSError("1472512 requested and 1048448 written")

    monkeypatch.setattr(runs, "cmd_run", fails)
    assert cli.main(["run", "--results", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "1472512 requested and 1048448 written under" in err and str(tmp_path / "r") in err


def test_a_full_disk_while_caching_a_set_ends_the_run_with_one_line(tmp_path, monkeypatch, capsys):
    """The audit's tmpfs probe: a full disk while writing a protected set failed that set, then every cell using it,
    each recorded as an error on the full disk, and later writes ended in tracebacks. Now the first storage error
    ends the run: exit 1, one line, no temporary folder, no record."""
    import numpy as np

    from bench.store import cache
    from tests.conftest import tiny_matrix

    matrix, results = tiny_matrix(tmp_path, extra_countermeasures=""), tmp_path / "r"
    real_save = np.save

    def full(path, array, *args, **kwargs):
        if "protected" in str(path):
            raise OSError("92032 requested and 89984 written")  # numpy's short write on a full disk
        return real_save(path, array, *args, **kwargs)

    monkeypatch.setattr(cache.np, "save", full)
    assert cli.main(["run", "--matrix", str(matrix), "--results", str(results), "--jobs", "1"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bench: error")]
    assert len(err) == 1 and "No space left on device" in err[0] and str(results / "cache") in err[0]
    assert not list(results.rglob(".tmp-*")) and not list(results.glob("runs/*/records.jsonl"))


def test_benchs_own_warnings_are_one_bench_warning_line(tmp_path):
    """bench's own warnings (damaged record lines …) print as `bench: warning: …`, not Python's `file.py:N:
    DamagedLines: …` with a source line; other libraries' warnings keep Python's form. (pytest records warnings
    instead of printing them, so the format the CLI installs is checked directly.)"""
    import warnings

    from bench.store.integrity import DamagedLines

    assert cli.main(["list", "recipes"]) == 0
    assert warnings.formatwarning is cli._warning_line
    line = warnings.formatwarning("records.jsonl: skipped line 2", DamagedLines, "/x/integrity.py", 51)
    assert line == "bench: warning: records.jsonl: skipped line 2\n"
    assert "/x/lib.py:3: DeprecationWarning: old" in warnings.formatwarning("old", DeprecationWarning, "/x/lib.py", 3)
