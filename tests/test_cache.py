"""Cache keys and entries (atomic, checksummed), the JSONL record log, and perturbation metrics."""

from __future__ import annotations

import copy
import json
import math
import types

import numpy as np
import pytest
import torch

from bench.core.components import ImageSet
from bench.execute.metrics import perturbation_metrics
from bench.store.cache import Cache
from bench.store.keys import make_key
from bench.store.records import RecordLog
from tests.conftest import make_record

# ------------------------------------------------------------------ make_key

SPEC = {
    "dataset": {"name": "digits", "version": 1, "params": {"size": 16, "per_class": 0}},
    "protection": {"name": "cwn", "version": 1, "params": {"epsilon": 8.0}},
    "countermeasure": {"name": "jpeg", "version": 1, "params": {"quality": 10}},
    "seed": 0,
}


def changed(path: tuple[str, ...], value) -> dict:
    spec = copy.deepcopy(SPEC)
    target = spec
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return spec


@pytest.mark.parametrize("path, value", [
    (("seed",), 1),
    (("dataset", "name"), "cifar10"),
    (("dataset", "version"), 2),
    (("dataset", "params", "size"), 8),
    (("dataset", "params", "per_class"), 5),
    (("protection", "name"), "random_noise"),
    (("protection", "version"), 2),
    (("protection", "params", "epsilon"), 4.0),
    (("countermeasure", "version"), 2),
    (("countermeasure", "params", "quality"), 50),
])
def test_key_changes_with_every_part(path, value):
    assert make_key(changed(path, value)) != make_key(SPEC)


def test_key_ignores_dict_order_at_every_level():
    def reverse(obj):
        return {k: reverse(v) for k, v in reversed(list(obj.items()))} if isinstance(obj, dict) else obj

    reordered = reverse(SPEC)
    assert list(reordered) != list(SPEC)
    assert make_key(reordered) == make_key(SPEC)


def test_key_is_stable_24_hex_digits():
    key = make_key(SPEC)
    assert len(key) == 24 and int(key, 16) >= 0
    assert make_key(copy.deepcopy(SPEC)) == key


# ------------------------------------------------------------------ Cache entries


def image_set(n: int = 7, channels: int = 3, size: int = 5, classes: int = 4, seed: int = 0) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
    return ImageSet(images, torch.randint(0, classes, (n,), generator=gen), classes)


def leftovers(root) -> list[str]:
    return [p.name for p in root.rglob(".tmp-*")]


@pytest.mark.parametrize("n, channels, size, classes", [(7, 3, 5, 4), (3, 1, 8, 10), (1, 3, 2, 100)])
def test_roundtrip_is_exact(tmp_path, n, channels, size, classes):
    cache, data = Cache(tmp_path), image_set(n, channels, size, classes)
    assert not cache.has("protected", "k") and cache.load("protected", "k") is None
    cache.save("protected", "k", data, {"seconds": 1.25})
    assert cache.has("protected", "k") and cache.valid("protected", "k")
    loaded = cache.load("protected", "k")
    assert loaded.images.dtype == torch.uint8 and loaded.labels.dtype == torch.int64
    assert torch.equal(loaded.images, data.images) and torch.equal(loaded.labels, data.labels)
    assert loaded.num_classes == classes
    manifest = cache.manifest("protected", "k")
    assert manifest["seconds"] == 1.25 and manifest["shape"] == [n, channels, size, size]
    assert manifest["kind"] == "protected" and manifest["key"] == "k"
    assert leftovers(tmp_path) == []


def test_kinds_are_separate(tmp_path):
    cache = Cache(tmp_path)
    cache.save("protected", "k", image_set(seed=1), {})
    assert not cache.has("purified", "k") and cache.load("purified", "k") is None


def test_save_same_key_twice_keeps_one_valid_entry(tmp_path):
    cache, data = Cache(tmp_path), image_set()
    cache.save("purified", "k", data, {"writer": "first"})
    cache.save("purified", "k", data, {"writer": "second"})
    assert [p.name for p in (tmp_path / "purified").iterdir()] == ["k"]
    assert leftovers(tmp_path) == []
    assert cache.manifest("purified", "k")["writer"] == "first"
    assert torch.equal(cache.load("purified", "k").images, data.images)


def test_failed_save_leaves_nothing(tmp_path):
    """An exception part-way through writing removes the temporary folder and creates no entry."""
    cache = Cache(tmp_path)
    broken = types.SimpleNamespace(images=torch.zeros(2, 1, 3, 3, dtype=torch.uint8), labels=None, num_classes=2)
    with pytest.raises(AttributeError):
        cache.save("protected", "k", broken, {})  # images.npy is written, then labels fail
    assert not cache.has("protected", "k") and not cache.path("protected", "k").exists()
    assert leftovers(tmp_path) == []


def flip_byte(path, offset_from_end: int = 3) -> None:
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(raw))


def corrupt_images(folder):
    flip_byte(folder / "images.npy")


def corrupt_labels(folder):
    flip_byte(folder / "labels.npy")


def truncate_images(folder):
    path = folder / "images.npy"
    path.write_bytes(path.read_bytes()[:-10])


def delete_images(folder):
    (folder / "images.npy").unlink()


def wrong_shape(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shape"] = [manifest["shape"][0] + 1, *manifest["shape"][1:]]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def unreadable_manifest(folder):
    (folder / "manifest.json").write_text('{"kind": "protected", "sha256": {')


def manifest_without_checksums(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["sha256"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [corrupt_images, corrupt_labels, truncate_images, delete_images, wrong_shape,
                                    unreadable_manifest, manifest_without_checksums])
def test_corrupted_entry_is_moved_aside(tmp_path, damage, capsys):
    cache = Cache(tmp_path)
    cache.save("protected", "k", image_set(), {})
    damage(cache.path("protected", "k"))
    assert cache.load("protected", "k") is None
    assert not cache.has("protected", "k") and not cache.path("protected", "k").exists()
    [aside] = (tmp_path / "protected" / ".damaged").iterdir()
    assert "did not verify" in capsys.readouterr().err and aside.name.startswith("k-")
    # the entry can then be rebuilt
    cache.save("protected", "k", image_set(), {})
    assert torch.equal(cache.load("protected", "k").images, image_set().images)


def test_valid_detects_corruption_and_moves_the_entry_aside(tmp_path):
    cache = Cache(tmp_path)
    cache.save("protected", "k", image_set(), {})
    corrupt_images(cache.path("protected", "k"))
    assert not cache.valid("protected", "k")
    assert not cache.has("protected", "k")


def test_corruption_of_one_entry_leaves_others(tmp_path):
    cache = Cache(tmp_path)
    cache.save("protected", "a", image_set(seed=1), {})
    cache.save("protected", "b", image_set(seed=2), {})
    corrupt_images(cache.path("protected", "a"))
    assert cache.load("protected", "a") is None
    assert torch.equal(cache.load("protected", "b").images, image_set(seed=2).images)


# ------------------------------------------------------------------ RecordLog


def test_record_log_roundtrip(tmp_path):
    log = RecordLog(tmp_path / "sub" / "records.jsonl")
    assert log.read() == [] and log.latest() == {}
    records = [make_record(cell="a", test_acc=[0.1, 0.2]), make_record(cell="b", test_acc_final=None, error="é ✓")]
    for record in records:
        log.append(record)
    assert log.read() == records
    assert log.path.read_text().count("\n") == 2


def test_truncated_last_line_is_ignored_and_next_append_is_readable(tmp_path):
    log = RecordLog(tmp_path / "records.jsonl")
    log.append(make_record(cell="a"))
    with open(log.path, "a") as handle:
        handle.write('{"cell": "b", "n": 2, "curve": [0.1, 0.')  # a writer killed mid-line
    assert [r.cell for r in log.read()] == ["a"]
    log.append(make_record(cell="c"))
    assert [r.cell for r in log.read()] == ["a", "c"]
    log.append(make_record(cell="d"))
    assert [r.cell for r in log.read()] == ["a", "c", "d"]


def test_truncated_only_line(tmp_path):
    """A file holding nothing but a cut line reads as empty, and appending still works."""
    log = RecordLog(tmp_path / "records.jsonl")
    log.path.write_text('{"cell": "x"')
    assert log.read() == []
    log.append(make_record(cell="y"))
    assert [r.cell for r in log.read()] == ["y"]


def test_latest_keeps_last_record_per_cell(tmp_path):
    log = RecordLog(tmp_path / "records.jsonl")
    for cell, acc in (("a", 0.1), ("b", 0.2), ("a", 0.3), ("b", 0.4), ("c", 0.5)):
        log.append(make_record(cell=cell, test_acc_final=acc))
    assert {k: r.test_acc_final for k, r in log.latest().items()} == {"a": 0.3, "b": 0.4, "c": 0.5}


def test_a_line_that_is_no_record_is_skipped_with_a_warning(tmp_path):
    log = RecordLog(tmp_path / "records.jsonl")
    log.path.write_text('{"cell": "a", "note": "no record"}\n')
    log.append(make_record(cell="b"))
    with pytest.warns(UserWarning, match="skipped line 1"):
        assert [r.cell for r in log.read()] == ["b"]


# ------------------------------------------------------------------ perturbation metrics


def test_perturbation_metrics_hand_computed():
    """Two 1×1×4 images: the first changed by (51, 0, 0, 0) → 0.2 in [0, 1] units, the second by (255, 255, 0, 0)."""
    clean = torch.zeros(2, 1, 1, 4, dtype=torch.uint8)
    protected = clean.clone()
    protected[0, 0, 0, 0] = 51
    protected[1, 0, 0, :2] = 255
    metrics = perturbation_metrics(clean, protected)
    # image 0: diff (0.2, 0, 0, 0): L2 0.2, MSE 0.01 → PSNR 20 dB
    # image 1: diff (1, 1, 0, 0):   L2 √2, MSE 0.5  → PSNR 10·log10(2) ≈ 3.0103 dB
    assert metrics["linf"] == pytest.approx(1.0)
    assert metrics["l2"] == pytest.approx((0.2 + math.sqrt(2)) / 2)
    assert metrics["psnr"] == pytest.approx((20 + 10 * math.log10(2)) / 2)


def test_perturbation_metrics_unchanged_images_left_out_of_psnr():
    clean = torch.full((3, 1, 2, 2), 100, dtype=torch.uint8)
    protected = clean.clone()
    protected[1] += 51  # diff 0.2 on all 4 pixels: MSE 0.04 → PSNR 10·log10(25) ≈ 13.979 dB
    metrics = perturbation_metrics(clean, protected)
    assert metrics["linf"] == pytest.approx(0.2)
    assert metrics["l2"] == pytest.approx(0.4 / 3)  # L2 of image 1 is √(4·0.04) = 0.4; others 0
    assert metrics["psnr"] == pytest.approx(10 * math.log10(25))


def test_perturbation_metrics_negative_differences():
    clean = torch.full((1, 3, 1, 1), 200, dtype=torch.uint8)
    protected = torch.tensor([200 - 51, 200, 200 + 51], dtype=torch.uint8).view(1, 3, 1, 1)
    metrics = perturbation_metrics(clean, protected)
    assert metrics["linf"] == pytest.approx(0.2)
    assert metrics["l2"] == pytest.approx(math.sqrt(0.08))


def test_perturbation_metrics_identical_images():
    images = torch.randint(0, 256, (4, 3, 5, 5), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    metrics = perturbation_metrics(images, images.clone())
    assert metrics == {"linf": 0.0, "l2": 0.0, "psnr": None}


def test_perturbation_metrics_empty():
    empty = torch.zeros(0, 3, 4, 4, dtype=torch.uint8)
    assert perturbation_metrics(empty, empty) == {"linf": 0.0, "l2": 0.0, "psnr": None}


def test_perturbation_metrics_do_not_overflow_uint8():
    """0 → 255 is a full-range change (not a uint8 wrap-around)."""
    clean = torch.zeros(1, 1, 1, 1, dtype=torch.uint8)
    protected = torch.full((1, 1, 1, 1), 255, dtype=torch.uint8)
    assert perturbation_metrics(clean, protected)["linf"] == 1.0
    assert perturbation_metrics(protected, clean)["linf"] == 1.0
    assert perturbation_metrics(clean, protected)["psnr"] == pytest.approx(0.0)


def test_cache_roundtrip_of_numpy_labels_dtype(tmp_path):
    """Labels saved from int64 come back as int64 torch tensors (usable as indices)."""
    cache, data = Cache(tmp_path), image_set()
    cache.save("dataset", "k", data, {})
    assert np.load(cache.path("dataset", "k") / "labels.npy").dtype == np.int64
    assert cache.load("dataset", "k").labels.dtype == torch.int64


def test_perturbation_metrics_in_parts_equal_the_whole_float64_computation(monkeypatch):
    """Large sets are measured a few images at a time (no float copy of the set): the same figures."""
    from bench.execute import metrics

    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (7, 3, 5, 5), generator=gen, dtype=torch.uint8)
    protected = (clean.int() + torch.randint(-9, 10, clean.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    protected[3] = clean[3]
    clean[0, 0, 0, 0], protected[0, 0, 0, 0] = 100, 140  # the largest change, in the first part
    diff = (protected.double() - clean.double()).flatten(1) / 255
    mse = diff.pow(2).mean(1)
    whole = {"linf": diff.abs().max().item(), "l2": diff.norm(dim=1).mean().item(),
             "psnr": (10 * torch.log10(1 / mse[mse > 0])).mean().item()}
    monkeypatch.setattr(metrics, "METRIC_CHUNK", 2 * 75)  # two images a part
    assert perturbation_metrics(clean, protected) == pytest.approx(whole, rel=1e-12)


def test_make_key_is_the_same_on_every_version_of_bench():
    """Every cached result is found by these keys: a change to their canonical form (separators, key order, the
    hash or its length) would silently orphan every results folder. mutmut's first run on bench/store/keys.py left
    the separator mutants alive; this golden value kills them."""
    from bench.store.keys import make_key

    spec = {"protection": {"name": "em", "params": {"epsilon": 8.0}}, "seed": 0, "b": [1, 2]}
    assert make_key(spec) == "daf0acde83b2ae6b0baa6e4b"
    assert make_key(dict(reversed(list(spec.items())))) == make_key(spec)
    from pathlib import PurePosixPath  # values JSON has no form for count by their text

    assert make_key({"root": PurePosixPath("a/b")}) == make_key({"root": "a/b"})


def test_the_key_chain_is_the_same_on_every_version_of_bench():
    """The protection, purification and cell keys of fixed specs are golden: renaming a field of a key's spec, or
    adding an absent option (``fitted_on``, ``mix``, ``unused_protection``) as ``None``, would orphan every results
    folder just as a change to ``make_key`` would (mutmut left each such change alive before this test). Prose
    recipe fields stay out of the cell key."""
    from bench.store.keys import cell_key, protection_key, purify_key, train_source

    data = "d" * 24
    protected = protection_key(data, {"name": "cwn"}, 3, None)
    assert (protected, protection_key(data, {"name": "cwn"}, 3, 0.5)) == (
        "26d4f4ab3c1a299878e32aa3", "05249b68ba3977531303a5cf")
    source = train_source(data, protected, 0.5, 3, "protected", None)
    clean_row = train_source(data, None, 1.0, 3, "clean_only", {"name": "cwn"})
    assert (purify_key(source, {"name": "jpeg"}), purify_key(clean_row, {"name": "jpeg"})) == (
        "8375e450b3cecfc06eea06d9", "8a41ef889ae0ad28284380a2")
    recipe = {"name": "quick", "epochs": 2, "lr": 0.1, "source": "x", "victim_overrides": {}, "dataset_overrides": {}}
    assert cell_key(source, {"name": "none"}, {"name": "cnn"}, recipe) == "99e2aefb759c674c4fed2ce8"
    assert cell_key(clean_row, {"name": "none"}, {"name": "cnn"}, {"epochs": 2}) == "ca5b17078714933f556b45fb"
