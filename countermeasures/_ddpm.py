"""DDPM pieces of ``diffpure`` and ``eclipse`` (not a plugin: no registrations): the pixel map to the model's
[−1, 1], the closed-form forward process, the DDPM/DDIM reverse samplers from t*, purifying a set with them, loading
a diffusers ``UNet2DModel`` and training the attacker's own small one (cached under a hash of all that decides it)
with DDPM's linear or Nichol & Dhariwal's cosine βs. diffusers loads lazily.

Timesteps are diffusers' indices 0..T−1: "diffusing to t*" uses ᾱ at index t* − 1 and then denoises through
indices t* − 1 … 0 (t* model calls for DDPM), as AVATAR's ``runners/diffpure_guided.py`` (``a[t - 1]``, then
``reversed(range(t))``). Every image has its own CPU generator, so outputs depend on neither device nor batching.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.api import ConfigError, ImageSet, Pretrained, fingerprint, locked, make_key, train_images_like, umask

TRAINED_ARCH = {"layers_per_block": 1, "down_block_types": ["DownBlock2D"] * 3, "up_block_types": ["UpBlock2D"] * 3}


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → floats in [−1, 1]: 2·x/255 − 1 (APBench's ``diffpure`` feeds x·2, in [0, 2])."""
    return images.float().div(255).mul(2).sub(1)


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Floats in [−1, 1] → uint8: (x + 1)/2, clamped to [0, 1], rounded to 8 bits."""
    return x.add(1).div(2).clamp(0, 1).mul(255).round().to(torch.uint8)


def generators(seed: int, first: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image ``first`` … ``first + count − 1`` (its index in the set), from ``seed``."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
            for i in range(first, first + count)]


def normal(like: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens]).to(like.device)


def diffuse(x: torch.Tensor, scheduler: Any, t_star: int, gens: list[torch.Generator]) -> torch.Tensor:
    """x_t* = √ᾱ·x + √(1 − ᾱ)·ε with ᾱ = ``alphas_cumprod[t* − 1]`` (the scheduler's ``add_noise``)."""
    t = torch.full((len(x),), t_star - 1, dtype=torch.long, device=x.device)
    return scheduler.add_noise(x, normal(x, gens), t)


def ddim_timesteps(t_star: int, steps: int) -> list[int]:
    """``steps`` indices from t* − 1 down to 0, evenly spaced (all of them when steps = t*)."""
    return [int(t) for t in np.linspace(t_star - 1, 0, steps).round()] if steps > 1 else [t_star - 1]


def ddim_step(scheduler: Any, eps: torch.Tensor, t: int, prev: int, x: torch.Tensor) -> torch.Tensor:
    """DDIMScheduler.step's deterministic update (η = 0, ε-prediction) from index t to an arbitrary ``prev``
    (−1: to ``final_alpha_cumprod``); the scheduler itself only steps by a fixed stride T // n."""
    abar = scheduler.alphas_cumprod.to(x.device)
    a_t, a_prev = abar[t], abar[prev] if prev >= 0 else scheduler.final_alpha_cumprod.to(x.device)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


@torch.no_grad()
def denoise(unet: Any, config: dict, x: torch.Tensor, t_star: int, sampler: str, steps: int,
            gens: list[torch.Generator]) -> torch.Tensor:
    """x_t* back to index 0: DDPM ancestral steps t* − 1 … 0 (noise from ``gens``), or DDIM in ``steps`` steps."""
    from diffusers import DDIMScheduler, DDPMScheduler
    if sampler == "ddpm":
        scheduler = DDPMScheduler.from_config(config)
        scheduler.set_timesteps(timesteps=list(range(t_star - 1, -1, -1)))
        for t in scheduler.timesteps:
            eps = unet(x, t.to(x.device)).sample
            x = scheduler.step(eps, t, x, generator=gens).prev_sample
        return x
    scheduler = DDIMScheduler.from_config(config)
    ts = ddim_timesteps(t_star, steps)
    for t, prev in zip(ts, ts[1:] + [-1]):
        x = ddim_step(scheduler, unet(x, torch.tensor(t, device=x.device)).sample, t, prev, x)
    return x


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE",
                                                                                    "TRANSFORMERS_OFFLINE"))


def _cached(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    try:
        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except ValueError:  # not a valid hub id (a local path that is not there)
        return False


def load(model: str, weights: Pretrained) -> tuple[Any, dict, str]:
    """(UNet2DModel, its DDPM scheduler config, where it came from): ``$BENCH_DDPM`` for the default hub id, else
    ``model`` as a local folder (a UNet folder, or a pipeline folder with unet/ and scheduler/) or hub id."""
    from diffusers import DDPMScheduler, UNet2DModel
    default = model == weights.hub_id  # $BENCH_DDPM where set, else the hub (its cache, or a download)
    source = weights.load_from() if default else model
    local = Path(source).expanduser()
    absent = (not weights.resolve().available) if default else (not local.exists() and _offline()
                                                                and not _cached(source))
    if absent:
        raise ConfigError(f"{weights.missing()} (no {source!r} here{', HF_HUB_OFFLINE is set' * _offline()})")
    sub = "unet" if (local / "unet" / "config.json").is_file() else None
    try:
        unet = UNet2DModel.from_pretrained(source, subfolder=sub, low_cpu_mem_usage=False)
        config = DDPMScheduler.from_pretrained(source, subfolder="scheduler" if sub else None).config
    except Exception as err:  # OSError offline or for a wrong folder, connection errors where the hub is unreachable
        raise ConfigError(f"{weights.missing()}; loading {source!r} failed: {type(err).__name__}: {err}") from err
    return unet.eval().requires_grad_(False), dict(config), source


def small_unet(channels: int, size: int, width: int) -> Any:
    """The attacker's UNet2DModel: three levels of (w, 2w, 2w) channels, one ResNet block each, no attention."""
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels,
                       norm_num_groups=math.gcd(width, 32), block_out_channels=(width, 2 * width, 2 * width),
                       **TRAINED_ARCH)


# β schedules of ``trained``: DDPM's (Ho et al. 2020: linear 1e-4 … 0.02) and improved-diffusion's cosine (Nichol &
# Dhariwal 2021 eq. 17, s = 0.008, β ≤ 0.999: diffusers' squaredcos_cap_v2)
SCHEDULES = {"linear": {"beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"},
             "cosine": {"beta_schedule": "squaredcos_cap_v2"}}


def trained(data: torch.Tensor, *, key: str, root: Path, width: int, steps: int, batch_size: int, lr: float,
            seed: int, device: torch.device, schedule: str = "linear", timesteps: int = 1000) -> tuple[Any, dict, str]:
    """A small DDPM trained on ``data`` (uint8) by the ε-prediction MSE (Ho et al. 2020 Alg. 1; ``timesteps`` βs of
    ``SCHEDULES[schedule]``; Adam, gradient norm clip 1, linear warm-up over the first 5 %), saved under ``root/key``
    as a diffusers folder (usable as ``model = <that path>``), or loaded from there. One worker trains it: the others
    wait on its lock (``root/.key.lock``, no time limit: a dead holder's lock is released) and load it. Returns (UNet,
    config, note)."""
    from diffusers import DDPMScheduler, UNet2DModel
    folder = root / key
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f".{key}.lock", what=f"the DDPM being trained into {folder}", timeout=math.inf):
        if (folder / "done.json").is_file():
            unet = UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False).eval().requires_grad_(False)
            return unet, dict(DDPMScheduler.from_pretrained(folder).config), f"loaded from {folder}"
        return _train(data, folder, width=width, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
                      scheduler=DDPMScheduler(num_train_timesteps=timesteps, **SCHEDULES[schedule]))


def _train(data: torch.Tensor, folder: Path, *, width: int, steps: int, batch_size: int, lr: float, seed: int,
           device: torch.device, scheduler: Any) -> tuple[Any, dict, str]:
    """``trained``'s fit and atomic save, under its lock."""
    root, key = folder.parent, folder.name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = small_unet(data.shape[1], data.shape[-1], width).to(device).train()
    gen, x_all = torch.Generator().manual_seed(seed), data.to(device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    warmup = max(1, steps // 20)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup)
        index = torch.randint(len(x_all), (min(batch_size, len(x_all)),), generator=gen)
        x0 = to_model_range(x_all[index.to(device)])
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t.to(device)), t.to(device)).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
    unet = unet.eval().requires_grad_(False)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
    tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700 would hide a shared cache from other users; the umask decides
    unet.save_pretrained(tmp)
    scheduler.save_config(tmp)
    (tmp / "done.json").write_text(json.dumps({"steps": steps, "final_loss": loss.item()}))  # marks it complete
    try:
        os.replace(tmp, folder)
    except OSError:  # another worker saved the same model first
        shutil.rmtree(tmp, ignore_errors=True)
    return unet, dict(scheduler.config), f"trained now (final loss {loss.item():.4f}), saved to {folder}"


def attacker_model(train: ImageSet, *, owner: str, train_on: str, per_class: int | None, width: int, steps: int,
                   batch_size: int, lr: float, seed: int, device: torch.device, cache: str | None,
                   schedule: str = "linear", timesteps: int = 1000, last: bool = False) -> tuple[Any, dict, str]:
    """``trained`` on ``train_on``: ``protected`` (the set given) or a registered dataset's train split (the first
    ``per_class`` per class, ``last``: the last ones; resized to the set's shape), cached under ``cache`` (default
    ~/.cache/bench/<owner>) by a hash of the data and of everything that decides the model (the schedule only where
    it is not DDPM's)."""
    data, what = train.images, "the protected set"
    if train_on != "protected":
        data = train_images_like(train_on, per_class, train, last)
        what = f"{train_on} ({len(data)} images{', the last of each class' if last else ''})"
    if train.size % 4:
        raise ConfigError(f"{owner} model = 'trained' halves the image twice: size {train.size} is no multiple of 4")
    other = {} if (schedule, timesteps) == ("linear", 1000) else {"schedule": schedule, "timesteps": timesteps}
    key = make_key({"data": fingerprint(ImageSet(data, torch.zeros(len(data), dtype=torch.long), 1)),
                    "arch": TRAINED_ARCH, "width": width, "steps": steps, "batch": batch_size, "lr": lr, "seed": seed,
                    **other})
    root = Path(cache or Path.home() / ".cache" / "bench" / owner).expanduser()
    unet, config, note = trained(data, key=key, root=root, width=width, steps=steps, batch_size=batch_size, lr=lr,
                                 seed=seed, device=device, schedule=schedule, timesteps=timesteps)
    return unet, config, f"trained on {what}, {steps} steps × {batch_size}: {note}"


def purify_with(countermeasure: Any, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
    """``diffpure``'s and ``eclipse``'s data stage: the model from ``countermeasure._model``, then every image diffused
    to its ``t_star`` and denoised back (``diffuse``, ``denoise``; its ``sampler``, ``steps``) in batches of its
    ``batch_size``, one generator per image by (seed, index); the record names the model, the setting, the mean
    PSNR to the input (dB) and the seconds taken."""
    from diffusers import DDPMScheduler
    start = time.perf_counter()
    unet, config, source = countermeasure._model(train, seed, device)
    t_star, batch_size = countermeasure.t_star, countermeasure.batch_size
    steps = countermeasure.steps or t_star  # None: every step (ddpm)
    size, channels = unet.config.sample_size, unet.config.in_channels
    if (size, channels) != (train.size, train.channels) or t_star > config["num_train_timesteps"]:
        raise ConfigError(f"{countermeasure.name}: the DDPM {source} is for {channels}×{size}×{size} images with "
                          f"{config['num_train_timesteps']} steps, the data are {train.channels}×{train.size}×"
                          f"{train.size} with t_star {t_star}: give a model of that shape, or model = 'trained'")
    unet, scheduler, out = unet.to(device), DDPMScheduler.from_config(config), []
    for i in range(0, len(train), batch_size):
        gens = generators(seed, i, min(batch_size, len(train) - i))
        x_t = diffuse(to_model_range(train.images[i:i + batch_size].to(device)), scheduler, t_star, gens)
        out.append(to_pixels(denoise(unet, config, x_t, t_star, countermeasure.sampler, steps, gens)).cpu())
    images = torch.cat(out) if out else train.images.clone()
    mse = (images.float() - train.images.float()).div(255).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return train.with_images(images, model=source, t_star=t_star, sampler=countermeasure.sampler, steps=steps,
                             variance=config.get("variance_type"), psnr=round(float((-10 * mse.log10()).mean()), 2),
                             seconds=round(time.perf_counter() - start, 2))
