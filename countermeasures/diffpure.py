"""Diffusion purification (AVATAR: Dolatabadi et al. 2024, "The Devil's Advocate: Shattering the Illusion of
Unexploitable Data using Diffusion Models", SaTML; built on DiffPure: Nie et al. 2022, ICML): noise the protected
images part-way with a diffusion model's forward process and denoise them back, washing the perturbation out."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from bench.api import COUNTERMEASURES, DATA, DATASETS, Countermeasure, ImageSet, Pretrained
from bench.countermeasures import _ddpm

TRAINED = "trained"
DDPM = Pretrained("DDPM", env="BENCH_DDPM", hub_id="google/ddpm-cifar10-32",
                  files="a diffusers UNet2DModel folder (config.json, diffusion_pytorch_model.safetensors) and its "
                        "scheduler_config.json (e.g. `huggingface-cli download google/ddpm-cifar10-32 --local-dir "
                        "DIR` on a connected machine)",
                  alternative="model = 'trained' (the attacker trains a small DDPM itself; recorded)",
                  size_mb=143, licence="Apache-2.0", allow=("config.json", "scheduler_config.json",
                                                            "diffusion_pytorch_model.safetensors",
                                                            "diffusion_pytorch_model.bin"))


@COUNTERMEASURES.register("diffpure")
class DiffPure(Countermeasure):
    """Data stage (AVATAR's sanitisation, its ``AVATAR_sanitization.py``; DiffPure §3.1): x ∈ [0, 1] ↦ 2x − 1,
    diffuse to t* by the closed form x_t* = √ᾱ·x + √(1 − ᾱ)·ε, denoise back to 0 with ``sampler``, ↦ (x + 1)/2,
    clamp, round to 8 bits. Labels are kept and the test set is never seen. ε and the sampler's noise come from
    one generator per image seeded by (seed, index): the output depends on neither ``batch_size`` nor the device.

    Defaults and their sources. ``t_star`` = 100 of T = 1000 (t* = 0.1): AVATAR's released CIFAR-10 sets are
    ``*_Sanitized_100_cifar10.npz`` (its README; ``AVATAR_sanitization.py`` takes ``--t``, used as ``a[t - 1]`` in
    ``runners/diffpure_sde.py``/``diffpure_guided.py``), as DiffPure's t* = 0.1 on CIFAR-10. ``sampler`` = ddpm,
    every step t* − 1 … 0 (``diffpure_guided.py``'s ``reversed(range(t))`` of ``p_sample``); ``ddim`` (η = 0, in
    ``steps`` evenly spaced steps) is the fast option. ``model``: google/ddpm-cifar10-32 (Ho et al. 2020's CIFAR-10
    DDPM), loaded from $BENCH_DDPM, a local folder or the hub; a model of another size or channel count than the
    data is an error, not resized. ``model = 'trained'``: the attacker trains a small DDPM (``_ddpm.trained``) on
    ``train_on`` (``protected``: the set it is given; or a registered dataset, ``train_on_per_class`` per class,
    resized) for ``train_steps`` × ``train_batch_size`` (Ho et al.: batch 128, Adam 2e-4; no paper trains such a
    model, so the 5,000 steps and ``train_width`` 32 are bench's), cached under ``cache`` (default
    ~/.cache/bench/diffpure) by a hash of all that decides it; the record names where it came from.

    Deviations: AVATAR's CIFAR-10 model is Score-SDE's NCSN++ (VP-SDE, β 0.1…20, the same schedule as DDPM's
    linear βs), denoised by Euler–Maruyama on the reverse SDE (``torchsde.sdeint``, dt = 1e-3, i.e. t* steps)
    rather than DDPM's ancestral steps (the variance is the model's scheduler's: google/ddpm-cifar10-32's and the
    trained one's ``fixed_small``); those weights are not in diffusers' format. APBench's ``diffpure`` (``defense/
    diffusion/__init__.py``) runs t* = 60 and feeds x·2 (in [0, 2]) and returns x/2, a known scaling bug; not
    reproduced. AVATAR writes ``(255 * x).astype(np.uint8)`` (truncated, unclamped); here clamped and rounded.
    The scheduler's config also decides ``clip_sample``: google/ddpm-cifar10-32's is true, so x̂0 is clipped to
    [−1, 1] at every reverse step, which AVATAR's Euler–Maruyama does not do (negligible from t* = 100).
    """

    paper: ClassVar[str] = "AVATAR (Dolatabadi et al. 2024; code hmdolatabadi/AVATAR); DiffPure (Nie et al. 2022) §3.1"
    # no DDPM weights offline: the attacker's own, tiny (cached under ~/.cache/bench/diffpure)
    test_params: ClassVar[dict[str, object]] = {"model": "trained", "train_steps": 2, "train_width": 8,
                                                "train_batch_size": 8, "t_star": 10}
    stages: ClassVar[frozenset[str]] = frozenset({DATA})
    pretrained: ClassVar[tuple[Pretrained, ...]] = (DDPM,)
    paper_setting: ClassVar[tuple[str, ...]] = ("model", "sampler")
    expensive_on_cpu: ClassVar[bool] = True
    t_star: int = 100
    sampler: str = "ddpm"
    steps: int | None = None  # denoising steps from t*: None is every step (t*), the only choice of ddpm
    model: str = DDPM.hub_id
    batch_size: int = 256
    train_on: str = "protected"
    train_on_per_class: int | None = None
    train_steps: int = 5000
    train_batch_size: int = 128
    train_lr: float = 2e-4
    train_width: int = 32
    cache: str | None = None  # where trained models are kept (~/.cache/bench/diffpure); not in the output's key

    def __post_init__(self) -> None:
        if not 1 <= self.t_star <= 1000:
            raise ValueError(f"diffpure t_star must be 1 … 1000 (of the 1000 training steps), got {self.t_star}")
        if self.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"diffpure sampler must be 'ddpm' or 'ddim', got {self.sampler!r}")
        if self.steps is not None and (self.sampler == "ddpm" and self.steps != self.t_star
                                       or not 1 <= self.steps <= self.t_star):
            raise ValueError(f"diffpure steps = {self.steps}: ddpm takes every step (leave steps out); ddim takes "
                             f"1 ≤ steps ≤ t_star = {self.t_star}")
        if min(self.batch_size, self.train_steps, self.train_batch_size, self.train_width) < 1 or self.train_lr <= 0:
            raise ValueError("diffpure needs batch_size, train_steps, train_batch_size, train_width ≥ 1 and "
                             "train_lr > 0")
        if self.model != TRAINED and (self.train_on != "protected" or self.train_on_per_class is not None):
            raise ValueError("diffpure train_on/train_on_per_class go with model = 'trained'")
        if self.train_on != "protected" and self.train_on not in DATASETS:
            raise ValueError(f"diffpure train_on {self.train_on!r}: 'protected' or a dataset ({DATASETS.names()})")
        if self.train_on_per_class is not None and (self.train_on == "protected" or self.train_on_per_class < 1):
            raise ValueError("diffpure train_on_per_class (≥ 1) goes with train_on = '<dataset>'")

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        del spec["params"]["cache"]  # where the trained model is kept changes nothing
        return spec

    def pretrained_needed(self) -> tuple[Pretrained, ...]:
        return (DDPM,) if self.model == DDPM.hub_id else ()

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        return _ddpm.purify_with(self, train, seed=seed, device=device)

    def _model(self, train: ImageSet, seed: int, device: torch.device) -> tuple[Any, dict, str]:
        if self.model != TRAINED:
            return _ddpm.load(self.model, DDPM)
        return _ddpm.attacker_model(train, owner=self.name, train_on=self.train_on, per_class=self.train_on_per_class,
                                    width=self.train_width, steps=self.train_steps, batch_size=self.train_batch_size,
                                    lr=self.train_lr, seed=seed, device=device, cache=self.cache)
