"""An unset parameter (None) means the paper's default, never 0: 0 means exactly 0 where that is a setting
(adv_training's zero budget, fastaa without Cutout) and is rejected, with what to write instead, where it is not.

Each test fails on the old sentinels, where 0 silently stood for the default.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.core.components import COUNTERMEASURES, PROTECTIONS, VICTIMS, ImageSet
from bench.core.registry import ConfigError
from bench.data.datasets import DATASETS, balanced_subset
from bench.execute.train import train_and_evaluate
from bench.plan.matrix import load_matrix
from bench.plan.recipes import RECIPES, Recipe, make_recipe
from bench.protections import _surrogate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    """40 real greyscale images (4 per class), 1×16×16."""
    return DATASETS.create("digits", per_class=4).load()[0]


def floats(data: ImageSet) -> torch.Tensor:
    return data.images.float() / 255


def counting_cnn(data: ImageSet) -> tuple[torch.nn.Module, list[int]]:
    """A small untrained CNN and the list its forward calls append to."""
    torch.manual_seed(0)
    net = VICTIMS.create("cnn", width=8).build(data.num_classes, data.channels, data.size)
    calls: list[int] = []
    net.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    return net, calls


def transform(name: str, x: torch.Tensor, seed: int = 0, **params) -> torch.Tensor:
    hooks = COUNTERMEASURES.create(name, **params).train_hooks(10, x.shape[-1])
    return hooks.batch_transform(x, torch.zeros(len(x), dtype=torch.long), torch.Generator().manual_seed(seed))[0]


# ------------------------------------------------------------------ adv_training: epsilon and step_size


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_adv_training_zero_epsilon_is_no_perturbation(norm, digits):
    """ε = 0 is a zero budget: the attack returns the batch itself and runs no forward pass (it used to mean
    8/255 or 1.0)."""
    net, calls = counting_cnn(digits)
    at = COUNTERMEASURES.create("adv_training", norm=norm, epsilon=0)
    assert at.budget() == (0.0, 0.0)
    x, y = floats(digits), digits.labels
    adv = at.train_hooks(10, digits.size).attack(net, x, y, torch.Generator().manual_seed(0))
    assert torch.equal(adv, x) and calls == []


@pytest.mark.parametrize("norm, epsilon, step", [("linf", 8 / 255, 2 / 255), ("l2", 1.0, 0.25)])
def test_adv_training_unset_epsilon_is_the_papers(norm, epsilon, step, digits):
    """Unset: DH's ε (8/255 L∞, 1 L2) and 2.5·ε/steps; the L∞ attack uses (nearly) all of its 8/255."""
    at = COUNTERMEASURES.create("adv_training", norm=norm)
    assert (at.epsilon, at.step_size) == (None, None)
    assert at.budget() == pytest.approx((epsilon, step))
    net, _ = counting_cnn(digits)
    x, y = floats(digits), digits.labels
    change = at.perturb(net, x, y, torch.Generator().manual_seed(0)) - x
    size = change.abs().amax() if norm == "linf" else change.flatten(1).norm(dim=1).amax()
    assert 0.9 * epsilon < size <= epsilon + 1e-5


def test_adv_training_step_size_unset_follows_epsilon_and_steps():
    at = COUNTERMEASURES.create("adv_training", epsilon=0.04, steps=4)
    assert at.budget() == pytest.approx((0.04, 0.025))
    assert COUNTERMEASURES.create("adv_training", epsilon=0.04, step_size=0.001).budget() == pytest.approx((0.04, 0.001))


@pytest.mark.parametrize("params, message", [({"epsilon": -0.01}, "epsilon ≥ 0"), ({"step_size": 0}, "step_size > 0"),
                                             ({"step_size": -1.0}, "step_size > 0")])
def test_adv_training_rejects_negative_budgets_and_a_zero_step(params, message):
    with pytest.raises(ConfigError, match=message):
        COUNTERMEASURES.create("adv_training", **params)


# ------------------------------------------------------------------ augmentations: pad, length, cutout


@pytest.mark.parametrize("name, field, instead", [("vanilla", "pad", "crop = false"), ("cutout", "length", "none"),
                                                  ("vanilla", "pad", "omit it"), ("cutout", "length", "omit it")])
def test_zero_pixel_crop_pad_and_cutout_square_are_rejected(name, field, instead):
    """A 0-px pad makes the crop the identity and a 0-px square cuts nothing: the error says what to write."""
    with pytest.raises(ConfigError, match=instead):
        COUNTERMEASURES.create(name, **{field: 0})
    with pytest.raises(ValueError, match=f"{field} ≥ 1"):
        COUNTERMEASURES.get(name)(**{field: -2})


@pytest.mark.parametrize("name, field, size, value", [("vanilla", "pad", 32, 4), ("vanilla", "pad", 16, 2),
                                                      ("cutout", "length", 32, 16), ("cutout", "length", 224, 112),
                                                      ("fastaa", "cutout", 32, 16)])
def test_unset_pixel_sizes_are_the_papers(name, field, size, value):
    """Unset resolves to size/8 (crop pad) and half the side (Cutout): the same draws as writing the value."""
    x = torch.rand(8, 3, size, size)
    assert getattr(COUNTERMEASURES.create(name), field) is None
    unset, explicit = transform(name, x), transform(name, x, **{field: value})
    assert torch.equal(unset, explicit)
    assert not torch.equal(unset, transform(name, x, **{field: value + 2}))


def test_fastaa_cutout_zero_is_the_policy_without_cutout():
    """fastaa cutout = 0: the same policy draws, and no square zeroed (it used to mean 16 px)."""
    x = torch.rand(16, 3, 32, 32) * 0.5 + 0.25
    policy, full = transform("fastaa", x, cutout=0), transform("fastaa", x)
    assert ((full == policy) | (full == 0)).all(), "the draws before Cutout differ"
    cut = ((full == 0) & (policy != 0)).all(1).flatten(1).sum(1)  # pixels only the default's Cutout zeroed
    assert (cut > 0).float().mean() > 0.8, "the default cuts squares that cutout = 0 keeps"
    with pytest.raises(ConfigError, match="cutout ≥ 0"):
        COUNTERMEASURES.create("fastaa", cutout=-1)


# ------------------------------------------------------------------ em: steps


def test_em_zero_steps_is_rejected():
    with pytest.raises(ConfigError, match="steps ≥ 1.*omit steps"):
        PROTECTIONS.create("em", steps=0)
    assert PROTECTIONS.create("em").steps is None


@pytest.mark.parametrize("params, steps", [({}, 20), ({"mode": "classwise"}, 1), ({"steps": 3}, 3),
                                           ({"mode": "classwise", "steps": 4}, 4)])
def test_em_unset_steps_are_the_official(params, steps, monkeypatch):
    """Unset: 20 signed steps per batch sample-wise, 1 class-wise (the official scripts); given: that many."""
    seen = []
    real = _surrogate.signed_pgd
    monkeypatch.setattr(_surrogate, "signed_pgd", lambda *a, **k: seen.append(k["steps"]) or real(*a, **{**k, "steps": 1}))
    data = ImageSet(torch.randint(0, 256, (8, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8),
                    torch.arange(8) % 2, 2)
    PROTECTIONS.create("em", surrogate="cnn", max_rounds=1, model_steps=1, **params).protect(data, seed=0, device=CPU)
    assert seen and set(seen) == {steps}


# ------------------------------------------------------------------ datasets: per_class, test_per_class


@pytest.mark.parametrize("field", ["per_class", "test_per_class"])
@pytest.mark.parametrize("name", ["digits", "cifar10-jpeg", "cifar10"])
def test_zero_images_per_class_is_rejected(name, field):
    with pytest.raises(ConfigError, match=f"{field} must be ≥ 1, got 0: omit it to keep every image"):
        DATASETS.create(name, **{field: 0})


def test_unset_per_class_keeps_every_image():
    train, test = DATASETS.create("digits").load()
    assert len(train) + len(test) == 1797
    assert DATASETS.create("digits").params()["per_class"] is None
    with pytest.raises(ValueError, match="omit it"):
        balanced_subset(train, 0)


# ------------------------------------------------------------------ recipes: iterations


def test_zero_iterations_is_rejected():
    with pytest.raises(ValueError, match="iterations must be ≥ 1, got 0: omit it to budget by epochs"):
        Recipe(iterations=0)
    with pytest.raises(ConfigError, match="omit it to budget by epochs"):
        make_recipe("quick", iterations=0)


def test_unset_iterations_budget_by_epochs_and_dh_counts_iterations():
    assert RECIPES["quick"].iterations is None and RECIPES["dh"].iterations == 40_000
    train, test = DATASETS.create("digits", per_class=5, test_per_class=2).load()
    torch.manual_seed(0)
    model = VICTIMS.create("cnn", width=8).build(10, 1, train.size)
    result = train_and_evaluate(model, train, test, make_recipe("quick", epochs=2, batch_size=25), seed=0, device=CPU,
                                augment="none")
    assert result["steps"] == 4 and len(result["test_acc"]) == 2  # 2 epochs of ⌈50 / 25⌉ steps


# ------------------------------------------------------------------ matrices set and sweep the optional fields

MATRIX = """
description = "optional fields"
seeds = [0]
[recipe]
name = "quick"
iterations = 7
[datasets.digits]
per_class = [5, 10]
[protections]
em = { surrogate = "cnn", steps = [2, 3] }
[countermeasures]
adv_training = { epsilon = [0, 0.0157] }
vanilla = { pad = 2 }
fastaa = { cutout = 0 }
cutout = {}
[victims.cnn]
"""


def test_a_matrix_sets_and_sweeps_the_optional_fields(tmp_path):
    """Integers into int | None and float | None fields, lists swept; an omitted field stays None (unset)."""
    path = tmp_path / "optional.toml"
    path.write_text(MATRIX)
    matrix = load_matrix(str(path))
    labels = {axis: [c.label for c in choices] for axis, choices in matrix.axes.items()}
    assert labels["datasets"] == ["digits[per_class=5]", "digits[per_class=10]"]
    assert labels["protections"] == ["em[steps=2]", "em[steps=3]"]
    assert labels["countermeasures"] == ["adv_training[epsilon=0]", "adv_training[epsilon=0.0157]", "vanilla",
                                         "fastaa", "cutout"]
    params = {c.label: dict(c.params) for c in matrix.axes["countermeasures"]}
    assert params["adv_training[epsilon=0]"]["epsilon"] == 0.0 and params["adv_training[epsilon=0]"]["step_size"] is None
    assert params["vanilla"]["pad"] == 2 and params["fastaa"]["cutout"] == 0 and params["cutout"]["length"] is None
    assert dict(matrix.axes["datasets"][0].params)["test_per_class"] is None
    for choice in matrix.axes["countermeasures"]:  # a planned cell re-creates its component from these params
        again = COUNTERMEASURES.create(choice.name, **dict(choice.params))
        assert dataclasses.asdict(again) == dict(choice.params)
    assert make_recipe(**matrix.recipe).iterations == 7


def test_a_matrix_writing_a_zero_sentinel_fails_before_anything_runs(tmp_path):
    path = tmp_path / "zero.toml"
    path.write_text(MATRIX.replace("cutout = {}", "cutout = { length = 0 }"))
    with pytest.raises(ConfigError, match="length ≥ 1"):
        load_matrix(str(path))


def test_zero_budget_trains_as_plain_cross_entropy():
    """Through the loop, adv_training with ε = 0 trains exactly the weights of no countermeasure."""
    train, test = DATASETS.create("digits", per_class=5, test_per_class=2).load()

    def run(hooks) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = VICTIMS.create("cnn", width=8).build(10, 1, train.size)
        return train_and_evaluate(model, train, test, make_recipe("quick", epochs=1, batch_size=25, precision="fp32"),
                                  seed=0, device=CPU, augment="none", hooks=hooks)["model"].state_dict()

    plain = run(None)
    for epsilon, same in ((0.0, True), (None, False)):
        trained = run(COUNTERMEASURES.create("adv_training", epsilon=epsilon, steps=2).train_hooks(10, train.size))
        assert all(torch.equal(trained[k], plain[k]) for k in plain) == same, epsilon
