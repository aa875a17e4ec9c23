"""The transfer protocol (issue 36): ``protect_per_class`` crafts a protection on a larger set than the cells train
on; the cells train on the first ``per_class`` images of each class of it, and share one protected set."""

from __future__ import annotations

import pytest
import torch

from bench.cli import main
from bench.core.registry import ConfigError
from bench.data.datasets import DATASETS, nested_index
from bench.data.mixes import assemble
from bench.plan.matrix import expand, load_matrix, parse_matrix
from bench.plan.planner import check_cells, crafting, dataset_choices, plan_cell, prepare_dataset
from bench.store.cache import Cache
from bench.store.records import RecordLog
from tests.conftest import tiny_matrix

TEXT = """
seeds = [0]
[recipe]
name = "quick"
epochs = 1
[datasets.digits]
per_class = 4
protect_per_class = 8
test_per_class = 3
[protections]
clean = {}
ops = {}
[countermeasures]
none = {}
[victims.cnn]
width = 8
"""


def test_cells_train_on_their_part_of_one_protected_set(tmp_path):
    """A 4/class cell trains on its part of the set OPS made from 8 images a class, keyed by the crafting set (so a
    plain 8/class matrix shares it): the first 4 images of each class of it."""
    results = tmp_path / "r"
    assert main(["run", "--matrix", str(tiny_matrix(tmp_path, "transfer", text=TEXT)), "--results", str(results),
                 "--jobs", "1"]) == 0
    records = RecordLog(results / "runs" / "transfer" / "records.jsonl").read()
    assert len(records) == 2 and all(r.status == "ok" for r in records)
    (ops,) = [r for r in records if r.protection == "ops"]
    cache = Cache(results / "cache")
    assert [key for key, _ in cache.entries("protected")] == [ops.protection_key]
    protected = cache.load("protected", ops.protection_key)
    assert len(protected) == 80 and ops.protect_info["protected_images"] == 80
    matrix = load_matrix(str(tmp_path / "transfer.toml"))
    keys = {choice: prepare_dataset(cache, choice) for choice in dataset_choices(expand(matrix))}
    plain = parse_matrix({**matrix_doc(per_class=8), "protections": ["ops"]}, "plain")
    (cell,) = expand(plain)
    assert plan_cell(cell, {cell.dataset: prepare_dataset(cache, cell.dataset)}, plain.recipe).protection_key == \
        ops.protection_key
    small = next(c for c in expand(matrix) if c.protection.name == "ops")
    plan = plan_cell(small, keys, matrix.recipe)
    sets = assemble(cache, plan.source)
    crafted = cache.load("dataset", f"{plan.crafting_key}-train")
    index = nested_index(crafted, sets.clean)
    assert len(sets.train) == 40 and torch.equal(sets.train.images, protected.images[index])
    assert not torch.equal(sets.train.images, sets.clean.images)


def matrix_doc(**dataset) -> dict:
    return {"datasets": {"digits": {"test_per_class": 3, **dataset}}, "protections": ["ops"],
            "countermeasures": ["none"], "victims": {"cnn": {"width": 8}}, "recipe": {"name": "quick", "epochs": 1}}


def test_nested_index_refuses_sets_that_are_not_nested():
    large = DATASETS.create("digits", per_class=8).load()[0]
    small = DATASETS.create("digits", per_class=4).load()[0]
    index = nested_index(large, small)
    assert torch.equal(large.labels[index], small.labels)
    shuffled = small.with_images(small.images.flip(0))
    with pytest.raises(RuntimeError, match="not nested"):
        nested_index(large, shuffled)


def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="protect_per_class = 4 needs per_class ≤ it"):
        DATASETS.create("digits", per_class=8, protect_per_class=4)
    with pytest.raises(ConfigError, match="needs per_class ≤ it"):
        DATASETS.create("digits", protect_per_class=4)
    doc = {**matrix_doc(per_class=4, protect_per_class=8), "mix": "fit_subset", "poison_ratio": 0.5}
    with pytest.raises(ConfigError, match="mix 'fit_subset'.*protect_per_class crafts it on a larger set"):
        check_cells(expand(parse_matrix(doc, "m")), "cpu", print)


def test_unset_protect_per_class_keeps_the_dataset_keys():
    """Records made before the option existed keep their keys: an unset option is not in the spec."""
    assert "protect_per_class" not in DATASETS.create("digits", per_class=4).spec()["params"]
    (cell,) = expand(parse_matrix(matrix_doc(per_class=4), "m"))
    assert crafting(cell.dataset) is None and dataset_choices([cell]) == {cell.dataset}


def test_the_estimate_counts_the_crafting_images_for_the_protect_stage():
    from bench.data.datasets import train_images

    (cell,) = expand(parse_matrix(matrix_doc(per_class=4, protect_per_class=8), "m"))
    assert train_images(cell.dataset.name, cell.dataset.kwargs) == 40 and \
        train_images(cell.dataset.name, cell.dataset.kwargs, crafted=True) == 80
    (plain,) = expand(parse_matrix(matrix_doc(per_class=4), "m"))
    assert train_images(plain.dataset.name, plain.dataset.kwargs, crafted=True) == 40
