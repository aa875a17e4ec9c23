"""DH (protections/dh): the protection's contract, its fitted hiding model, encryption of unseen images and the
planner's refusal without the paper's weights. HiNet itself: tests/test_dh_hinet.py; semantic images:
tests/test_dh_semantic.py."""

from __future__ import annotations

import pytest
import torch

import bench.countermeasures  # noqa: F401  (registers)
import bench.protections  # noqa: F401
import bench.victims  # noqa: F401
from bench.core.components import PROTECTIONS, ImageSet
from bench.core.registry import ConfigError
from bench.data.datasets import DATASETS
from bench.data.mixes import fit_protection
from bench.plan.matrix import expand, load_matrix
from bench.plan.planner import check_cells
from bench.store.artifacts import load_models
from bench.store.cache import Cache

CPU = torch.device("cpu")
FAST = dict(source="skimage", extractor="classifier", extractor_epochs=1, blocks=2, growth=8, iterations=3,
            batch_size=8)
BUDGET = 8 + 1  # 8/255 and the rounding to 8 bits, in levels


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return DATASETS.create("digits", per_class=6, test_per_class=2).load()[0]  # 8×8: even, as Haar needs


@pytest.fixture(scope="module")
def fitted(digits):
    torch.set_num_threads(1)  # as the tests' autouse fixture, which runs after module fixtures: same bytes need it
    return PROTECTIONS.create("dh", **FAST).fit(digits, seed=1, device=CPU)


def test_contract_shape_labels_budget_determinism_and_record(digits, fitted):
    images = digits.images.clone()
    out = fitted.data
    assert out.images.dtype == torch.uint8 and out.images.shape == digits.images.shape
    assert torch.equal(out.labels, digits.labels), "labels changed"
    assert torch.equal(digits.images, images), "input mutated"
    change = (out.images.int() - digits.images.int()).abs()
    assert change.max() <= BUDGET and change.float().mean() > 0.1, "outside 8/255 + 1/255, or nothing changed"
    again = PROTECTIONS.create("dh", **FAST).fit(digits, seed=1, device=CPU).data
    assert torch.equal(again.images, out.images), "not the same bytes for one seed"
    info = out.info
    assert info["source"].startswith("skimage") and info["extractor"].startswith("classifier")
    assert {"psnr", "ssim", "reveal_psnr", "reveal_psnr_unclipped"} <= set(info) and info["psnr"] > 30
    assert "semantic images" in info["ran"] and info["covers"] == "the protected set itself"


def test_class_wise_mode_hides_one_distinct_image_per_class_and_sample_mode_many(digits, fitted):
    secrets = fitted.models["hiding"].secrets
    assert secrets.shape == (10, 1, 1, digits.size, digits.size) and secrets.dtype == torch.uint8
    flat = secrets.flatten(1)
    assert len({bytes(row.numpy()) for row in flat}) == 10, "two classes hide the same image"
    sample = PROTECTIONS.create("dh", **FAST, mode="sample", variants=3).fit(digits, seed=1, device=CPU)
    assert sample.models["hiding"].secrets.shape == (10, 3, 1, digits.size, digits.size)
    assert sample.data.info["mode"] == "sample" and sample.data.info["variants"] == 3


def test_the_hiding_network_encrypts_unseen_images_through_the_cache(tmp_path, digits, fitted):
    """As ``bench protect`` and the ood mix get it: the saved artifact reproduces the published images for their
    labels (class mode) and protects unseen ones within the budget; a wrong label raises."""
    dh = PROTECTIONS.create("dh", **FAST)
    cache = Cache(tmp_path)
    cache.save("protected", "k", fitted.data, {"spec": dh.spec(), "seed": 1}, models=fitted.models)
    models = load_models(cache.path("protected", "k"), ("hiding",), CPU)
    again = dh.encrypt(models, digits.images, device=CPU, labels=digits.labels)
    assert torch.equal(again, fitted.data.images)
    unseen = DATASETS.create("digits", per_class=3, test_per_class=3).load()[1]
    out = dh.encrypt(models, unseen.images, device=CPU, labels=unseen.labels)
    change = (out.int() - unseen.images.int()).abs()
    assert out.dtype == torch.uint8 and 0 < change.max() <= BUDGET
    with pytest.raises(ValueError, match="one label in"):
        dh.encrypt(models, unseen.images, device=CPU, labels=unseen.labels + 10)



def test_bench_protect_encrypts_a_folder_for_its_label_and_refuses_without_one(tmp_path, digits, fitted, capsys):
    import numpy as np
    from PIL import Image

    from bench.cli import main

    dh = PROTECTIONS.create("dh", **FAST)
    Cache(tmp_path / "cache").save("protected", "k", fitted.data, {"spec": dh.spec(), "seed": 1}, models=fitted.models)
    threes = digits.images[digits.labels == 3]
    (tmp_path / "in").mkdir()
    for i, image in enumerate(threes):
        Image.fromarray(image[0].numpy()).save(tmp_path / "in" / f"{i}.png")
    args = ["protect", "--model", "k", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--results", str(tmp_path), "--device", "cpu"]
    assert main(args) == 2 and "--label K" in capsys.readouterr().err
    assert not (tmp_path / "out").exists(), "written before the refusal"
    assert main([*args, "--label", "3"]) == 0
    out = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "out" / f"{i}.png")))[None]
                       for i in range(len(threes))])
    assert torch.equal(out, fitted.data.images[digits.labels == 3]), "not the images DH published for class 3"

def test_the_ood_mix_hands_dh_the_labels_of_the_images_it_encrypts(digits):
    out = fit_protection(PROTECTIONS.create("dh", **FAST), digits, 0.5, seed=2, device=CPU)
    assert out.data.info["encrypted_unseen"] == len(digits) // 2
    assert (out.data.images.int() - digits.images.int()).abs().max() <= BUDGET


def test_the_paper_setting_is_refused_without_its_weights_and_names_the_alternatives(monkeypatch, tmp_path):
    """Offline with empty caches (online, the hub's weights would be downloaded at run time: tests/test_weights.py)."""
    for env in ("BENCH_SD", "BENCH_CONTROLNET", "BENCH_CLIP", "BENCH_COCO", "BENCH_RESNET18"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    matrix = tmp_path / "m.toml"
    matrix.write_text('[datasets.digits]\n[protections.dh]\n[countermeasures.none]\n[victims.cnn]\n')
    with pytest.raises(ConfigError, match="BENCH_SD") as err:
        check_cells(expand(load_matrix(str(matrix))), "cpu", lambda line: None)
    assert "BENCH_RESNET18" in str(err.value) and "extractor = 'classifier'" in str(err.value)
    assert "source = 'skimage'" in str(err.value)


@pytest.mark.parametrize("params, message", [({"mode": "pixel"}, "'class'"), ({"source": "noise"}, "one of"),
                                             ({"source": "folder"}, "folder = "), ({"variants": 3}, "mode = 'sample'"),
                                             ({"extractor": "vgg"}, "extractor"), ({"blocks": 0}, "blocks")])
def test_bad_parameters_raise(params, message):
    with pytest.raises(ValueError, match=message):
        PROTECTIONS.create("dh", **params)


@pytest.mark.slow
def test_dh_classwise_makes_a_cnn_learn_far_less_than_on_clean_data():
    """Issue 16's CPU check as a test (≈ 15 min here): cifar10-jpeg 500/class, plain CNN, `quick` recipe, DH(C) as
    in the dh-cpu matrix; ≥ 20 points below clean and the hidden image revealed at ≥ 20 dB. Measured (dh-cpu):
    clean 54.2 %, DH(C) 13.5 %, PSNR 34.1 dB, SSIM 0.969, reveal 16.9 dB: the reveal bar fails at this CPU size
    (4 blocks, 1,000 iterations; the paper: 16, 5,000)."""
    from bench.core.components import VICTIMS
    from bench.execute.train import train_and_evaluate
    from bench.plan.recipes import make_recipe

    train, test = DATASETS.create("cifar10-jpeg", per_class=500, test_per_class=100).load()
    dh = PROTECTIONS.create("dh", source="skimage", extractor="classifier", extractor_arch="resnet20",
                            extractor_epochs=10, blocks=4, iterations=1000)
    protected = dh.fit(train, seed=0, device=CPU).data
    acc = {}
    for name, data in (("clean", train), ("dh", protected)):
        torch.manual_seed(0)
        model = VICTIMS.create("cnn").build(10, 3, 32)
        acc[name] = train_and_evaluate(model, data, test, make_recipe("quick"), seed=0, device=CPU,
                                       augment="crop_flip")["final"]
    assert acc["dh"] <= acc["clean"] - 0.20, acc
    assert protected.info["reveal_psnr"] >= 20, protected.info
