"""What a component's code is: whether it ships with bench, where it is defined, and a fingerprint of its source
that a plugin's cache keys hold, so that editing its code without bumping ``version`` is never served stale results.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import sys
from pathlib import Path
from typing import Any


def is_builtin(cls: type) -> bool:
    """Whether ``cls`` ships with bench (its module is under ``bench``): its ``version`` is then its contract."""
    return cls.__module__.partition(".")[0] == "bench"


def origin(cls: type) -> str:
    """``file:qualname`` where ``cls`` is defined (``module:qualname`` without a file); a class shipped by value to a
    worker keeps the origin it was registered with."""
    if "_bench_origin" in cls.__dict__:
        return cls.__dict__["_bench_origin"]
    file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    return f"{Path(file).resolve() if file else cls.__module__}:{cls.__qualname__}"


def code_fingerprint(cls: type) -> str | None:
    """sha256 of the source a component is made of; None for a built-in.

    That is every ``.py`` file (by relative path) of its top-level package, or its module's file, or for a class
    defined in ``__main__`` the script's file, else (a notebook) the class's own source. Computed once per class and
    kept on it, so that a class shipped by value to a worker keeps it.
    """
    if is_builtin(cls):
        return None
    if "_bench_code" not in cls.__dict__:
        cls._bench_code = _source_digest(cls)  # type: ignore[attr-defined]
    return cls.__dict__["_bench_code"]


def component_identity(cls: Any) -> dict[str, Any]:
    """``{"name", "version", "code"}`` of a component class, for records (``code`` is None for a built-in)."""
    return {"name": cls.name, "version": cls.version, "code": code_fingerprint(cls)}


_DIGESTS: dict[Path, str] = {}  # a package's or file's digest, once per process: the code this process imported


def _source_digest(cls: type) -> str:
    parts = cls.__module__.split(".")
    packages = (sys.modules.get(".".join(parts[:i])) for i in range(1, len(parts) + 1))
    # the outermost regular package (a namespace package has no __file__ and may span many distributions)
    root = next((Path(p.__file__).parent for p in packages if getattr(p, "__file__", None) and hasattr(p, "__path__")),
                None)
    file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if root is None and file and Path(file).is_file():
        root = Path(file)
    if root is not None:
        if root not in _DIGESTS:
            base = root if root.is_dir() else root.parent
            files = sorted(root.rglob("*.py")) if root.is_dir() else _beside(root)
            digest = hashlib.sha256()
            for path in files:
                if "__pycache__" not in path.parts:
                    digest.update(f"{path.relative_to(base).as_posix()}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n"
                                  .encode())
            _DIGESTS[root] = digest.hexdigest()
        return _DIGESTS[root]
    try:
        return hashlib.sha256(_class_source(cls).encode()).hexdigest()
    except (OSError, TypeError) as err:
        from bench.core.registry import ConfigError  # registry imports this module

        raise ConfigError(f"{getattr(cls, 'name', '') or cls.__qualname__} ({cls.__module__}): bench cannot read its "
                          "source code, which its cache keys hold so that an edit is never served stale results; put "
                          "it in a .py file and import it (or pass the file with --plugins / bench.use)") from err


def _beside(file: Path) -> list[Path]:
    """A top-level module's file and, transitively, the modules and packages beside it that it imports (its folder
    is on ``sys.path``, so ``import helper`` finds ``helper.py``): read from the source, the same in every process."""
    found: dict[Path, None] = {}
    todo = [file]
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found[path] = None
        if path.is_dir():
            todo += sorted(path.rglob("*.py"))
            continue
        try:
            tree = ast.parse(path.read_text(), str(path))
        except (OSError, SyntaxError, ValueError):
            continue
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module]
        for top in {name.partition(".")[0] for name in names}:
            for candidate in (file.parent / f"{top}.py", file.parent / top):
                if candidate.is_file() or (candidate / "__init__.py").is_file():
                    todo.append(candidate)
    return sorted(p for p in found if p.is_file())


def _class_source(cls: type) -> str:
    """The class's source; in a notebook (no ``__main__.__file__``, so no class source) its annotations and the
    sources of the methods it defines, which the cells' line cache holds."""
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        own = {k: getattr(v, "__func__", getattr(v, "fget", v)) for k, v in vars(cls).items()}
        # dataclass's generated dunders have no source; the rest do where the notebook keeps its cells
        methods = {k: f for k, f in own.items() if inspect.isfunction(f) and (not k.startswith("__") or
                                                                              k == "__post_init__")}
        if not methods:
            raise
        return "\n".join([cls.__qualname__, repr(own.get("__annotations__")),
                          *(inspect.getsource(methods[k]) for k in sorted(methods))])
