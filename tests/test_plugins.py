"""Plugins that install and behave: entry points, ``--plugins`` specs (file, package, folder), one import per file,
fingerprints of plugin code in keys, and the same plugin set in every worker (joblib, submitit, Ray).

Anything that registers into the global registries runs in a subprocess: discovery happens once per process.
"""

from __future__ import annotations

import importlib.util
import json
import linecache
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bench.api import make_key
from bench.core.components import COUNTERMEASURES, Countermeasure
from bench.core.registry import ConfigError, Registry, code_fingerprint, component_identity
from conftest import REPO, run_subprocess, tiny_matrix

PY = sys.executable

COUNTERMEASURE = '''
from typing import ClassVar
from bench.api import COUNTERMEASURES, Countermeasure, ImageSet
{helper_import}
print("EXECUTED {name}", __name__)


@COUNTERMEASURES.register("{name}")
class Plugin(Countermeasure):
    """Test plugin: a data stage from its helper module."""
    stages: ClassVar[frozenset[str]] = frozenset({{"data"}})

    def purify(self, train: ImageSet, *, seed, device) -> ImageSet:
        return train.with_images(helper.transform(train.images))
'''

PROTECTION = '''
from bench.api import PROTECTIONS, Protection, ImageSet
from . import helper


@PROTECTIONS.register("{name}")
class Plugin(Protection):
    """Test plugin: a protection from its helper module."""

    def protect(self, train: ImageSet, *, seed, device) -> ImageSet:
        return train.with_images(helper.transform(train.images))
'''

HELPER = "def transform(images):\n    return 255 - images\n"


def flat_plugin(folder: Path, name: str) -> Path:
    """``folder/<name>.py`` importing ``helper_<name>.py`` beside it (``import helper``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"helper_{name}.py").write_text(HELPER)
    path = folder / f"{name}.py"
    path.write_text(COUNTERMEASURE.format(name=name, helper_import=f"import helper_{name} as helper"))
    return path


def package_plugin(folder: Path, package: str, countermeasure: str, protection: str | None = None) -> Path:
    """``folder/<package>/``: a countermeasure and (optionally) a protection, each with ``from . import helper``."""
    root = folder / package
    root.mkdir(parents=True)
    (root / "__init__.py").write_text('"""A plugin package."""\n')
    (root / "helper.py").write_text(HELPER)
    code = COUNTERMEASURE.format(name=countermeasure, helper_import="from . import helper")
    (root / "countermeasure.py").write_text(code)
    if protection:
        (root / "protection.py").write_text(PROTECTION.format(name=protection))
    return root


def python(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this checkout importable."""
    full = {key: value for key, value in os.environ.items() if key != "BENCH_PLUGINS"}  # only the test's plugins
    full.update({"PYTHONPATH": str(REPO), **(env or {})})
    return subprocess.run([PY, "-c", code], cwd=cwd, env=full, capture_output=True, text=True, timeout=300)


LIST = ("from bench.api import COUNTERMEASURES, PROTECTIONS\n"
        "print('NAMES', COUNTERMEASURES.names('t_*') + PROTECTIONS.names('t_*'))\n")


def names(proc: subprocess.CompletedProcess) -> list[str]:
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("NAMES"))
    return eval(line.removeprefix("NAMES "))  # noqa: S307  a list literal this test printed


# ------------------------------------------------------------------ specs: file, package, folder, module name


def test_a_flat_file_imports_a_helper_beside_it_and_a_package_its_own(tmp_path):
    flat = flat_plugin(tmp_path / "flat", "t_flat")
    package = package_plugin(tmp_path / "pkgs", "t_pkg", "t_pkg_cm", "t_pkg_prot")
    proc = python(f"from bench.core import plugins; plugins.use({str(flat)!r}, {str(package)!r})\n" + LIST, tmp_path)
    assert names(proc) == ["t_flat", "t_pkg_cm", "t_pkg_prot"]
    assert "EXECUTED t_flat t_flat" in proc.stdout, "a flat file is the module named after it"
    assert "EXECUTED t_pkg_cm t_pkg.countermeasure" in proc.stdout


def test_a_folder_holds_flat_files_and_packages(tmp_path):
    """Package sub-folders used to be skipped silently; underscore files and plain sub-folders are not plugins."""
    folder = tmp_path / "plugins"
    flat_plugin(folder, "t_in_folder")
    package_plugin(folder, "t_sub", "t_sub_cm")
    (folder / "_private.py").write_text("raise RuntimeError('never imported')\n")
    (folder / "data").mkdir()
    (folder / "data" / "x.py").write_text("raise RuntimeError('never imported')\n")
    proc = python(LIST, tmp_path, {"BENCH_PLUGINS": str(folder)})
    assert names(proc) == ["t_in_folder", "t_sub_cm"]


def test_a_dotted_module_name_is_a_spec(tmp_path):
    package_plugin(tmp_path / "site", "t_named", "t_named_cm")
    proc = python("from bench.core import plugins; plugins.use('t_named')\n" + LIST, tmp_path,
                  {"PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path / "site")])})
    assert names(proc) == ["t_named_cm"], "the package's submodules are imported too"


@pytest.mark.parametrize("spec, message", [
    ("no_such_plugin_module", "no module named 'no_such_plugin_module'"),
    ("missing/plugin.py", "no such .py file, folder or importable module name"),
])
def test_a_spec_that_names_nothing_is_refused(tmp_path, spec, message):
    proc = python(f"from bench.core import plugins; plugins.use({spec!r})\n" + LIST, tmp_path)
    assert proc.returncode != 0 and "PluginImportError" in proc.stderr and message in proc.stderr


def test_a_broken_package_plugin_names_the_submodules_file_and_line(tmp_path):
    package = package_plugin(tmp_path, "t_broken", "t_broken_cm")
    (package / "later.py").write_text("x = 1\n\nraise RuntimeError('half-written')\n")
    (package / "syntax.py").write_text("def f(:\n")
    proc = python(LIST, tmp_path, {"BENCH_PLUGINS": str(package)})
    assert proc.returncode != 0 and f"{package / 'later.py'}:3: RuntimeError: half-written" in proc.stderr
    (package / "later.py").unlink()
    proc = python(LIST, tmp_path, {"BENCH_PLUGINS": str(package)})
    assert f"{package / 'syntax.py'}:1: SyntaxError" in proc.stderr


# ------------------------------------------------------------------ entry points


def test_an_installed_distribution_is_found_by_its_entry_point(tmp_path):
    """A dist-info with ``[bench.plugins]`` (as ``pip install`` writes from a plugin's pyproject) is all it takes; the
    same package also given by path and in $BENCH_PLUGINS is imported once."""
    site = tmp_path / "site"
    package = package_plugin(site, "t_ep", "t_ep_cm", "t_ep_prot")
    info = site / "t_ep-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: t-ep\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[bench.plugins]\nt_ep = t_ep\n")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    assert names(python(LIST, tmp_path, env)) == ["t_ep_cm", "t_ep_prot"]
    proc = python(f"from bench.core import plugins; plugins.use({str(package)!r})\n" + LIST, tmp_path,
                  {**env, "BENCH_PLUGINS": str(package)})
    assert names(proc) == ["t_ep_cm", "t_ep_prot"] and proc.stdout.count("EXECUTED t_ep_cm") == 1


# ------------------------------------------------------------------ one import per file


def test_a_plugin_the_script_imported_first_or_later_is_imported_once(tmp_path):
    """Today's duplicate-name error: a script importing a module that $BENCH_PLUGINS also loads."""
    folder = tmp_path / "plugins"
    flat_plugin(folder, "t_once")
    code = ("import sys; sys.path.insert(0, {folder!r})\n{before}"
            "from bench.api import COUNTERMEASURES; COUNTERMEASURES.names()\n{after}" + LIST)
    for before, after in (("import t_once\n", ""), ("", "import t_once\n")):
        proc = python(code.format(folder=str(folder), before=before, after=after), tmp_path,
                      {"BENCH_PLUGINS": str(folder)})
        assert names(proc) == ["t_once"] and proc.stdout.count("EXECUTED t_once") == 1, proc.stdout


@pytest.fixture
def exec_file(monkeypatch):
    """Import a file as a module of a given name (in ``sys.modules`` as an import puts it, until the test ends)."""

    def run(path: Path, module_name: str, registry: Registry) -> types.ModuleType:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        module.REGISTRY = registry
        monkeypatch.setitem(sys.modules, module_name, module)
        spec.loader.exec_module(module)
        return module

    return run


SAME_NAME = ("from bench.core.components import Countermeasure\n\n"
             "@REGISTRY.register('alpha')\nclass A(Countermeasure):\n    pass\n")


def test_the_same_source_under_a_second_module_name_is_no_duplicate(tmp_path, exec_file):
    registry = Registry("countermeasure", Countermeasure)
    (tmp_path / "one.py").write_text(SAME_NAME)
    exec_file(tmp_path / "one.py", "first_name", registry)
    second = exec_file(tmp_path / "one.py", "second_name", registry)
    assert registry.get("alpha") is second.A


def test_two_classes_claiming_one_name_still_raise_naming_both_files(tmp_path, exec_file):
    registry = Registry("countermeasure", Countermeasure)
    for name in ("one", "two"):
        (tmp_path / f"{name}.py").write_text(SAME_NAME)
    exec_file(tmp_path / "one.py", "mod_one", registry)
    with pytest.raises(ValueError, match="duplicate countermeasure name 'alpha'") as info:
        exec_file(tmp_path / "two.py", "mod_two", registry)
    assert str(tmp_path / "one.py") in str(info.value) and str(tmp_path / "two.py") in str(info.value)


# ------------------------------------------------------------------ fingerprints


def test_built_in_specs_hold_no_code_and_their_keys_stay():
    """Cache keys of built-ins must not change: their version is their contract."""
    spec = COUNTERMEASURES.create("jpeg", quality=50).spec()
    assert spec == {"name": "jpeg", "version": COUNTERMEASURES.get("jpeg").version, "params": {"quality": 50}}
    assert make_key({"name": "jpeg", "version": 1, "params": {"quality": 50}}) == "6d6597773c925a80ab69854d"
    assert component_identity(COUNTERMEASURES.get("jpeg")) == {"name": "jpeg", "version": spec["version"], "code": None}


SPECS = ("from bench.core import plugins; from bench.api import COUNTERMEASURES; plugins.use({flat!r}, {package!r})\n"
         "print('CODE', *(COUNTERMEASURES.create(name).spec()['code'] for name in ('t_fp', 't_fp_cm')))\n")


def test_editing_a_plugin_changes_its_fingerprint_and_nothing_else_does(tmp_path):
    flat = flat_plugin(tmp_path / "flat", "t_fp")
    package = package_plugin(tmp_path / "pkgs", "t_fp_pkg", "t_fp_cm")

    def codes() -> list[str]:
        proc = python(SPECS.format(flat=str(flat), package=str(package)), tmp_path)
        assert proc.returncode == 0, proc.stderr
        return next(line for line in proc.stdout.splitlines() if line.startswith("CODE ")).split()[1:]

    before = codes()
    assert len(before) == 2 and all(len(code) == 64 for code in before) and codes() == before, "stable across runs"
    flat.write_text(flat.read_text() + "# an edit that keeps version\n")
    (package / "helper.py").write_text(HELPER + "# a helper's edit counts too\n")
    after = codes()
    assert after[0] != before[0] and after[1] != before[1]
    (flat.parent / "unrelated.py").write_text("x = 1\n")  # beside the file, never imported by it: no change
    assert codes() == after
    (flat.parent / "helper_t_fp.py").write_text(HELPER + "# the flat file's helper (import helper_t_fp)\n")
    assert codes()[0] != after[0], "a flat plugin's fingerprint must cover the helper it imports beside it"


CELL = ("from bench.core.components import Countermeasure\n"
        "class InCell(Countermeasure):\n    strength: int = 1\n\n    def purify(self, train, *, seed, device):\n"
        "        return train.with_images(255 - train.images)\n")


def define_in_module(source: str, filename: str | None) -> type:
    """Run ``source`` as a module without a file (a notebook's ``__main__``), with its lines in the line cache as a
    notebook keeps its cells' (``filename``), or nowhere (None)."""
    module = types.ModuleType("t_notebook")
    if filename:
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    sys.modules[module.__name__] = module
    try:
        exec(compile(source, filename or "<string>", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module.InCell


def test_a_notebooks_component_is_fingerprinted_from_its_cells_source():
    first = define_in_module(CELL, "<ipython-input-1>")
    again = define_in_module(CELL, "<ipython-input-2>")
    edited = define_in_module(CELL.replace("255 - train.images", "train.images // 2"), "<ipython-input-3>")
    assert len(code_fingerprint(first)) == 64 and code_fingerprint(again) == code_fingerprint(first)
    assert code_fingerprint(edited) != code_fingerprint(first)


def test_a_component_without_source_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="put it in a .py file"):
        code_fingerprint(define_in_module(CELL, None))


# ------------------------------------------------------------------ every worker gets the plugin set

SCRIPT = '''
import sys
from pathlib import Path
from typing import ClassVar

import t_imported  # registers t_imported by import, as a user's script does
from bench.api import COUNTERMEASURES, Countermeasure, ImageSet
from bench.core import plugins
from bench.execute.backends import BackendOptions
from bench.execute.scheduler import RunOptions, run_matrix
from bench.plan.matrix import load_matrix


@COUNTERMEASURES.register("t_main")
class Halve(Countermeasure):
    """Defined in the script itself (shipped to workers by value)."""
    stages: ClassVar[frozenset[str]] = frozenset({"data"})

    def purify(self, train: ImageSet, *, seed, device) -> ImageSet:
        return train.with_images(train.images // 2)


if __name__ == "__main__":
    plugins.use(sys.argv[4])  # a package folder, loaded by its path (not importable by name in a worker)
    run_matrix(load_matrix(sys.argv[1]), RunOptions(results=Path(sys.argv[2]), jobs=2, device="cpu",
                                                    backend=BackendOptions(sys.argv[3])))
'''

SCRIPT_CELLS = """
seeds = [0]
[recipe]
name = "quick"
epochs = 1
[datasets.digits]
per_class = 10
test_per_class = 5
[protections]
clean = {}
[countermeasures]
t_imported = {}
t_main = {}
t_used_cm = {}
[victims.cnn]
width = 8
"""


ALL_OK = {"t_imported": "ok", "t_main": "ok", "t_used_cm": "ok"}


def run_script(tmp_path: Path, backend: str) -> dict[str, str]:
    """The script above on a 3-cell matrix with ``jobs=2``: each cell's status (and its error)."""
    flat_plugin(tmp_path, "t_imported")
    package = package_plugin(tmp_path / "elsewhere", "t_used", "t_used_cm")
    (tmp_path / "script.py").write_text(SCRIPT)
    matrix = tiny_matrix(tmp_path, "cells", text=SCRIPT_CELLS)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("BENCH_PLUGINS", None)
    proc = subprocess.run([PY, "script.py", str(matrix), str(tmp_path / "r"), backend, str(package)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / "r" / "runs" / "cells" / "records.jsonl").read_text().splitlines()
    return {r["countermeasure"]: r["status"] + (r.get("error") or "")[-500:] for r in map(json.loads, lines)}


def test_a_script_registered_component_runs_with_jobs_2(tmp_path):
    """Used to fail with "unknown countermeasure": the joblib workers never imported the script's components."""
    assert run_script(tmp_path, "local") == ALL_OK


@pytest.mark.slow  # each job is a fresh interpreter: ~40 s
@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="pip install -e '.[cluster]'")
def test_a_script_registered_component_runs_on_submitit(tmp_path):
    assert run_script(tmp_path, "submitit") == ALL_OK


@pytest.mark.slow  # a local Ray instance: ~40 s
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="pip install -e '.[cluster]'")
def test_a_script_registered_component_runs_on_ray(tmp_path):
    assert run_script(tmp_path, "ray") == ALL_OK


def test_ray_workers_get_the_drivers_bench_variables(monkeypatch):
    from bench.execute.backends import worker_env

    monkeypatch.setenv("BENCH_PLUGINS", "/somewhere/plugins")
    monkeypatch.setenv("OTHER_VARIABLE", "x")
    env = worker_env()
    assert env["BENCH_PLUGINS"] == "/somewhere/plugins" and "OTHER_VARIABLE" not in env
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


ONE_CELL = SCRIPT_CELLS.replace("t_imported = {}\nt_main = {}\nt_used_cm = {}", "t_edited = {}")


def test_editing_a_plugin_without_its_version_retrains_its_cell(tmp_path):
    """Keys used to hold only parameters and version: the rerun said "recorded, 0 to train" after an edit."""
    plugin = tmp_path / "plugins" / "t_edited.py"
    plugin.parent.mkdir()
    plugin.write_text(COUNTERMEASURE.format(name="t_edited", helper_import="import types\n"
                                            "helper = types.SimpleNamespace(transform=lambda images: 255 - images)"))
    matrix = tiny_matrix(tmp_path, "edited", text=ONE_CELL)
    args = ["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--jobs", "1", "--device", "cpu"]
    env = {"BENCH_PLUGINS": str(plugin.parent)}
    log = tmp_path / "r" / "runs" / "edited" / "records.jsonl"
    for edit in ("", "", "# an edit that keeps version\n"):
        plugin.write_text(plugin.read_text() + edit)
        proc = run_subprocess(args, tmp_path, env)
        assert proc.returncode == 0, proc.stderr
    cells = [json.loads(line)["cell"] for line in log.read_text().splitlines()]
    assert len(cells) == 2 and len(set(cells)) == 2, "the unchanged rerun trained nothing, the edited one retrained"
