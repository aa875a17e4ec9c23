"""The common feature space of UGE's feature-distance loss (UGE §3.2 Eq. 7–9): an image encoder E_i and one
feature per class (E_t of "A photo of a <class>").

``clip``: the paper's choice, CLIP's image and text towers through ``transformers`` (``CLIPModel``) from a local
folder or a hub id; the variant is not named in the paper, ViT-B/32 is the default here. ``classifier``: the
documented alternative for machines without CLIP weights: an encoder the protector trains on its own clean
data (a victim, its features the input of its last linear layer), class prototypes (the normalised mean clean
feature of each class) standing in for the text features. A matrix must ask for it; the record names which ran.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import ImageSet, Pretrained
from bench.protections import _surrogate as S

CLIP = Pretrained("CLIP", env="BENCH_CLIP", hub_id="openai/clip-vit-base-patch32",
                  files="a transformers CLIPModel folder (config.json, model.safetensors, tokenizer files; e.g. from "
                        "`huggingface-cli download openai/clip-vit-base-patch32 --local-dir DIR` on a connected machine)",
                  alternative="encoder = 'classifier' (a classifier trained on the clean set; recorded)",
                  size_mb=605, licence="MIT (openai/CLIP; see https://huggingface.co/openai/clip-vit-base-patch32)",
                  allow=("*.json", "merges.txt", "vocab.json", "model.safetensors", "pytorch_model.bin"))
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # org/name, as the hub spells repository ids
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CLASS_NAMES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "svhn": tuple(str(d) for d in range(10)),
}


@dataclasses.dataclass(frozen=True)
class Encoder:
    """``images``: float [0, 1] N×C×H×W → N×D features (differentiable in the images); ``classes``: K×D, one
    feature per class; ``name``: what ran, for the record."""

    images: Callable[[torch.Tensor], torch.Tensor]
    classes: torch.Tensor
    name: str
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def class_names(spec: str, num_classes: int) -> tuple[str, ...]:
    """A preset (``cifar10``, ``svhn``) or comma-separated class names, checked against the class count."""
    names = CLASS_NAMES.get(spec) or tuple(n.strip() for n in spec.split(",") if n.strip())
    if len(names) != num_classes:
        raise ValueError(f"class names {spec!r} give {len(names)} names for {num_classes} classes: name a preset "
                         f"({', '.join(CLASS_NAMES)}) or give '{num_classes} comma-separated names'")
    return names


def clip_source(source: str | None) -> str:
    """The folder or hub id to load CLIP from: ``source``, else $BENCH_CLIP, else the default hub id."""
    return source or CLIP.load_from()


def clip_weights(clip_model: str | None) -> tuple[Pretrained, ...]:
    """What the planner checks for ``clip_model``: nothing for an existing folder, CLIP ($BENCH_CLIP, else the
    default hub id) when it is None, else that hub id (a missing folder is refused, never looked up)."""
    if clip_model is None:
        return (CLIP,)
    if Path(clip_model).expanduser().is_dir():
        return ()
    hub_id = clip_model if HUB_ID.fullmatch(clip_model) and not clip_model.startswith(("~", ".")) else ""
    licence = f"see https://huggingface.co/{hub_id}" if hub_id else ""
    files = f"clip_model = {clip_model!r}: an existing transformers CLIPModel folder or a hub id (org/name)"
    return (dataclasses.replace(CLIP, env="", hub_id=hub_id, size_mb=0, licence=licence, files=files),)


def clip_encoder(source: str, names: tuple[str, ...], device: torch.device) -> Encoder:
    """CLIP from a local folder or a hub id (offline: a folder, or the hub cache). Images are resized to the
    tower's input size (bicubic, differentiable) and normalised with CLIP's statistics."""
    try:
        from transformers import CLIPModel, CLIPTokenizer
    except ImportError as err:
        raise RuntimeError("the clip encoder needs transformers: pip install 'bench[clip]'") from err
    try:
        model = CLIPModel.from_pretrained(source).to(device).eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(source)
    except Exception as err:  # OSError offline, connection errors where the hub is unreachable
        raise RuntimeError(f"{CLIP.missing()}; loading {source!r} failed: {type(err).__name__}: {err}. Without CLIP, choose the "
                           "documented alternative encoder = 'classifier'") from err
    with torch.no_grad():
        tokens = tokenizer([f"A photo of a {n}" for n in names], padding=True, return_tensors="pt").to(device)
        text = clip_features(model.get_text_features(**tokens))
    side = model.config.vision_config.image_size
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))

    def images(x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
        return clip_features(model.get_image_features(pixel_values=(x - mean) / std))
    return Encoder(images, text, f"clip:{Path(source).name if Path(source).exists() else source}")


def clip_features(out: Any) -> torch.Tensor:
    """transformers ≥ 5 may return a model output rather than the projected features tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def classifier_encoder(arch: str, epochs: int, train: ImageSet, *, seed: int, device: torch.device) -> Encoder:
    """The alternative encoder: victim ``arch`` trained ``epochs`` on the protector's clean ``train`` set, its
    features the input of its last linear layer, class prototypes from the clean images."""
    net, accuracy = S.pretrain(arch, train, seed=seed, device=device, epochs=epochs)
    head = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not head:
        raise ValueError(f"encoder_arch {arch!r} has no linear layer whose input could serve as features")
    captured: list[torch.Tensor] = []
    head[-1].register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))

    def images(x: torch.Tensor) -> torch.Tensor:
        captured.clear()
        net(x)
        return captured[0].flatten(1).float()
    with torch.no_grad():
        x, y = S.to_float(train, device), train.labels.to(device)
        feats = torch.cat([F.normalize(images(x[i]), dim=1) for i in S.batches(len(x), 512, device)])
        prototypes = torch.stack([feats[y == c].mean(0) for c in range(train.num_classes)])
    return Encoder(images, prototypes, f"classifier:{arch}", {"encoder_clean_accuracy": accuracy})
