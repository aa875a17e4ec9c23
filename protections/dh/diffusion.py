"""DH's semantic images as the paper makes them (DH §III-B3, §IV-A2): CLIP text features of COCO captions →
K-means → one caption per class, the canny edge map of that caption's COCO image as the ControlNet condition,
M samples per class from Stable Diffusion + ControlNet (canny) with seeded generators. diffusers, transformers
and the weights load lazily, here only; results are cached as PNGs and reused without them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from bench.api import ConfigError, Pretrained
from bench.protections.uge.encoders import CLIP, clip_features

ALTERNATIVE = "source = 'skimage' or 'folder'"
STABLE_DIFFUSION = Pretrained(
    "Stable Diffusion", env="BENCH_SD", hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
    files="a diffusers StableDiffusionPipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
          "scheduler/) of v1.5, ControlNet-canny's base (the paper names Stable Diffusion without a version; e.g. "
          "from `huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir DIR --include "
          "model_index.json '*/config.json' 'unet/*.fp16.safetensors' 'vae/*.fp16.safetensors' "
          "'text_encoder/*.fp16.safetensors' 'tokenizer/*' 'scheduler/*' 'feature_extractor/*'` on a connected "
          "machine)", alternative=ALTERNATIVE, size_mb=2150,
    licence="CreativeML OpenRAIL-M", probe="model_index.json",
    allow=("model_index.json", "scheduler/*", "tokenizer/*", "feature_extractor/*",  # no safety checker: not loaded
           *(f"{part}/{file}" for part in ("unet", "vae", "text_encoder") for file in ("config.json",
                                                                                     "*.fp16.safetensors"))))
CONTROLNET = Pretrained(
    "ControlNet canny", env="BENCH_CONTROLNET", hub_id="lllyasviel/sd-controlnet-canny",
    files="a diffusers ControlNetModel folder (config.json, diffusion_pytorch_model.safetensors)",
    alternative=ALTERNATIVE, size_mb=1445, licence="OpenRAIL (see https://huggingface.co/lllyasviel/sd-controlnet-canny)",
    allow=("config.json", "diffusion_pytorch_model.safetensors"))
TEXT_CLIP = dataclasses.replace(  # UGE's CLIP entry ($BENCH_CLIP, the same hub id and files), DH's alternative
    CLIP, alternative=f"{ALTERNATIVE}, or prompts = a JSON list of the chosen {{caption, file_name}} (no clustering)")
SIDE, GUIDANCE, BATCH = 512, 7.5, 8  # SD v1.5's native size; diffusers' default guidance; samples per call


def select_prompts(features: np.ndarray | torch.Tensor, k: int, seed: int,
                   groups: Sequence[int] | None = None) -> list[int]:
    """Indices of k prompts, one per cluster of k-means++ (seeded) over the L2-normalised features: the prompt
    nearest its cluster's centre (DH §III-B3). The paper keeps "the top-k distinct clusters" without saying how
    many it forms or how it ranks them; k clusters keeps them all, k-means spreading its k centres over the
    caption space. A prompt whose group (its COCO image: ~5 captions each) another class took is skipped."""
    from sklearn.cluster import KMeans
    x = torch.nn.functional.normalize(torch.as_tensor(features).float(), dim=1).numpy()  # float32: 590k×512
    if len(x) < k:
        raise ConfigError(f"{len(x)} prompts cannot give {k} classes one each: give a larger captions file")
    km = KMeans(n_clusters=k, init="k-means++", n_init="auto", random_state=seed).fit(x)
    chosen: list[int] = []
    for c, centre in enumerate(km.cluster_centers_):
        members = np.flatnonzero(km.labels_ == c)
        order = members[np.argsort(np.linalg.norm(x[members] - centre, axis=1), kind="stable")]
        taken = {groups[j] for j in chosen} if groups is not None else set()
        free = next((int(i) for i in order if groups is None or groups[i] not in taken), None)
        if free is None:
            raise ConfigError(f"prompt cluster {c} holds only captions of images other classes took: give more")
        chosen.append(free)
    return chosen


def generate(*, prompts: str | None, coco_images: str | None, classes: int, per_class: int, size: int, seed: int,
             steps: int, cache: str | None,
             device: torch.device | str = "cpu") -> tuple[list[list[torch.Tensor]], tuple[str, ...], str]:
    """Per class, ``per_class`` SD+ControlNet samples (uint8 3×size×size), the class prompts and the record; CLIP
    and the pipeline run on ``device`` (the job's), SD and ControlNet in fp16 there on CUDA."""
    device = torch.device(device)
    entries, weights, sources, root = settings(prompts, coco_images, classes, per_class, seed, steps, cache)
    given = isinstance(entries, list)
    what = (f"diffusion: {sources[STABLE_DIFFUSION.env]} + {sources[CONTROLNET.env]} (UniPC, {steps} steps, "
            f"guidance {GUIDANCE}) on the canny edges of the prompts' COCO images; prompts: "
            + (f"given ({prompts})" if given else f"k-means++ (k={classes}, seed {seed}) over CLIP "
               f"{sources[CLIP.env]} text features of {prompts}") + f"; cached at {root}")
    if not (root / "prompts.json").is_file():
        _preflight(weights)
        picked = entries if given else _cluster(entries, classes, seed, sources[CLIP.env], device)
        _sample(picked, Path(str(coco_images)), per_class, seed, steps, sources, root, device)
    from PIL import Image

    from bench.protections.dh.semantic import square
    picked = json.loads((root / "prompts.json").read_text())
    images = [[square(np.asarray(Image.open(root / f"{k:04d}" / f"{m:04d}.png").convert("RGB")), size)
               for m in range(per_class)] for k in range(classes)]
    return images, tuple(p["caption"] for p in picked), what


def settings(prompts: str | None, coco_images: str | None, classes: int, per_class: int, seed: int, steps: int,
             cache: str | None) -> tuple[dict | list, tuple[Pretrained, ...], dict[str, str], Path]:
    """The prompts file's content, the weights it needs, where each loads from ($env, else the hub id), and the
    cache folder: ``cache`` (default ~/.cache/bench/dh-semantic) / a hash of all that decides the images."""
    if not prompts or not Path(prompts).is_file() or not coco_images or not Path(coco_images).is_dir():
        raise ConfigError(f"source = 'diffusion' needs prompts = a COCO captions file (captions_train2017.json) or "
                          f"a JSON list of the chosen {{caption, file_name}}, and coco_images = its image folder "
                          f"(train2017/); got {prompts!r}, {coco_images!r}. Or choose {ALTERNATIVE}")
    raw = Path(prompts).read_bytes()
    entries = json.loads(raw)
    given = isinstance(entries, list)  # the selection a run wrote to its cache: no clustering, no CLIP
    if given and (len(entries) != classes or not all({"caption", "file_name"} <= set(e) for e in entries)):
        raise ConfigError(f"prompts {prompts} is a list of {len(entries)}, expected {classes} {{caption, "
                          "file_name}} (one per class), or give a COCO captions file to cluster")
    if not given and not (isinstance(entries, dict) and {"annotations", "images"} <= set(entries)):
        raise ConfigError(f"prompts {prompts} is no COCO captions file: it needs 'annotations' (image_id, caption) "
                          "and 'images' (id, file_name), as captions_train2017.json")
    weights = (STABLE_DIFFUSION, CONTROLNET) + (() if given else (TEXT_CLIP,))
    sources = {w.env: str(w.locate() or w.hub_id) for w in weights}
    key = json.dumps([hashlib.sha256(raw).hexdigest(), str(Path(coco_images).resolve()), classes, per_class, seed,
                      steps, GUIDANCE, sorted(sources.items())])
    root = Path(cache or Path.home() / ".cache" / "bench" / "dh-semantic").expanduser()
    return entries, weights, sources, root / hashlib.sha256(key.encode()).hexdigest()[:16]


def _preflight(weights: Sequence[Pretrained]) -> None:
    """One ConfigError naming everything absent: packages, and weights neither at $env nor cached nor (online)
    to be downloaded."""
    problems = []
    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        problems.append(f"source = 'diffusion' needs diffusers and transformers: pip install -e '.[diffusion]' (or "
                        f"choose {ALTERNATIVE})")
    problems += [w.missing() for w in weights if not w.resolve().available]
    if problems:
        raise ConfigError("; ".join(problems))


def _cluster(data: dict, k: int, seed: int, clip: str, device: torch.device) -> list[dict]:
    """The k chosen {caption, file_name} of a COCO captions file (annotations → image_id, caption; images → id,
    file_name): CLIP text features, then ``select_prompts`` with the images as groups."""
    from transformers import CLIPModel, CLIPTokenizer
    files = {im["id"]: im["file_name"] for im in data["images"]}
    notes = [a for a in data["annotations"] if a["image_id"] in files]
    try:
        model, tokenizer = CLIPModel.from_pretrained(clip).to(device).eval(), CLIPTokenizer.from_pretrained(clip)
    except Exception as err:  # OSError offline, connection errors where the hub is unreachable
        raise ConfigError(f"{TEXT_CLIP.missing()}; loading {clip!r} failed: {type(err).__name__}: {err}") from err
    feats = []
    with torch.no_grad():
        for i in range(0, len(notes), 1024):
            tokens = tokenizer([a["caption"].strip() for a in notes[i:i + 1024]], padding=True, truncation=True,
                               max_length=77, return_tensors="pt").to(device)
            feats.append(clip_features(model.get_text_features(**tokens)).float().cpu())
    picked = select_prompts(torch.cat(feats), k, seed, [a["image_id"] for a in notes])
    return [{"caption": notes[i]["caption"].strip(), "file_name": files[notes[i]["image_id"]]} for i in picked]


def _sample(picked: list[dict], images: Path, per_class: int, seed: int, steps: int, sources: dict[str, str],
            root: Path, device: torch.device) -> None:
    """SD+ControlNet samples of each chosen prompt, conditioned on the canny edges (white on black) of its COCO
    image centre-cropped and resized to 512; PNGs under ``root``, prompts.json last (it marks a complete cache).
    On CUDA both load in fp16 (SD's fp16 variant files, where a local folder has them: half the download)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UniPCMultistepScheduler
    from PIL import Image

    from bench.protections.dh.semantic import canny_edges, square
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    sd = sources[STABLE_DIFFUSION.env]
    variant = "fp16" if not Path(sd).exists() or any(Path(sd).glob("*/*.fp16.*")) else None
    try:
        controlnet = ControlNetModel.from_pretrained(sources[CONTROLNET.env], torch_dtype=dtype)
        # the black images of the NSFW checker would not be semantic; COCO captions are the prompts
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            sd, controlnet=controlnet, safety_checker=None, requires_safety_checker=False, torch_dtype=dtype,
            variant=variant)
    except Exception as err:  # OSError offline, connection errors where the hub is unreachable
        raise ConfigError(f"{STABLE_DIFFUSION.missing()}; {CONTROLNET.missing()}; loading failed: "
                          f"{type(err).__name__}: {err}") from err
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    for k, p in enumerate(picked):
        photo = square(np.asarray(Image.open(images / p["file_name"]).convert("RGB")), SIDE)
        edges = canny_edges(photo[None])[0].numpy()
        condition = Image.fromarray(np.repeat(edges[..., None] * np.uint8(255), 3, axis=2))
        (root / f"{k:04d}").mkdir(parents=True, exist_ok=True)
        for start in range(0, per_class, BATCH):
            ms = range(start, min(start + BATCH, per_class))
            gens = [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, k, m]).generate_state(1)[0]))
                    for m in ms]  # CPU generators: the same latents on any device
            out = pipe([p["caption"]] * len(ms), image=condition, num_inference_steps=steps, guidance_scale=GUIDANCE,
                       generator=gens, output_type="np").images
            for m, img in zip(ms, out):
                Image.fromarray(np.round(img * 255).astype(np.uint8)).save(root / f"{k:04d}" / f"{m:04d}.png")
    (root / "prompts.json").write_text(json.dumps(picked, indent=1))
