"""Pretrained weights (bench.core.exchange.Pretrained, bench.plan.weights; issue 34): a cell is planned when its
weights are at $env, in the hub's (or torch's) cache, or (online) downloadable at run time, and refused only
offline without them; `bench weights` lists them; DH runs on the job's device. No network: hub caches are faked
as folders, hub and pipeline calls are monkeypatched."""

import argparse
import json
import os
import subprocess
import sys
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image

from bench.api import COUNTERMEASURES, PROTECTIONS, ConfigError, ImageSet
from bench.cli import main
from bench.countermeasures.diffpure import DDPM
from bench.plan import weights as W
from bench.protections.dh import diffusion as D
from bench.protections.dh import semantic as SEM
from bench.protections.dh.losses import RESNET18, extractor
from bench.protections.uge import encoders as E
from tests.conftest import REPO

ENVS = ("BENCH_SD", "BENCH_CONTROLNET", "BENCH_CLIP", "BENCH_COCO", "BENCH_RESNET18", "BENCH_DDPM")
HUB_IDS = ("openai/clip-vit-base-patch32", "google/ddpm-cifar10-32", "stable-diffusion-v1-5/stable-diffusion-v1-5",
           "lllyasviel/sd-controlnet-canny", "https://download.pytorch.org/models/resnet18-f37072fd.pth")


@pytest.fixture
def bare(tmp_path, monkeypatch):
    """No $BENCH_* weights, online (no offline variable), empty hub and torch caches under tmp_path."""
    for env in (*ENVS, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def fake_hub_repo(cache, hub_id, *files, revision="0123abcd0123abcd0123abcd0123abcd0123abcd"):
    """The hub cache's layout for one repository: models--org--name/{refs/main, snapshots/<rev>/<files>}."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    for name in files:
        (repo / "snapshots" / revision / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / revision / name).write_text("{}")


def test_full_dry_run_plans_hub_weights_online_and_refuses_them_offline(bare, monkeypatch, capsys):
    monkeypatch.setenv("BENCH_COCO", str(bare))  # COCO has no hub copy: it stays refused when absent
    args = ["run", "--matrix", "full", "--dry-run", "--device", "cpu", "--results", str(bare / "r")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "blocked" not in out
    rows = {name: next(line for line in out.splitlines() if line.startswith(f"cifar10 | {name}"))
            for name in ("uge | none | resnet18", "dh[mode=class] | none | resnet18", "clean | diffpure | resnet18")}
    assert "weights: CLIP from hub openai/clip-vit-base-patch32 (download at run time)" in rows["uge | none | resnet18"]
    assert "DDPM from hub google/ddpm-cifar10-32 (download at run time)" in rows["clean | diffpure | resnet18"]
    assert all(hub_id in rows["dh[mode=class] | none | resnet18"] for hub_id in HUB_IDS if "ddpm" not in hub_id)
    assert "weights to download at run time (about 4,388 MB)" in out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "uge | none | resnet18 | 0 | 1 | protected | poison: to build | result: to run | blocked: CLIP weights" in out
    assert "blocked: Stable Diffusion weights not found; ControlNet canny weights not found; CLIP weights" in out
    assert "$BENCH_DDPM" in err and "offline now: HF_HUB_OFFLINE/--offline" in err and "105 cell(s)" in err  # 77 on CIFAR-10, 28 DH cells on the ImageNet subset


def test_a_repository_in_the_hub_cache_resolves_offline(bare, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert E.CLIP.resolve().kind == "missing" and DDPM.resolve().kind == "missing"
    fake_hub_repo(bare / "hub", E.CLIP.hub_id, "config.json", "model.safetensors")
    found = E.CLIP.resolve()
    assert (found.kind, found.where, found.available) == ("hub-cache", E.CLIP.hub_id, True)
    assert found.describe() == "CLIP from hub openai/clip-vit-base-patch32 (cached)"
    uge = PROTECTIONS.create("uge")  # the planner's check: $BENCH_CLIP unset, offline, cached → planned
    assert [w.resolve().kind for w in uge.pretrained_needed()] == ["hub-cache"]
    monkeypatch.delenv("HF_HUB_CACHE")  # $HF_HOME/hub is the cache where $HF_HUB_CACHE is unset
    monkeypatch.setenv("HF_HOME", str(bare / "home"))
    assert DDPM.resolve().kind == "missing"
    fake_hub_repo(bare / "home" / "hub", DDPM.hub_id, "config.json")
    assert DDPM.resolve().kind == "hub-cache"
    checkpoint = bare / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"  # torch's cache, for the URL
    assert RESNET18.resolve().kind == "missing"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    assert RESNET18.resolve().kind == "hub-cache"


def test_env_wins_and_an_absent_env_path_is_missing_even_online(bare, monkeypatch):
    assert E.CLIP.resolve().kind == "download" and E.clip_source(None) == E.CLIP.hub_id
    monkeypatch.setenv("BENCH_CLIP", str(bare))
    assert E.CLIP.resolve().kind == "local" and E.clip_source(None) == str(bare)
    monkeypatch.setenv("BENCH_CLIP", str(bare / "absent"))
    assert E.CLIP.resolve().kind == "missing"
    assert f"$BENCH_CLIP = {bare / 'absent'} does not exist" in E.CLIP.missing()


def test_uge_takes_a_hub_id_as_clip_model(bare, monkeypatch):
    needed = PROTECTIONS.create("uge", clip_model="laion/CLIP-ViT-B-32").pretrained_needed()
    assert [(w.hub_id, w.env, w.resolve().kind) for w in needed] == [("laion/CLIP-ViT-B-32", "", "download")]
    assert PROTECTIONS.create("uge", clip_model=str(bare)).pretrained_needed() == ()  # an existing folder
    absent = PROTECTIONS.create("uge", clip_model=str(bare / "absent")).pretrained_needed()
    assert [w.resolve().kind for w in absent] == ["missing"] and "absent" in absent[0].missing()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert needed[0].resolve().kind == "missing" and "laion/CLIP-ViT-B-32" in needed[0].missing()


def test_bench_weights_lists_each_weight_with_size_and_licence(bare, capsys):
    assert W.cmd_weights(argparse.Namespace(matrix="full", download=False, offline=False, plugins=[])) == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    expected = {"DDPM": ("143", "Apache-2.0"), "CLIP": ("605", "MIT"), "Stable Diffusion": ("2,150", "OpenRAIL-M"),
                "ControlNet canny": ("1,445", "OpenRAIL"), "COCO captions": ("19,300", "CC BY 4.0"),
                "ResNet-18 (ImageNet)": ("45", "BSD-3-Clause")}
    for name, (size, licence) in expected.items():
        assert size in lines[name] and licence in lines[name], lines[name]
    assert "download at run time: openai/clip-vit-base-patch32" in lines["CLIP"] and "uge, dh" in lines["CLIP"]
    assert "| missing " in lines["COCO captions"] and "images.cocodataset.org/zips/train2017.zip" in out
    assert all(w.size_mb and w.licence for w in PROTECTIONS.create("dh").pretrained_needed())
    import torchvision

    assert RESNET18.url == torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url


def test_weights_download_fetches_only_what_bench_loads_and_refuses_offline(bare, monkeypatch, capsys):
    import huggingface_hub

    fetched, repo_files = {}, {
        DDPM.hub_id: ["config.json", "scheduler_config.json", "diffusion_pytorch_model.bin",
                      "diffusion_pytorch_model.safetensors", "README.md"],
        D.STABLE_DIFFUSION.hub_id: ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                                    "unet/diffusion_pytorch_model.fp16.safetensors", "safety_checker/config.json",
                                    "safety_checker/model.fp16.safetensors", "tokenizer/vocab.json",
                                    "v1-5-pruned.safetensors"]}
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda hub_id: repo_files.get(hub_id, ["config.json"]))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda hub_id, allow_patterns, cache_dir: fetched.setdefault(hub_id, allow_patterns))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: fetched.setdefault(url, kw))
    parser = argparse.ArgumentParser()
    W.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["weights", "--matrix", "full", "--download"])
    assert W.cmd_weights(args) == 0
    assert fetched[DDPM.hub_id] == ["config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors"]
    assert fetched[D.STABLE_DIFFUSION.hub_id] == ["model_index.json", "unet/config.json",
                                                  "unet/diffusion_pytorch_model.fp16.safetensors",
                                                  "tokenizer/vocab.json"]
    assert fetched[RESNET18.url]["check_hash"] and set(fetched) == {*HUB_IDS}  # COCO: nothing to fetch
    capsys.readouterr()
    offline = parser.parse_args(["weights", "--matrix", "full", "--download", "--offline"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test: apply_offline sets it
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    with pytest.raises(ConfigError, match="run it on a connected machine"):
        W.cmd_weights(offline)
    assert W.hub_offline()


def test_run_offline_flag_sets_the_variables_workers_inherit(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    parser = argparse.ArgumentParser()
    W.offline_flag(parser)
    W.apply_offline(parser.parse_args([]))
    assert not W.hub_offline()
    W.apply_offline(parser.parse_args(["--offline"]))
    assert W.hub_offline() and constants.HF_HUB_OFFLINE
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")


def test_dh_extractor_falls_back_to_torchvisions_weights(bare, monkeypatch):
    import torchvision

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # from torch's cache, never the network
    checkpoint = bare / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), checkpoint)
    train = ImageSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4) % 2, 2)
    features, ran = extractor("imagenet", train, epochs=1, seed=0, device=torch.device("cpu"))
    assert features(torch.zeros(2, 3, 32, 32)).shape == (2, 512, 1, 1)
    assert ran == f"imagenet resnet18 (torchvision ResNet18_Weights.IMAGENET1K_V1, cached from {RESNET18.url})"


class Fake:
    """A stand-in for CLIP, its tokenizer, ControlNet and the SD pipeline: records where each is sent."""

    seen: ClassVar[dict] = {}

    def __init__(self, name):
        self.name, self.scheduler = name, SimpleNamespace(config={})

    @classmethod
    def loader(cls, name):
        return SimpleNamespace(from_pretrained=lambda source, **kw: cls.seen.setdefault(name, []).append(kw)
                               or cls(name), from_config=lambda config: None)

    def to(self, device):
        Fake.seen.setdefault(f"{self.name}.to", []).append(torch.device(device))
        return self

    def eval(self):
        return self

    def set_progress_bar_config(self, **kw):
        pass

    def get_text_features(self, input_ids):
        return torch.randn(len(input_ids), 4)

    def __call__(self, prompts, **kw):
        if self.name == "tokenizer":
            return Tokens(input_ids=torch.zeros(len(prompts), 3))
        return SimpleNamespace(images=np.stack([torch.rand(16, 16, 3, generator=g).numpy() for g in kw["generator"]]))


class Tokens(dict):
    def to(self, device):
        Fake.seen.setdefault("tokens.to", []).append(torch.device(device))
        return self


@pytest.mark.parametrize("device, dtype", [(torch.device("cuda", 3), torch.float16), (torch.device("cpu"),
                                                                                         torch.float32)])
def test_dh_semantic_images_run_on_the_jobs_device(bare, monkeypatch, device, dtype):
    Fake.seen = {}  # the packages' lazy modules resist setattr: whole stand-in modules
    monkeypatch.setitem(sys.modules, "transformers", SimpleNamespace(CLIPModel=Fake.loader("CLIPModel"),
                                                                     CLIPTokenizer=Fake.loader("tokenizer")))
    monkeypatch.setitem(sys.modules, "diffusers", SimpleNamespace(**{name: Fake.loader(name) for name in (
        "ControlNetModel", "StableDiffusionControlNetPipeline", "UniPCMultistepScheduler")}))
    (bare / "train2017").mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            bare / "train2017" / f"{i}.png")
    (bare / "captions.json").write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.png"} for i in range(2)],
                                                    "annotations": [{"image_id": i, "caption": f"photo {i}"}
                                                                    for i in range(2)]}))
    out = SEM.semantic_images("diffusion", classes=2, per_class=1, channels=3, size=8, seed=0, device=device,
                              prompts=str(bare / "captions.json"), coco_images=str(bare / "train2017"),
                              cache=str(bare / "cache"))
    assert out.images.shape == (2, 1, 3, 8, 8) and "stable-diffusion-v1-5/stable-diffusion-v1-5" in out.source
    assert Fake.seen["CLIPModel.to"] == Fake.seen["tokens.to"] == Fake.seen["StableDiffusionControlNetPipeline.to"] \
        == [device]
    assert Fake.seen["ControlNetModel"] == [{"torch_dtype": dtype}]
    assert {k: Fake.seen["StableDiffusionControlNetPipeline"][0][k] for k in ("torch_dtype", "variant")} == \
        {"torch_dtype": dtype, "variant": "fp16"}


def test_dh_fit_hands_its_device_to_the_semantic_images(monkeypatch):
    class Seen(Exception):
        pass

    def spy(source, **kw):
        raise Seen(kw["device"])
    monkeypatch.setattr(SEM, "semantic_images", spy)
    train = ImageSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4) % 2, 2)
    with pytest.raises(Seen) as seen:
        PROTECTIONS.create("dh", source="skimage", extractor="classifier").fit(train, seed=0,
                                                                               device=torch.device("cpu"))
    assert seen.value.args == (torch.device("cpu"),)
    assert COUNTERMEASURES.create("diffpure").pretrained_needed() == (DDPM,)


def test_diffpure_loads_the_default_ddpm_from_the_hub_cache_offline(bare):
    """The run-time side of a hub-cache plan: no $BENCH_DDPM, offline, the repository's snapshot in the cache (a
    fresh interpreter: huggingface_hub reads $HF_HUB_CACHE once, at import)."""
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler

    from bench.countermeasures import _ddpm

    fake_hub_repo(bare / "hub", DDPM.hub_id)
    snapshot = next((bare / "hub" / "models--google--ddpm-cifar10-32" / "snapshots").iterdir())
    _ddpm.small_unet(3, 32, 8).save_pretrained(snapshot)
    DDPMScheduler(num_train_timesteps=1000).save_config(snapshot)
    code = ("from bench.countermeasures import _ddpm\nfrom bench.countermeasures.diffpure import DDPM\n"
            "unet, config, source = _ddpm.load(DDPM.hub_id, DDPM)\nprint(DDPM.resolve().kind, source, "
            "unet.config.block_out_channels)")
    env = {k: v for k, v in os.environ.items() if k not in ENVS} | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.stdout.split("\n")[-2] == "hub-cache google/ddpm-cifar10-32 [8, 16, 16]", done.stderr[-2000:]
