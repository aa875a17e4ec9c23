"""Plugin discovery: which modules are imported so that their components register, once per process.

Sources, in this order: the built-in packages (``bench.protections``, ``bench.countermeasures``, ``bench.victims``),
the entry-point group ``bench.plugins`` of installed distributions, ``$BENCH_PLUGINS`` (``os.pathsep``-separated
specs) and the specs given to ``use`` (``bench run --plugins``). A spec is:

- a ``.py`` file: imported as the top-level module named after it, its folder appended to ``sys.path`` so that it may
  ``import helper`` from a file beside it (under a private name where another module already has that name);
- a package folder (it has ``__init__.py``): imported as the package named after the folder, then its non-underscore
  submodules (as the built-ins are); its helpers are ``from . import helper``;
- any other folder: each of its non-underscore ``.py`` files and package sub-folders, as above;
- else a dotted module name (a package's non-underscore submodules are imported too), as an entry point's value is.

A file reached twice (an entry point, ``--plugins`` and ``$BENCH_PLUGINS``, or a script that imported it first) is
imported once. A failed import raises ``PluginImportError`` naming the file and line, then on every later registry
call. Workers load the driver's set before each job (``active`` in the driver, ``ensure`` in the worker).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import sys
import traceback
import types
from pathlib import Path

from bench.core.registry import PluginImportError, code_fingerprint, is_builtin, registries

BUILTIN = ("bench.protections", "bench.countermeasures", "bench.victims")
GROUP = "bench.plugins"
ENV = "BENCH_PLUGINS"
_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclasses.dataclass
class _State:
    phase: str = "todo"  # todo → running → done | failed
    error: PluginImportError | None = None
    pending: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (spec, where it was given)
    loaded: dict[str, str] = dataclasses.field(default_factory=dict)  # module name → its file, plugins only


_STATE = _State()


def use(*specs: str | os.PathLike[str]) -> None:
    """Add plugin specs (files, package folders, folders of plugins, module names) to this process's plugin set.

    Loaded with the rest on the first registry call, or at the next one where discovery has already run. Example::

        import bench
        bench.use("my_methods/")          # as `bench run --plugins my_methods/`
        bench.COUNTERMEASURES.names()     # now lists them
    """
    _STATE.pending.extend((os.fspath(spec), "--plugins") for spec in specs)


def discover() -> None:
    """Import the plugin set (the built-ins first); later calls load only specs ``use`` added since.

    A plugin that looks a name up while it is imported sees the registrations made so far (the ``running`` phase).
    """
    if _STATE.phase == "failed":
        raise _STATE.error  # type: ignore[misc]
    if _STATE.phase == "running" or (_STATE.phase == "done" and not _STATE.pending):
        return
    first, _STATE.phase = _STATE.phase == "todo", "running"
    try:
        if first:
            for name in BUILTIN:
                _import_package(_import_module(name, f"built-in package {name}"))
            for entry in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
                dist = getattr(entry.dist, "name", "?")
                _load_module(entry.module, f"entry point {entry.name} = {entry.value!r} of {dist} (group {GROUP})")
            _STATE.pending[:0] = [(spec, f"${ENV}") for spec in os.environ.get(ENV, "").split(os.pathsep) if spec]
        while _STATE.pending:
            _load(*_STATE.pending.pop(0))
    except PluginImportError as err:
        _STATE.phase, _STATE.error = "failed", err
        raise
    _STATE.phase = "done"


def loaded() -> dict[str, str]:
    """Module name → file of every plugin module discovery imported (built-ins excluded)."""
    return dict(_STATE.loaded)


# ---------------------------------------------------------------- loading one spec

def _load(spec: str, given: str) -> None:
    path = Path(os.path.abspath(os.path.expanduser(spec)))
    if not path.exists() and _MODULE_NAME.fullmatch(spec) and not spec.endswith(".py"):
        _load_module(spec, f"{given} {spec}")
    elif path.is_file() and path.suffix == ".py":
        _load_file(path)
    elif (path / "__init__.py").is_file():
        _load_package(path)
    elif path.is_dir():
        for child in sorted(path.iterdir()):
            if child.name.startswith(("_", ".")):
                continue
            if child.suffix == ".py" and child.is_file():
                _load_file(child)
            elif (child / "__init__.py").is_file():
                _load_package(child)
    else:
        raise PluginImportError(f"{given} {spec}: no such .py file, folder or importable module name; give a "
                                "plugin file, a package folder, a folder of plugins or a dotted module name")


def _load_file(path: Path) -> None:
    if _already(path):
        return
    private = f"bench_plugin_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{hashlib.sha256(bytes(path)).hexdigest()[:8]}"
    name = path.stem if _free(path.stem, path) else private
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))  # after installed modules, so that a helper never shadows one
    _exec(name, path)


def _load_package(folder: Path) -> None:
    init = folder / "__init__.py"
    module = _already(init)
    if module is None:
        name = folder.name
        if not _free(name, init):
            taken = getattr(sys.modules.get(name), "__file__", None) or _find_origin(name)
            raise PluginImportError(f"plugin package {folder}: the name {name!r} is already taken by {taken}; rename "
                                    "the folder, or uninstall (or stop importing) the other package")
        module = _exec(name, init, package=True)
    _import_package(module)


def _load_module(name: str, given: str) -> None:
    module = _import_module(name, given)
    _STATE.loaded.setdefault(name, getattr(module, "__file__", None) or "")
    if hasattr(module, "__path__"):
        _import_package(module)


def _import_package(package: types.ModuleType) -> None:
    """Import a package's non-underscore submodules (one level: a sub-package imports its own)."""
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            module = _import_module(f"{package.__name__}.{info.name}", f"plugin module {package.__name__}")
            if not package.__name__.startswith("bench."):
                _STATE.loaded.setdefault(module.__name__, getattr(module, "__file__", None) or "")


def _import_module(name: str, given: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(f"{err.name}.")):
            raise PluginImportError(f"{given}: no module named {err.name!r} (nor a file or folder {name!r}); install "
                                    "it, or give the path of the plugin's file or folder") from err
        raise _import_error(err, _root(name)) from err
    except Exception as err:
        raise _import_error(err, _root(name)) from err


def _root(name: str) -> str | None:
    """The file of module ``name``, or its package's folder (where an import error's frame is looked for)."""
    origin = _find_origin(name.partition(".")[0])
    return str(Path(origin).parent) if origin and origin.endswith("__init__.py") else origin


def _exec(name: str, file: Path, package: bool = False) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, file,
                                                  submodule_search_locations=[str(file.parent)] if package else None)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(name, None)
        raise _import_error(err, str(file.parent if package else file)) from err
    _STATE.loaded[name] = str(file)
    return module


def _already(file: Path) -> types.ModuleType | None:
    """The module already imported from ``file`` under any name (a script's ``__main__`` included), if one is."""
    real = file.resolve()
    for module in list(sys.modules.values()):
        other = getattr(module, "__file__", None)  # the base name first: sys.modules holds thousands
        if other and os.path.basename(other) == file.name and Path(other).resolve() == real:
            if module.__name__ != "__main__":
                _STATE.loaded.setdefault(module.__name__, str(file))
            return module
    return None


def _free(name: str, file: Path) -> bool:
    """Whether ``name`` may be given to the module of ``file``: a valid name that no other module has or would get."""
    if not name.isidentifier() or name in sys.modules:
        return False
    found = _find_origin(name)
    return found is None or Path(found).resolve() == file.resolve()


def _find_origin(name: str) -> str | None:
    """The file ``import name`` would load (the name itself for a module without one), None if nothing would."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    return None if spec is None else spec.origin if spec.origin and spec.has_location else name


def _import_error(err: BaseException, root: str | None) -> PluginImportError:
    """The error naming the plugin's file and line: the deepest frame under ``root`` (the plugin's file or folder)."""
    if isinstance(err, SyntaxError) and err.filename:
        where = f"{err.filename}:{err.lineno}"
    else:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith("<frozen")]
        under = [f for f in frames if root and _inside(f.filename, root)]
        frame = (under or frames or [None])[-1]
        where = f"{frame.filename}:{frame.lineno}" if frame else (root or "?")
    return PluginImportError(f"could not import plugin module {where}: {type(err).__name__}: {err}; fix or remove "
                             "that file (bench imports every non-underscore module of its plugin folders and packages)")


def _inside(filename: str, root: str) -> bool:
    file, top = Path(filename).resolve(), Path(root).resolve()
    return file == top or top in file.parents


# ---------------------------------------------------------------- the same set in every worker

@dataclasses.dataclass(frozen=True)
class PluginSet:
    """What a worker loads before a job so that it knows the driver's components: the driver's ``sys.path``, the
    modules that hold its non-built-in components or were loaded as plugins (name, file), and the components
    defined in ``__main__`` (a script's or a notebook's), cloudpickled by value with the kind they register as."""

    path: tuple[str, ...] = ()
    modules: tuple[tuple[str, str], ...] = ()
    by_value: bytes = b""


def active() -> PluginSet:
    """The driver's plugin set now: what discovery loaded and every module a registered component comes from."""
    discover()
    modules, by_value = loaded(), []
    for registry in registries():
        for cls in registry.classes().values():
            file = getattr(sys.modules.get(cls.__module__), "__file__", None)
            if is_builtin(cls):
                continue
            if cls.__module__ in ("__main__", "__mp_main__") or not file:
                code_fingerprint(cls)  # kept on the class: the worker cannot read the driver's __main__
                by_value.append((registry.kind, cls))
            else:
                modules.setdefault(cls.__module__, file)
    ordered = tuple(sorted(modules.items(), key=lambda item: item[0].count(".")))  # packages before submodules
    path = tuple(entry or os.getcwd() for entry in sys.path)  # "" (python -c, -m): the driver's folder
    return PluginSet(path, ordered, cloudpickle().dumps(by_value) if by_value else b"")


_ENSURED: set[int] = set()


def ensure(plugins: PluginSet) -> None:
    """Load ``plugins`` in this process (a worker), once per distinct set; a no-op where the driver runs the job."""
    if hash(plugins) in _ENSURED:
        return
    sys.path.extend(p for p in plugins.path if p not in sys.path)
    discover()
    for name, file in plugins.modules:
        if name in sys.modules or (file and _already(Path(file))):
            continue
        origin = _find_origin(name)
        if not file or (origin and Path(origin).resolve() == Path(file).resolve()):
            _import_module(name, f"plugin module {name} (loaded by the driver)")
        else:
            _exec(name, Path(file), package=Path(file).name == "__init__.py")
    for kind, cls in cloudpickle().loads(plugins.by_value) if plugins.by_value else ():
        registry = next(r for r in registries() if r.kind == kind and issubclass(cls, r.base))
        registry.register(cls.name)(cls)
    _ENSURED.add(hash(plugins))


def cloudpickle() -> types.ModuleType:
    """cloudpickle (pickles ``__main__``'s classes by value): a dependency of joblib ≥ 1.5, vendored by older ones."""
    try:
        import cloudpickle
    except ImportError:
        from joblib.externals import cloudpickle  # type: ignore[no-redef]
    return cloudpickle
