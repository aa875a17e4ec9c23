"""The hidden semantic images of DH (DH §III-B3, §IV-A2; the SIG ablation of Table VII): one natural image per
class (class-wise, DH(C)), or M per class sharing one image's shape (its canny edges) and differing in local
texture (sample-wise, DH(S)). ``source`` says where they come from; the record says which ran:

``diffusion``: the paper's Stable Diffusion + ControlNet (canny) generation (``protections.dh.diffusion``).
``skimage``: natural photographs scikit-image ships (no download); more classes than photographs (CIFAR-100) take
  non-overlapping square tiles, of the coarsest g×g grid (g ≤ 4) with enough informative ones (contrast and edges
  in a 32-px thumbnail), colour photographs first; a seeded permutation gives each class a different one.
``folder``: the user's images: K files (sorted → classes) or K subfolders (sorted) of ≥ 1 image.

A class's given images come first, then ``texture_variant``s of them up to ``per_class`` (standing in for more
SD+ControlNet samples of one prompt and edge map). Images are centre-cropped square, resized antialiased to
size×size and converted to ``channels``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import torch

# skimage and torchvision are imported in the functions that use them: at the top they cost every `bench list`
# about 2 s (torchvision.transforms.v2 pulls torchvision.models and torch._dynamo; skimage pulls scipy)
from bench.api import ConfigError, Pretrained
from bench.protections.dh import diffusion
from bench.protections.dh.diffusion import CONTROLNET, STABLE_DIFFUSION, TEXT_CLIP, select_prompts

__all__ = ["CONTROLNET", "SOURCES", "STABLE_DIFFUSION", "TEXT_CLIP", "SemanticImages", "canny_edges",
           "pretrained_for", "select_prompts", "semantic_images", "texture_variant"]
SOURCES = ("skimage", "folder", "diffusion")
COLOUR = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle")
GREY = ("camera", "moon", "coins", "clock", "cell", "page", "text")
TEXTURES = ("brick", "grass", "gravel")  # texture photographs: the variants' new textures, never a class
SUFFIXES = (".png", ".jpg", ".jpeg")
CANNY_SIGMA, CANNY_QUANTILES = 1.0, (0.8, 0.9)
VARIANTS = " (sample variants: edges kept, texture re-synthesised, see protections/dh/semantic.py)"


@dataclasses.dataclass(frozen=True)
class SemanticImages:
    """``images``: uint8 K×M×C×S×S, M images for each of K classes; ``source``: what ran, for the record;
    ``names``: one per class (the photograph, the file or folder stem, or the prompt)."""

    images: torch.Tensor
    source: str
    names: tuple[str, ...]


def semantic_images(source: str, *, classes: int, per_class: int, channels: int, size: int, seed: int,
                    folder: str | None = None, prompts: str | None = None, coco_images: str | None = None,
                    steps: int = 20, cache: str | None = None, device: torch.device | str = "cpu") -> SemanticImages:
    """K×M semantic images from ``source`` (DH §III-B3), the same bytes for a seed; see the module docstring.
    ``device``: where ``diffusion`` runs CLIP and the pipeline (the job's device)."""
    if source not in SOURCES:
        raise ConfigError(f"unknown semantic image source {source!r}: choose one of {', '.join(SOURCES)}")
    for name, value in (("classes", classes), ("per_class", per_class), ("size", size), ("steps", steps)):
        if value < 1:
            raise ConfigError(f"semantic images: {name} = {value}, it must be ≥ 1")
    if channels not in (1, 3):
        raise ConfigError(f"semantic images: channels = {channels}, only 1 (grey) or 3 (RGB) are made")
    if source == "diffusion":
        given, names, what = diffusion.generate(prompts=prompts, coco_images=coco_images, classes=classes,
                                                per_class=per_class, size=size, seed=seed, steps=steps, cache=cache,
                                                device=device)
    else:
        given, names, what = _folder(folder, classes, size) if source == "folder" else _skimage(classes, seed, size)
    keys = {hash(g[0].numpy().tobytes()) for g in given}
    if len(keys) < classes:
        raise ConfigError(f"semantic images from {source!r}: two classes got the same image; give distinct ones")
    from torchvision.transforms.v2 import functional as TF
    out = []
    for k, group in enumerate(given):
        group = [TF.rgb_to_grayscale(x) if channels == 1 else x for x in group[:per_class]]
        rng = np.random.default_rng([seed, k])
        out.append(torch.stack(group + [texture_variant(group[m % len(group)], rng)
                                        for m in range(len(group), per_class)]))
    derived = per_class > min(len(g) for g in given)
    return SemanticImages(torch.stack(out), what + (VARIANTS if derived else ""), names)


def pretrained_for(source: str, prompts_given: bool) -> tuple[Pretrained, ...]:
    """The weights ``source`` loads: diffusion needs SD and ControlNet, and CLIP to cluster the captions unless
    the chosen prompts are given (a JSON list of {caption, file_name}, as each run writes to its cache)."""
    if source not in SOURCES:
        raise ConfigError(f"unknown semantic image source {source!r}: choose one of {', '.join(SOURCES)}")
    return () if source != "diffusion" else (STABLE_DIFFUSION, CONTROLNET) + (() if prompts_given else (TEXT_CLIP,))


def canny_edges(images: torch.Tensor) -> torch.Tensor:
    """Bool N×S×S canny edges (skimage.feature.canny, σ = 1) of uint8 N×C×S×S images, on the grey image (Rec. 709
    luma). Hysteresis thresholds at the 80th/90th percentile of each image's gradient magnitude: the strongest
    edges of any image at any size (ControlNet's fixed cv2 thresholds 100/200, meant for 512 px, leave
    low-contrast photographs without edges at 32 px)."""
    return torch.from_numpy(np.stack([_edges(x.permute(1, 2, 0).numpy() / 255.0) for x in images]))


def _edges(x: np.ndarray) -> np.ndarray:
    from skimage import color, feature

    grey = color.rgb2gray(x) if x.shape[-1] == 3 else x[..., 0]
    low, high = CANNY_QUANTILES
    return feature.canny(grey, sigma=CANNY_SIGMA, low_threshold=low, high_threshold=high, use_quantiles=True)


def texture_variant(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A sample-wise variant of ``image`` (uint8 C×S×S) with its shape and a new texture: DH(S)'s images "share
    the same global shape but differ in their local textures" (DH §IV-A2); this stands in for SD+ControlNet
    samples of one prompt and edge map. Near the canny edges (dilated 1 px, feathered) the image is kept;
    elsewhere its smoothed base (Gaussian σ = 1) gets the band-pass detail of a seeded crop (position, scale,
    rotation) of a skimage texture photograph (brick, grass, gravel), scaled to the image's own local detail
    energy so flat regions stay flat and no edges appear; then a mild colour jitter (gain ±4 %, offset ±2 %)."""
    from skimage import filters, morphology, transform

    x = image.permute(1, 2, 0).numpy() / 255.0
    size, c = x.shape[0], x.shape[-1]
    keep = morphology.dilation(_edges(x), morphology.disk(1)).astype(float)
    mask = np.clip(2 * filters.gaussian(keep, sigma=0.7), 0, 1)[..., None]  # feathered: no seam edges
    base = filters.gaussian(x, sigma=1.0, channel_axis=-1)
    energy = np.sqrt(filters.gaussian(((x - base) ** 2).mean(-1), sigma=2.0))
    tex = _photo(TEXTURES[rng.integers(len(TEXTURES))])[..., 0] / 255.0
    side = int(rng.integers(size, min(4 * size, tex.shape[0]) + 1))
    i, j = rng.integers(0, tex.shape[0] - side + 1, 2)
    tex = np.rot90(transform.resize(tex[i:i + side, j:j + side], (size, size), anti_aliasing=True), rng.integers(4))
    tex = tex - filters.gaussian(tex, sigma=1.0)
    v = mask * x + (1 - mask) * (base + (tex / (tex.std() + 1e-6) * energy)[..., None])
    v = v * (1 + 0.04 * rng.standard_normal(c)) + 0.02 * rng.standard_normal(c)
    return torch.from_numpy(np.round(np.clip(v, 0, 1) * 255).astype(np.uint8)).permute(2, 0, 1).contiguous()


def square(x: np.ndarray, size: int) -> torch.Tensor:
    """uint8 H×W×3 → uint8 3×size×size: the centre square, resized antialiased."""
    from torchvision.transforms.v2 import functional as TF

    side = min(x.shape[:2])
    top, left = (x.shape[0] - side) // 2, (x.shape[1] - side) // 2
    crop = torch.from_numpy(np.array(x[top:top + side, left:left + side])).permute(2, 0, 1)  # a writable copy
    return TF.resize(crop, [size, size], antialias=True)


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    from skimage import data

    x = getattr(data, name)()
    x = x[0] if isinstance(x, tuple) else x  # stereo_motorcycle: the left image
    return np.repeat(x[..., None], 3, axis=2) if x.ndim == 2 else x


def _tile(name: str, g: int, i: int, j: int) -> np.ndarray:
    x = _photo(name)
    side = min(x.shape[:2]) // g
    top, left = (x.shape[0] - g * side) // 2 + i * side, (x.shape[1] - g * side) // 2 + j * side
    return x[top:top + side, left:left + side]


def _informative(x: np.ndarray) -> bool:
    """Contrast and shape in a 32-px grey thumbnail (skimage's default absolute canny thresholds)."""
    from skimage import feature
    from torchvision.transforms.v2 import functional as TF

    grey = TF.rgb_to_grayscale(square(x, 32))[0].numpy() / 255.0
    return grey.std() >= 0.04 and feature.canny(grey, sigma=CANNY_SIGMA).mean() >= 0.04


def _skimage(classes: int, seed: int, size: int) -> tuple[list[list[torch.Tensor]], tuple[str, ...], str]:
    for g, photos in ((g, p) for g in range(1, 5) for p in (COLOUR, COLOUR + GREY)):
        tiles = [(n, i, j) for n in photos for i in range(g) for j in range(g) if _informative(_tile(n, g, i, j))]
        if len(tiles) >= classes:
            break
    else:
        raise ConfigError(f"the skimage source has {len(tiles)} distinct informative images (4×4 tiles of "
                          f"{len(photos)} photographs), fewer than {classes} classes: use source = 'folder' "
                          "(your images) or 'diffusion'")
    picked = [tiles[t] for t in np.random.default_rng(seed).permutation(len(tiles))[:classes]]
    names = tuple(n if g == 1 else f"{n} tile {i},{j} of {g}×{g}" for n, i, j in picked)
    used = ", ".join(dict.fromkeys(n for n, _, _ in picked))
    what = f"skimage photographs: {used}" + ("" if g == 1 else f" ({g}×{g} tiles, seeded)")
    return [[square(_tile(n, g, i, j), size)] for n, i, j in picked], names, what


def _folder(folder: str | None, classes: int, size: int) -> tuple[list[list[torch.Tensor]], tuple[str, ...], str]:
    from PIL import Image
    layouts = (f"{classes} image files (sorted by name → classes 0…{classes - 1}) or {classes} subfolders (sorted) "
               f"of ≥ 1 image each ({', '.join(SUFFIXES)})")
    root = Path(folder).expanduser() if folder else None
    if root is None or not root.is_dir():
        raise ConfigError(f"semantic folder {folder!r} is not a directory: give folder = a directory of {layouts}")
    visible = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    files = [p for p in visible if p.is_file() and p.suffix.lower() in SUFFIXES]
    dirs = [p for p in visible if p.is_dir()]
    groups = [[f] for f in files] if files and not dirs else [
        sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES) for d in dirs]
    if len(groups) != classes or (files and dirs) or not all(groups):
        found = f"{len(files)} images and {len(dirs)} subfolders" + ("" if all(groups) else ", some empty")
        raise ConfigError(f"semantic folder {root} holds {found}, expected {classes} classes: accepted layouts are "
                          f"{layouts}")
    images = [[square(np.asarray(Image.open(p).convert("RGB")), size) for p in g] for g in groups]
    counts = sorted({len(g) for g in groups})
    names = tuple(p.stem if p.is_file() else p.name for p in files or dirs)
    return images, names, f"folder {root} ({'one image' if files else f'{counts[0]}–{counts[-1]} images'} per class)"
