"""Properties of the cache's entries that other code and users rely on: the manifest's fields and file names, the
errors that say what is wrong with an entry, where damaged entries go and what the user is told, replace and keep
semantics, the entry folder's mode, and the cleanup of deleted entries (mutation testing, issue 39)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sklearn
import torch
import torchvision

from bench.core.components import ImageSet
from bench.store import cache as module
from bench.store.cache import Cache, checked_manifest, read_entry, save_model, verify


def image_set(seed: int = 0, n: int = 6, classes: int = 3) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 4, 4), generator=gen, dtype=torch.uint8)
    return ImageSet(images, torch.randint(0, classes, (n,), generator=gen), classes)


def model(width: int = 3, arch: Any = None) -> torch.nn.Module:
    layer = torch.nn.Linear(width, width)
    if arch is not None:
        layer.arch = arch
    return layer


def rewrite_manifest(folder: Path, manifest: Any) -> None:
    """Write ``manifest`` as the entry's manifest with a matching ``manifest.sha256`` (a consistent entry)."""
    raw = json.dumps(manifest).encode()
    (folder / "manifest.json").write_bytes(raw)
    (folder / "manifest.sha256").write_text(f"{hashlib.sha256(raw).hexdigest()}  manifest.json\n")


def edited(folder: Path, change: Callable[[dict[str, Any]], None]) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    rewrite_manifest(folder, manifest)


def aside(cache: Cache, kind: str = "protected") -> list[Path]:
    return sorted((cache.root / kind / ".damaged").iterdir())


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache")


# ------------------------------------------------------------------ what an entry holds


def test_the_manifest_records_what_readers_look_up(cache: Cache) -> None:
    """manifest.json holds kind, key, classes, shape, dtype, creation time, library versions, checksums, models and
    the caller's meta (a non-JSON value such as a path as its text), pretty-printed for people who inspect it."""
    before = time.time()
    cache.save("protected", "k", image_set(), {"seed": 3, "source": Path("/data/x")},
               models={"generator": model(arch={"width": 3})})
    folder = cache.path("protected", "k")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("kind", "key", "num_classes", "shape", "dtype", "seed", "source")} == {
        "kind": "protected", "key": "k", "num_classes": 3, "shape": [6, 1, 4, 4], "dtype": "uint8", "seed": 3,
        "source": "/data/x"}
    assert before <= manifest["created"] <= time.time()
    assert manifest["versions"] == {"python": platform.python_version(), "torch": torch.__version__,
                                    "torchvision": torchvision.__version__, "numpy": np.__version__,
                                    "scikit-learn": sklearn.__version__}
    assert manifest["models"] == {"generator": {"file": "generator.pt", "arch": {"width": 3}}}
    assert sorted(manifest["sha256"]) == ["generator.pt", "images.npy", "labels.npy"]
    assert sorted(p.name for p in folder.iterdir()) == ["generator.pt", "images.npy", "labels.npy", "manifest.json",
                                                        "manifest.sha256"]
    assert (folder / "manifest.json").read_text().count("\n") > 10  # one field a line, not one long line


def test_a_saved_model_file_holds_its_state_dict(tmp_path: Path) -> None:
    """``<kind>.pt`` is the model's state_dict, which a rebuilt model of the same arch loads."""
    fitted = model(arch={"width": 3})
    assert save_model(tmp_path, "classifier", fitted) == {"file": "classifier.pt", "arch": {"width": 3}}
    state = torch.load(tmp_path / "classifier.pt")
    assert sorted(state) == ["bias", "weight"] and torch.equal(state["weight"], fitted.weight.detach())


@pytest.mark.parametrize("arch", [None, "wide"], ids=["no arch", "arch not a dict"])
def test_a_model_without_an_arch_dict_is_refused_with_the_fix(tmp_path: Path, arch: Any) -> None:
    """A fitted model without an ``arch`` dict cannot be rebuilt: the error names the model and says what to add."""
    with pytest.raises(TypeError, match=re.escape(
            "the fitted 'generator' model (Linear) has no `arch` dict; give it one, from which the component's "
            "build_model(kind, arch) rebuilds it")):
        save_model(tmp_path, "generator", model(arch=arch))
    assert list(tmp_path.iterdir()) == []


def test_an_entry_folder_follows_the_umask_not_mkdtemp(cache: Cache) -> None:
    """Other users of a shared results folder can read entries: the folder's mode is 0777 less the umask."""
    old = os.umask(0o027)
    try:
        cache.save("dataset", "d", image_set(), {})
    finally:
        os.umask(old)
    assert cache.path("dataset", "d").stat().st_mode & 0o7777 == 0o750


def test_images_are_read_as_copy_on_write_memory_maps(cache: Cache) -> None:
    """A large set is not read into memory: images are a copy-on-write map, so writing to them leaves the entry."""
    cache.save("dataset", "d", image_set(), {})
    _, images, _ = read_entry(cache.path("dataset", "d"))
    assert isinstance(images, np.memmap) and images.mode == "c"
    images[...] = 0
    assert cache.valid("dataset", "d") and torch.equal(cache.load("dataset", "d").images, image_set().images)


# ------------------------------------------------------------------ replace, keep, and delete


def test_replace_rebuilds_the_entry_and_leaves_no_old_folder(cache: Cache) -> None:
    """``save(replace=True)`` swaps a valid entry for the new one, and nothing of the old one stays behind."""
    cache.save("purified", "k", image_set(seed=1), {"writer": "first"})
    cache.save("purified", "k", image_set(seed=2), {"writer": "second"}, replace=True)
    assert cache.manifest("purified", "k")["writer"] == "second"
    assert torch.equal(cache.load("purified", "k").images, image_set(seed=2).images)
    assert [p.name for p in (cache.root / "purified").iterdir()] == ["k"]


def test_write_keeps_a_valid_entry_unless_asked_to_replace(cache: Cache) -> None:
    """``write`` without ``replace`` keeps the valid entry already at the key (a concurrent writer's)."""
    def fill(seed: int) -> Callable[[Path], tuple[int, list[int]]]:
        def write(folder: Path) -> tuple[int, list[int]]:
            data = image_set(seed)
            np.save(folder / "images.npy", data.images.numpy())
            np.save(folder / "labels.npy", data.labels.numpy())
            return data.num_classes, list(data.images.shape)
        return write

    cache.write("dataset", "d", fill(1), {"writer": "first"})
    cache.write("dataset", "d", fill(2), {"writer": "second"})
    assert cache.manifest("dataset", "d")["writer"] == "first"
    cache.write("dataset", "d", fill(2), {"writer": "third"}, replace=True)
    assert cache.manifest("dataset", "d")["writer"] == "third"


def test_a_deletion_cut_short_leaves_a_folder_that_sweep_recognises(cache: Cache, monkeypatch) -> None:
    """The replaced entry is first moved, whole, into a ``.old-<key>~…~<pid>@…`` folder of this writer beside it, so
    that a deletion cut short leaves litter that ``sweep`` removes once the writer is gone."""
    cache.save("purified", "k", image_set(seed=1), {"writer": "first"})
    rmtree = shutil.rmtree

    def cut_short(path: Any, *args: Any, **kwargs: Any) -> None:
        if path is not None and Path(path).name.startswith(".old-"):
            return
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", cut_short)
    cache.save("purified", "k", image_set(seed=2), {"writer": "second"}, replace=True)
    monkeypatch.undo()
    [old] = [p for p in (cache.root / "purified").iterdir() if p.name != "k"]
    assert old.name.startswith(".old-k~") and re.search(rf"~{os.getpid()}@[^~]*$", old.name)
    [entry] = old.iterdir()
    assert json.loads((entry / "manifest.json").read_text())["writer"] == "first"
    assert [key for key, _ in cache.entries("purified")] == ["k"]


def test_a_cache_writes_nothing_to_the_system_temp_folder(cache: Cache, tmp_path: Path, monkeypatch) -> None:
    """Saves and replacements work in the cache's own folder: an unusable system temp folder does not matter."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-temp-folder"))
    cache.save("purified", "k", image_set(seed=1), {})
    cache.save("purified", "k", image_set(seed=2), {}, replace=True)
    assert torch.equal(cache.load("purified", "k").images, image_set(seed=2).images)


def test_a_concurrent_writers_entry_with_the_models_is_kept(cache: Cache, capsys) -> None:
    """A second save of an entry with the same models finds a valid one in the way and keeps it: nothing moved aside."""
    for _ in range(2):
        cache.save("protected", "k", image_set(), {}, models={"generator": model(arch={"width": 3})})
    assert cache.valid("protected", "k", ("generator",))
    assert not (cache.root / "protected" / ".damaged").exists() and capsys.readouterr().err == ""
    assert [p.name for p in (cache.root / "protected").iterdir()] == ["k"]


def test_an_entry_lacking_models_of_its_rebuild_is_moved_aside_naming_them(cache: Cache, capsys) -> None:
    """The entry in the way of a save with models it lacks is moved aside; stderr names the missing models."""
    cache.save("protected", "k", image_set(), {})
    cache.save("protected", "k", image_set(), {}, models={"generator": model(arch={}), "classifier": model(arch={})})
    assert cache.valid("protected", "k", ("classifier", "generator"))
    assert "(it holds no classifier, generator model, which its rebuild has)" in capsys.readouterr().err
    assert len(aside(cache)) == 1


def test_a_damaged_entry_that_cannot_be_moved_aside_stops_the_save(cache: Cache, capsys) -> None:
    """When what is in the way neither verifies nor can be moved aside, the save gives up after one retry with an
    OSError that names the path and says to remove it; the user is told once per try, and no temporary folder stays."""
    folder = cache.path("protected", "k")
    folder.mkdir(parents=True)
    (folder / "junk").write_text("x")
    (cache.root / "protected" / ".damaged").write_text("a file in the way")
    with pytest.raises(OSError, match=re.escape(f"cannot put cache entry {folder} in place: something that does not "
                                                "verify keeps reappearing there; remove it and rerun")) as raised:
        cache.save("protected", "k", image_set(), {})
    assert raised.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    out, err = capsys.readouterr()
    assert out == "" and err.count(f"bench: cache entry {folder} did not verify (") == 2
    assert err.count("and cannot be moved aside ([Errno 17] File exists") == 2 and err.count("move it away by hand\n") == 2
    assert sorted(p.name for p in (cache.root / "protected").iterdir()) == [".damaged", "k"]


# ------------------------------------------------------------------ moving aside


def test_damaged_entries_go_to_damaged_named_by_key_and_time(cache: Cache, capsys) -> None:
    """Each damaged entry is moved to ``.damaged/<key>-<YYYYmmddTHHMMSS>-<6 hex>`` (the folder made once, reused),
    and stderr names where it went and that it is rebuilt."""
    for key in ("a", "b"):
        cache.save("dataset", key, image_set(), {})
        (cache.path("dataset", key) / "labels.npy").write_bytes(b"damaged")
        assert cache.load("dataset", key) is None
    names = [p.name for p in aside(cache, "dataset")]
    assert [name[:2] for name in names] == ["a-", "b-"]
    assert all(re.fullmatch(r"[ab]-\d{8}T\d{6}-[0-9a-f]{6}", name) for name in names), names
    assert abs(time.mktime(time.strptime(names[0][2:17], "%Y%m%dT%H%M%S")) - time.time()) < 120
    err = capsys.readouterr().err
    for path in aside(cache, "dataset"):
        assert (f"did not verify (checksum mismatch in labels.npy): moved to {path}, kept for inspection (corrupted, "
                "incomplete or outdated); rebuilding it\n") in err


def test_an_entry_copied_to_another_key_names_whose_manifest_it_has(cache: Cache) -> None:
    """An entry copied to another key is not that key's: the error names the kind and key its manifest is of."""
    cache.save("protected", "a", image_set(), {})
    shutil.copytree(cache.path("protected", "a"), cache.path("protected", "b"))
    with pytest.raises(ValueError, match="^its manifest is the one of protected/a$"):
        cache.manifest("protected", "b")
    assert not cache.has("protected", "b") and cache.has("protected", "a")


# ------------------------------------------------------------------ what does not verify, and why


def test_what_is_no_entry_folder_is_named(cache: Cache) -> None:
    """checked_manifest tells a missing entry from a file where an entry should be."""
    folder = cache.root / "dataset" / "d"
    with pytest.raises(ValueError, match="^nothing there$"):
        checked_manifest(folder)
    folder.parent.mkdir(parents=True)
    folder.write_text("a file")
    with pytest.raises(ValueError, match="^not a folder$"):
        checked_manifest(folder)


def test_a_missing_manifest_is_named_with_the_reason(cache: Cache) -> None:
    cache.save("dataset", "d", image_set(), {})
    (cache.path("dataset", "d") / "manifest.json").unlink()
    with pytest.raises(ValueError, match="^manifest.json unreadable: No such file or directory$"):
        checked_manifest(cache.path("dataset", "d"))


def test_a_checksum_file_of_binary_garbage_is_a_mismatch(cache: Cache) -> None:
    """A manifest.sha256 that is not text (a damaged disk block) reads as a checksum that does not match."""
    cache.save("dataset", "d", image_set(), {})
    (cache.path("dataset", "d") / "manifest.sha256").write_bytes(b"\xff\xfe\x80 garbage\n")
    with pytest.raises(ValueError, match="^manifest.json does not match manifest.sha256: edited or damaged$"):
        checked_manifest(cache.path("dataset", "d"))


@pytest.mark.parametrize("manifest, problem", [
    (b"{not json", "manifest.json is not JSON: "),
    ([1, 2], "manifest.json is not an entry's manifest"),
    ({"models": {}}, "manifest.json is not an entry's manifest"),
    ({"sha256": "abc", "models": {}}, "manifest.json is not an entry's manifest"),
    ({"sha256": {}, "models": []}, "manifest.json is not an entry's manifest"),
], ids=["not JSON", "a list", "no checksums", "checksums not a dict", "models not a dict"])
def test_a_checksummed_manifest_that_is_no_entrys_is_named(cache: Cache, manifest: Any, problem: str) -> None:
    cache.save("dataset", "d", image_set(), {})
    folder = cache.path("dataset", "d")
    if isinstance(manifest, bytes):
        (folder / "manifest.json").write_bytes(manifest)
        (folder / "manifest.sha256").write_text(f"{hashlib.sha256(manifest).hexdigest()}  manifest.json\n")
    else:
        rewrite_manifest(folder, manifest)
    with pytest.raises(ValueError, match="^" + re.escape(problem)):
        checked_manifest(folder)


def test_a_manifest_without_a_models_field_is_an_entry_without_models(cache: Cache) -> None:
    """``models`` is optional in a manifest: an entry without it verifies, loads, and holds no model."""
    cache.save("dataset", "d", image_set(), {})
    folder = cache.path("dataset", "d")
    edited(folder, lambda m: m.pop("models"))
    assert "models" not in verify(folder)
    assert cache.valid("dataset", "d") and not cache.valid("dataset", "d", ("generator",))
    assert torch.equal(cache.load("dataset", "d").images, image_set().images)
    cache.save("dataset", "d", image_set(), {}, models={"generator": model(arch={})})  # the rebuild with the model
    assert cache.valid("dataset", "d", ("generator",))


def test_a_damaged_model_file_fails_verification(cache: Cache) -> None:
    """Model files are verified like the images: one flipped byte and the entry does not verify."""
    cache.save("protected", "k", image_set(), {}, models={"generator": model(arch={})})
    path = cache.path("protected", "k") / "generator.pt"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="^checksum mismatch in generator.pt$"):
        verify(cache.path("protected", "k"))


@pytest.mark.parametrize("file", ["../images.npy", "sub/generator.pt", 3])
def test_a_manifest_naming_a_file_outside_the_entry_is_refused(cache: Cache, file: Any) -> None:
    cache.save("protected", "k", image_set(), {}, models={"generator": model(arch={})})
    folder = cache.path("protected", "k")
    digest = hashlib.sha256((folder / "images.npy").read_bytes()).hexdigest()
    edited(folder, lambda m: (m["models"]["generator"].update(file=file), m["sha256"].update({str(file): digest})))
    with pytest.raises(ValueError, match=re.escape(f"manifest.json names a file {file!r} outside the entry")):
        verify(folder)


def test_a_file_without_a_checksum_is_named_with_the_error(cache: Cache) -> None:
    cache.save("dataset", "d", image_set(), {})
    edited(cache.path("dataset", "d"), lambda m: m["sha256"].pop("labels.npy"))
    with pytest.raises(ValueError, match="^KeyError: 'labels.npy'$"):
        verify(cache.path("dataset", "d"))


def entry_written(cache: Cache, images: np.ndarray, labels: np.ndarray, shape: list[int] | None = None,
                  num_classes: Any = 3) -> Path:
    """An entry written with these arrays (checksums consistent) and the shape/classes its writer reports."""
    def fill(folder: Path) -> tuple[Any, list[int]]:
        np.save(folder / "images.npy", images)
        np.save(folder / "labels.npy", labels)
        return num_classes, list(images.shape) if shape is None else shape

    cache.write("dataset", "d", fill, {})
    return cache.path("dataset", "d")


IMAGES, LABELS = np.zeros((4, 1, 2, 2), np.uint8), np.zeros(4, np.int64)


@pytest.mark.parametrize("images, labels, shape, num_classes", [
    (IMAGES.astype(np.float32), LABELS, None, 3),
    (IMAGES, LABELS, [5, 1, 2, 2], 3),
    (IMAGES, LABELS.astype(np.float32), None, 3),
    (IMAGES, LABELS[:3], None, 3),
    (IMAGES, LABELS, None, 3.0),
], ids=["float images", "shape not the manifest's", "float labels", "one label short", "classes not an int"])
def test_arrays_that_do_not_match_the_manifest_are_refused(cache: Cache, images: np.ndarray, labels: np.ndarray,
                                                          shape: list[int] | None, num_classes: Any, capsys) -> None:
    """Each mismatch alone makes the entry fail: load moves it aside and says why."""
    folder = entry_written(cache, images, labels, shape, num_classes)
    with pytest.raises(ValueError, match="^stored images or labels do not match the manifest$"):
        read_entry(folder)
    assert cache.load("dataset", "d") is None
    assert "(stored images or labels do not match the manifest)" in capsys.readouterr().err


def test_arrays_that_cannot_be_read_are_an_error_naming_the_cause(cache: Cache, monkeypatch) -> None:
    """An I/O error reading the arrays is a ValueError that names it (the entry is moved aside), not a crash."""
    cache.save("dataset", "d", image_set(), {})

    def failing(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(module.np, "load", failing)
    with pytest.raises(ValueError, match=re.escape("OSError: [Errno 5] Input/output error")):
        read_entry(cache.path("dataset", "d"))


def test_an_empty_array_file_is_moved_aside_not_a_crash(cache: Cache, capsys) -> None:
    """A writer whose ``fill`` leaves an empty images.npy (its checksum matches) makes an entry that load moves aside
    and rebuilds, instead of an uncaught EOFError (found by the mutation run on this module)."""
    def fill(folder: Path) -> tuple[int, list[int]]:
        (folder / "images.npy").write_bytes(b"")
        np.save(folder / "labels.npy", LABELS)
        return 3, list(IMAGES.shape)

    cache.write("dataset", "d", fill, {})
    with pytest.raises(ValueError, match="^EOFError"):
        read_entry(cache.path("dataset", "d"))
    assert cache.load("dataset", "d") is None and "EOFError" in capsys.readouterr().err
