"""``bench perf train``: bench's training loop against a reference loop written the way existing repositories
write it (APBench's ``train.py``: a torch DataLoader over PIL images with per-sample torchvision transforms,
fp32, NCHW). Same model, data, batch size, device and epochs; runs alternate; images/s of the training
loop alone (no evaluation) and their ratio are written to ``results/perf/``.
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
from bench.execute.train import channel_stats, train_and_evaluate
from bench.plan.recipes import make_recipe


@dataclasses.dataclass(frozen=True)
class PerfSettings:
    """What both loops train: ``victims`` on ``per_class`` images per class, for ``epochs``, ``repeats`` times."""

    victims: tuple[str, ...] = ("resnet18", "cnn")
    dataset: str = "cifar10-jpeg"
    per_class: int = 100
    epochs: int = 2
    batch_size: int = 128
    repeats: int = 3
    workers: int = 2
    device: str = "auto"


def reference_loop(model: nn.Module, train: ImageSet, batch_size: int, epochs: int, device: torch.device,
                   workers: int, seed: int) -> float:
    """Train the way APBench's train.py does; returns training images/s."""
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
                        persistent_workers=workers > 0)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen / (time.perf_counter() - start)


def bench_loop(model: nn.Module, train: ImageSet, test: ImageSet, batch_size: int, epochs: int,
               device: torch.device, seed: int) -> dict[str, Any]:
    """bench's own loop (``bench.execute.train``), evaluating only at the end; returns its result."""
    recipe = make_recipe("quick", epochs=epochs, batch_size=batch_size)
    return train_and_evaluate(model, train, test, recipe, seed=seed, device=device, augment="crop_flip",
                              evaluate_every_epoch=False)


def run_perf(settings: PerfSettings, results: Path) -> list[dict[str, Any]]:
    """Alternate reference and bench runs per victim; write JSON and Markdown under ``results/perf``."""
    from bench.data.datasets import DATASETS

    device = torch.device("cuda" if settings.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if settings.device == "auto" else settings.device))
    train, test = DATASETS.create(settings.dataset, per_class=settings.per_class, test_per_class=10).load()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()} ×{os.cpu_count()}"
    rows = []
    for victim in settings.victims:
        build = lambda: VICTIMS.create(victim).build(train.num_classes, train.channels, train.size)  # noqa: E731
        ours, ref, precision = [], [], ""
        for repeat in range(settings.repeats):
            torch.manual_seed(repeat)
            ref.append(reference_loop(build(), train, settings.batch_size, settings.epochs, device,
                                      settings.workers, repeat))
            torch.manual_seed(repeat)
            result = bench_loop(build(), train, test, settings.batch_size, settings.epochs, device, repeat)
            ours.append(result["images_per_s"])
            precision = result["precision"]
        rows.append({"victim": victim, "device": str(device), "device_name": name, "threads": torch.get_num_threads(),
                     "dataset": settings.dataset, "images": len(train), "batch_size": settings.batch_size,
                     "epochs": settings.epochs, "repeats": settings.repeats, "reference_workers": settings.workers,
                     "reference_images_per_s": statistics.median(ref), "bench_images_per_s": statistics.median(ours),
                     "ratio": statistics.median(ours) / statistics.median(ref), "bench_precision": precision,
                     "reference_runs": ref, "bench_runs": ours})
    out = results / "perf"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"train-{device.type}"
    (out / f"{stem}.json").write_text(json.dumps({"settings": dataclasses.asdict(settings), "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(markdown(rows))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [f"device: {rows[0]['device_name']} ({rows[0]['device']}, {rows[0]['threads']} threads)" if rows else "",
             "", "| victim | images × epochs | batch | reference img/s | bench img/s | ratio | bench precision |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['victim']} | {r['images']} × {r['epochs']} | {r['batch_size']} | "
                     f"{r['reference_images_per_s']:.0f} | {r['bench_images_per_s']:.0f} | {r['ratio']:.2f} | "
                     f"{r['bench_precision']} |")
    return "\n".join(lines) + "\n"
