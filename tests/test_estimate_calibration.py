"""The estimate where nothing similar is recorded: the device factor from other records, budget scaling of the
protect table, the range, and the cluster job requests sized from it (bench.plan.estimate, bench.plan.requests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.plan.estimate import Estimate, budget, calibrate, estimate, table_set_seconds, timings
from bench.plan.matrix import expand, parse_matrix
from bench.plan.requests import JobRequest, job_requests
from bench.store.cache import Cache
from tests.conftest import record_json

MATRIX = {"datasets": {"digits": {"size": 32}}, "protections": {"em": {"surrogate": "cnn"}}, "countermeasures": ["none"],
          "victims": ["resnet20"], "recipe": {"name": "quick", "epochs": 10}}


def record(**fields):
    base = {"status": "ok", "device": "cpu", "victim_name": "cnn", "recipe": "quick", "recipe_params": {"batch_size": 128},
            "dataset_name": "digits", "dataset_params": {"per_class": None, "size": 32}, "protection_name": "clean",
            "protection_params": {}, "countermeasure_name": "none", "countermeasure_params": {}, "cell": "x"}
    return record_json(**{**base, **fields})


def write(folder, *lines):
    runs = folder / "runs" / "other"
    runs.mkdir(parents=True)
    (runs / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return timings([folder])


def cnn_cell(seconds, cell="a", **fields):
    """A cnn cell of 100 steps × 128 images at 32 px (the tables' unit): the table's 400 images/s make it 32 s."""
    return record(steps=100, seconds={"train": seconds}, cell=cell, **fields)


def test_device_factor_from_other_victims_and_components(tmp_path):
    """Records of the cnn at half the table's time (and a cwn set) calibrate resnet20's training and EM's set,
    neither recorded: both at the table × 0.5; records of another device are not used."""
    records = write(tmp_path, cnn_cell(16.0), cnn_cell(16.0, cell="b", countermeasure_name="cutout"),
                    cnn_cell(0.016, cell="c", device="cuda:0"))
    assert calibrate(records, "cpu") == {"train": [0.5, 0.5], "all": [0.5, 0.5]}
    matrix = parse_matrix(MATRIX, "m")
    work = estimate(matrix, expand(matrix), Cache(tmp_path / "cache"), {}, [], records, "cpu", jobs=1)
    train = 1_438 * 10 / 350 * 0.5  # resnet20's table rate
    em = table_set_seconds("em", {"surrogate": "cnn"}, 1_438, "protect", "cpu") * 0.5
    assert work.seconds == pytest.approx(train + em)
    assert (work.from_records, work.from_table, work.uncalibrated, work.factors) == (0, 2, 0, (0.5,))
    assert work.low < work.seconds < work.high
    assert "est. 4 min (2–9 min) on this CPU (1 job; 0 of 2 stages timed from records on this CPU, the rest from " \
           "bench's rate table × 0.5 device factor from records)" in work.line("m")


def test_same_component_calibrates_other_budgets(tmp_path):
    """A recorded EM set at other params calibrates EM (not the device's training factor)."""
    em = record(protection_name="em", protection_params={"surrogate": "cnn", "model_steps": 20}, protection_key="k",
                seconds={"protect": 2 * table_set_seconds("em", {"surrogate": "cnn", "model_steps": 20}, 1_438,
                                                          "protect", "cpu")})
    records = write(tmp_path, cnn_cell(16.0), em)
    ratios = calibrate(records, "cpu")
    assert ratios["build:em"] == pytest.approx([2.0]) and ratios["train"] == [0.5]
    matrix = parse_matrix({**MATRIX, "victims": ["cnn"]}, "m")
    work = estimate(matrix, expand(matrix), Cache(tmp_path / "cache"), {}, [], records, "cpu", jobs=1)
    assert work.longest["protect"] == pytest.approx(2 * table_set_seconds("em", {"surrogate": "cnn"}, 1_438,
                                                                          "protect", "cpu"))
    assert work.longest["train"] == pytest.approx(1_438 * 10 / 800) and work.untimed == {"protect"}


def test_no_record_on_the_device_is_uncalibrated_and_wide(tmp_path):
    matrix = parse_matrix(MATRIX, "m")
    work = estimate(matrix, expand(matrix), Cache(tmp_path / "cache"), {}, [], [], "cpu", jobs=2)
    assert work.uncalibrated == 2 and work.high == pytest.approx(16 * work.low)
    assert "the rest from bench's rate table, 2 uncalibrated (no record on this device)" in work.line("m")
    assert "(1 job; nothing to run)" in Estimate(0, 0, {}, 0.0, 1, "cpu", 0, 0).line("m")


def test_budget_scales_the_table_by_a_components_epochs_and_iterations():
    """UGE's generator epochs dominate its work; DH's HiNet iterations do not grow with the images."""
    assert budget("uge", {"epochs": 20, "encoder_epochs": 80}, 500) == pytest.approx(1.0)
    assert budget("uge", {"epochs": 40, "encoder_epochs": 80}, 500) == pytest.approx(1.75)
    assert budget("tap", {"surrogate_epochs": 40, "steps": 250, "restarts": 8}, 500) == pytest.approx(4.25)
    assert budget("dh", {"iterations": 1000, "blocks": 4, "batch_size": 24, "extractor_epochs": 40}, 5_000) \
        == pytest.approx(0.09 + 0.1)
    assert budget("jpeg", {"quality": 10}, 500) == 1.0
    short = table_set_seconds("confoundergan", {"surrogate": "cnn", "epochs": 20, "surrogate_epochs": 80}, 500,
                              "protect", "cpu")
    full = table_set_seconds("confoundergan", {"surrogate": "cnn", "epochs": 200, "surrogate_epochs": 80}, 500,
                             "protect", "cpu")
    assert full / short == pytest.approx(1.0 / 0.19)


def test_job_requests():
    """Time: 3× the longest recorded job (6× from the table), ≥ 30 min; memory: the device's default, more for
    large sets; CPUs: the threads (≥ 4 beside a GPU); the caller's values win."""
    work = Estimate(10, 0, {}, 900.0, 2, "cpu", 5, 1, longest={"protect": 1_200.0, "train": 900.0},
                    untimed=frozenset({"protect"}), data_gb=0.15)
    assert job_requests(work, "cpu", 2) == {"protect": JobRequest(120, 8, 2), "purify": JobRequest(30, 8, 2),
                                            "train": JobRequest(45, 8, 2)}
    assert job_requests(work, "cuda:0", 1)["train"] == JobRequest(45, 32, 4)
    big = job_requests(Estimate(1, 0, {}, 1.0, 1, "cpu", 1, 0, data_gb=10.0), "cpu", 1)
    assert big["train"] == JobRequest(30, 82, 1)
    assert job_requests(work, "cpu", 2, time_min=10, mem_gb=4, cpus=3)["protect"] == JobRequest(10, 4, 3)


def test_estimate_gives_the_longest_job_and_the_data_size(tmp_path):
    records = write(tmp_path, cnn_cell(16.0))
    matrix = parse_matrix({**MATRIX, "victims": ["cnn", "resnet20"]}, "m")
    work = estimate(matrix, expand(matrix), Cache(tmp_path / "cache"), {}, [], records, "cpu", jobs=2)
    assert work.longest["train"] == pytest.approx(1_438 * 10 / 350 * 0.5) and set(work.longest) == {"protect", "train"}
    assert work.data_gb == pytest.approx(1_438 * 32 * 32 / 1e9)  # 1 channel at 32 px
    assert work.seconds == pytest.approx(sum(work.longest.values()))  # EM's set, then resnet20: over half the work
    requests = job_requests(work, "cpu", 1)
    assert requests["train"].time_min == 30 and requests["protect"].time_min >= 30


def test_training_work_scales_with_each_victims_flops_at_the_datasets_resolution():
    """224 px costs a plain CNN ≈ 49× a 32-px image (no stem) and a ResNet-18 ≈ 3.3× (its ImageNet stem); the
    estimate of a cell follows."""
    from bench.plan.rates import compute

    assert compute("cnn", {}, "imagenet-subset", {}) == pytest.approx(49, rel=0.02)
    assert compute("resnet18", {}, "imagenet-subset", {}) == pytest.approx(3.27, rel=0.02)
    assert compute("cnn", {}, "cifar10", {}) == 1.0
    doc = {**MATRIX, "victims": ["cnn"], "protections": ["clean"]}
    at = {size: estimate(m, expand(m), Cache(Path("/nonexistent")), {}, [], [], "cpu", jobs=1).seconds
          for size in (32, 64) for m in [parse_matrix({**doc, "datasets": {"digits": {"size": size}}}, "m")]}
    assert at[64] / at[32] == pytest.approx(4, rel=0.05)


def test_a_model_shared_by_purified_sets_is_counted_once():
    """ECLIPSE's attacker trains one sparse DDPM per (parameters, data) and every protection's set reuses it: the
    estimate counts its training once, then each further set's denoising only (coverage's 136 h were 35 h)."""
    eclipse = {"train_on": "digits", "train_steps": 20_000}
    doc = {**MATRIX, "countermeasures": {"eclipse": eclipse}, "victims": ["cnn"]}

    def purify(protections):
        m = parse_matrix({**doc, "protections": protections}, "m")
        work = estimate(m, expand(m), Cache(Path("/nonexistent")), {}, [], [], "cpu", jobs=1)
        return work, table_set_seconds("eclipse", eclipse, 1797, "purify", "cpu")
    (one, first), (three, _) = purify(["clean"]), purify(["clean", "cwn", "random_noise"])
    denoise_only = table_set_seconds("eclipse", eclipse, 1797, "purify", "cpu", shared=True)
    assert 0 < denoise_only < first / 10
    assert three.seconds - one.seconds < first / 2
