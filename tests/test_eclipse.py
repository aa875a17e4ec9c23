"""eclipse (ECLIPSE, Wang et al. 2024): the cosine 4,000-step schedule and its t* = 100 noise (≈ 6/255, against
diffpure's ≈ 41/255), the data stage's contract on real digits (shape, dtype, labels, determinism, no use of the
test split), its small change, the corruption compensation's greyscale fraction and noise, the pretrained path's
refusal, parameter validation, and a denoising check on a class-wise noise poison of real digits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bench.core.components import COUNTERMEASURES, ImageSet
from bench.core.registry import ConfigError
from bench.countermeasures import _ddpm
from bench.countermeasures.eclipse import SCHEDULE, TIMESTEPS, WEIGHTS, compensate
from bench.data.datasets import DATASETS

CPU = torch.device("cpu")
TINY = {"train_on": "digits", "train_on_per_class": 2, "train_steps": 2, "train_width": 8, "train_batch_size": 8}


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    """100 real greyscale digits, 1×16×16 (10 per class)."""
    return DATASETS.create("digits", per_class=10).load()[0]


def make(tmp_path, name="eclipse", **params):
    return COUNTERMEASURES.create(name, **{**TINY, "cache": str(tmp_path), **params})


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).div(255).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((-10 * mse.log10()).mean())


def forward_std(schedule: str, timesteps: int, t_star: int) -> float:
    from diffusers import DDPMScheduler
    abar = DDPMScheduler(num_train_timesteps=timesteps, **_ddpm.SCHEDULES[schedule]).alphas_cumprod[t_star - 1]
    return math.sqrt(1 - float(abar))


def test_forward_noise_is_eclipses_not_diffpures():
    """√(1 − ᾱ_t*) at t* = 100: improved-diffusion's cosine of 4,000 steps (ᾱ(t) = f(t)/f(0), f = cos²((t/T + s)/
    (1 + s)·π/2), s = 0.008, computed here independently) gives 0.0499 on [−1, 1], 6.4/255 in pixels; DDPM's 1,000
    linear βs (diffpure, AVATAR) give 0.321, 40.9/255: ECLIPSE's noise is 6.4 times smaller."""
    def f(t: float) -> float:
        return math.cos((t / TIMESTEPS + 0.008) / 1.008 * math.pi / 2) ** 2
    eclipse, diffpure = forward_std(SCHEDULE, TIMESTEPS, 100), forward_std("linear", 1000, 100)
    assert eclipse == pytest.approx(math.sqrt(1 - f(100) / f(0)), rel=1e-4)
    assert eclipse * 255 / 2 == pytest.approx(6.36, abs=0.05) and diffpure * 255 / 2 == pytest.approx(40.9, abs=0.1)
    assert 6 < diffpure / eclipse < 7


def test_data_stage_contract(tmp_path, digits, monkeypatch):
    """uint8, shape and labels kept, input untouched, the same bytes for a seed and others for another; the model
    is a cosine 4,000-step DDPM trained on the sparse set; the output does not depend on train_on's test split."""
    images, labels = digits.images.clone(), digits.labels.clone()
    countermeasure = make(tmp_path, t_star=10)
    out = countermeasure.purify(digits, seed=0, device=CPU)
    assert out.images.dtype == torch.uint8 and out.images.shape == digits.images.shape
    assert torch.equal(out.labels, labels) and out.num_classes == digits.num_classes
    assert torch.equal(digits.images, images), "the input was mutated"
    assert torch.equal(out.images, countermeasure.purify(digits, seed=0, device=CPU).images)
    assert not torch.equal(out.images, countermeasure.purify(digits, seed=1, device=CPU).images)
    assert out.info["model"].startswith("trained on digits (20 images, the last of each class), 2 steps") and out.info["t_star"] == 10
    folder = next(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    config = json.loads((folder / "scheduler_config.json").read_text())
    assert config["num_train_timesteps"] == 4000 and config["beta_schedule"] == "squaredcos_cap_v2"
    loader = type(DATASETS.create("digits"))
    real = loader.load

    def poisoned_test_split(self, *args, **kwargs):
        train, test = real(self, *args, **kwargs)
        return train, ImageSet(torch.full_like(test.images, 255), test.labels, test.num_classes)
    monkeypatch.setattr(loader, "load", poisoned_test_split)
    other = make(tmp_path / "fresh", t_star=10).purify(digits, seed=0, device=CPU)
    assert torch.equal(other.images, out.images), "the test split changed the output"


def test_change_is_of_eclipses_scale(tmp_path, digits):
    """With the same tiny training, t* = 100 of the cosine 4,000 changes the digits little (PSNR > 28 dB); diffpure's
    t* = 100 of the linear 1,000 rewrites them (< 22 dB)."""
    steps = {"sampler": "ddim", "steps": 5, "t_star": 100}
    ours = make(tmp_path, **steps).purify(digits, seed=0, device=CPU)
    theirs = COUNTERMEASURES.create("diffpure", model="trained", cache=str(tmp_path), **TINY, **steps)
    theirs = theirs.purify(digits, seed=0, device=CPU)
    assert psnr(ours.images, digits.images) > 28 and psnr(theirs.images, digits.images) < 22


def test_compensation_greyscales_40_percent_and_adds_noise_of_std_005():
    """RandomGrayscale(0.4) per image: 40 % ± 3 % of 2,000 images have equal channels (their 8-bit luma); the
    noise alone has std 0.05 (and the −0.5/255 bias of truncation to 8 bits); outputs are 8-bit values in [0, 1]."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2000, 3, 4, 4), generator=gen).float() / 255
    out = compensate(x, torch.Generator().manual_seed(1), 0.4, 0.0)
    grey = (out == out[:, :1]).flatten(1).all(1)
    assert 0.37 < grey.float().mean() < 0.43
    assert torch.allclose(out[grey][:, 0], (_ddpm_luma(x[grey]) * 255).round() / 255, atol=1e-6)
    assert torch.equal(out[~grey], x[~grey])
    middle = torch.full((2000, 3, 4, 4), 128 / 255)
    noisy = compensate(middle, torch.Generator().manual_seed(2), 0.0, 0.05)
    delta = noisy - middle
    assert delta.std().item() == pytest.approx(0.05, abs=0.001) and delta.mean().item() == pytest.approx(-0.5 / 255,
                                                                                                         abs=5e-4)
    assert torch.equal((noisy * 255).round() / 255, noisy) and noisy.min() >= 0 and noisy.max() <= 1
    assert torch.equal(noisy, compensate(middle, torch.Generator().manual_seed(2), 0.0, 0.05))
    one = torch.full((10, 1, 4, 4), 128 / 255)
    assert torch.equal(compensate(one, torch.Generator(), 1.0, 0.0), one)  # one channel: no greyscale to take


def _ddpm_luma(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def test_train_hook_is_the_compensation():
    hooks = COUNTERMEASURES.create("eclipse").train_hooks(10, 32)
    x, y = torch.full((4, 3, 8, 8), 0.5), torch.arange(4)
    out, labels = hooks.batch_transform(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(labels, y) and torch.equal(out, compensate(x, torch.Generator().manual_seed(0), 0.4, 0.05))


def test_pretrained_path_refuses_naming_the_variable_and_the_alternative(monkeypatch, digits):
    monkeypatch.delenv(WEIGHTS.env, raising=False)
    countermeasure = COUNTERMEASURES.create("eclipse", model="pretrained")
    assert countermeasure.pretrained_needed() == (WEIGHTS,)
    assert COUNTERMEASURES.create("eclipse").pretrained_needed() == ()
    with pytest.raises(ConfigError, match=r"\$BENCH_ECLIPSE_DDPM.*improved-diffusion.*model = 'trained'"):
        countermeasure.purify(digits, seed=0, device=CPU)


@pytest.mark.parametrize("params, message", [
    ({"t_star": 0}, "t_star"), ({"t_star": 4001}, "t_star"), ({"sampler": "sde"}, "sampler"),
    ({"steps": 10}, "steps only with sampler = 'ddim'"), ({"sampler": "ddim", "steps": 101}, "steps"),
    ({"train_steps": 0}, "train_steps"), ({"train_lr": 0.0}, "train_lr"), ({"train_on": "protected"}, "train_on"),
    ({"train_on_per_class": 0}, "per class"), ({"grayscale_p": 1.5}, "grayscale_p"), ({"noise_std": -0.1}, "noise_std"),
])
def test_parameter_validation(params, message):
    with pytest.raises(ValueError, match=message):
        COUNTERMEASURES.create("eclipse", **params)


def test_purifies_a_class_wise_noise_poison_of_real_digits(tmp_path):
    """A DDPM trained on 300 clean digits (the sparse set) for 150 steps, then t* = 100, DDIM in 10 steps: the
    purified images of a class-wise ±8/255 noise poison (URP-like) on 100 other digits are closer to their clean
    originals than the poisoned ones are (measured: 30.9 → 32.5 dB; an untrained denoiser, 2 steps: 28.8 dB)."""
    everything = DATASETS.create("digits").load()[0]
    clean = ImageSet(everything.images[-100:], everything.labels[-100:], 10)  # not in the first 30 per class
    noise = torch.from_numpy(np.random.default_rng(0).choice([-8, 8], size=(10, 1, 16, 16)))
    poisoned = clean.with_images((clean.images.int() + noise[clean.labels]).clamp(0, 255).to(torch.uint8))
    countermeasure = make(tmp_path, train_on_per_class=30, train_steps=150, train_width=16, train_batch_size=32,
                          train_lr=2e-3, sampler="ddim", steps=10)
    purified = countermeasure.purify(poisoned, seed=0, device=CPU)
    before, after = psnr(poisoned.images, clean.images), psnr(purified.images, clean.images)
    assert after > before + 1, (before, after)


def test_the_sparse_set_is_the_end_of_each_class_disjoint_from_the_cells_images(digits):
    """ECLIPSE's sparse set (the paper: clean images that are not the poisoned ones) is the last images of each class
    of the train split, so a cell on the first ``per_class`` images never has its own originals in it."""
    from bench.data.datasets import DATASETS, train_images_like

    full = DATASETS.create("digits").load()[0]
    sparse = train_images_like("digits", 5, digits, last=True)
    last = torch.cat([torch.nonzero(full.labels == c).flatten()[-5:] for c in range(full.num_classes)])
    assert torch.equal(sparse, full.images[last.sort().values])
    first = train_images_like("digits", 5, digits)
    assert not any(torch.equal(a, b) for a in first for b in sparse)
