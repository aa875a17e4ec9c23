"""Fuzz (issue 35): generated matrices, command lines and ``bench protect`` folders end with exit 0, 1 or 2, never
a traceback, and change no file outside ``--results`` / ``--output``.

Each test runs the CLI in-process (``bench.cli.main``) in a fresh sandbox folder that is also the working directory
(so that a path escaping to ``./`` or ``..`` shows), snapshots every file of the sandbox outside the folders the
command may write, and compares after. An exception escaping ``main`` is the traceback a user would see: the test
fails with it. The strategies mix valid values with the audit's hostile ones (``../shared/audits/reliability.md``,
probe 4): NaN/inf/negative numbers, wrong types, unknown names, escaping paths, links, damaged images.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.cli import main

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
NASTY_NUMBERS = [math.nan, math.inf, -math.inf, -1, 0, 0.5, 1e18, -8.0, 2**63, True, "x", [], {}]
NASTY_TEXT = ["", "..", "../escaped", "/tmp/abs", "a" * 300, "é 名", "x\ny", "*", "cuda:7"]


@contextlib.contextmanager
def sandbox() -> Iterator[Path]:
    """A fresh folder, also the working directory; the environment and cwd are restored after."""
    before_env, before_cwd = dict(os.environ), os.getcwd()
    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as outer:
        root = Path(outer) / "work"  # `check` watches outer too: a write to ../ shows
        root.mkdir()
        os.chdir(root)
        try:
            yield root
        finally:
            os.chdir(before_cwd)
            os.environ.clear()
            os.environ.update(before_env)


def snapshot(root: Path, writable: tuple[Path, ...]) -> dict[str, tuple]:
    """Every entry under ``root`` outside ``writable``: kind, link target or size and content hash."""
    found = {}
    for path in root.rglob("*"):
        if any(path == w or w in path.parents for w in writable):
            continue
        if path.is_symlink():
            found[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            found[str(path)] = ("file", path.stat().st_size, hash(path.read_bytes()))
        else:
            found[str(path)] = ("dir",)
    return found


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``bench ARGV`` in-process: its exit status and stderr (argparse's own exits included)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 2
    return code, err.getvalue()


def check(argv: list[str], root: Path, writable: tuple[Path, ...]) -> tuple[int, str]:
    """Run ``argv``; assert exit 0/1/2, no traceback text, nothing changed outside ``writable``."""
    before = snapshot(root.parent, writable)
    code, err = run_cli(argv)
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    assert snapshot(root.parent, writable) == before, argv
    event(f"{argv[0]}: exit {code}")  # --hypothesis-show-statistics counts them
    return code, err


def toml_value(value: object) -> str:
    """``value`` as TOML (tomllib has no writer; the strategies make only these types)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    assert isinstance(value, dict)
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"


def toml_document(matrix: dict) -> str:
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in matrix.items() if not isinstance(v, dict)]
    for table, body in ((k, v) for k, v in matrix.items() if isinstance(v, dict)):
        lines.append(f"[{json.dumps(table)}]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(lines) + "\n"


nasty = st.sampled_from(NASTY_NUMBERS + NASTY_TEXT)


BASE = {"name": "fuzz", "seeds": [0], "recipe": {"name": "quick", "epochs": 1},
        "datasets": {"digits": {"size": 8, "per_class": 6, "test_per_class": 3}},
        "protections": {"clean": {}, "random_noise": {"epsilon": 8.0}},
        "countermeasures": {"none": {}, "bdr": {"bits": 2}}, "victims": {"cnn": {"width": 4}}}
# where a mutation lands: a top-level key, or a key inside one of BASE's tables (a new key there is unknown)
PLACES = [(key,) for key in [*BASE, "poison_ratio", "mix", "exclude", "layout", "description", "nosuch"]] + [
    ("recipe", "epochs"), ("recipe", "lr"), ("recipe", "momentum"), ("recipe", "batch_size"), ("recipe", "name"),
    ("recipe", "eval_batch_size"), ("recipe", "nosuch"), ("datasets", "digits", "size"),
    ("datasets", "digits", "per_class"), ("datasets", "nosuch"), ("protections", "random_noise", "epsilon"),
    ("protections", "cwp"), ("protections", "nosuch"), ("countermeasures", "bdr", "bits"),
    ("countermeasures", "jpeg"), ("victims", "cnn", "width"), ("victims", "lenet"), ("victims", "nosuch")]
VALUES = st.one_of(nasty, st.sampled_from([1, 2, 4, 0.5, 1.0, "quick", "none", {}, {"quality": 10}, [0, 1],
                                           [{"protection": "clean"}], {"rows": "protection"}, ["clean"]]))


@st.composite
def matrices(draw: st.DrawFn) -> dict:
    """BASE (a valid 4-cell matrix) with 0–3 mutations: a value replaced (valid or hostile), a key removed, added."""
    matrix = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(0, 3))):
        *parents, last = draw(st.sampled_from(PLACES))
        table = matrix
        for key in parents:
            table = table.get(key) if isinstance(table, dict) else None
        if not isinstance(table, dict):
            continue
        if draw(st.booleans()) and last in table:
            del table[last]
        else:
            table[last] = draw(VALUES)
    return matrix


@FUZZ
@given(matrix=matrices(), damage=st.sampled_from(["none"] * 8 + ["bytes", "syntax"]))
def test_fuzzed_matrices_plan_or_exit_2(matrix: dict, damage: str) -> None:
    """A generated matrix is planned (``--dry-run``) or refused with exit 2; nothing outside ``--results``."""
    with sandbox() as root:
        path = root / "m.toml"
        text = toml_document(matrix)
        path.write_bytes({"none": text.encode(), "bytes": b"\xff\xfe" + text.encode(),
                          "syntax": text.encode() + b"[[["}[damage])
        results = root / "results"
        code, err = check(["run", "--matrix", str(path), "--results", str(results), "--dry-run"], root, (results,))
        assert code != 1, err  # planning has no runtime failures: a bad matrix is a usage error


@settings(FUZZ, max_examples=20)
@given(matrix=matrices())
def test_fuzzed_matrices_run_or_exit_2(matrix: dict) -> None:
    """A few generated matrices run for real (4 cells of 8×8 digits, one epoch): exit 0, 1 (a cell failed, recorded)
    or 2 (refused before any work), nothing written outside ``--results``; a refused run leaves no record."""
    with sandbox() as root:
        path, results = root / "m.toml", root / "results"
        path.write_text(toml_document(matrix))
        code, err = check(["run", "--matrix", str(path), "--results", str(results), "--jobs", "1"], root, (results,))
        if code == 2:
            assert not list(results.glob("runs/*/records.jsonl")), err


CELLS = st.sampled_from(["protection=clean", "protection=nosuch", "seed=0", "nokey=1", "victim=c*", "=", ""])


def command_lines(root: Path) -> st.SearchStrategy[list[str]]:
    """``bench`` command lines of the cheap subcommands with valid and hostile flags and values."""
    values = st.sampled_from([*map(str, NASTY_NUMBERS[:8]), *NASTY_TEXT, "/etc/hostname", "/dev/null",
                              str(root / "tiny.toml"), "tiny", "tiny", "smoke", "cpu", "auto", "final", "1", "2"])
    run = st.tuples(st.just(["run", "--dry-run", "--matrix", str(root / "tiny.toml")]), st.lists(st.one_of(
        st.tuples(st.sampled_from(["--jobs", "--threads", "--device", "--max-hours", "--stale-after", "--backend",
                                   "--data-root", "--gpus-per-task", "--mem-gb", "--max-cells", "--nosuch"]), values),
        st.tuples(st.sampled_from(["--only", "--rerun"]), CELLS),
        st.tuples(st.sampled_from(["--retry-failed", "--force", "--deterministic", "--offline"]))), max_size=3))
    others = st.tuples(st.sampled_from([["list"], ["show"], ["leaderboard"], ["report"], ["weights"],
                                        ["leaderboard", "--matrix", "tiny"], ["report", "--matrix", "tiny"]]), st.lists(
        st.one_of(st.tuples(st.sampled_from(["--matrix", "--metric", "--compare", "--out"]), values),
                  st.tuples(values), st.tuples(st.sampled_from(["--markdown", "--mix-recipes"]))), max_size=2))
    return st.one_of(run, others).map(lambda parts: [*parts[0], *(x for flag in parts[1] for x in flag)])


@FUZZ
@given(data=st.data())
def test_fuzzed_command_lines_exit_0_1_or_2(tiny_results: Path, data: st.DataObject) -> None:
    """Cheap subcommands (listing, planning, tables, reports, weights) under generated flags and values."""
    with sandbox() as root:
        (root / "tiny.toml").write_text(TINY)
        results, out = root / "results", root / "out"
        shutil.copytree(tiny_results, results, symlinks=True)  # records to tabulate and report
        argv = data.draw(command_lines(root))
        if argv[0] != "list":
            argv += ["--results", str(results)]
        check(argv, root, (results, out, root / "reports"))


TINY = """name = "tiny"
seeds = [0]
[recipe]
name = "quick"
epochs = 1
[datasets.digits]
size = 8
per_class = 6
test_per_class = 3
[protections]
clean = {}
[countermeasures]
none = {}
[victims.cnn]
width = 4
"""


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder after one run of TINY (1 cell), copied into each sandbox."""
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "tiny.toml").write_text(TINY)
    assert run_cli(["run", "--matrix", str(folder / "tiny.toml"), "--results", str(folder / "results"),
                    "--jobs", "1"])[0] == 0
    return folder / "results"


@pytest.fixture(scope="module")
def fitted_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ConfounderGAN entry fitted on 8×8 digits (1 channel), as the protect stage saves it."""
    from bench.core.components import PROTECTIONS
    from bench.store.cache import Cache
    from bench.testing import digits_set

    data = digits_set()
    data = type(data)(data.images[:64, :, ::2, ::2].contiguous(), data.labels[:64], data.num_classes)
    protection = PROTECTIONS.create("confoundergan", surrogate="cnn", surrogate_epochs=1, epochs=1, width=8,
                                    batch_size=64)
    fitted = protection.fit(data, seed=0, device=__import__("torch").device("cpu"))
    results = tmp_path_factory.mktemp("fitted") / "results"
    Cache(results / "cache").save("protected", "fuzzkey", fitted.data, {"spec": protection.spec(), "seed": 0},
                                  fitted.models)
    return results / "cache" / "protected" / "fuzzkey"


def write_input(folder: Path, kind: str, name: str, precious: Path) -> None:
    """One entry of a ``--input`` folder: an image of some mode and size, a damaged file, or a link."""
    rng = np.random.default_rng(len(name))
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    path = folder / name
    if kind == "png":
        Image.fromarray(grey).save(path.with_suffix(".png"))
    elif kind == "jpg":
        Image.fromarray(grey).save(path.with_suffix(".jpg"), quality=95)
    elif kind == "png16":
        Image.fromarray(grey.astype(np.uint16) * 257).save(path.with_suffix(".png"))
    elif kind in ("rgba", "palette", "cmyk", "rgb"):
        image = Image.fromarray(np.stack([grey] * 3, -1))
        image = {"rgba": image.convert("RGBA"), "palette": image.convert("P"), "rgb": image,
                 "cmyk": image.convert("CMYK")}[kind]
        image.save(path.with_suffix(".jpg" if kind == "cmyk" else ".png"))
    elif kind == "big":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(path.with_suffix(".png"))
    elif kind == "bytes":
        path.with_suffix(".png").write_bytes(rng.bytes(100))
    elif kind == "empty":
        path.with_suffix(".jpg").write_bytes(b"")
    elif kind == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(grey).save(buffer, format="PNG")
        path.with_suffix(".png").write_bytes(buffer.getvalue()[:60])
    elif kind == "link":
        path.with_suffix(".png").symlink_to(precious)
    elif kind == "folder":
        path.with_suffix(".png").mkdir()


def prepare_output(output: Path, kind: str, inputs: Path, precious: Path) -> None:
    """``--output`` before the run: absent, empty, a file, or holding files and links named as the outputs."""
    if kind == "absent":
        return
    if kind == "file":
        output.write_bytes(b"x")
        return
    output.mkdir()
    first = next(iter(sorted(inputs.iterdir())), None)
    if first is None:
        return
    target = output / (first.stem + ".png")
    if kind == "existing":
        target.write_bytes(b"an older output")
    elif kind == "symlink_in" and first.is_file():
        target.symlink_to(first.resolve())
    elif kind == "hardlink_in" and first.is_file() and not first.is_symlink():
        os.link(first, target)
    elif kind == "symlink_elsewhere":
        target.symlink_to(precious)


INPUT_KINDS = ["png", "png", "jpg", "png16", "rgba", "palette", "cmyk", "rgb", "big", "bytes", "empty", "truncated",
               "link", "folder"]


@FUZZ
@given(inputs=st.lists(st.sampled_from(INPUT_KINDS), min_size=0, max_size=5),
       output=st.sampled_from(["absent", "empty", "file", "existing", "symlink_in", "hardlink_in",
                               "symlink_elsewhere", "inside_input"]),
       flags=st.lists(st.sampled_from([["--overwrite"], ["--batch-size", "2"], ["--batch-size", "0"],
                                       ["--label", "3"], ["--protection", "cwn"]]), max_size=2))
def test_fuzzed_protect_folders(fitted_model: Path, inputs: list[str], output: str, flags: list[list[str]]) -> None:
    """``bench protect`` on generated folders: exit 0/1/2; inputs, links' targets and other files unchanged; a
    failed run writes nothing; a successful one writes plain files, never through a link."""
    with sandbox() as root:
        source, precious = root / "in", root / "precious.png"
        source.mkdir()
        Image.fromarray(np.full((8, 8), 7, np.uint8)).save(precious)
        for i, kind in enumerate(inputs):
            write_input(source, kind, f"img{i}", precious)
        target = source / "out" if output == "inside_input" else root / "out"
        prepare_output(target, "empty" if output == "inside_input" else output, source, precious)
        before = snapshot(target, ()) if target.is_dir() else None
        argv = ["protect", "--model", str(fitted_model), "--input", str(source), "--output", str(target),
                "--device", "cpu", *(x for flag in flags for x in flag)]
        code, err = check(argv, root, (target,) if output != "inside_input" else ())
        if code != 0 and before is not None:
            assert snapshot(target, ()) == before, (argv, err)  # nothing half-written
        if code == 0:  # what it wrote is plain files; a link it did not write over (another name) stays as it was
            assert all(not p.is_symlink() and p.is_file() or (before or {}).get(str(p)) == snapshot(target, ())[str(p)]
                       for p in target.iterdir()), argv
