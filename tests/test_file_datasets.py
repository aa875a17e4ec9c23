"""Datasets of image files (issue 37): the releases' layouts read from tiny stand-ins written in them, decoded once into
the results cache as memory maps, checked for missing files before any work, and run end to end."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from bench.cli import main
from bench.core.registry import BenchWarning, ConfigError
from bench.data import decoded, standins
from bench.data.datasets import DATASETS, fingerprint
from bench.store.cache import Cache, read_entry
from bench.store.records import RecordLog
from tests.conftest import tiny_matrix


def load(name, cache=None, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BenchWarning)  # stand-ins are not the releases
        return DATASETS.create(name, **params).load(cache)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return standins.write_imagenet(tmp_path_factory.mktemp("imagenet"), classes=6, per_class=5, val_per_class=2,
                                   size=40)


def test_imagenet_subset_takes_the_first_classes_a_train_fraction_and_their_validation_images(imagenet, tmp_path):
    train, test = load("imagenet-subset", root=str(imagenet), preset="dh", classes=4, size=32)
    assert train.images.shape == (4, 3, 32, 32) and test.images.shape == (8, 3, 32, 32)  # 20 % of 5 = 1 a class
    assert train.labels.tolist() == [0, 1, 2, 3] and test.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    full, _ = load("imagenet-subset", root=str(imagenet), preset="imagenet25", classes=4, size=32)
    assert len(full) == 20 and any(torch.equal(full.images[i], train.images[0]) for i in range(5))
    named, _ = load("imagenet-subset", root=str(imagenet), wnids=("n01440766", "n01440764"), size=32,
                    train_fraction=1.0)
    assert torch.equal(named.images[named.labels == 1], full.images[full.labels == 0])  # the list's order
    wnid = standins.wnids(1)[0]
    with Image.open(imagenet / "train" / wnid / f"{wnid}_0.JPEG") as file:  # Resize(32/0.875) + CenterCrop(32)
        pixels = np.asarray(file.convert("RGB").resize((37, 37), Image.BILINEAR))[2:34, 2:34]
    assert torch.equal(full.images[0], torch.from_numpy(pixels.copy()).permute(2, 0, 1))


def test_imagenet_validation_from_kaggles_csv_equals_class_folders(imagenet, tmp_path):
    flat = standins.write_imagenet(tmp_path / "flat", classes=6, per_class=5, val_per_class=2, size=40, val_csv=True)
    by_folder = load("imagenet-subset", root=str(imagenet), classes=3, size=32)[1]
    by_csv = load("imagenet-subset", root=str(flat), classes=3, size=32)[1]
    assert torch.equal(by_folder.images, by_csv.images) and torch.equal(by_folder.labels, by_csv.labels)
    (flat / "LOC_val_solution.csv").unlink()
    with pytest.raises(ConfigError, match="LOC_val_solution.csv is missing"):
        load("imagenet-subset", root=str(flat), classes=3, size=32)
    with pytest.raises(ConfigError, match="lacks"):
        load("imagenet-subset", root=str(imagenet), classes=7, size=32)


def test_tiny_imagenet_isic_and_bloodmnist_read_their_layouts(tmp_path):
    tiny = standins.write_tiny_imagenet(tmp_path / "tiny", classes=3, per_class=2, val_per_class=2)
    train, test = load("tiny-imagenet", root=str(tiny))
    assert train.images.shape == (6, 3, 64, 64) and test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    drawn = [torch.from_numpy(np.array(standins.picture(c, 0, 64))).permute(2, 0, 1).float() for c in range(3)]
    distance = [(train.images[0].float() - d).abs().mean() for d in drawn]
    assert min(distance) == distance[0]  # wnids.txt lists them reversed: label 0 is the first in sorted order
    assert load("tiny-imagenet", root=str(tiny), size=32)[0].size == 32
    isic_train, isic_test = load("isic", root=str(standins.write_isic(tmp_path / "isic", 5)), size=24)
    assert isic_train.labels.bincount().tolist() == [4] * 7 and isic_test.labels.bincount().tolist() == [1] * 7
    npz = standins.write_medmnist(tmp_path / "med" / "bloodmnist.npz", {"train": 3, "val": 1, "test": 2})
    with pytest.warns(BenchWarning, match="not the published release"):
        blood_train, blood_test = DATASETS.create("bloodmnist", root=str(npz.parent)).load()
    assert blood_train.images.shape == (24, 3, 28, 28) and blood_test.num_classes == 8
    with pytest.raises(ConfigError, match="size must be one of"):
        DATASETS.create("bloodmnist", size=32)
    with pytest.raises(ConfigError, match="bloodmnist_64.npz not found.*zenodo"):
        DATASETS.create("bloodmnist", root=str(npz.parent), size=64).load()


def test_image_folder_splits_one_folder_by_class_and_reads_greyscale(imagenet):
    train, test = load("image-folder", root=str(imagenet / "train"), size=16, channels=1, test_fraction=0.4)
    assert train.channels == 1 and train.labels.bincount().tolist() == [3] * 6
    assert test.labels.bincount().tolist() == [2] * 6
    again, _ = load("image-folder", root=str(imagenet / "train"), size=16, channels=1, test_fraction=0.4)
    assert torch.equal(again.images, train.images)
    both, held = load("image-folder", root=str(imagenet), size=16)  # train/ and val/ folders
    assert len(both) == 30 and len(held) == 12
    with pytest.raises(ConfigError, match="needs root"):
        DATASETS.create("image-folder").load()


def test_decoded_once_into_the_cache_as_a_memory_map_and_again_when_a_file_changes(imagenet, tmp_path, monkeypatch):
    cache = Cache(tmp_path / "cache")
    first, _ = load("imagenet-subset", cache, root=str(imagenet), classes=3, size=32)
    (entry,) = [k for k, _ in cache.entries("decoded") if k.endswith("-train")]
    assert isinstance(read_entry(cache.path("decoded", entry))[1], np.memmap)
    calls = []
    real = decoded._decode_rows
    monkeypatch.setattr(decoded, "_decode_rows", lambda *a: (calls.append(len(a[2])), real(*a)))
    second, _ = load("imagenet-subset", cache, root=str(imagenet), classes=3, size=32, per_class=2)
    assert calls == [] and torch.equal(second.images, first.images[[0, 1, 5, 6, 10, 11]])
    touched = imagenet / "train" / standins.wnids(1)[0] / f"{standins.wnids(1)[0]}_0.JPEG"
    os.utime(touched, ns=(1, 1))
    load("imagenet-subset", cache, root=str(imagenet), classes=3, size=32)
    assert calls == [15, 6]  # both splits: the key covers every split's files


def test_fingerprint_in_parts_is_the_whole_arrays_hash():
    """Keys made before the fingerprint hashed in parts still hold."""
    import hashlib

    data = load("digits")[0]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(tuple(data.images.shape)).encode())
    digest.update(data.images.numpy().tobytes())
    digest.update(data.labels.numpy().astype(np.int64).tobytes())
    assert fingerprint(data) == digest.hexdigest()


MATRIX = """
seeds = [0]
[recipe]
name = "quick"
epochs = 1
[datasets.imagenet-subset]
root = "{root}"
classes = 3
size = 32
train_fraction = 1.0
[datasets.tiny-imagenet]
root = "{missing}"
[protections]
random_noise = {{}}
[countermeasures]
none = {{}}
[victims.cnn]
width = 8
"""


def test_a_missing_dataset_stops_the_run_before_any_work_and_a_present_one_runs(imagenet, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    text = MATRIX.format(root=imagenet, missing=missing)
    results = tmp_path / "r"
    assert main(["run", "--matrix", str(tiny_matrix(tmp_path, "files", text=text)), "--results", str(results)]) == 2
    err = capsys.readouterr().err
    assert f"tiny-imagenet: {missing} not found" in err and "cs231n.stanford.edu" in err
    assert not (results / "cache" / "decoded").exists() and not (results / "cache" / "dataset").exists()
    text = text[:text.index("[datasets.tiny-imagenet]")] + text[text.index("[protections]"):]
    assert main(["run", "--matrix", str(tiny_matrix(tmp_path, "files", text=text)), "--results", str(results),
                 "--jobs", "1"]) == 0
    (record,) = RecordLog(results / "runs" / "files" / "records.jsonl").read()
    assert record.status == "ok" and record.memory["peak_rss"] > 50 and record.linf is not None
