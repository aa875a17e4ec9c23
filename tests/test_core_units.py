"""Registries, cache keys and entries, records, metrics, leaderboard layout and datasets."""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch

import bench.data
from bench.cache import Cache, make_key
from bench.components import ImageSet, Protection
from bench.data import DATASETS, balanced_subset, fingerprint
from bench.leaderboard import build_tables, write_tables
from bench.records import RecordLog, perturbation_metrics
from bench.registry import ConfigError, Registry, describe_params


# ------------------------------------------------------------------ registry

def test_registry_rules():
    registry = Registry("thing", Protection)

    @registry.register("a")
    class A(Protection):
        size: int = 3

    assert registry.names() == ["a"] and A.name == "a" and describe_params(A) == "size=3"
    assert dataclasses.is_dataclass(A) and registry.create("a", size=4).size == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        registry.create("a").size = 5
    with pytest.raises(ValueError, match="duplicate"):
        registry.register("a")(type("B", (Protection,), {}))
    with pytest.raises(TypeError, match="need defaults"):
        registry.register("c")(type("C", (Protection,), {"__annotations__": {"x": int}}))
    with pytest.raises(TypeError, match="subclass"):
        registry.register("d")(type("D", (), {}))
    with pytest.raises(ConfigError, match="did you mean 'a'"):
        registry.get("aa")
    with pytest.raises(ConfigError, match="did you mean 'size'"):
        registry.create("a", sizes=1)


# ------------------------------------------------------------------ cache

BASE = {"dataset": "d1", "protection": {"name": "cwn", "version": 1, "params": {"epsilon": 8.0}}, "seed": 0}


@pytest.mark.parametrize("change", [
    {"dataset": "d2"},
    {"seed": 1},
    {"protection": {"name": "cwn", "version": 2, "params": {"epsilon": 8.0}}},
    {"protection": {"name": "cwn", "version": 1, "params": {"epsilon": 4.0}}},
    {"protection": {"name": "random_noise", "version": 1, "params": {"epsilon": 8.0}}},
])
def test_key_changes_with_every_input(change):
    assert make_key({**BASE, **change}) != make_key(BASE)


def test_key_ignores_dict_order():
    assert make_key(BASE) == make_key(dict(reversed(list(BASE.items()))))
    assert len(make_key(BASE)) == 24


def _set(n: int = 6) -> ImageSet:
    gen = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, 4, 4), generator=gen, dtype=torch.uint8), torch.arange(n) % 3, 3)


def test_cache_roundtrip_is_exact_and_leaves_no_temporaries(tmp_path):
    cache, data = Cache(tmp_path), _set()
    cache.save("protected", "k", data, {"seconds": 1.5})
    cache.save("protected", "k", data, {"seconds": 9.0})  # a second writer keeps the first entry
    loaded = cache.load("protected", "k")
    assert torch.equal(loaded.images, data.images) and torch.equal(loaded.labels, data.labels)
    manifest = cache.manifest("protected", "k")
    assert manifest["seconds"] == 1.5 and set(manifest["versions"]) >= {"torch", "numpy"}
    assert [p.name for p in (tmp_path / "protected").iterdir()] == ["k"]


@pytest.mark.parametrize("damage", ["flip_byte", "bad_json", "wrong_shape", "missing_file"])
def test_corrupted_entry_is_dropped(tmp_path, damage):
    cache = Cache(tmp_path)
    cache.save("protected", "k", _set(), {})
    folder = tmp_path / "protected" / "k"
    if damage == "flip_byte":
        raw = bytearray((folder / "images.npy").read_bytes())
        raw[-3] ^= 1
        (folder / "images.npy").write_bytes(bytes(raw))
    elif damage == "bad_json":
        (folder / "manifest.json").write_text("{not json")
    elif damage == "wrong_shape":
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["shape"] = [1, 1, 1, 1]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    else:
        (folder / "labels.npy").unlink()
    assert cache.load("protected", "k") is None and not cache.has("protected", "k")


# ------------------------------------------------------------------ records and metrics

def test_record_log_survives_a_truncated_line(tmp_path):
    log = RecordLog(tmp_path / "records.jsonl")
    log.append({"cell": "a", "status": "ok"})
    with open(log.path, "a") as handle:
        handle.write('{"cell": "b", "sta')  # killed mid-write
    log.append({"cell": "c", "status": "ok"})
    log.append({"cell": "a", "status": "error"})
    assert [r["cell"] for r in log.read()] == ["a", "c", "a"]
    assert log.latest()["a"]["status"] == "error"


def test_perturbation_metrics_hand_computed():
    clean = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    protected = clean.clone()
    protected[0, 0, 0, 0] = 51  # 0.2 in [0, 1] units; image 1 unchanged
    m = perturbation_metrics(clean, protected)
    assert m["linf"] == pytest.approx(0.2) and m["l2"] == pytest.approx(0.1)  # mean of 0.2 and 0
    assert m["psnr"] == pytest.approx(10 * math.log10(1 / (0.04 / 4)))
    assert perturbation_metrics(clean, clean) == {"linf": 0.0, "l2": 0.0, "psnr": None}


# ------------------------------------------------------------------ leaderboard

def _record(protection, countermeasure, acc, seed=0, status="ok", recipe="quick", best=None):
    return {"cell": f"{protection}-{countermeasure}-{seed}-{recipe}", "status": status, "dataset": "digits",
            "victim": "cnn", "recipe": recipe, "poison_ratio": 1.0, "protection": protection,
            "countermeasure": countermeasure, "seed": seed, "test_acc_final": acc,
            "test_acc_best": best if best is not None else acc, "error": None if status == "ok" else "boom"}


def test_leaderboard_layout(tmp_path):
    records = [_record("cwp", "bdr", 0.5), _record("cwp", "none", 0.2), _record("clean", "bdr", 0.9),
               _record("clean", "none", 0.96), _record("clean", "none", 0.98, seed=1), _record("cwn", "none", None, status="error")]
    [table] = build_tables(records)
    assert list(table.display.index) == ["clean", "cwp", "cwn"]
    assert list(table.display.columns) == ["none", "bdr", "Mean", "Max"]
    assert table.mean.at["clean", "none"] == pytest.approx(97.0)
    assert table.display.at["clean", "none"] == f"97.00 ± {pd.Series([96.0, 98.0]).std():.2f}"
    assert table.mean.at["cwp", "Mean"] == pytest.approx(35.0) and table.mean.at["cwp", "Max"] == pytest.approx(50.0)
    assert table.display.at["cwn", "none"] == "error" and table.display.at["cwn", "bdr"] == ""
    paths = write_tables([table], tmp_path)
    csv = pd.read_csv(paths[0], index_col=0)
    assert csv.at["cwp", "none"] == pytest.approx(20.0)
    markdown_rows = [line.split("|")[1].strip() for line in paths[1].read_text().splitlines() if line.startswith("|")]
    assert markdown_rows[2:] == ["clean", "cwp", "cwn"]


def test_leaderboard_splits_recipes_orders_and_best():
    records = [_record("clean", "none", 0.9, best=0.95), _record("clean", "none", 0.8, recipe="other"),
               _record("cwp", "none", 0.3), _record("cwp", "jpeg", 0.6)]
    tables = build_tables(records, metric="best")
    assert len(tables) == 2 and {t.slug for t in tables} == {"digits__cnn__quick", "digits__cnn__other"}
    quick = next(t for t in tables if t.slug == "digits__cnn__quick")
    assert quick.mean.at["clean", "none"] == pytest.approx(95.0) and "best" in quick.title
    [ordered] = build_tables(records[:1] + records[2:], {"protections": ["cwp", "clean"], "countermeasures": ["jpeg", "none"]})
    assert list(ordered.display.index) == ["clean", "cwp"] and list(ordered.display.columns)[:2] == ["none", "jpeg"]


# ------------------------------------------------------------------ datasets

def test_digits_split_and_subset():
    train, test = DATASETS.create("digits").load()
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 16, 16)
    assert len(train) + len(test) == 1797 and set(test.labels.tolist()) == set(range(10))
    again, _ = DATASETS.create("digits").load()
    assert torch.equal(again.images, train.images)
    small, _ = DATASETS.create("digits", per_class=5, size=8).load()
    assert small.labels.bincount().tolist() == [5] * 10 and small.images.shape[-1] == 8
    subset = balanced_subset(train, 3)
    first = torch.nonzero(train.labels == 0).flatten()[:3]
    assert torch.equal(subset.images[subset.labels == 0], train.images[first])


def test_fingerprint_sees_one_pixel():
    data = _set()
    changed = data.images.clone()
    changed[0, 0, 0, 0] ^= 1
    assert fingerprint(data) != fingerprint(data.with_images(changed))


def test_missing_torchvision_files_name_what_to_place(tmp_path):
    with pytest.raises(ConfigError) as err:
        DATASETS.create("cifar10", root=str(tmp_path), download=False).load()
    assert "cifar-10-python.tar.gz" in str(err.value) and str(tmp_path) in str(err.value)


def test_missing_cifar10_jpeg_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_CIFAR10_JPEG", raising=False)
    monkeypatch.setenv("BENCH_DATA_ROOT", str(tmp_path))
    monkeypatch.setattr(bench.data, "REPO_ROOT", tmp_path / "repo")
    with pytest.raises(ConfigError, match="BENCH_CIFAR10_JPEG"):
        DATASETS.create("cifar10-jpeg").load()


def test_cifar10_jpeg_subset_when_present():
    path = bench.data.REPO_ROOT.parent / "shared" / "data" / "cifar10_jpeg75.npz"
    if not path.is_file():
        pytest.skip("the development copy of CIFAR-10 is not beside this checkout")
    train, test = DATASETS.create("cifar10-jpeg", path=str(path), per_class=10, test_per_class=5).load()
    assert train.images.shape == (100, 3, 32, 32) and test.images.shape == (50, 3, 32, 32)
    assert train.labels.bincount().tolist() == [10] * 10


def test_readme_component_table_is_current():
    """The README's component table is `bench list --markdown`: regenerate it when adding a component."""
    from bench.cli import component_table
    from bench.components import COUNTERMEASURES, PROTECTIONS, VICTIMS

    registries = {"protections": PROTECTIONS, "countermeasures": COUNTERMEASURES, "victims": VICTIMS,
                  "datasets": DATASETS}
    readme = (bench.data.REPO_ROOT / "README.md").read_text()
    assert component_table(registries, list(registries)) in readme


def test_leaderboard_mixes_recipes_only_when_asked():
    records = [_record("clean", "none", 0.9), _record("cwp", "none", 0.3, recipe="fast")]
    assert len(build_tables(records)) == 2
    [mixed] = build_tables(records, mix_recipes=True)
    assert "fast+quick" in mixed.title and list(mixed.display.index) == ["clean", "cwp"]
