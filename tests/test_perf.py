"""``bench perf train``: a discarded warm-up, device-sized defaults, the fp32 and plain rows, same-precision ratios."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from bench.data.datasets import DATASETS
from bench.execute import perf
from bench.execute.perf import PerfSettings, run_perf


def test_none_sizes_resolve_to_the_devices_and_given_ones_stay():
    assert PerfSettings().resolved(torch.device("cuda")) == PerfSettings(per_class=1000, epochs=3, workers=4)
    assert PerfSettings().resolved(torch.device("cpu")) == PerfSettings(per_class=100, epochs=2, workers=2)
    assert PerfSettings(per_class=7, epochs=1, workers=0).resolved(torch.device("cuda")).per_class == 7


@pytest.mark.parametrize("warmup", [True, False])
def test_the_warm_up_run_of_each_loop_is_not_kept(monkeypatch, warmup):
    calls = itertools.count(1)  # each loop call returns the next number: the warm-up's are 1-4
    monkeypatch.setattr(perf, "resolve_precision", lambda precision, device: "bf16")
    monkeypatch.setattr(perf, "reference_loop", lambda *args: float(next(calls)))
    monkeypatch.setattr(perf, "plain_loop", lambda *args: float(next(calls)))
    monkeypatch.setattr(perf, "bench_loop", lambda *args: {"images_per_s": float(next(calls))})
    settings = PerfSettings(("cnn",), "digits", 5, 1, 16, repeats=2, workers=0, warmup=warmup)
    train, test = DATASETS.create("digits", per_class=2, test_per_class=1).load()
    row = perf.measure("cnn", train, test, settings, torch.device("cpu"))
    first = 5 if warmup else 1
    assert row["reference_runs"] == [first, first + 4] and row["plain_runs"] == [first + 3, first + 7]
    assert row["bench_runs"] == [first + 1, first + 5] and row["bench_fp32_runs"] == [first + 2, first + 6]
    assert row["ratio"] == pytest.approx((first + 4) / (first + 2))  # medians: bench fp32 / reference


def test_perf_train_writes_the_fp32_and_plain_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(perf, "resolve_precision", lambda precision, device: "fp32" if precision == "fp32" else "bf16")
    rows = run_perf(PerfSettings(("cnn",), "digits", per_class=5, epochs=1, batch_size=16, repeats=1, workers=0),
                    tmp_path)
    row = rows[0]
    assert row["warmup"] and all(row[f"{loop}_images_per_s"] > 0 for loop in ("reference", "bench", "bench_fp32",
                                                                               "plain"))
    assert row["ratio"] == pytest.approx(row["bench_fp32_images_per_s"] / row["reference_images_per_s"])
    assert row["ratio_plain"] == pytest.approx(row["bench_images_per_s"] / row["plain_images_per_s"])
    table = (tmp_path / "perf" / "train-cpu.md").read_text()
    for line in ("| cnn | reference (DataLoader) | fp32 |", "| cnn | bench | bf16 |", "| cnn | bench | fp32 |",
                 "| cnn | plain (device-resident) | bf16 |"):
        assert line in table
    assert json.loads((tmp_path / "perf" / "train-cpu.json").read_text())["settings"]["epochs"] == 1
