"""ECLIPSE (Wang et al. 2024, "ECLIPSE: Expunging Clean-label Indiscriminate Poisons via Sparse Diffusion
Purification", ESORICS; code CGCL-codes/ECLIPSE @f7cc72a): a DDPM trained on a sparse clean set denoises the poisons
from a light forward noise, and training adds probabilistic greyscale and light Gaussian noise ("corruption
compensation")."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from bench.api import COUNTERMEASURES, DATA, DATASETS, TRAIN, Countermeasure, ImageSet, Pretrained, TrainHooks
from bench.countermeasures import _ddpm, _ops

TRAINED, PRETRAINED = "trained", "pretrained"
SCHEDULE, TIMESTEPS = "cosine", 4000  # configs/cifar10.yml: noise_schedule 'cosine', diffusion_steps 4000
WEIGHTS = Pretrained(
    "ECLIPSE DDPM", env="BENCH_ECLIPSE_DDPM",
    files="a diffusers UNet2DModel folder (config.json, diffusion_pytorch_model.safetensors) and its "
          "scheduler_config.json (4,000 cosine steps: beta_schedule squaredcos_cap_v2) for the data's shape",
    source="the authors' ema_0.9999_250000.pt (Google Drive, CGCL-codes/ECLIPSE README) is an improved-diffusion "
           "state dict (learned variance, 6 output channels), not diffusers' format: convert it to that folder first",
    alternative="model = 'trained' (the attacker trains a small cosine DDPM on train_on's sparse clean set)",
    licence="MIT")


@COUNTERMEASURES.register("eclipse")
class Eclipse(Countermeasure):
    """Data stage (Alg. 1 lines 11–23; ``purification.py``, ``runners/improved_diffusion.py``): x ↦ 2x − 1, diffuse
    to t* in closed form (eq. 11; the code's ``a[t - 1]`` of the discrete βs), denoise back through t* − 1 … 0 (eq. 12,
    ``p_sample`` with ``clip_denoised=True``), ↦ (x + 1)/2, clamped, rounded to 8 bits; labels kept, the test set never
    seen, one generator per image by (seed, index) (``_ddpm.purify_with``, shared with ``diffpure``). Train stage
    (eq. 13; ``train.py --pure``): after the recipe's crop and flip, each image is greyscaled with probability
    ``grayscale_p`` (ITU-R 601-2 luma, as PIL's ``convert('L')``), then gets N(0, ``noise_std``²) noise, clamped
    to [0, 1] and truncated to 8 bits (``ToPILImage``'s ``mul(255).byte()``), drawn afresh every batch.

    Defaults and their sources: ``t_star`` 100 (§4.1, Tab. 7; ``--t 100``) of T = 4,000 cosine steps (§3.5 after
    Nichol & Dhariwal 2021; ``configs/cifar10.yml``): √(1 − ᾱ) = 0.0499 in [−1, 1], 6.4/255 in pixels (diffpure's
    t* 100 of 1,000 linear: 0.321, 40.9/255). ``sampler`` ddpm, every one of the t* steps (Alg. 1 line 14);
    ``ddim`` in ``steps`` steps is the fast option. ``grayscale_p`` 0.4, ``noise_std`` 0.05 (§4.1, Fig. 5; ``--p``,
    ``--std``). ``train_on`` / ``train_on_per_class``: cifar10's last 200 per class, 2,000 images, the paper's 4 %
    of CIFAR-10's size (§4.1; the README's 2,000 test images). ``train_steps`` 250,000 (§4.1 I = 250K; Fig. 5a: 150K
    –300K alike), batch 128 and Adam 1e-4 (the paper is silent: openai/improved-diffusion @2e66f3f README's CIFAR-10
    L_hybrid flags), ``train_width`` 128 (``num_channels``), ``batch_size`` 256 (``purification.py``). ``model``: ``trained`` (the paper's own approach: a DDPM trained from scratch on the
    sparse set, ``_ddpm.trained``, cached under ``cache``, default ~/.cache/bench/eclipse), ``pretrained`` ($BENCH_
    ECLIPSE_DDPM: a diffusers folder; the authors' checkpoint is not one), or a diffusers folder or hub id.

    Deviations: bench's UNet (``_ddpm.small_unet``: ``train_width`` × (1, 2, 2), one block a level, no attention)
    trained on the ε-MSE with fixed variance β̃ (``fixed_small``), no EMA; the paper's is improved-diffusion's (128
    × (1, 2, 2, 2), 3 blocks, attention at 16 and 8, learned Σ by L_hybrid, eqs. 8–10; the EMA 0.9999 weights). The
    sparse set is a train split (bench never hands a countermeasure the test set): with ``train_on_end`` (default)
    the last ``train_on_per_class`` images of each class, disjoint from a cell's ``per_class`` first ones, as the
    paper's test images are from the poisoned set; a cell protecting the whole train split holds their originals. Duplicating it M = 4 times (eq. 3) changes nothing for a trainer that
    samples uniformly. Alg. 1 corrupts the purified set once; the code (followed) per batch.
    """

    paper: ClassVar[str] = "ECLIPSE (Wang et al. 2024, ESORICS) §3.5, §4.1, Alg. 1; code CGCL-codes/ECLIPSE @f7cc72a"
    test_params: ClassVar[dict[str, object]] = {"train_on": "digits", "train_on_per_class": 2, "train_steps": 2,
                                                "train_width": 8, "train_batch_size": 8, "t_star": 10}
    stages: ClassVar[frozenset[str]] = frozenset({DATA, TRAIN})
    pretrained: ClassVar[tuple[Pretrained, ...]] = (WEIGHTS,)
    paper_setting: ClassVar[tuple[str, ...]] = ("t_star", "sampler", "train_steps", "train_on_per_class", "grayscale_p",
                                                "noise_std")
    expensive_on_cpu: ClassVar[bool] = True
    t_star: int = 100
    sampler: str = "ddpm"
    steps: int | None = None  # denoising steps from t*: None is every step (t*), the only choice of ddpm
    model: str = TRAINED
    batch_size: int = 256
    train_on: str = "cifar10"
    train_on_per_class: int | None = 200
    train_on_end: bool = True  # the last images of each class: disjoint from the first ones a cell protects
    train_steps: int = 250_000
    train_batch_size: int = 128
    train_lr: float = 1e-4
    train_width: int = 128
    grayscale_p: float = 0.4
    noise_std: float = 0.05
    cache: str | None = None  # where trained models are kept (~/.cache/bench/eclipse); not in the output's key

    def __post_init__(self) -> None:
        _ops.require(1 <= self.t_star <= TIMESTEPS and self.sampler in ("ddpm", "ddim"), self,
                     f"1 ≤ t_star ≤ {TIMESTEPS} (of the cosine schedule's steps) and sampler 'ddpm' or 'ddim'")
        _ops.require(self.steps is None or (self.sampler == "ddim" and 1 <= self.steps <= self.t_star), self,
                     "steps only with sampler = 'ddim', 1 ≤ steps ≤ t_star (ddpm takes every step: leave it out)")
        _ops.require(min(self.batch_size, self.train_steps, self.train_batch_size, self.train_width) >= 1
                     and self.train_lr > 0, self, "batch_size, train_steps, train_batch_size, train_width ≥ 1, "
                     "train_lr > 0")
        per_class_ok = self.train_on_per_class is None or self.train_on_per_class >= 1
        _ops.require(self.train_on in DATASETS and per_class_ok, self,
                     f"train_on a registered dataset (the sparse clean set: {DATASETS.names()}), per class ≥ 1")
        _ops.require(0 <= self.grayscale_p <= 1 and self.noise_std >= 0, self, "grayscale_p in [0, 1], noise_std ≥ 0")

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        del spec["params"]["cache"]  # where the trained model is kept changes nothing
        return spec

    def pretrained_needed(self) -> tuple[Pretrained, ...]:
        return (WEIGHTS,) if self.model == PRETRAINED else ()

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        return _ddpm.purify_with(self, train, seed=seed, device=device)

    def _model(self, train: ImageSet, seed: int, device: torch.device) -> tuple[Any, dict, str]:
        if self.model != TRAINED:  # "pretrained" is the empty hub id: $BENCH_ECLIPSE_DDPM, else the refusal
            return _ddpm.load(WEIGHTS.hub_id if self.model == PRETRAINED else self.model, WEIGHTS)
        return _ddpm.attacker_model(train, owner=self.name, train_on=self.train_on, per_class=self.train_on_per_class,
                                    width=self.train_width, steps=self.train_steps, batch_size=self.train_batch_size,
                                    lr=self.train_lr, seed=seed, device=device, cache=self.cache, schedule=SCHEDULE,
                                    timesteps=TIMESTEPS, last=self.train_on_end)

    def train_hooks(self, num_classes: int, image_size: int) -> TrainHooks:
        return TrainHooks(batch_transform=lambda x, y, gen: (compensate(x, gen, self.grayscale_p, self.noise_std), y))


def compensate(x: torch.Tensor, gen: torch.Generator, grayscale_p: float, noise_std: float) -> torch.Tensor:
    """Eq. 13 as ``train.py`` runs it on float batches in [0, 1]: ``RandomGrayscale(p)`` per image (8-bit luma
    replicated; identity on one channel), + N(0, σ²), clamped, truncated to 8 bits (``ToPILImage``, ``ToTensor``)."""
    grey = _ops.per_image(_ops.draw(len(x), gen, x.device) < grayscale_p)
    if x.shape[1] == 3:
        x = torch.where(grey, _ops.luma(x).mul(255).round().div(255).expand_as(x), x)
    noise = torch.randn(x.shape, generator=_ops.device_generator(gen, x.device), device=x.device, dtype=x.dtype)
    return (x + noise_std * noise).clamp(0, 1).mul(255).floor().div(255)
