"""Victims fine-tuned from torchvision's ImageNet weights (``weights = 'imagenet'``, victims/_imagenet.py; issue
38). No network and no real weights: a fake file (a freshly initialised torchvision network, saved) stands in, under
a table entry whose file name carries that file's own SHA-256 prefix; the production check is exercised on the real
file names."""

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
import torchvision

from bench.api import VICTIMS
from bench.cli import main
from bench.store.keys import make_key
from bench.victims import _imagenet as I

# make_key(VICTIMS.create(name).spec()) before the parameter existed (bench at d1e6825): unset keeps every key
KEYS = {"densenet121": "c73f4a539176fe673546fc51", "mobilenetv2": "0e83103c7af8652cfdfe2a51",
        "resnet18": "6be93ab43d40930a583b36fc", "resnet20": "271da9021456362a7eb985f5",
        "resnet32": "e2b0703749a21ba42c3c0218", "resnet50": "ac19e95eddba7c60b330bcc8",
        "shufflenetv2": "e4231034f13d7ada41482135", "vgg11": "d22e0f8530245d2bcea23c1d",
        "vgg19": "a9425fdb43fe18d7ce20c9ac", "vit": "d65128b06e7d1feaa2524987"}
# seed-0 builds at 3×32×32, 10 classes, before the change: Σ|θ| and the first logits of a seed-1 batch
OUTPUTS = {"resnet18": (109470.11038317632, [-0.002212037332355976, -0.006557795684784651, 0.02442101016640663]),
           "mobilenetv2": (93146.52139785612, [-0.02049948088824749, 0.019016822800040245, -0.015966596081852913])}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache, no $BENCH_* weight paths, online."""
    for weights in I.WEIGHTS.values():
        monkeypatch.delenv(weights.env, raising=False)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def fake_weights(name, folder, monkeypatch, rename=lambda k: k):
    """A freshly initialised torchvision network saved to ``folder`` under a name carrying its own SHA-256 prefix;
    the victim's table entry is pointed at that name (the test hook), the production check left as it is."""
    weights = I.WEIGHTS[name]
    torch.manual_seed(123)
    state = {rename(k): v for k, v in getattr(torchvision.models, weights.builder)().state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fake.pth"
    torch.save(state, path)
    prefix = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    path = path.rename(folder / f"{weights.builder}-{prefix}.pth")
    monkeypatch.setitem(I.WEIGHTS, name, dataclasses.replace(weights, url=f"https://example.invalid/{path.name}"))
    return state


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_imagenet_weights_fill_every_layer_but_a_new_head(name, torch_home, monkeypatch):
    # densenet121's published file names layers norm.1/conv.2 (torchvision's loader maps them): faked that way
    old_style = (lambda k: k.replace("norm1", "norm.1").replace("conv2", "conv.2")) if name == "densenet121" else str
    state = fake_weights(name, torch_home, monkeypatch, old_style)
    victim = VICTIMS.create(name, weights="imagenet")
    torch.manual_seed(0)
    model = victim.build(10, 3, 32).eval()
    got = model.net.state_dict()
    head = I.WEIGHTS[name].head
    body = [k for k in got if not k.startswith(head + ".")]
    assert len(body) == len(state) - 2 and all(torch.equal(got[k], state[old_style(k)]) for k in body)
    assert got[f"{head}.weight"].shape[0] == 10 and not torch.equal(got[f"{head}.bias"], state[f"{head}.bias"][:10])
    with torch.no_grad():
        for size, channels in ((32, 3), (224, 3), (32, 1)):
            assert model(torch.rand(2, channels, size, size)).shape == (2, 10)
    mean, std = victim.input_stats()
    assert mean.tolist() == pytest.approx(I.MEAN) and std.tolist() == pytest.approx(I.STD)
    assert victim.pretrained_needed() == (I.WEIGHTS[name],) and VICTIMS.create(name).pretrained_needed() == ()


def test_a_file_that_is_not_torchvisions_is_refused(torch_home, monkeypatch):
    torch_home.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), torch_home / "resnet18-f37072fd.pth")
    with pytest.raises(ValueError, match=r"is not torchvision's ResNet18_Weights.IMAGENET1K_V1 \(f37072fd…\)"):
        VICTIMS.create("resnet18", weights="imagenet").build(10, 3, 32)
    monkeypatch.setenv("BENCH_RESNET18", str(torch_home / "resnet18-f37072fd.pth"))  # the same check at $env
    assert I.WEIGHTS["resnet18"].resolve().kind == "local"
    with pytest.raises(ValueError, match="replace it with resnet18-f37072fd.pth from https://download.pytorch.org"):
        VICTIMS.create("resnet18", weights="imagenet").build(10, 3, 32)


def test_the_planner_refuses_missing_weights_offline_naming_the_file(torch_home, tmp_path, monkeypatch, capsys):
    matrix = tmp_path / "tiny.toml"
    matrix.write_text('seeds = [0]\n[recipe]\nname = "quick"\nepochs = 1\n[datasets.digits]\nsize = 16\n'
                      '[protections]\nclean = {}\n[countermeasures]\nnone = {}\n'
                      '[victims]\nresnet18 = { weights = "imagenet" }\nresnet20 = {}\n')
    args = ["run", "--matrix", str(matrix), "--dry-run", "--device", "cpu", "--results", str(tmp_path / "r")]
    assert main(args) == 0  # online: planned as a download at run time, and the dry run says so
    assert "ResNet-18 (ImageNet) from https://download.pytorch.org/models/resnet18-f37072fd.pth (download at run " \
           "time)" in capsys.readouterr().out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert "resnet18 | 0 | 1 | protected | poison: identity | result: to run | blocked: ResNet-18 (ImageNet)" in out
    assert "1 cell(s) ask for what their components cannot do" in err and "resnet20" not in err
    for needed in (("place resnet18-f37072fd.pth (torchvision.models.ResNet18_Weights.IMAGENET1K_V1, fetched from "
                    "https://download.pytorch.org/models/resnet18-f37072fd.pth"), "set $BENCH_RESNET18",
                   "bench weights --matrix M --download", "leave weights unset (the victim trains from scratch)",
                   f"torch's hub cache: {torch_home / 'resnet18-f37072fd.pth'}"):
        assert needed in err
    fake_weights("resnet18", torch_home, monkeypatch)  # in the cache: planned offline
    assert main(args) == 0


def test_unset_keeps_keys_and_outputs():
    assert {name: make_key(VICTIMS.create(name).spec()) for name in KEYS} == KEYS
    assert VICTIMS.create("resnet18", weights="imagenet").spec()["params"] == {"weights": "imagenet"}
    for name, (total, logits) in OUTPUTS.items():
        torch.manual_seed(0)
        model = VICTIMS.create(name).build(10, 3, 32).eval()
        torch.manual_seed(1)
        with torch.no_grad():
            y = model(torch.rand(2, 3, 32, 32))
        assert sum(p.double().abs().sum().item() for p in model.parameters()) == pytest.approx(total, rel=1e-9)
        assert y[0, :3].tolist() == pytest.approx(logits, abs=1e-6)


def test_wrong_values_raise_naming_the_fix():
    with pytest.raises(ValueError, match="'imagenet' .* or unset"):
        VICTIMS.create("resnet18", weights="imagenet21k")
    with pytest.raises(ValueError, match="resnet20 has no ImageNet weights in torchvision: leave weights unset"):
        VICTIMS.create("resnet20", weights="imagenet")
    with pytest.raises(ValueError, match="leave dim, depth"):
        VICTIMS.create("vit", weights="imagenet", dim=256)
    assert "weights" not in {f.name for f in dataclasses.fields(VICTIMS.get("cnn"))}
    # the capability declaration (``_Declared.pretrained``) is not shadowed by the parameter: the catalog reads it
    assert all(VICTIMS.get(name).pretrained == () for name in KEYS)


def test_the_table_is_torchvisions_and_every_head_is_replaced():
    """URLs as torchvision's enums give them; each architecture built on the meta device (nothing read) takes a
    32-px batch to 10 logits through a new head."""
    assert set(I.WEIGHTS) == set(KEYS) - {"resnet20", "resnet32"}
    for name, weights in I.WEIGHTS.items():
        assert torchvision.models.get_weight(weights.enum).url == weights.url
        assert Path(weights.cache_path()).name == weights.file and len(weights.sha256_prefix) >= 8
        with torch.device("meta"):
            model = VICTIMS.create(name, weights="imagenet").build(10, 3, 32)
            assert model(torch.empty(1, 3, 32, 32)).shape == (1, 10)
        assert model.net.get_submodule(weights.head).out_features == 10
