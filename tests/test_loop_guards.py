"""The training loop really trains on what it is given and scores what it is given: it learns real digits and is
scored on the test set it gets, the optimiser steps with the recipe's schedule, the hooks see augmented batches
with their own labels, a cell trains on its data stage's output, and a record's fields agree with its curves.

Each test guards a way the loop once could break silently (an evaluation on the train set, labels misaligned with
their images, the schedule or the augmentation never applied, a purified set ignored, a record's final accuracy
taken from another epoch): every run here passes its shape and determinism checks under those faults.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch

from bench.cli import main
from bench.core.components import COUNTERMEASURES, VICTIMS, Countermeasure, ImageSet, TrainHooks
from bench.data.datasets import DATASETS
from bench.execute.train import to_input, train_and_evaluate
from bench.plan.recipes import make_recipe
from bench.store.records import RecordLog
from tests.conftest import tiny_matrix

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> tuple[ImageSet, ImageSet]:
    """200 train and 200 test digits, 16×16."""
    return DATASETS.create("digits", per_class=20, test_per_class=20).load()


def _train(train: ImageSet, test: ImageSet, hooks: TrainHooks | None = None, augment: str = "crop",
           **recipe) -> dict:
    torch.manual_seed(0)  # model initialisation, as bench.execute.stages does before building
    model = VICTIMS.create("cnn", width=8).build(10, 1, train.size)
    recipe = make_recipe("quick", **{"epochs": 5, "batch_size": 16, "precision": "fp32", **recipe})
    return train_and_evaluate(model, train, test, recipe, seed=0, device=CPU, augment=augment, hooks=hooks)


def _accuracy(model: torch.nn.Module, data: ImageSet) -> float:
    """Top-1 accuracy, computed here, not by the loop."""
    model.eval()
    with torch.no_grad():
        return (model(to_input(data.images)).argmax(1) == data.labels).float().mean().item()


def test_the_loop_learns_digits_and_is_scored_on_the_test_set_it_is_given(digits):
    """A width-8 CNN trained 5 epochs on 200 digits classifies the held-out test digits far above chance (0.1), and
    its reported final accuracy is the trained model's accuracy on that test set. The same training scored on the
    test images with their labels shuffled reports chance: the score comes from the test set it is given."""
    train, test = digits
    shuffled = ImageSet(test.images, test.labels[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))],
                        test.num_classes)
    real, control = _train(train, test), _train(train, shuffled)
    assert real["final"] >= 0.5, real["test_acc"]
    assert real["final"] == pytest.approx(_accuracy(real["model"], test), abs=1.5 / len(test))
    assert real["final"] == real["test_acc"][-1] and real["best"] == max(real["test_acc"])
    assert control["train_acc"] == real["train_acc"], "the test set changed the training"
    assert control["final"] <= 0.2, control["test_acc"]


def _observed_lrs(train: ImageSet, test: ImageSet, **recipe) -> list[float]:
    """The step size the optimiser took at each step: with plain SGD (no momentum, no weight decay) and a loss whose
    gradient is 1 for every parameter, each step moves every parameter down by exactly that step's lr."""
    before: list[torch.Tensor] = []

    def unit_gradient(model, x, y, gen):
        params = [p for p in model.parameters() if p.requires_grad]
        before.append(torch.cat([p.detach().flatten() for p in params]).clone())
        return sum(p.sum() for p in params), model(x)

    result = _train(train, test, TrainHooks(loss=unit_gradient), epochs=2, batch_size=50, momentum=0.0,
                    weight_decay=0.0, **recipe)
    after = torch.cat([p.detach().flatten() for p in result["model"].parameters() if p.requires_grad])
    return [(a - b).mean().item() for a, b in zip(before, [*before[1:], after])]


@pytest.mark.parametrize("schedule, multiplier", [
    pytest.param("cosine", lambda k, total: 0.5 * (1 + math.cos(math.pi * k / total)), id="cosine"),
    pytest.param("step", lambda k, total: 1.0 if k < 4 else 0.1, id="step"),  # milestones (1,): ×0.1 from step 4
    pytest.param("constant", lambda k, total: 1.0, id="constant")])
def test_the_optimiser_steps_with_the_recipes_schedule(digits, schedule, multiplier):
    """2 epochs × 4 steps of lr 0.05: the step sizes measured on the weights follow the recipe's schedule."""
    lrs = _observed_lrs(*digits, schedule=schedule, lr=0.05, milestones=(1,), gamma=0.1)
    assert len(lrs) == 8
    assert lrs == pytest.approx([0.05 * multiplier(k, 8) for k in range(8)], rel=1e-3, abs=1e-6)


def _batches_seen(train: ImageSet, test: ImageSet, augment: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (x, y) the loop handed to the batch_transform hook over one epoch."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(x, y, gen):
        seen.append((x.detach().clone(), y.clone()))
        return x, y

    _train(train, test, TrainHooks(batch_transform=record), augment=augment, epochs=1, batch_size=50)
    return torch.cat([x for x, _ in seen]), torch.cat([y for _, y in seen])


def test_batches_are_augmented_and_keep_their_own_labels(digits):
    """Without augmentation every batch image is a train image, once each per epoch, with that image's own label;
    with ``crop`` (the digits' standard augmentation) almost no batch image is a train image any more."""
    train, test = digits
    raw = to_input(train.images).flatten(1)
    x, y = _batches_seen(train, test, "none")
    match = (x.flatten(1)[:, None, :] == raw[None, :, :]).all(2)  # batch image × train image
    assert match.any(1).all() and sorted(match.float().argmax(1).tolist()) == list(range(len(train)))
    assert torch.equal(y, train.labels[match.float().argmax(1)]), "batch labels are not their images' labels"
    cropped, _ = _batches_seen(train, test, "crop")
    unchanged = (cropped.flatten(1)[:, None, :] == raw[None, :, :]).all(2).any(1)
    assert unchanged.float().mean() <= 0.2, "the standard augmentation did not reach the batches"


# ------------------------------------------------------------------ a real (tiny) run: stages and records


class Blank(Countermeasure):
    """Test countermeasure: a data stage that sets every train image to 0 (nothing left to learn from)."""
    paper: ClassVar[str] = "test countermeasure"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})

    def purify(self, train: ImageSet, *, seed, device) -> ImageSet:
        return train.with_images(torch.zeros_like(train.images))


class LateRelabel(Countermeasure):
    """Test countermeasure: trains on wrong labels ((y + 1) mod K) in the last two epochs, so the test accuracy
    falls at the end: the best epoch is not the last."""
    paper: ClassVar[str] = "test countermeasure"
    stages: ClassVar[frozenset[str]] = frozenset({"train"})

    def train_hooks(self, num_classes, image_size):
        state = {"late": False}

        def epoch_start(epoch, epochs):
            state["late"] = epoch >= epochs - 2

        def relabel(x, y, gen):
            return x, (y + 1) % num_classes if state["late"] else y

        return TrainHooks(batch_transform=relabel, epoch_start=epoch_start)


RUN = """
seeds = [0]
[recipe]
name = "quick"
epochs = 5
batch_size = 16
schedule = "constant"
[datasets.digits]
per_class = 20
test_per_class = 20
[protections]
clean = {}
[countermeasures]
none = {}
blank_loop_test = {}
late_relabel_loop_test = {}
[victims.cnn]
width = 8
"""


@pytest.fixture(scope="module")
def run_records(tmp_path_factory) -> dict[str, object]:
    """One in-process ``bench run`` of 3 cells on digits (clean data; none, blank, late-relabel): records by
    countermeasure. The test countermeasures are registered for this run only."""
    added = {"blank_loop_test": Blank, "late_relabel_loop_test": LateRelabel}
    for name, cls in added.items():
        COUNTERMEASURES.register(name)(cls)
    try:
        folder = tmp_path_factory.mktemp("loop")
        matrix = tiny_matrix(folder, "loop", text=RUN)
        assert main(["run", "--matrix", str(matrix), "--results", str(folder / "r"), "--jobs", "1"]) == 0
        records = RecordLog(folder / "r" / "runs" / "loop" / "records.jsonl").read()
    finally:
        for name in added:
            COUNTERMEASURES._classes.pop(name, None)  # no other test sees them
    assert all(r.status == "ok" for r in records), [r.error for r in records]
    return {r.countermeasure: r for r in records}


def test_a_data_stage_that_blanks_the_images_trains_the_victim_to_chance(run_records):
    """The cell trains on its data stage's output: blanked train images leave chance accuracy on the real test set,
    while the same victim, recipe and data without the stage learns."""
    assert run_records["none"].test_acc_final >= 0.5, run_records["none"].test_acc
    assert run_records["blank_loop_test"].test_acc_final <= 0.25, run_records["blank_loop_test"].test_acc


def test_record_fields_agree_with_the_curves(run_records):
    """final is the last epoch's test accuracy, best the curve's maximum and best_epoch (1-based) where it is, for
    every cell; the late-relabel cell's curve falls at the end, so there final and best differ."""
    for record in run_records.values():
        curve = record.test_acc
        assert len(curve) == 5 and record.test_acc_final == curve[-1], (record.countermeasure, curve)
        assert record.test_acc_best == max(curve) and curve[record.best_epoch - 1] == max(curve), curve
    late = run_records["late_relabel_loop_test"]
    assert late.test_acc_final < late.test_acc_best and late.best_epoch < 5, late.test_acc

