"""The one training loop: recipes, schedules, augmentation, hooks, budgets, determinism, perf harness."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from bench.core.components import VICTIMS, TrainHooks
from bench.core.registry import ConfigError
from bench.data.datasets import DATASETS
from bench.execute.augment import random_resized_crop, standard_augment
from bench.execute.train import TrainingDiverged, _schedule, cpu_has_bf16, resolve_precision, train_and_evaluate
from bench.plan.recipes import RECIPES, make_recipe

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return DATASETS.create("digits", per_class=20, test_per_class=10).load()


def _train(digits, hooks=None, **recipe):
    train, test = digits
    torch.manual_seed(0)  # model initialisation, as bench.execute.stages does before building
    model = VICTIMS.create("cnn", width=8).build(10, 1, train.size)
    return train_and_evaluate(model, train, test, make_recipe("quick", **{"epochs": 2, **recipe}), seed=0, device=CPU,
                              augment="crop", hooks=hooks)


def test_every_recipe_names_its_source():
    assert set(RECIPES) >= {"quick", "fast", "confoundergan", "apbench", "dh", "uge"}
    assert all(r.source and r.name == name for name, r in RECIPES.items())
    g5 = RECIPES["confoundergan"]
    assert (g5.lr, g5.momentum, g5.epochs, g5.schedule) == (0.025, 0.9, 90, "cosine")
    assert RECIPES["dh"].iterations == 40_000 and RECIPES["apbench"].batch_size == 256


def test_uge_plain_cnn_override():
    uge = RECIPES["uge"]
    assert (uge.lr, uge.epochs) == (0.1, 160)
    cnn = uge.for_victim("cnn")
    assert (cnn.lr, cnn.epochs, cnn.optimizer) == (1e-3, 100, "adam") and uge.for_victim("resnet18") == uge


def test_dataset_overrides_apply_to_their_dataset_first_and_leave_other_cells_keys():
    """DH trains 8,000 iterations on its ImageNet subset and 40,000 on CIFAR: one matrix, one recipe; a victim's own
    override wins; cells of the other datasets keep the keys they had without the table."""
    from bench.plan.matrix import expand, parse_matrix
    from bench.plan.planner import plan_cell

    recipe = make_recipe("uge", datasets={"imagenet-subset": {"iterations": 80, "lr": 0.05}})
    assert recipe.for_dataset("imagenet-subset").for_victim("resnet18").iterations == 80
    assert recipe.for_dataset("cifar10").for_victim("resnet18").iterations is None
    assert recipe.for_dataset("imagenet-subset").for_victim("cnn").lr == 1e-3  # UGE's plain CNN: its override wins
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'"):
        make_recipe("dh", datasets={"imagenet": {"iterations": 8}})
    with pytest.raises(ConfigError, match="iterations must be ≥ 1"):
        make_recipe("dh", datasets={"digits": {"iterations": 0}})
    doc = {"datasets": {"digits": {}}, "protections": ["clean"], "countermeasures": ["none"], "victims": ["cnn"]}
    plain = parse_matrix({**doc, "recipe": {"name": "quick"}}, "m")
    tabled = parse_matrix({**doc, "recipe": {"name": "quick", "datasets": {"cifar10": {"epochs": 3}}}}, "m")
    changed = parse_matrix({**doc, "recipe": {"name": "quick", "datasets": {"digits": {"epochs": 3}}}}, "m")
    keys = [plan_cell(expand(m)[0], {expand(m)[0].dataset: "d"}, m.recipe).cell_key for m in (plain, tabled, changed)]
    assert keys[0] == keys[1] != keys[2]


@pytest.mark.parametrize("overrides, message", [
    ({"epoch": 3}, "epoch"), ({"schedule": "linear"}, "schedule"), ({"lr": "high"}, "lr"), ({"epochs": 0}, "epochs")])
def test_bad_recipe_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_recipe("quick", **overrides)


def test_schedules():
    apbench = RECIPES["apbench"]
    step = _schedule(apbench, 200 * 10, 10)
    assert step(999) == 1.0 and step(1000) == 0.5 and step(1999) == 0.5
    cosine = _schedule(RECIPES["quick"], 100, 10)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)
    triangle = _schedule(RECIPES["fast"], 100, 10)
    assert triangle(0) == 0 and triangle(25) == pytest.approx(1.0) and triangle(100) == 0


def test_augment_shapes_determinism_and_content():
    x = torch.rand(8, 3, 32, 32)
    for kind in ("crop_flip", "crop", "flip", "rrc_flip", "none"):
        a = standard_augment(x, kind, torch.Generator().manual_seed(1))
        b = standard_augment(x, kind, torch.Generator().manual_seed(1))
        assert a.shape == x.shape and torch.equal(a, b)
    assert torch.equal(standard_augment(x, "none", torch.Generator()), x)
    flipped = standard_augment(x, "flip", torch.Generator().manual_seed(0))
    assert all(torch.equal(f, i) or torch.equal(f, i.flip(2)) for f, i in zip(flipped, x))
    crop = standard_augment(x, "crop", torch.Generator().manual_seed(0))
    assert ((crop == 0).float().mean() > 0) and crop.max() <= x.max()  # zero padding shows at the borders
    identity = random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(identity, x, atol=1e-5)
    with pytest.raises(ValueError, match="unknown augmentation"):
        standard_augment(x, "cutout", torch.Generator())


def test_curves_determinism_and_precision(digits):
    first, second = _train(digits), _train(digits)
    assert first["test_acc"] == second["test_acc"] and first["train_acc"] == second["train_acc"]
    assert len(first["test_acc"]) == 2 and first["best"] >= first["final"]
    assert first["precision"] == ("bf16" if cpu_has_bf16() else "fp32") == resolve_precision("auto", CPU)
    assert _train(digits, precision="fp32")["precision"] == "fp32"


def test_iteration_budget(digits):
    result = _train(digits, iterations=3, batch_size=64)
    assert result["steps"] == 3 and len(result["test_acc"]) == 1


def test_hooks_are_used(digits):
    """Batch transform with soft labels, a per-batch attack and a loss override all reach the loop, each given the
    loop's one generator."""
    calls = {"transform": 0, "attack": 0, "loss": 0}
    generators = set()

    def soft_labels(x, y, gen):
        calls["transform"] += 1
        generators.add(gen)
        return x, F.one_hot(y, 10).float() * 0.9 + 0.01

    def attack(model, x, y, gen):
        calls["attack"] += 1
        generators.add(gen)
        return (x + 0.01).clamp(0, 1)

    def loss(model, x, y, gen):
        calls["loss"] += 1
        generators.add(gen)
        logits = model(x)
        return F.cross_entropy(logits.float(), y), logits

    result = _train(digits, hooks=TrainHooks(soft_labels, attack, loss), epochs=1)
    assert calls["transform"] == calls["attack"] == calls["loss"] == 2 and result["steps"] == 2
    assert len(generators) == 1 and isinstance(generators.pop(), torch.Generator)


def test_divergence_stops_the_cell(digits):
    def nan_loss(model, x, y, gen):
        logits = model(x)
        return logits.sum() * float("nan"), logits

    with pytest.raises(TrainingDiverged, match="nan"):
        _train(digits, hooks=TrainHooks(loss=nan_loss))


FAULTS = """
import resource, sys, torch
from bench.core.components import VICTIMS
from bench.execute.train import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
model = VICTIMS.create("cnn").build(10, 3, 32)
x, y = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
for i in range(8):
    if i == 3:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.nn.functional.cross_entropy(model(x), y).backward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


@pytest.mark.slow  # page-fault counts depend on the machine's allocator, kernel and memory pressure
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_keep_freed_memory_cuts_page_faults_of_cpu_training_steps():
    """glibc's default returns big freed buffers to the OS, so each step page-faults them back in."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                                       check=True, timeout=600).stdout) for mode in ("default", "keep")}
    assert faults["keep"] < faults["default"] / 3, faults


def test_perf_harness_writes_both_loops(tmp_path):
    from bench.execute.perf import PerfSettings, run_perf

    rows = run_perf(PerfSettings(("cnn",), "digits", per_class=10, epochs=1, batch_size=32, repeats=1, workers=0),
                    tmp_path)
    assert rows[0]["reference_images_per_s"] > 0 and rows[0]["bench_images_per_s"] > 0
    saved = json.loads((tmp_path / "perf" / "train-cpu.json").read_text())
    assert saved["rows"][0]["ratio"] == pytest.approx(rows[0]["ratio"])
    assert "| cnn |" in (tmp_path / "perf" / "train-cpu.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("victim, floor", [("resnet18", 0.45), ("cnn", 0.40)])
def test_quick_recipe_on_cifar10_jpeg_subset(victim, floor):
    """Acceptance: 500 per class of CIFAR-10 (JPEG copy), quick recipe, CPU: ≥ floor in ≤ 10 minutes."""
    try:
        train, test = DATASETS.create("cifar10-jpeg", per_class=500, test_per_class=200).load()
    except ConfigError as err:
        pytest.skip(str(err))
    torch.set_num_threads(2)
    start = time.perf_counter()
    model = VICTIMS.create(victim).build(10, 3, 32)
    result = train_and_evaluate(model, train, test, make_recipe("quick"), seed=0, device=CPU, augment="crop_flip")
    seconds = time.perf_counter() - start
    print(f"{victim}: final {result['final']:.4f} best {result['best']:.4f} in {seconds:.0f} s, curve {result['test_acc']}")
    assert result["final"] >= floor and seconds <= 600
