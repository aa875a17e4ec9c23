"""Validation at planning (issue 35; ../shared/audits/reliability.md defects 11, 13, 14, 20 and probe 4): component and
recipe parameters out of range, matrix names that would leave --results, bad matrix keys and flags, filters that keep
nothing, the --max-cells bound and planning's progress, and matrix.json written atomically. Each is a usage error
(exit 2, a message naming the key, the value and the fix) before anything is loaded or written."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import types
import typing
from pathlib import Path

import pytest

from bench import cli
from bench.core.components import COUNTERMEASURES, PROTECTIONS, Protection
from bench.core.registry import ConfigError, Registry, check_range, param_hints, range_of, registries
from bench.data.datasets import DATASETS
from bench.plan import validate
from bench.plan.matrix import load_matrix, parse_matrix
from bench.plan.recipes import RECIPES, Recipe, make_recipe
from bench.store import atomic

BASE = {"datasets": {"digits": {"size": 8, "per_class": 4, "test_per_class": 2}}, "protections": ["clean"],
        "countermeasures": ["none"], "victims": {"cnn": {"width": 4}}}
TOML = """{top}
[datasets.digits]
size = 8
per_class = 4
test_per_class = 2
[protections]
clean = {{}}
[countermeasures]
none = {{}}
[victims.cnn]
width = 4
{tail}"""


def numeric_params() -> list[tuple[Registry, str, str, type]]:
    """(registry, component, parameter, int or float) for every numeric parameter of every registered component."""
    found = []
    for registry in registries():
        for name in registry.names():
            for key, hint in param_hints(registry.get(name)).items():
                options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
                found += [(registry, name, key, kind) for kind in (int, float) if kind in options]
    return found


# ------------------------------------------------------------------ component and recipe parameters

def test_nan_and_inf_are_refused_for_every_float_parameter():
    """The audit's fuzz: e.g. em.step_size = nan and uge.lr = inf were accepted and failed every cell at run time."""
    accepted = []
    for registry, name, key, kind in numeric_params():
        for value in (math.nan, math.inf, -math.inf) if kind is float else ():
            try:
                registry.create(name, **{key: value})
                accepted.append(f"{registry.kind} {name}.{key}={value}")
            except ConfigError as err:
                assert repr(key) in str(err) and name in str(err)
    assert not accepted


def test_counts_are_at_least_one_and_ints_at_most_int32():
    """Every int parameter named as a count (epochs, steps, widths, batch sizes …) refuses 0 and −1, unless its
    class declares otherwise; no int but a seed takes 10¹⁸ (confoundergan.epochs = 0, cnn width 0 were accepted)."""
    accepted = []
    for registry, name, key, kind in numeric_params():
        if kind is not int:
            continue
        low = range_of(registry.get(name), key, int)
        values = [10**18] * ("seed" not in key) + ([0, -1] if low.startswith("[1,") else [-1])
        for value in values:
            try:
                registry.create(name, **{key: value})
                accepted.append(f"{registry.kind} {name}.{key}={value}")
            except ConfigError:
                pass
    assert not accepted
    assert range_of(PROTECTIONS.get("confoundergan"), "epochs", int).startswith("[1,")


def test_a_declared_bound_overrides_the_rule_by_name():
    """tap declares steps ≥ 0 (the random start alone is its documented ablation) and shift ≥ 1."""
    assert PROTECTIONS.create("tap", steps=0).steps == 0
    with pytest.raises(ConfigError, match=r"'shift': must be in \[1, 2147483647\], got 0; omit it for the default 1"):
        PROTECTIONS.create("tap", shift=0)


def test_bad_bound_declarations_fail_on_registration():
    registry = Registry("thing", Protection)
    with pytest.raises(TypeError, match="not a parameter"):
        @registry.register("a")
        class A(Protection):
            bounds: typing.ClassVar[dict[str, str]] = {"nosuch": "[0, 1]"}
            size: int = 1
    with pytest.raises(TypeError, match="bad interval"):
        @registry.register("b")
        class B(Protection):
            bounds: typing.ClassVar[dict[str, str]] = {"size": "0 to 1"}
            size: int = 1


def test_every_default_lies_in_its_range():
    """The ranges by name fit every shipped component's defaults and every named recipe."""
    for registry in registries():
        for name in registry.names():
            cls = registry.get(name)
            for field in dataclasses.fields(cls):
                check_range(cls, field.name, getattr(cls(), field.name), f"{name}.{field.name}")
    for recipe in RECIPES.values():
        for field in dataclasses.fields(Recipe):
            check_range(Recipe, field.name, getattr(recipe, field.name), f"recipe {recipe.name}.{field.name}")


@pytest.mark.parametrize("field, value", [("lr", math.nan), ("lr", math.inf), ("momentum", -5.0), ("momentum", 1.0),
                                          ("weight_decay", -math.inf), ("eval_batch_size", 0), ("gamma", 0.0),
                                          ("milestones", [10, -1]), ("epochs", 10**18)])
def test_recipe_fields_out_of_range_are_refused(field, value):
    """The audit: lr = nan/inf, momentum = −5 and eval_batch_size = 0 passed and failed every cell."""
    with pytest.raises(ConfigError, match=f"recipe field '{field}'"):
        make_recipe("quick", **{field: value})
    with pytest.raises(ConfigError, match=f"key 'recipe': recipe field '{field}'"):
        parse_matrix({**BASE, "recipe": {field: value}}, "m")


@pytest.mark.parametrize("axis, component, params", [
    ("victims", "cnn", {"width": 0}), ("victims", "cnn", {"width": -4}), ("protections", "em", {"step_size": math.nan}),
    ("protections", "uge", {"lr": math.inf}), ("protections", "confoundergan", {"epochs": 0}),
    ("countermeasures", "distill", {"temperature": math.nan}), ("protections", "rem", {"batch_size": -1}),
])
def test_the_audits_accepted_values_are_refused_at_planning(axis, component, params):
    with pytest.raises(ConfigError) as info:
        parse_matrix({**BASE, axis: {component: params}}, "m")
    key = next(iter(params))
    assert f"key '{axis}.{component}'" in str(info.value) and repr(key) in str(info.value)


def test_a_huge_int_for_a_float_is_refused_not_an_overflow():
    with pytest.raises(ConfigError, match="finite"):
        PROTECTIONS.create("cwn", epsilon=10**400)


def test_a_recipe_name_that_is_no_string_is_refused():
    with pytest.raises(ConfigError, match="unknown recipe"):
        make_recipe([])  # type: ignore[arg-type]


# ------------------------------------------------------------------ the matrix's own keys

@pytest.mark.parametrize("name", ["../../escaped", "..", ".", "", "/tmp/abs", "a/b", "a" * 101, "-x", "x\ny", "é", 5,
                                  True, ["a"]])
def test_names_that_are_not_one_safe_path_component_are_refused(name):
    """The name is a folder under --results: ../.. or an absolute path wrote records outside it (defect 11)."""
    with pytest.raises(ConfigError) as info:
        parse_matrix({**BASE, "name": name}, "m")
    assert "key 'name'" in str(info.value) and repr(name) in str(info.value) and "write e.g. name = " in str(info.value)


@pytest.mark.parametrize("name", ["smoke", "dh-table1.v2_b", "A" * 100, "0"])
def test_safe_names_are_kept(name):
    assert parse_matrix({**BASE, "name": name}, "m").name == name


def test_a_file_name_that_is_no_safe_name_needs_a_name_key(tmp_path):
    path = tmp_path / "my matrix.toml"
    path.write_text(TOML.format(top="", tail=""))
    with pytest.raises(ConfigError, match="no key 'name', and the file name 'my matrix'.*name = 'my-matrix'"):
        load_matrix(str(path))
    path.write_text(TOML.format(top='name = "mine"', tail=""))
    assert load_matrix(str(path)).name == "mine"


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", ["../../escaped", "/ABS", "..", "a" * 300])
def test_a_run_with_an_escaping_name_writes_nothing_anywhere(name, tmp_path, capsys):
    """A real run (not --dry-run) is refused before the dataset cache or any record is written; the 300-character
    name used to end in OSError(ENAMETOOLONG) after caching the dataset."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    abs_target = tmp_path / "abs"
    matrix = work / "m.toml"
    matrix.write_text(TOML.format(top=f"name = {json.dumps(name.replace('/ABS', str(abs_target)))}", tail=""))
    before = snapshot(tmp_path)
    assert cli.main(["run", "--matrix", str(matrix), "--results", str(work / "results"), "--jobs", "1"]) == 2
    err = capsys.readouterr().err
    assert "key 'name'" in err and "Traceback" not in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("top, tail, message", [
    ('recipe = "quick"', "", "key 'recipe': expected a table, got 'quick'"),
    ("exclude = 5", "", "key 'exclude': expected [[exclude]] tables"),
    ("exclude = [5]", "", "key 'exclude': expected [[exclude]] tables"),
    ("seeds = [-1]", "", "key 'seeds': -1 is out of range"),
    (f"seeds = [{2**63}]", "", "out of range"),
    ('name = "x"', '[layout]\nlabels = { nosuch = "N" }', "unknown label 'nosuch'"),
])
def test_bad_matrix_keys_exit_2_naming_the_key(top, tail, message, tmp_path, capsys):
    """``recipe = "quick"`` ended in a ValueError traceback; seeds beyond torch's range failed at run time."""
    path = tmp_path / "m.toml"
    path.write_text(TOML.format(top=top, tail=tail))
    assert cli.main(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("key, value", [("poison_ratio", 10**400), ("poison_ratio", math.inf), ("protections", [[]]),
                                        ("victims", [{}])])
def test_values_that_raised_other_errors_are_config_errors(key, value):
    """Found by a fuzz of parse_matrix: OverflowError and TypeError (unhashable) tracebacks."""
    with pytest.raises(ConfigError, match=f"key '{key}'"):
        parse_matrix({**BASE, key: value}, "m")


def test_a_matrix_file_that_is_not_utf8_exits_2(tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_bytes(TOML.format(top="# caf\xe9", tail="").encode("latin-1"))
    assert cli.main(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not UTF-8 text" in err and "save the file as UTF-8" in err


def test_errors_in_an_extends_chain_name_the_file_that_has_them(tmp_path, capsys):
    """A parent that is not UTF-8 is named (not its child); a child whose axis cannot merge exits 2, not TypeError."""
    parent, child = tmp_path / "parent.toml", tmp_path / "child.toml"
    parent.write_bytes(TOML.format(top="# caf\xe9", tail="").encode("latin-1"))
    child.write_text('extends = "parent.toml"\n')
    assert cli.main(["run", "--matrix", str(child), "--results", str(tmp_path / "r"), "--dry-run"]) == 2
    assert f"{parent}: not UTF-8 text" in capsys.readouterr().err
    parent.write_text(TOML.format(top="", tail=""))
    child.write_text('extends = "parent.toml"\nprotections = [[]]\n')
    assert cli.main(["run", "--matrix", str(child), "--results", str(tmp_path / "r"), "--dry-run"]) == 2
    assert f"{child}: key 'protections': expected a table" in capsys.readouterr().err


# ------------------------------------------------------------------ flags and filters

@pytest.mark.parametrize("flags, message", [
    (["--max-hours", "nan"], "--max-hours"), (["--max-hours", "inf"], "--max-hours"),
    (["--max-hours", "-1"], "--max-hours"), (["--stale-after", "nan"], "--stale-after"),
    (["--stale-after", "inf"], "--stale-after"), (["--data-root", "/nonexistent"], "--data-root /nonexistent"),
    (["--max-cells", "0"], "--max-cells"),
    (["--only", "protection=nosuch"], "--only protection=nosuch matches no cell; the protection labels here are: clean"),
    (["--rerun", "victim=x*"], "--rerun victim=x* matches no cell; the victim labels here are: cnn"),
    (["--only", "seed=1"], "the seed labels here are: 0"),
])
def test_bad_flags_and_empty_filters_exit_2(flags, message, tmp_path, capsys):
    """``--max-hours nan`` refused every run later, ``--only protection=nosuch`` ran 0 cells with exit 0."""
    path = tmp_path / "m.toml"
    path.write_text(TOML.format(top="", tail=""))
    assert cli.main(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--dry-run", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_bad_stale_after_in_the_environment_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_CLAIM_STALE", "soon")
    assert cli.main(["run", "--matrix", "smoke", "--results", str(tmp_path), "--dry-run"]) == 2
    assert "$BENCH_CLAIM_STALE='soon'" in capsys.readouterr().err


def test_exclusions_that_drop_every_cell_exit_2(tmp_path, capsys):
    path = tmp_path / "m.toml"
    path.write_text(TOML.format(top="", tail='[[exclude]]\nprotection = "c*"'))
    assert cli.main(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--dry-run"]) == 2
    assert "its [[exclude]] rules drop every one of its 1 cells" in capsys.readouterr().err


# ------------------------------------------------------------------ size bound and progress

def test_a_matrix_over_max_cells_is_refused_before_it_is_expanded(tmp_path, monkeypatch, capsys):
    """10⁶ cells printed nothing for 10 minutes: the count comes from the axes, before one cell is made."""
    from bench.plan import matrix as matrix_module

    monkeypatch.setattr(matrix_module, "expand", lambda matrix: pytest.fail("expanded before the bound was checked"))
    path = tmp_path / "m.toml"
    path.write_text(TOML.format(top=f"seeds = {list(range(1000))}", tail="").replace(
        "clean = {}", "random_noise = { epsilon = " + str([e / 4 for e in range(1, 1001)]) + " }"))
    assert cli.main(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "1,000,000 cells before its [[exclude]] rules, over the --max-cells bound of 100,000" in err
    assert "pass --max-cells 1000000" in err
    assert cli.main(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--dry-run", "--max-cells", "10",
                     "--only", "seed=1?"]) == 2
    assert "10,000 cells (selected by --only seed=1?)" in capsys.readouterr().err


def test_large_plans_report_each_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(validate, "PROGRESS_CELLS", 2)
    path = tmp_path / "m.toml"
    path.write_text(TOML.format(top="seeds = [0, 1]", tail=""))
    assert cli.main(["run", "--matrix", str(path), "--results", str(tmp_path / "r"), "--dry-run"]) == 0
    steps = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bench: planning 2 cells: ")]
    assert [line.split(": ")[2].split(" …")[0] for line in steps] == [
        "expanding m", "estimating the run's cost", "checking each cell's components", "computing each cell's cache keys"]


# ------------------------------------------------------------------ matrix.json

def test_save_resolved_leaves_no_temporary_file_when_the_disk_is_full(tmp_path, monkeypatch):
    """ENOSPC during save_resolved left a 0-byte matrix.tmp<pid> beside the old matrix.json (defect 13)."""
    from bench.execute.scheduler import save_resolved

    matrix, path = parse_matrix(BASE, "m"), tmp_path / "matrix.json"
    save_resolved(matrix, ["k1"], path)
    before = path.read_bytes()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        save_resolved(matrix, ["k2"], path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["matrix.json"]


def test_an_atomic_write_that_fails_midway_removes_its_temporary_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic.write_text(path, "new \udc80")  # fails while writing
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    link = tmp_path / "link.txt"
    link.symlink_to(path)
    atomic.write_text(link, "new")
    assert path.read_text() == "old" and link.read_text() == "new" and not link.is_symlink()


def test_a_damaged_matrix_json_is_rewritten_with_a_warning(tmp_path):
    from bench.execute.scheduler import save_resolved

    path = tmp_path / "matrix.json"
    path.write_text('{"cells": ["k1"')
    with pytest.warns(UserWarning, match="rewriting it"):
        save_resolved(parse_matrix(BASE, "m"), ["k2"], path)
    assert json.loads(path.read_text())["cells"] == ["k2"]


def test_dataset_and_matrix_checks_use_the_registry():
    """DATASETS and COUNTERMEASURES share the same checks (one mechanism for every registry)."""
    with pytest.raises(ConfigError, match="'per_class': must be in"):
        DATASETS.create("digits", per_class=10**18)
    with pytest.raises(ConfigError, match="finite"):
        COUNTERMEASURES.create("gauss_noise", sigma=math.inf)
