"""Train-set mixes (ConfounderGAN §5.2, Fig. 5): matrix syntax, cache keys, the train sets built, the layout."""

from __future__ import annotations

import pytest
import torch

from bench.cli import main
from bench.core.registry import ConfigError
from bench.data.mixes import TrainSource, assemble, class_mask
from bench.plan.matrix import expand, parse_matrix
from bench.plan.planner import check_cells, plan_cell, prepare_dataset
from bench.report.leaderboard import build_tables
from bench.store.cache import Cache
from bench.store.records import RecordLog
from tests.conftest import tiny_matrix

GAN = "{ surrogate = \"cnn\", surrogate_epochs = 1, epochs = 1, width = 8 }"


def doc(**changes) -> dict:
    base = {"datasets": {"digits": {"per_class": 10}}, "protections": ["clean", "cwn"], "countermeasures": ["none"],
            "victims": {"cnn": {"width": 8}}, "poison_ratio": [0.5]}
    return {**base, **changes}


def test_mix_is_an_axis_with_exclusions():
    matrix = parse_matrix(doc(mix=["protected", "clean_only"], exclude=[{"protection": "cwn", "mix": "clean_only"}]), "m")
    assert [(c.protection.label, c.mix) for c in expand(matrix)] == [
        ("clean", "protected"), ("clean", "clean_only"), ("cwn", "protected")]
    assert parse_matrix(doc(mix="fit_subset"), "m").mixes == ("fit_subset",)
    assert parse_matrix(doc(), "m").mixes == ("protected",)


@pytest.mark.parametrize("bad", ["oods", 3, ["protected", "nope"]])
def test_unknown_mix_names_the_known_ones(bad):
    with pytest.raises(ConfigError, match="key 'mix'.*clean_only"):
        parse_matrix(doc(mix=bad), "m")


def test_keys_per_mix(tmp_path):
    """protected keeps the keys it had before mixes existed; fit_subset/ood refit per ratio; clean_only protects
    nothing; ood refuses a protection that cannot encrypt unseen images, naming the fix."""
    cache = Cache(tmp_path)
    matrix = parse_matrix(doc(mix=["protected", "fit_subset", "ood", "clean_only"]), "m")
    cells = {(c.protection.label, c.mix): c for c in expand(matrix)}
    key = prepare_dataset(cache, cells["cwn", "protected"].dataset)
    plans = {k: plan_cell(c, {c.dataset: key}, {"name": "quick"}) for k, c in cells.items() if k != ("cwn", "ood")}
    assert plans["cwn", "clean_only"].protection_key is None
    assert plans["cwn", "fit_subset"].protection_key != plans["cwn", "protected"].protection_key
    assert len({p.cell_key for p in plans.values()}) == len(plans)
    with pytest.raises(ConfigError, match="mix 'ood'.*encrypts_unseen.*cwn cannot"):
        plan_cell(cells["cwn", "ood"], {cells["cwn", "ood"].dataset: key}, {"name": "quick"})
    with pytest.raises(ConfigError, match=r"(?s)1 cell.*cwn × none × cnn.*mix ood.*encrypts_unseen.*\[\[exclude\]\]"):
        check_cells(list(cells.values()), "cpu", print)


def test_class_mask_takes_the_ratio_of_every_class():
    from bench.data.datasets import DATASETS

    data = DATASETS.create("digits", per_class=10).load()[0]
    mask = class_mask(data, 0.3, seed=1)
    assert all(int(mask[data.labels == c].sum()) == 3 for c in range(10))
    assert torch.equal(mask, class_mask(data, 0.3, seed=1)) and not torch.equal(mask, class_mask(data, 0.3, seed=2))


def test_fig5_mixes_end_to_end(tmp_path):
    """A generator fitted on half of each class encrypts the other half without labels (ood); fit_subset keeps
    that half clean; clean_only trains on it alone; the leaderboard has a column per ratio."""
    text = f"""
seeds = [0]
poison_ratio = [0.5, 0.7]
mix = ["fit_subset", "ood", "clean_only"]
[recipe]
name = "quick"
epochs = 1
[datasets.digits]
per_class = 10
test_per_class = 5
[protections]
clean = {{}}
confoundergan = {GAN}
[countermeasures]
none = {{}}
[victims.cnn]
width = 8
[[exclude]]
protection = "clean"
mix = "ood"
[[exclude]]
protection = "confoundergan"
mix = "clean_only"
"""
    results = tmp_path / "r"
    assert main(["run", "--matrix", str(tiny_matrix(tmp_path, "fig5", text=text)), "--results", str(results),
                 "--jobs", "1"]) == 0
    records = RecordLog(results / "runs" / "fig5" / "records.jsonl").read()
    assert len(records) == 8 and all(r.status == "ok" for r in records)
    by = {(r.protection, r.mix, r.poison_ratio): r for r in records}
    ood = by["confoundergan", "ood", 0.5]
    assert ood.protect_info["fitted_on"] == 50 and ood.protect_info["encrypted_unseen"] == 50
    cache = Cache(results / "cache")
    sets = {}
    for mix in ("fit_subset", "ood", "clean_only"):
        protection_key = by["clean" if mix == "clean_only" else "confoundergan", mix, 0.5].protection_key
        assert (protection_key is None) == (mix == "clean_only")
        sets[mix] = assemble(cache, TrainSource(_dataset_key(cache), protection_key, 0.5, 0, mix))
    clean, fit, mask = sets["fit_subset"].clean, sets["fit_subset"].train, sets["fit_subset"].mask
    assert torch.equal(fit.images[~mask], clean.images[~mask]) and not torch.equal(fit.images[mask], clean.images[mask])
    ood_set = sets["ood"].train
    assert torch.equal(ood_set.images[mask], fit.images[mask])
    assert (ood_set.images[~mask] != clean.images[~mask]).flatten(1).any(1).float().mean() > 0.9
    assert ood.protect_models == ["generator"]
    rest = sets["clean_only"].train
    assert len(rest) == 50 and torch.equal(rest.images, clean.images[~mask])
    (table,) = build_tables([r.to_json() for r in records])
    assert list(table.mean.columns) == ["p=0.5", "p=0.7", "Mean", "Max"]
    assert set(table.mean.index) == {"clean [fit_subset]", "clean [clean_only]", "confoundergan [fit_subset]",
                                     "confoundergan [ood]"}


def _dataset_key(cache: Cache) -> str:
    (folder,) = [p.name for p in (cache.root / "dataset").iterdir() if p.name.endswith("-train")]
    return folder.removesuffix("-train")

