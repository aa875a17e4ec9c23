"""The adaptive attacker's DnCNN denoiser (ConfounderGAN App. D Table 3): the network, the halves, the trained
denoiser against a protection it can run, the reference columns, and the attacker contract through `bench run`.

The generic contract (uint8, C×H×W kept, classes kept, input untouched, same bytes for a seed) is parametrised
over every subset countermeasure in ``tests/test_components.py``.
"""

from __future__ import annotations

import pytest
import torch

from bench.cli import main
from bench.core.components import COUNTERMEASURES, Attacker, Countermeasure, ImageSet
from bench.countermeasures.dncnn import DnCNN, dihedral, halves
from bench.data import mixes
from bench.data.datasets import DATASETS
from bench.store.records import RecordLog
from bench.testing import coloured
from conftest import require_cifar10_jpeg

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def rgb() -> ImageSet:
    """200 real CIFAR-10 images (20 per class)."""
    return DATASETS.create("cifar10-jpeg", path=str(require_cifar10_jpeg()), per_class=20, test_per_class=1).load()[0]


@pytest.fixture(scope="module")
def digits_rgb() -> ImageSet:
    """200 coloured digits (20 per class, 32×32, three different channels): always present, so the trained
    denoiser is checked without the optional CIFAR-10 copy."""
    return coloured(DATASETS.create("digits", per_class=20, size=32).load()[0])


def pattern_attacker(clean: ImageSet, pattern: torch.Tensor) -> tuple[ImageSet, Attacker]:
    """A protection the attacker can run exactly (one fixed ±8/255 pattern added to every image): the
    protected set and its attacker."""
    def protect(natural: ImageSet) -> ImageSet:
        return natural.with_images((natural.images.short() + pattern).clamp(0, 255).to(torch.uint8))
    return protect(clean), Attacker(clean, protect, "adds the known pattern")


def test_dncnn_architecture_follows_the_official_code():
    net = DnCNN(3, depth=17, width=64)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == 17 and len(norms) == 15 and all(n.eps == 1e-4 and n.momentum == 0.95 for n in norms)
    assert convs[0].bias is not None and all(c.bias is None for c in convs[1:])
    weight = convs[1].weight.flatten(1)  # orthogonal init: the rows (64 ≤ 576) are orthonormal
    assert torch.allclose(weight @ weight.T, torch.eye(64), atol=1e-4)
    torch.nn.init.zeros_(convs[-1].weight)
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(net.eval()(x), x), "the output is the input minus the predicted residual"


def test_halves_are_disjoint_class_balanced_and_not_the_protected_part(rgb):
    own, victims = halves(rgb, 0)
    assert len(own) == len(victims) == 100 and not set(own.tolist()) & set(victims.tolist())
    assert torch.bincount(rgb.labels[victims]).tolist() == [10] * 10
    assert torch.equal(halves(rgb, 0)[1], victims) and not torch.equal(halves(rgb, 1)[1], victims)
    protected_part = torch.nonzero(mixes.class_mask(rgb, 0.5, 0)).flatten()
    assert not torch.equal(protected_part, own), "the halves must not be a cell's protected part at p = 0.5"


def test_dihedral_gives_eight_distinct_transforms():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert len({tuple(dihedral(x, m).flatten().tolist()) for m in range(8)}) == 8


def test_trained_denoiser_lowers_the_mse_to_the_natural_images_of_the_held_out_half(digits_rgb):
    """Trained on the attacker's half, the denoiser brings the victim's half (never seen) closer to its natural
    images than the protected images are. A CPU budget (15 epochs of batches of 10, lr not decayed: ~5 s):
    measured 0.24× the protected images' MSE (1.9e-4 vs 8.0e-4), loss 3.66 → 0.32; trained on (natural,
    natural) pairs instead, the identity-started denoiser stays at 1.00× with loss 0."""
    pattern = (torch.randint(0, 2, digits_rgb.images.shape[1:], generator=torch.Generator().manual_seed(0)) * 16
               - 8).short()
    protected, attacker = pattern_attacker(digits_rgb, pattern)
    dncnn = COUNTERMEASURES.create("dncnn", epochs=15, milestones=[15], depth=5, width=32, batch_size=10,
                                   identity_start=True)
    fitted = dncnn.fit(protected, seed=0, device=CPU, attacker=attacker)
    info = fitted.data.info
    assert info["mse_denoised_vs_natural"] < 0.75 * info["mse_encrypted_vs_natural"], info
    assert info["denoiser_loss_last"] < info["denoiser_loss_first"]
    victims = halves(digits_rgb, 0)[1]
    assert torch.equal(fitted.data.labels, digits_rgb.labels[victims]) and list(fitted.models) == ["denoiser"]


@pytest.mark.parametrize("images", ["natural", "encrypted"])
def test_reference_columns_are_the_same_half(rgb, images):
    pattern = torch.full(rgb.images.shape[1:], 8, dtype=torch.short)
    protected, attacker = pattern_attacker(rgb, pattern)
    out = COUNTERMEASURES.create("dncnn_reference", images=images).purify(protected, seed=3, device=CPU,
                                                                          attacker=attacker)
    victims = halves(rgb, 3)[1]
    assert torch.equal(out.images, (rgb if images == "natural" else protected).images[victims])
    assert torch.equal(out.labels, rgb.labels[victims])


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="milestones"):
        COUNTERMEASURES.create("dncnn", milestones=[60, 30])
    with pytest.raises(ValueError, match="natural"):
        COUNTERMEASURES.create("dncnn_reference", images="denoised")


def test_needs_attacker_must_match_the_signature():
    with pytest.raises(TypeError, match="attacker"):
        class Blind(Countermeasure):
            stages = frozenset({"data"})
            needs_attacker = True

            def purify(self, train, *, seed, device):
                return train
        Blind.check_declaration()


def test_attacker_encrypts_with_fitted_models_else_runs_the_protection(rgb):
    from bench.core.components import PROTECTIONS, Models

    sets = mixes.TrainSet(rgb, rgb, torch.ones(len(rgb), dtype=torch.bool))
    runs = mixes.attacker(PROTECTIONS.create("random_noise"), Models(), sets, seed=0, device=CPU)
    assert "runs random_noise" in runs.how and runs.clean is rgb
    first = runs.protect(rgb.subset(torch.arange(10)))
    assert not torch.equal(first.images, PROTECTIONS.create("random_noise").protect(
        rgb.subset(torch.arange(10)), seed=0, device=CPU).images), "the attacker does not know the protector's seed"


def test_dncnn_through_bench_run_trains_the_victim_on_the_other_half(tmp_path):
    """`bench run` hands the attacker to the data stage: the victim sees half the images, the record says how
    the attacker protected its own, and the denoiser is saved beside the purified set."""
    matrix = tmp_path / "adaptive.toml"
    matrix.write_text("""
seeds = [0]
[recipe]
name = "quick"
epochs = 1
[datasets.digits]
per_class = 20
test_per_class = 5
[protections]
cwn = {}
[countermeasures]
dncnn = { epochs = 2, depth = 3, width = 8, batch_size = 16 }
dncnn_reference = { images = ["natural", "encrypted"] }
[victims.cnn]
width = 8
""")
    assert main(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--jobs", "1"]) == 0
    records = RecordLog(tmp_path / "r" / "runs" / "adaptive" / "records.jsonl").read()
    assert len(records) == 3 and all(r.status == "ok" for r in records)
    dncnn = next(r for r in records if r.countermeasure_name == "dncnn")
    assert dncnn.purify_info["victim_images"] == 100 and "runs cwn" in dncnn.purify_info["attacker"]
    assert dncnn.purify_models == ["denoiser"]
