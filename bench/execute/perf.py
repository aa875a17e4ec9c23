"""``bench perf train``: bench's training loop against a reference loop written the way existing repositories
write it (APBench's ``train.py``: a torch DataLoader over PIL images with per-sample torchvision transforms,
fp32, NCHW) and against a plain device-resident loop (the ceiling: data on the device, crop + flip from a
device generator, no host sync inside an epoch, bench's precision and channels_last).

Same model, data, batch size, device and epochs; one discarded warm-up run of each loop per victim (CUDA
context, cuDNN heuristics, allocator, DataLoader workers), then the loops alternate ``repeats`` times. Rows:
the reference (fp32), bench at its resolved precision, bench in fp32 (where that differs) and the plain loop;
ratios are taken at the same precision: bench fp32 / reference, bench / plain. Written to ``results/perf/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.core.components import VICTIMS, ImageSet
from bench.execute import devices
from bench.execute.train import Normalize, autocast, channel_stats, resolve_precision, train_and_evaluate
from bench.plan.recipes import make_recipe

CPU_SIZES = {"per_class": 100, "epochs": 2, "workers": 2}
CUDA_SIZES = {"per_class": 1000, "epochs": 3, "workers": 4}  # ≥ 117 steps per run at batch 128 (finding 12)


@dataclasses.dataclass(frozen=True)
class PerfSettings:
    """What the loops train: ``victims`` on ``per_class`` images per class, for ``epochs``, ``repeats`` times.

    ``per_class``, ``epochs`` and ``workers`` (the reference's DataLoader workers) left None take the device's
    size (``resolved``): 100 per class, 2 epochs, 2 workers on a CPU; 1,000, 3 and 4 on CUDA.
    """

    victims: tuple[str, ...] = ("resnet18", "cnn")
    dataset: str = "cifar10-jpeg"
    per_class: int | None = None
    epochs: int | None = None
    batch_size: int = 128
    repeats: int = 3
    workers: int | None = None
    device: str = "auto"
    warmup: bool = True

    def resolved(self, device: torch.device) -> PerfSettings:
        """These settings with every None replaced by ``device``'s size."""
        sizes = CUDA_SIZES if device.type == "cuda" else CPU_SIZES
        return dataclasses.replace(self, **{k: v for k, v in sizes.items() if getattr(self, k) is None})


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_loop(model: nn.Module, train: ImageSet, batch_size: int, epochs: int, device: torch.device,
                   workers: int, seed: int) -> float:
    """Train the way APBench's train.py does (fp32, NCHW); returns training images/s. The DataLoader's workers
    start, and the model moves to the device, before the clock starts; batches are pinned on CUDA."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    mean, std = channel_stats(train.images)
    size = train.size
    transform = transforms.Compose([transforms.RandomCrop(size, padding=max(1, size // 8)),
                                    transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                    transforms.Normalize(mean.tolist(), std.tolist())])
    pil = [Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy()) for img in train.images]

    class PilDataset(Dataset):
        def __len__(self) -> int:
            return len(pil)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return transform(pil[i]), int(train.labels[i])

    torch.manual_seed(seed)
    loader = DataLoader(PilDataset(), batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    first = iter(loader)  # starts the workers (persistent: reused by later epochs)
    _synchronize(device)
    seen, start = 0, time.perf_counter()
    for epoch in range(epochs):
        for x, y in first if epoch == 0 else loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
    _synchronize(device)
    return seen / (time.perf_counter() - start)


def bench_loop(model: nn.Module, train: ImageSet, test: ImageSet, batch_size: int, epochs: int,
               device: torch.device, seed: int, precision: str = "auto") -> dict[str, Any]:
    """bench's own loop (``bench.execute.train``), evaluating only at the end; returns its result."""
    recipe = make_recipe("quick", epochs=epochs, batch_size=batch_size, precision=precision)
    return train_and_evaluate(model, train, test, recipe, seed=seed, device=device, augment="crop_flip",
                              evaluate_every_epoch=False)


def plain_loop(model: nn.Module, train: ImageSet, batch_size: int, epochs: int, device: torch.device, seed: int,
               precision: str = "auto") -> float:
    """The ceiling: the train set on the device, crop + flip drawn by a device generator, bf16 autocast where
    bench uses it, channels_last, the quick recipe's optimiser, no host sync inside the loop; images/s."""
    recipe = make_recipe("quick")
    x_all, y_all = train.images.to(device), train.labels.to(device)
    net = nn.Sequential(Normalize(*channel_stats(train.images)), model).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                                weight_decay=recipe.weight_decay)
    gen = torch.Generator(device=device).manual_seed(seed)
    channels, height, width = x_all.shape[1:]
    pad, precision = max(1, train.size // 8), resolve_precision(precision, device)
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    chans = torch.arange(channels, device=device)[None, :, None, None]
    net.train()
    _synchronize(device)
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x_all), device=device, generator=gen)
        for first in range(0, len(x_all), batch_size):
            index = order[first:first + batch_size]
            n = len(index)
            x = F.pad(x_all[index].float().div_(255), (pad,) * 4)
            dy, dx = (torch.randint(0, 2 * pad + 1, (n,), device=device, generator=gen) for _ in range(2))
            x = x[torch.arange(n, device=device)[:, None, None, None], chans, (dy[:, None] + rows)[:, None, :, None],
                  (dx[:, None] + cols)[:, None, None, :]]
            flip = torch.rand(n, device=device, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x).contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                loss = F.cross_entropy(net(x).float(), y_all[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += n
    _synchronize(device)
    return seen / (time.perf_counter() - start)


def measure(victim: str, train: ImageSet, test: ImageSet, settings: PerfSettings, device: torch.device) -> dict[str, Any]:
    """images/s of each loop for ``victim`` (``settings`` resolved): a discarded warm-up, then ``repeats``
    alternating runs; the median of each, its runs, and the ratios at the same precision."""
    def build() -> nn.Module:
        return VICTIMS.create(victim).build(train.num_classes, train.channels, train.size)

    precision = resolve_precision("auto", device)
    loops = {"reference": lambda r: reference_loop(build(), train, settings.batch_size, settings.epochs, device,
                                                   settings.workers, r),
             "bench": lambda r: bench_loop(build(), train, test, settings.batch_size, settings.epochs, device,
                                           r)["images_per_s"],
             "bench_fp32": lambda r: bench_loop(build(), train, test, settings.batch_size, settings.epochs, device, r,
                                                "fp32")["images_per_s"],
             "plain": lambda r: plain_loop(build(), train, settings.batch_size, settings.epochs, device, r)}
    if precision == "fp32":  # bench in fp32 is bench itself
        del loops["bench_fp32"]
    runs: dict[str, list[float]] = {name: [] for name in loops}
    for repeat in range(-1 if settings.warmup else 0, settings.repeats):
        for name, loop in loops.items():
            torch.manual_seed(max(repeat, 0))
            rate = loop(max(repeat, 0))
            if repeat >= 0:  # -1 is the warm-up: not kept
                runs[name].append(rate)
    med = {name: statistics.median(values) for name, values in runs.items()}
    fp32 = med.get("bench_fp32", med["bench"])
    return {"bench_precision": precision, "reference_images_per_s": med["reference"], "bench_images_per_s": med["bench"],
            "bench_fp32_images_per_s": fp32, "plain_images_per_s": med["plain"],
            "ratio": fp32 / med["reference"], "ratio_plain": med["bench"] / med["plain"],
            **{f"{name}_runs": values for name, values in runs.items()}}


def run_perf(settings: PerfSettings, results: Path) -> list[dict[str, Any]]:
    """Measure every victim; write JSON and Markdown under ``results/perf``. ``ratio`` is bench fp32 / reference
    (the same precision), ``ratio_plain`` bench / the plain loop (the same precision)."""
    from bench.data.datasets import DATASETS

    device = devices.single(settings.device)
    settings = settings.resolved(device)
    train, test = DATASETS.create(settings.dataset, per_class=settings.per_class, test_per_class=10).load()
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU {platform.processor() or platform.machine()} ×{os.cpu_count()}")
    rows = []
    for victim in settings.victims:
        rows.append({"victim": victim, "device": str(device), "device_name": name, "threads": torch.get_num_threads(),
                     "dataset": settings.dataset, "images": len(train), "batch_size": settings.batch_size,
                     "epochs": settings.epochs, "repeats": settings.repeats, "warmup": settings.warmup,
                     "reference_workers": settings.workers, **measure(victim, train, test, settings, device)})
    out = results / "perf"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train-{device.type}"
    (out / f"{stem}.json").write_text(json.dumps({"settings": dataclasses.asdict(settings), "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(markdown(rows))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """One line per victim and loop: images/s, and each ratio beside the loop it compares."""
    lines = [f"device: {rows[0]['device_name']} ({rows[0]['device']}, {rows[0]['threads']} threads)" if rows else "",
             "", "| victim | loop | precision | images × epochs | batch | img/s | ratio (same precision) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['images']} × {r['epochs']} | {r['batch_size']}"
        loops = [("reference (DataLoader)", "fp32", r["reference_images_per_s"], ""),
                 ("bench", r["bench_precision"], r["bench_images_per_s"],
                  f"bench/plain {r['ratio_plain']:.2f}" + (f", bench/reference {r['ratio']:.2f}"
                                                          if r["bench_precision"] == "fp32" else "")),
                 ("plain (device-resident)", r["bench_precision"], r["plain_images_per_s"], "ceiling")]
        if r["bench_precision"] != "fp32":
            loops.insert(2, ("bench", "fp32", r["bench_fp32_images_per_s"], f"bench/reference {r['ratio']:.2f}"))
        lines += [f"| {r['victim']} | {loop} | {precision} | {size} | {rate:.0f} | {ratio} |"
                  for loop, precision, rate, ratio in loops]
    return "\n".join(lines) + "\n"
