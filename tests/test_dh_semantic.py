"""DH's hidden semantic images (protections/dh/semantic.py, diffusion.py; DH §III-B3): the offline sources, the
sample-wise variants' shared edges and differing textures, the folder layouts, and what of the diffusion path
runs without its weights (the clear error, the prompt selection, the cache)."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import filters, morphology

from bench.core.registry import ConfigError
from bench.protections.dh import diffusion as D
from bench.protections.dh import semantic as SEM
from bench.protections.uge.encoders import CLIP


def skimage(classes=10, per_class=1, channels=3, size=32, seed=0):
    return SEM.semantic_images("skimage", classes=classes, per_class=per_class, channels=channels, size=size,
                               seed=seed)


def distinct(images):
    """The smallest mean |difference| (0–255) between two classes' first images."""
    x = images[:, 0].flatten(1).float()
    d = torch.cdist(x, x, p=1) / x.shape[1]
    return d[~torch.eye(len(x), dtype=torch.bool)].min().item()


def test_skimage_class_wise_is_natural_distinct_and_seeded():
    out = skimage()
    assert out.images.shape == (10, 1, 3, 32, 32) and out.images.dtype == torch.uint8
    assert out.source.startswith("skimage photographs: ") and len(set(out.names)) == 10
    assert distinct(out.images) > 10
    again, other = skimage(), skimage(seed=1)
    assert torch.equal(out.images, again.images) and out.names == again.names
    assert other.names != out.names


def test_skimage_gives_a_hundred_distinct_classes_and_grey():
    out = skimage(classes=100)
    assert out.images.shape == (100, 1, 3, 32, 32) and len(set(out.names)) == 100
    assert distinct(out.images) > 3 and "tiles" in out.source
    grey = skimage(channels=1, size=24)
    assert grey.images.shape == (10, 1, 1, 24, 24) and grey.names == skimage().names
    with pytest.raises(ConfigError, match="fewer than 1000 classes.*folder"):
        skimage(classes=1000)


def edge_f1(a, b):
    """F1 of two edge maps, each pixel matched within 1 px."""
    da, db = (morphology.dilation(e, morphology.disk(1)) for e in (a, b))
    precision, recall = (b & da).sum() / max(b.sum(), 1), (a & db).sum() / max(a.sum(), 1)
    return 2 * precision * recall / max(precision + recall, 1e-9)


def test_sample_variants_keep_the_edges_and_change_the_texture():
    # Measured (10 classes, 6 per class, 32 px, seeds 0 and 1): per-class mean edge F1 0.93–1.00 (mean 0.975); mean
    # |difference| between variants off the edges 5.7–20.8 of 255 per class (mean 12.5), 6.5 in the high-pass band
    # (the σ = 1 residual) alone; 100 classes (4×4 tiles, 4 per class): F1 0.85–1.00 per class, off the edges ≥ 5.2.
    out = skimage(per_class=6)
    assert out.images.shape == (10, 6, 3, 32, 32) and "texture re-synthesised" in out.source
    assert torch.equal(out.images[:, 0], skimage().images[:, 0])  # the photograph, then its variants
    f1s, diffs, bands, corr = [], [], [], []
    for group in out.images:
        edges = SEM.canny_edges(group).numpy()
        f1s.append(np.mean([edge_f1(edges[0], e) for e in edges[1:]]))
        off = ~morphology.dilation(edges[0], morphology.disk(1))
        x = group[1:].float().numpy()
        band = x - filters.gaussian(x, sigma=(0, 0, 1, 1), preserve_range=True)
        pairs = [(a, b) for a in range(len(x)) for b in range(a + 1, len(x))]
        diffs.append(np.mean([np.abs(x[a] - x[b]).mean(0)[off].mean() for a, b in pairs]))
        bands.append(np.mean([np.abs(band[a] - band[b]).mean(0)[off].mean() for a, b in pairs]))
        corr += [np.corrcoef(group[0].flatten().float(), v.flatten())[0, 1] for v in x]
    assert min(f1s) >= 0.85 and np.mean(f1s) >= 0.95
    assert min(diffs) >= 3 and np.mean(diffs) >= 8 and np.mean(bands) >= 4
    assert np.mean(corr) >= 0.85  # an image derivation, not noise
    assert torch.equal(out.images, skimage(per_class=6).images)


def test_canny_edges_are_bool_maps_of_the_grey_image():
    images = skimage(classes=3, size=40).images[:, 0]
    edges = SEM.canny_edges(images)
    assert edges.shape == (3, 40, 40) and edges.dtype == torch.bool and 0.02 < edges.float().mean() < 0.3
    assert torch.equal(SEM.canny_edges(images[:, :1].expand(-1, 3, -1, -1)), SEM.canny_edges(images[:, :1]))


def write(path, seed, side=20):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (side, side + 4, 3), dtype=np.uint8)).save(path)


def test_folder_one_image_per_class(tmp_path):
    for i, name in enumerate(("b", "a", "c")):
        write(tmp_path / f"{name}.png", i)
    out = SEM.semantic_images("folder", classes=3, per_class=1, channels=3, size=16, seed=0, folder=str(tmp_path))
    assert out.images.shape == (3, 1, 3, 16, 16) and out.names == ("a", "b", "c")
    assert out.source == f"folder {tmp_path} (one image per class)"
    first = SEM.square(np.asarray(Image.open(tmp_path / "a.png")), 16)
    assert torch.equal(out.images[0, 0], first)


def test_folder_one_subfolder_per_class_derives_missing_variants(tmp_path):
    for c, count in enumerate((2, 1, 3)):
        (tmp_path / f"class{c}").mkdir()
        for m in range(count):
            write(tmp_path / f"class{c}" / f"{m}.jpg", 10 * c + m)
    out = SEM.semantic_images("folder", classes=3, per_class=3, channels=1, size=16, seed=0, folder=str(tmp_path))
    assert out.images.shape == (3, 3, 1, 16, 16) and out.names == ("class0", "class1", "class2")
    assert "1–3 images" in out.source and "texture re-synthesised" in out.source
    assert len({out.images[c, m].numpy().tobytes() for c in range(3) for m in range(3)}) == 9


def test_folder_with_the_wrong_count_or_missing_says_which_layouts(tmp_path):
    for i in range(2):
        write(tmp_path / f"{i}.png", i)
    with pytest.raises(ConfigError, match=r"holds 2 images and 0 subfolders, expected 3 classes.*3 image files.*"
                                          r"3 subfolders"):
        SEM.semantic_images("folder", classes=3, per_class=1, channels=3, size=16, seed=0, folder=str(tmp_path))
    with pytest.raises(ConfigError, match="is not a directory"):
        SEM.semantic_images("folder", classes=3, per_class=1, channels=3, size=16, seed=0,
                            folder=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(source="noise"), "unknown semantic image source 'noise'.*skimage, folder, diffusion"),
    (dict(per_class=0), "per_class = 0, it must be ≥ 1"),
    (dict(classes=0), "classes = 0, it must be ≥ 1"),
    (dict(channels=2), "channels = 2"),
])
def test_bad_input_names_the_problem(kwargs, message):
    args = dict(source="skimage", classes=2, per_class=1, channels=3, size=8, seed=0) | kwargs
    with pytest.raises(ConfigError, match=message):
        SEM.semantic_images(args.pop("source"), **args)


def test_pretrained_for_names_the_weights_each_source_needs():
    assert SEM.pretrained_for("skimage", False) == () == SEM.pretrained_for("folder", True)
    assert SEM.pretrained_for("diffusion", False) == (SEM.STABLE_DIFFUSION, SEM.CONTROLNET, SEM.TEXT_CLIP)
    assert SEM.pretrained_for("diffusion", True) == (SEM.STABLE_DIFFUSION, SEM.CONTROLNET)
    assert (SEM.TEXT_CLIP.env, SEM.TEXT_CLIP.hub_id) == (CLIP.env, CLIP.hub_id)
    assert SEM.STABLE_DIFFUSION.env == "BENCH_SD" and SEM.CONTROLNET.hub_id == "lllyasviel/sd-controlnet-canny"


@pytest.fixture
def coco(tmp_path, monkeypatch):
    """A two-image COCO captions file, no weights anywhere (offline, an empty hub cache: one holding them, or the
    hub online, would be used)."""
    for env in ("BENCH_SD", "BENCH_CONTROLNET", "BENCH_CLIP", "HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    (tmp_path / "train2017").mkdir()
    for i in range(2):
        write(tmp_path / "train2017" / f"{i:012d}.jpg", i, side=64)
    data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(2)],
            "annotations": [{"image_id": i, "caption": f"caption {i}"} for i in range(2)]}
    (tmp_path / "captions.json").write_text(json.dumps(data))
    return dict(prompts=str(tmp_path / "captions.json"), coco_images=str(tmp_path / "train2017"),
                cache=str(tmp_path / "cache"))


def test_diffusion_without_weights_says_where_to_put_them(coco):
    with pytest.raises(ConfigError, match=r"\$BENCH_SD.*\$BENCH_CONTROLNET.*\$BENCH_CLIP.*source = 'skimage' or "
                                          r"'folder'"):
        SEM.semantic_images("diffusion", classes=2, per_class=1, channels=3, size=16, seed=0, **coco)


def test_diffusion_without_diffusers_says_how_to_install(coco, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[diffusion\]'"):
        SEM.semantic_images("diffusion", classes=2, per_class=1, channels=3, size=16, seed=0, **coco)


def test_diffusion_without_prompts_asks_for_them(tmp_path):
    with pytest.raises(ConfigError, match="needs prompts = a COCO captions file.*coco_images"):
        SEM.semantic_images("diffusion", classes=2, per_class=1, channels=3, size=16, seed=0,
                            prompts=str(tmp_path / "none.json"), coco_images=str(tmp_path))


def test_diffusion_reuses_its_cache_without_weights(coco):
    *_, root = D.settings(coco["prompts"], coco["coco_images"], 2, 2, 0, 20, coco["cache"])
    rng = np.random.default_rng(0)
    for k in range(2):
        (root / f"{k:04d}").mkdir(parents=True)
        for m in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"{k:04d}" / f"{m:04d}.png")
    (root / "prompts.json").write_text(json.dumps([{"caption": f"caption {k}", "file_name": ""} for k in range(2)]))
    out = SEM.semantic_images("diffusion", classes=2, per_class=2, channels=3, size=16, seed=0, **coco)
    assert out.images.shape == (2, 2, 3, 16, 16) and out.names == ("caption 0", "caption 1")
    assert out.source.startswith("diffusion: stable-diffusion-v1-5/stable-diffusion-v1-5 + ")
    assert str(root) in out.source
    assert torch.equal(out.images[1, 0], SEM.square(np.asarray(Image.open(root / "0001" / "0000.png")), 16))


def clusters(seed=0):
    """Three clusters of 12 features around orthogonal directions (so K-means recovers them)."""
    rng = np.random.default_rng(seed)
    points = np.concatenate([np.eye(8)[c] * 5 + rng.normal(0, 0.6, (12, 8)) for c in range(3)])
    x = points / np.linalg.norm(points, axis=1, keepdims=True)
    nearest = [12 * c + int(np.argmin(np.linalg.norm(x[12 * c:12 * c + 12] - x[12 * c:12 * c + 12].mean(0), axis=1)))
               for c in range(3)]
    return points, nearest


def test_prompt_selection_takes_the_prompt_nearest_each_cluster_centre():
    points, nearest = clusters()
    chosen = SEM.select_prompts(points, 3, seed=0)
    assert sorted(chosen) == nearest and sorted(i // 12 for i in chosen) == [0, 1, 2]
    assert SEM.select_prompts(torch.tensor(points), 3, seed=0) == chosen  # deterministic, tensors too
    # two clusters' nearest prompts describe one image: the cluster taking it second takes its next nearest
    groups = list(range(len(points)))
    groups[nearest[1]] = nearest[0]
    again = SEM.select_prompts(points, 3, seed=0, groups=groups)
    assert len(set(again) & set(nearest[:2])) == 1 and nearest[2] in again and len({groups[i] for i in again}) == 3
    with pytest.raises(ConfigError, match="36 prompts cannot give 40 classes"):
        SEM.select_prompts(points, 40, seed=0)


def tiny_weights(root):
    """Tiny random SD + ControlNet-canny + CLIP folders, the layouts the real ones have (nothing downloaded)."""
    from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig
    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab |= {c: len(vocab), c + "</w>": len(vocab) + 1}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=77)
    text = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=len(vocab), projection_dim=16)
    blocks = dict(block_out_channels=(8, 16), layers_per_block=1, in_channels=4, cross_attention_dim=32,
                  norm_num_groups=4, attention_head_dim=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"))
    unet = UNet2DConditionModel(**blocks, out_channels=4, sample_size=16,
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    controlnet = ControlNetModel(**blocks, conditioning_embedding_out_channels=(4, 8, 8, 8))  # latents at 1/8
    vae = AutoencoderKL(block_out_channels=(4, 8, 8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    pipe = StableDiffusionControlNetPipeline(vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tokenizer,
                                             unet=unet, controlnet=controlnet, scheduler=DDIMScheduler(),
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "sd")
    controlnet.save_pretrained(root / "controlnet")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=32, patch_size=8)
    clip = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")


@pytest.mark.slow
def test_diffusion_runs_end_to_end_with_tiny_random_weights(tmp_path, monkeypatch):
    """The real path (CLIP features → K-means → canny condition → UniPC sampling → cache), tiny random models."""
    pytest.importorskip("diffusers")
    tiny_weights(tmp_path)
    for env, folder in (("BENCH_SD", "sd"), ("BENCH_CONTROLNET", "controlnet"), ("BENCH_CLIP", "clip")):
        monkeypatch.setenv(env, str(tmp_path / folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "train2017").mkdir()
    captions = ["a man in a space suit", "an astronaut", "a cup of coffee", "a coffee mug", "a cat sitting",
                "a ginger cat", "a rocket launch", "a rocket on a pad"]
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")):
        Image.fromarray(SEM._photo(name)).save(tmp_path / "train2017" / f"{i:012d}.jpg")
    (tmp_path / "captions.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(4)],
        "annotations": [{"image_id": i // 2, "caption": c} for i, c in enumerate(captions)]}))
    args = dict(classes=3, per_class=3, channels=3, size=32, seed=0, prompts=str(tmp_path / "captions.json"),
                coco_images=str(tmp_path / "train2017"), steps=2, cache=str(tmp_path / "cache"))
    out = SEM.semantic_images("diffusion", **args)
    assert out.images.shape == (3, 3, 3, 32, 32) and "k-means++ (k=3, seed 0)" in out.source
    chosen = {captions.index(n) // 2 for n in out.names}
    assert len(chosen) == 3  # three prompts of three different images
    assert len({x.numpy().tobytes() for x in out.images.flatten(0, 1)}) == 9
    root = next((tmp_path / "cache").iterdir())
    assert json.loads((root / "prompts.json").read_text())[0]["caption"] == out.names[0]
    with monkeypatch.context() as m:  # the cache answers: nothing is sampled again
        m.setattr(D, "_sample", lambda *a: pytest.fail("sampled again despite the cache"))
        assert torch.equal(SEM.semantic_images("diffusion", **args).images, out.images)
    (root / "prompts.json").unlink()  # regenerating gives the same bytes: seeded generators
    assert torch.equal(SEM.semantic_images("diffusion", **args).images, out.images)
