"""UGE (protections/uge.py), the authorized victim (victims/authorized.py) and distill (countermeasures/distill.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bench.countermeasures  # noqa: F401  (registers)
import bench.protections  # noqa: F401
import bench.victims  # noqa: F401
from bench.core.components import COUNTERMEASURES, PROTECTIONS, VICTIMS, ImageSet, Models
from bench.core.registry import ConfigError
from bench.data.datasets import DATASETS
from bench.plan.matrix import expand, load_matrix
from bench.plan.planner import check_cells
from bench.protections.uge import Generator
from bench.protections.uge import encoders as E
from bench.protections.uge import gradient_matching
from bench.store.artifacts import load_models
from bench.store.cache import Cache
from bench.victims.authorized import initial_network

CPU = torch.device("cpu")
FAST = dict(authorized="cnn", hacker="cnn", encoder="classifier", encoder_arch="cnn", encoder_epochs=1, epochs=2,
            width=4, trajectory_epochs=2, batch_size=32)


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return DATASETS.create("digits", per_class=8, test_per_class=2).load()[0]


@pytest.fixture(scope="module")
def fitted(digits):
    torch.set_num_threads(1)  # as the tests' autouse fixture, which runs after module fixtures: same bytes need it
    return PROTECTIONS.create("uge", **FAST).fit(digits, seed=1, device=CPU)


def test_contract_shape_labels_budget_and_determinism(digits, fitted):
    images = digits.images.clone()
    out = fitted.data
    assert out.images.dtype == torch.uint8 and out.images.shape == digits.images.shape
    assert torch.equal(out.labels, digits.labels) and torch.equal(digits.images, images), "input mutated or labels changed"
    change = (out.images.int() - digits.images.int()).abs()
    assert change.max() <= 0.04 * 255 + 1 and change.float().mean() > 0.5, "outside ρ + 1/255, or nothing changed"
    again = PROTECTIONS.create("uge", **FAST).fit(digits, seed=1, device=CPU).data
    assert torch.equal(again.images, out.images), "not the same bytes for one seed"
    assert out.info["encoder"] == "classifier:cnn" and out.info["terms"] == "gm+fd+ud"


def test_gradient_matching_is_zero_for_identical_images_and_positive_otherwise(digits):
    net = initial_network("cnn", 0, 10, 1, digits.size)
    x, y = digits.images[:16].float() / 255, digits.labels[:16]
    assert gradient_matching(net, x, x.clone(), y).abs().item() < 1e-5
    assert gradient_matching(net, x, (x + 0.04 * torch.randn_like(x)).clamp(0, 1), y).item() > 1e-3


def test_generator_output_stays_in_the_box_for_any_size():
    for channels, size in ((1, 7), (3, 32), (2, 10)):
        G = Generator(channels, 4, 0.04, 0.5)
        x = torch.rand(3, channels, size, size)
        out = G(x)
        assert out.shape == x.shape and (out - x).abs().max() <= 0.04 + 1e-6 and 0 <= out.min() and out.max() <= 1


def test_the_generator_encrypts_unseen_images(digits, fitted):
    unseen = DATASETS.create("digits", per_class=3, test_per_class=3).load()[1].images
    uge = PROTECTIONS.create("uge", **FAST)
    out = uge.encrypt(fitted.models, unseen, device=CPU)
    assert out.dtype == torch.uint8 and out.shape == unseen.shape
    change = (out.int() - unseen.int()).abs()
    assert 0 < change.max() <= 0.04 * 255 + 1 and torch.equal(out, uge.encrypt(fitted.models, unseen, device=CPU))


def test_authorized_victim_starts_from_exactly_the_protections_theta0(tmp_path, digits, fitted):
    """Through the cache, as a cell gets it: the victim's initial tensors are the protection's θ0; a hacker of the
    same architecture seeded by its cell, and the clean row's authorized network, start as documented."""
    cache = Cache(tmp_path)
    cache.save("protected", "k", fitted.data, {"spec": PROTECTIONS.create("uge", **FAST).spec(), "seed": 1},
               models=fitted.models)
    models = load_models(cache.path("protected", "k"), ("authorized",), CPU)
    theta0 = fitted.models["authorized"].nets[0].state_dict()
    start = VICTIMS.create("authorized").build(10, 1, digits.size, models=models)
    assert all(torch.equal(a, theta0[k]) for k, a in start.state_dict().items())
    assert all(p.requires_grad for p in start.parameters()) and start.training
    torch.manual_seed(1)  # the cell seed, as bench.execute.stages seeds before building a victim
    hacker = VICTIMS.create("cnn").build(10, 1, digits.size)
    assert not all(torch.equal(a, theta0[k]) for k, a in hacker.state_dict().items())
    original = VICTIMS.create("authorized", arch="cnn").build(10, 1, digits.size)  # no protection model: same θ0
    assert all(torch.equal(a, theta0[k]) for k, a in original.state_dict().items())
    with pytest.raises(ValueError, match="omit arch"):
        VICTIMS.create("authorized", arch="lenet").build(10, 1, digits.size, models=models)


def test_distill_fits_the_teacher_from_theta0_keeps_the_data_and_matches_it(digits, fitted):
    distill = COUNTERMEASURES.create("distill", teacher_recipe="quick")
    out = distill.fit(fitted.data, seed=0, device=CPU, models=Models({"authorized": fitted.models["authorized"]}))
    assert torch.equal(out.data.images, fitted.data.images) and out.data.info["teacher"] == "cnn"
    teacher = out.models["teacher"]
    hooks = distill.train_hooks(10, digits.size, models=out.models)
    x, y = fitted.data.images[:8].float() / 255, fitted.data.labels[:8]
    gen = torch.Generator().manual_seed(0)
    loss, logits = hooks.loss(teacher, x, y, gen)  # the teacher distilled into itself: KL 0
    assert abs(loss.item()) < 1e-5 and logits.shape == (8, 10)
    student = initial_network("cnn", 5, 10, 1, digits.size)
    assert hooks.loss(student, x, y, gen)[0].item() > 1e-3


def test_clip_is_refused_without_weights_and_names_the_alternative(monkeypatch, tmp_path):
    """Offline with an empty hub cache (online, the hub id is downloaded at run time: tests/test_weights.py)."""
    monkeypatch.delenv(E.CLIP.env, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    matrix = tmp_path / "m.toml"
    matrix.write_text('[datasets.digits]\n[protections.uge]\n[countermeasures.none]\n[victims.authorized]\n')
    with pytest.raises(ConfigError, match="BENCH_CLIP"):
        check_cells(expand(load_matrix(str(matrix))), "cpu", lambda line: None)
    with pytest.raises(RuntimeError, match="encoder = 'classifier'"):
        E.clip_encoder(str(tmp_path / "absent"), ("a", "b"), CPU)


def tiny_clip(folder: Path) -> Path:
    """A randomly initialised CLIP with a byte-level vocabulary, saved as a transformers folder."""
    transformers = pytest.importorskip("transformers")
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(text_config={**small, "vocab_size": len(vocab)}, projection_dim=8,
                                     vision_config={**small, "image_size": 32, "patch_size": 8})
    transformers.CLIPModel(config).save_pretrained(folder)
    return folder


def test_clip_encoder_loads_a_local_folder_and_is_differentiable(tmp_path):
    encoder = E.clip_encoder(str(tiny_clip(tmp_path)), E.class_names("cifar10", 10), CPU)
    assert encoder.classes.shape == (10, 8) and encoder.name == f"clip:{tmp_path.name}"
    x = torch.rand(2, 1, 16, 16, requires_grad=True)  # greyscale, another size: resized and repeated
    feats = encoder.images(x)
    assert feats.shape == (2, 8)
    feats.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_class_names_are_checked_against_the_class_count():
    assert E.class_names("cat, dog", 2) == ("cat", "dog")
    with pytest.raises(ValueError, match="3 names for 10 classes"):
        E.class_names("a,b,c", 10)


@pytest.mark.parametrize("params, message", [({"losses": "gm+xx"}, "join distinct terms"),
                                             ({"encoder": "dino"}, "'classifier'"), ({"hacker": "nope"}, "not a victim")])
def test_bad_parameters_raise(params, message):
    with pytest.raises(ValueError, match=message):
        PROTECTIONS.create("uge", **params)


@pytest.mark.slow
def test_uge_hackers_learn_less_than_on_clean_data_while_the_authorized_network_learns():
    """Real data, CPU-sized: cifar10-jpeg 50/class; a hacker CNN on UGE data falls ≥ 15 points below its clean
    accuracy; the authorized network stays within 10 points of its clean accuracy."""
    from bench.execute.train import train_and_evaluate
    from bench.plan.recipes import make_recipe

    train, test = DATASETS.create("cifar10-jpeg", per_class=50, test_per_class=50).load()
    uge = PROTECTIONS.create("uge", authorized="resnet20", encoder="classifier", encoder_arch="cnn", encoder_epochs=80,
                             epochs=20, width=16)
    protected = uge.fit(train, seed=0, device=CPU)
    recipe = make_recipe("cpu")
    acc = {}
    for name, data in (("clean", train), ("uge", protected.data)):
        for victim in ("authorized", "cnn"):
            torch.manual_seed(0)
            kwargs = {"models": protected.models} if name == "uge" and victim == "authorized" else {}
            model = VICTIMS.create(victim, **({"arch": "resnet20"} if victim == "authorized" else {})).build(
                10, 3, 32, **kwargs)
            acc[name, victim] = train_and_evaluate(model, data, test, recipe, seed=0, device=CPU,
                                                   augment="crop_flip")["final"]
    assert acc["uge", "cnn"] <= acc["clean", "cnn"] - 0.15, acc
    assert acc["uge", "authorized"] >= acc["clean", "authorized"] - 0.10, acc
