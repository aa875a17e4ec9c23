"""UGE against its paper (fidelity audit, findings 3–6 and 9): G's output, L_fd's reduction and target, and what a
fit records so that a reader sees whether each term acts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import bench.protections  # noqa: F401  (registers)
from bench.core.components import PROTECTIONS
from bench.data.datasets import DATASETS
from bench.protections.uge import Generator
from bench.protections.uge.losses import class_targets, feature_gap, least_similar
from tests.test_uge import CPU, FAST, digits  # noqa: F401  (digits: the fixture)


@pytest.mark.parametrize("output", ["normalised", "clamp", "tanh"])
def test_generator_output_is_eq3_clamp_of_x_plus_rho_a_or_the_tanh_reading(output):
    torch.manual_seed(0)
    G = Generator(1, 4, 0.04, 0.0, output=output).eval()
    x = torch.rand(4, 1, 8, 8) * 0.8 + 0.1
    a = G.net(x)
    step = 0.04 * (torch.tanh(a) if output == "tanh" else a.clamp(-1, 1))
    assert torch.allclose(G(x), (x + step).clamp(0, 1), atol=1e-6)
    G.train()
    x.requires_grad_(False)
    G(x).sum().backward()
    assert G.net[0].weight.grad.abs().sum() > 0, "no gradient reaches G"


def test_generator_output_must_be_known():
    with pytest.raises(ValueError, match="output 'sigmoid'"):
        Generator(1, 4, 0.04, 0.0, output="sigmoid")
    with pytest.raises(ValueError, match="target 'pixel'"):
        PROTECTIONS.create("uge", target="pixel")
    with pytest.raises(ValueError, match="fd_reduction 'max'"):
        PROTECTIONS.create("uge", fd_reduction="max")


def test_eq9_target_is_the_least_similar_other_class_and_the_class_variant_its_mode():
    text = torch.eye(3)
    clean = torch.tensor([[0.9, 0.1, 0.0], [0.9, 0.0, 0.1], [0.0, 0.9, 0.1], [0.1, 0.1, 0.9]])
    y = torch.tensor([0, 0, 1, 2])
    assert least_similar(clean, text, y).tolist() == [2, 1, 0, 0]  # never the image's own class
    far, y = torch.tensor([1, 1, 2, 0, 0, 2]), torch.tensor([0, 0, 0, 1, 1, 1])
    modes, consistency = class_targets(far, y, 3)
    assert modes.tolist() == [1, 1, 1, 0, 0, 0] and math.isclose(consistency, 2 / 3)


def test_feature_gap_is_the_mse_or_the_sum():
    a, b = torch.zeros(2, 4), torch.tensor([[1.0, 1, 1, 1], [2, 0, 0, 0]])
    assert feature_gap(a, b, "mean").tolist() == [1.0, 1.0] and feature_gap(a, b, "sum").tolist() == [4.0, 4.0]


def test_a_fit_records_every_term_its_steps_saturation_and_target_consistency(digits):
    info = PROTECTIONS.create("uge", **FAST).fit(digits, seed=0, device=CPU).data.info
    assert set(info["losses"]) == {"gm", "fd", "ud"} and all(math.isfinite(v) for v in info["losses"].values())
    assert all(len(curve) == 2 and curve[-1] == round(info["losses"][t], 6) for t, curve in info["losses_by_epoch"].items())
    assert info["generator_steps"] == 2 * math.ceil(80 / 32) and info["trajectory_steps"] == 2 * math.ceil(80 / 32)
    assert 0 <= info["at_rho"] <= 1 and 0 < info["fd_target_consistency"] <= 1 and info["norm_shift"] >= 0
    mse = PROTECTIONS.create("uge", **{**FAST, "fd_reduction": "mean"}).fit(digits, seed=0, device=CPU).data.info
    assert mse["fd_hinge_active"] == 1.0, "under the MSE reading ‖F′ − F_t‖²/D < α = 0.1 for every image"
    fd_only = PROTECTIONS.create("uge", **{**FAST, "losses": "fd"}).fit(digits, seed=0, device=CPU).data.info
    assert set(fd_only["losses"]) == {"fd"} and fd_only["trajectory_steps"] == 0


def test_the_class_target_is_an_explicit_variant_that_changes_the_images(digits):
    image = PROTECTIONS.create("uge", **{**FAST, "losses": "fd"})
    per_class = PROTECTIONS.create("uge", **{**FAST, "losses": "fd", "target": "class"})
    assert image.target == "image" and image.spec() != per_class.spec()
    a, b = (p.fit(digits, seed=0, device=CPU).data for p in (image, per_class))
    assert a.info["fd_target_consistency"] == b.info["fd_target_consistency"] < 1
    assert not torch.equal(a.images, b.images)


def test_the_authorized_victim_and_distills_teacher_normalise_as_the_fit_did(digits):
    """Audit finding 9: the fit's trajectory and L_gm use the clean set's statistics; the authorized network trains
    on x_u, whose channel means differ by mean(δ), so it must normalise with the fit's statistics, not x_u's."""
    from bench.core.components import COUNTERMEASURES, VICTIMS, Models
    from bench.execute.train import channel_stats, train_and_evaluate
    from bench.plan.recipes import make_recipe

    fitted = PROTECTIONS.create("uge", **FAST).fit(digits, seed=0, device=CPU)
    clean_mean, clean_std = channel_stats(digits.images)
    assert not torch.equal(channel_stats(fitted.data.images)[0], clean_mean), "x_u's statistics equal x's"
    mean, std = VICTIMS.create("authorized").input_stats(models=fitted.models)
    assert torch.equal(mean, clean_mean) and torch.equal(std, clean_std)
    assert VICTIMS.create("authorized").input_stats(models=Models()) is None  # clean row: the train set's own
    assert VICTIMS.create("cnn").input_stats() is None
    model = VICTIMS.create("authorized").build(10, 1, digits.size, models=fitted.models)
    recipe = dataclasses.replace(make_recipe("quick").for_victim("cnn"), epochs=1)
    trained = train_and_evaluate(model, fitted.data, digits, recipe, seed=0, device=CPU, augment="none",
                                 stats=(mean, std))["model"]
    assert torch.equal(trained[0].mean.flatten(), clean_mean)
    teacher = COUNTERMEASURES.create("distill", teacher_recipe="quick").fit(
        fitted.data, seed=0, device=CPU, models=Models({"authorized": fitted.models["authorized"]})).models["teacher"]
    assert torch.equal(teacher.net[0].mean.flatten(), clean_mean)


def test_the_generator_does_not_collapse_to_one_colour_shift():
    """Audit finding 3 on real data (cifar10-jpeg, 20 images a class): with x + ρ·tanh(a) or x + ρ·a, Adam drives
    the output conv's offset past ±1 within a few steps and G publishes one constant shift (≈ 97 % of pixels at ±ρ,
    mean δ ≈ ±ρ per channel); with a batch-normalised map L_fd keeps falling and δ follows the image."""
    train = DATASETS.create("cifar10-jpeg", per_class=20, test_per_class=1).load()[0]
    uge = PROTECTIONS.create("uge", losses="fd", encoder="classifier", encoder_arch="cnn", encoder_epochs=5, epochs=10,
                             width=8, batch_size=64)  # output='tanh' or 'clamp' fail both checks
    info = uge.fit(train, seed=0, device=CPU).data.info
    curve = info["losses_by_epoch"]["fd"]
    assert info["at_rho"] < 0.9 and info["norm_shift"] < 0.05, info
    assert curve[-1] < curve[1] - 0.01, curve


def test_a_cell_trains_the_authorized_victim_with_the_fits_statistics(tmp_path, monkeypatch):
    """Through `bench run` (in-process): the train stage passes ``Victim.input_stats`` on, so the authorized victim
    normalises with the clean statistics and a hacker with its (protected) train set's own."""
    from bench.cli import main
    from bench.execute import stages
    from bench.execute.train import channel_stats

    seen = {}
    real = stages.train_and_evaluate

    def spy(model, train, *args, **kwargs):
        seen[type(model).__name__ if kwargs["stats"] is None else "authorized"] = kwargs["stats"]
        return real(model, train, *args, **kwargs)

    monkeypatch.setattr(stages, "train_and_evaluate", spy)
    params = "\n".join(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}" for k, v in FAST.items())
    matrix = tmp_path / "m.toml"
    matrix.write_text(f'[recipe]\nname = "quick"\n[datasets.digits]\nper_class = 8\ntest_per_class = 2\n'
                      f'[protections.uge]\n{params}\n[countermeasures.none]\n'
                      '[victims.authorized]\narch = "cnn"\n[victims.cnn]\n')
    assert main(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--jobs", "1"]) == 0
    clean = DATASETS.create("digits", per_class=8, test_per_class=2).load()[0]
    assert torch.equal(seen["authorized"][0], channel_stats(clean.images)[0]) and None in seen.values()
