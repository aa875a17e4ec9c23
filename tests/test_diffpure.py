"""diffpure (AVATAR / DiffPure diffusion purification): the data-stage contract on real photographs, the pixel
map to [−1, 1] and the forward process's closed form (which APBench's x·2 scaling bug breaks), the DDIM step
against diffusers', absent weights, the attacker's trained DDPM and its cache, and parameter validation.

The contract runs ``model = 'trained'`` with a tiny budget (a real model cannot be had offline); the GPU test runs
google/ddpm-cifar10-32 where $BENCH_DDPM points at it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from bench.core.components import COUNTERMEASURES, ImageSet
from bench.core.registry import ConfigError
from bench.countermeasures import _ddpm
from bench.countermeasures.diffpure import DDPM
from bench.data.datasets import DATASETS
from bench.plan.matrix import Cell, Choice
from bench.plan.planner import Components, missing_capabilities
from conftest import require_cifar10_jpeg

CPU = torch.device("cpu")
TINY = {"model": "trained", "train_steps": 2, "train_width": 8, "train_batch_size": 8, "t_star": 10}


@pytest.fixture(scope="module")
def rgb() -> ImageSet:
    """20 real CIFAR-10 photographs (2 per class); skips without the JPEG copy."""
    path = require_cifar10_jpeg()
    return DATASETS.create("cifar10-jpeg", path=str(path), per_class=2, test_per_class=1).load()[0]


def make(tmp_path, **params):
    return COUNTERMEASURES.create("diffpure", **{**TINY, "cache": str(tmp_path), **params})


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.float() - b.float()).div(255).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return float((-10 * mse.log10()).mean())


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 4)])
def test_contract(tmp_path, rgb, sampler, steps):
    """uint8, same shape, labels kept, input untouched, the same bytes for a seed and other bytes for another;
    the record says which model, t*, sampler, steps and time."""
    images, labels = rgb.images.clone(), rgb.labels.clone()
    countermeasure = make(tmp_path, sampler=sampler, steps=steps)
    out = countermeasure.purify(rgb, seed=0, device=CPU)
    assert out.images.dtype == torch.uint8 and out.images.shape == rgb.images.shape
    assert torch.equal(out.labels, labels) and out.num_classes == rgb.num_classes
    assert torch.equal(rgb.images, images), "the input was mutated"
    assert out.images.numpy().tobytes() == countermeasure.purify(rgb, seed=0, device=CPU).images.numpy().tobytes()
    assert not torch.equal(out.images, countermeasure.purify(rgb, seed=1, device=CPU).images)
    assert (out.images != rgb.images).float().mean() > 0.5
    assert out.info["model"].startswith("trained on the protected set, 2 steps") and out.info["t_star"] == 10
    assert out.info["sampler"] == sampler and out.info["steps"] == (steps or 10) and out.info["seconds"] >= 0


def test_independent_of_batch_size(tmp_path, rgb):
    """Each image has its own generators: batching does not change a byte."""
    whole = make(tmp_path).purify(rgb, seed=3, device=CPU)
    assert torch.equal(make(tmp_path, batch_size=7).purify(rgb, seed=3, device=CPU).images, whole.images)


def test_pixel_map():
    """0 → −1, 255 → 1, and back to the same 8-bit values (APBench's x·2 would map 0 → 0, 255 → 2)."""
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = _ddpm.to_model_range(pixels)
    assert x.min() == -1 and x.max() == 1 and abs(float(x.flatten()[128]) - (128 / 255 * 2 - 1)) < 1e-6
    assert torch.equal(_ddpm.to_pixels(x), pixels)


def test_forward_process_closed_form():
    """On a batch of one image drawn 4,000 times, x_t* has mean √ᾱ·(2x − 1) and variance 1 − ᾱ per pixel,
    with ᾱ = ∏ (1 − β) over the first t* of DDPM's 1000 linear βs (1e-4 … 0.02), computed here independently."""
    from diffusers import DDPMScheduler
    t_star, n = 100, 4000
    image = torch.linspace(0, 255, 16).round().to(torch.uint8).reshape(1, 1, 4, 4)
    x_t = _ddpm.diffuse(_ddpm.to_model_range(image.expand(n, -1, -1, -1)), DDPMScheduler(), t_star,
                        _ddpm.generators(0, 0, n))
    abar = float(np.prod(1 - np.linspace(1e-4, 0.02, 1000)[:t_star]))
    mean = np.sqrt(abar) * (2 * image.double() / 255 - 1)
    assert abar == pytest.approx(0.8970, abs=1e-4)
    assert (x_t.double().mean(0) - mean[0]).abs().max() < 5 * np.sqrt((1 - abar) / n)
    assert x_t.double().var(0).div(1 - abar).sub(1).abs().max() < 0.15


def test_small_t_star_returns_the_input(tmp_path, rgb, monkeypatch):
    """t* = 1 (ᾱ = 1 − 1e-4) hands back nearly the input, even with an untrained denoiser; APBench's scaling
    (x·2 in, x/2 out) would clip every pixel above 127 and fails this check."""
    out = make(tmp_path, t_star=1).purify(rgb, seed=0, device=CPU)
    assert psnr(out.images, rgb.images) > 35 and out.info["psnr"] > 35
    monkeypatch.setattr(_ddpm, "to_model_range", lambda images: images.float().div(255).mul(2))
    monkeypatch.setattr(_ddpm, "to_pixels", lambda x: x.div(2).clamp(0, 1).mul(255).round().to(torch.uint8))
    assert psnr(make(tmp_path, t_star=1).purify(rgb, seed=0, device=CPU).images, rgb.images) < 25


def test_ddim_step_matches_diffusers():
    """The DDIM update to an arbitrary previous index equals DDIMScheduler.step where its fixed stride applies."""
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(90)  # stride 1000 // 90 = 11: 99 → 88, and 0 → the final ᾱ = 1
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    for t, prev in ((99, 88), (0, -1)):
        expected = scheduler.step(eps, t, x).prev_sample
        assert torch.allclose(_ddpm.ddim_step(scheduler, eps, t, prev, x), expected, atol=1e-6)
    assert _ddpm.ddim_timesteps(100, 10) == [99, 88, 77, 66, 55, 44, 33, 22, 11, 0]
    assert _ddpm.ddim_timesteps(100, 1) == [99] and _ddpm.ddim_timesteps(5, 5) == [4, 3, 2, 1, 0]


def test_absent_weights_name_the_variable_and_the_alternative(monkeypatch, rgb):
    monkeypatch.delenv(DDPM.env, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if _ddpm._cached(DDPM.hub_id):
        pytest.skip(f"{DDPM.hub_id} is in this machine's hub cache")
    countermeasure = COUNTERMEASURES.create("diffpure")
    assert countermeasure.pretrained_needed() == (DDPM,)
    assert COUNTERMEASURES.create("diffpure", model="trained").pretrained_needed() == ()
    with pytest.raises(ConfigError, match=r"\$BENCH_DDPM.*model = 'trained'"):
        countermeasure.purify(rgb, seed=0, device=CPU)
    monkeypatch.setenv(DDPM.env, "/nonexistent/ddpm")
    with pytest.raises(ConfigError, match=r"\$BENCH_DDPM"):
        countermeasure.purify(rgb, seed=0, device=CPU)
    choice = lambda name, **kw: Choice(name, tuple(kw.items()), name)  # noqa: E731
    cell = Cell(choice("digits"), choice("clean"), choice("diffpure"), choice("cnn"), 0, 1.0)
    assert any("BENCH_DDPM" in r for r in missing_capabilities(cell, Components.of(cell)))
    trained = Cell(choice("digits"), choice("clean"), choice("diffpure", model="trained"), choice("cnn"), 0, 1.0)
    assert missing_capabilities(trained, Components.of(trained)) == []


def test_trained_model_is_cached_and_loads_as_a_folder(tmp_path, rgb, monkeypatch):
    """The first run trains and saves a diffusers folder (its mode from the umask, so a group shares it); the next
    loads it without training (the optimiser is never built) and gives the same bytes, as does ``model = <that
    folder>``; another budget is another model."""
    old_umask = os.umask(0o002)
    try:
        first = make(tmp_path).purify(rgb, seed=0, device=CPU)
    finally:
        os.umask(old_umask)
    assert "trained now" in first.info["model"]
    folders = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "config.json").is_file() and (folders[0] / "done.json").is_file()
    assert folders[0].stat().st_mode & 0o777 == 0o775

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cached model")
    with monkeypatch.context() as patch:
        patch.setattr(torch.optim, "Adam", no_training)
        again = make(tmp_path).purify(rgb, seed=0, device=CPU)
    assert f"loaded from {folders[0]}" in again.info["model"] and torch.equal(again.images, first.images)
    local = COUNTERMEASURES.create("diffpure", model=str(folders[0]), t_star=10).purify(rgb, seed=0, device=CPU)
    assert torch.equal(local.images, first.images) and local.info["model"] == str(folders[0])
    assert local.info["variance"] == "fixed_small"
    make(tmp_path, train_steps=3).purify(rgb, seed=0, device=CPU)
    assert len([p for p in tmp_path.iterdir() if not p.name.startswith(".")]) == 2
    assert make(tmp_path).spec() == make(tmp_path / "elsewhere").spec()  # where it is cached is no key


def test_trained_on_another_dataset(tmp_path, rgb):
    """train_on = 'digits': greyscale 16×16 digits, resized and repeated to the data's 3×32×32, train the DDPM."""
    out = make(tmp_path, train_on="digits", train_on_per_class=2).purify(rgb, seed=0, device=CPU)
    assert out.info["model"].startswith("trained on digits (20 images)")
    assert out.images.shape == rgb.images.shape


def test_one_channel_digits(tmp_path):
    """1-channel 16×16 digits go through a 1-channel trained DDPM; a model of another shape is a clear error."""
    digits = DATASETS.create("digits", per_class=2).load()[0]
    out = make(tmp_path).purify(digits, seed=0, device=CPU)
    assert out.images.shape == digits.images.shape and (out.images != digits.images).any()
    folder = next(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    bigger = ImageSet(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), 10)
    with pytest.raises(ConfigError, match=r"1×16×16.*3×32×32.*model = 'trained'"):
        COUNTERMEASURES.create("diffpure", model=str(folder)).purify(bigger, seed=0, device=CPU)
    odd = ImageSet(torch.zeros(2, 1, 18, 18, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), 10)
    with pytest.raises(ConfigError, match="multiple of 4"):
        make(tmp_path).purify(odd, seed=0, device=CPU)


@pytest.mark.parametrize("params, message", [
    ({"t_star": 0}, "t_star"), ({"t_star": 1001}, "t_star"), ({"sampler": "sde"}, "sampler"),
    ({"steps": 10}, "ddpm takes every step"), ({"sampler": "ddim", "steps": 0}, "1 ≤ steps"),
    ({"sampler": "ddim", "steps": 101}, "1 ≤ steps"), ({"batch_size": 0}, "batch_size"),
    ({"model": "trained", "train_steps": 0}, "train_steps"), ({"model": "trained", "train_lr": 0.0}, "train_lr"),
    ({"train_on": "digits"}, "go with model = 'trained'"), ({"model": "trained", "train_on": "mnist"}, "train_on"),
    ({"model": "trained", "train_on_per_class": 3}, "train_on_per_class"),
])
def test_parameter_validation(params, message):
    with pytest.raises(ValueError, match=message):
        COUNTERMEASURES.create("diffpure", **params)


@pytest.mark.gpu
def test_pretrained_cifar10_ddpm_on_gpu(rgb):
    """google/ddpm-cifar10-32 from $BENCH_DDPM on CUDA: t* = 100 changes the photographs visibly but keeps them
    (PSNR 18–35 dB, DDPM and DDIM), t* = 1 hands them back."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if not os.environ.get(DDPM.env):
        pytest.skip(f"needs ${DDPM.env}: {DDPM.files}")
    cuda = torch.device("cuda")
    for params in ({}, {"sampler": "ddim", "steps": 20}):
        out = COUNTERMEASURES.create("diffpure", **params).purify(rgb, seed=0, device=cuda)
        assert 18 < psnr(out.images, rgb.images) < 35, out.info
    assert psnr(COUNTERMEASURES.create("diffpure", t_star=1).purify(rgb, seed=0, device=cuda).images, rgb.images) > 35


def _train_tiny(root: str) -> str:
    """One worker's call (a spawned process): the attacker's tiny DDPM on fixed data, keyed alike in both."""
    torch.set_num_threads(1)
    data = torch.arange(4 * 3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(4, 3, 8, 8)
    return _ddpm.trained(data, key="shared", root=__import__("pathlib").Path(root), width=8, steps=30, batch_size=4,
                         lr=1e-3, seed=0, device=torch.device("cpu"))[2]


def test_two_workers_train_a_shared_ddpm_once(tmp_path):
    """Workers that need the same attacker model (ECLIPSE's sparse DDPM, AVATAR's) do not both train it: one holds
    the model's lock and trains, the other waits and loads (coverage-cpu trained it twice, ≈ 600 s each, before)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        notes = pool.map(_train_tiny, [str(tmp_path)] * 2)
    assert sorted(note.split()[0] for note in notes) == ["loaded", "trained"], notes
