"""The countermeasures of DH Table I and beyond: contracts of the train-stage hooks, goldens of the data-stage
filters against independent computations (Pillow, SciPy, NumPy), adversarial training's budget and effect,
UEraser's max-over-draws loss, orthogonal projection, oracle early stopping, and the DH Table I matrices.

Data-stage contracts (uint8 out, shape, labels, input untouched, determinism) are parametrised over every
countermeasure in ``tests/test_components.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from scipy import ndimage

from bench.core.components import COUNTERMEASURES, TRAIN, VICTIMS, ImageSet, TrainHooks
from bench.countermeasures import _ops, _trivial
from bench.data.datasets import DATASETS
from bench.plan.matrix import expand, load_matrix
from bench.testing import coloured
from conftest import require_cifar10_jpeg

CPU = torch.device("cpu")
# Train stages whose hooks need models their own data stage fitted (distill's teacher: tests/test_uge.py).
TRAIN_STAGE = [n for n in COUNTERMEASURES.names()
               if TRAIN in COUNTERMEASURES.get(n).stages and not COUNTERMEASURES.get(n).fits]
SOFT_LABELS = {"mixup", "cutmix"}
# Small settings where a default would be slow or need the loop's epoch report.
HOOK_PARAMS = {"ueraser": {"variant": "max", "repeats": 2}, "adv_training": {"steps": 2}}


@pytest.fixture(scope="module")
def rgb() -> ImageSet:
    """40 real RGB images (4 per class) of the CIFAR-10 JPEG copy; skips without it (the goldens and the filters'
    effects are checked on photographs, not on noise; the attacks' losses on ``digits_rgb``)."""
    path = require_cifar10_jpeg()
    return DATASETS.create("cifar10-jpeg", path=str(path), per_class=4, test_per_class=1).load()[0]


@pytest.fixture(scope="module")
def digits_rgb() -> ImageSet:
    """40 coloured digits (4 per class, 32×32, three different channels): always present, so the attacks' and
    UEraser's loss checks run without the optional CIFAR-10 copy."""
    return coloured(DATASETS.create("digits", per_class=4, size=32).load()[0])


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """A small untrained CNN in train mode (the hooks' contracts do not depend on its weights)."""
    torch.manual_seed(0)
    net = VICTIMS.create("cnn", width=8).build(10, 3, 32)
    return net


def floats(data: ImageSet) -> torch.Tensor:
    return data.images.float() / 255


def fitted(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 30) -> torch.nn.Module:
    """``model`` trained on (x, y) until its clean loss is low: attacks and augmentations then raise it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for module in model.modules():  # batch-norm statistics of exactly this batch, for eval mode
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model(x)
    return model


def run_transform(name: str, x: torch.Tensor, y: torch.Tensor, seed: int = 0, **params):
    hooks = COUNTERMEASURES.create(name, **{**HOOK_PARAMS.get(name, {}), **params}).train_hooks(10, x.shape[-1])
    return hooks.batch_transform(x, y, torch.Generator().manual_seed(seed)) if hooks.batch_transform else (x, y)


# ------------------------------------------------------------------ train stage: contract


@pytest.mark.parametrize("name", TRAIN_STAGE)
def test_train_stage_contract(name, rgb, model):
    """Shape and dtype kept, values in [0, 1], input untouched, deterministic for a seed; labels kept except the
    soft labels of mixup and cutmix (N×K, non-negative, summing to 1); the attack and loss hooks keep that too."""
    x, y = floats(rgb), rgb.labels
    x0, y0 = x.clone(), y.clone()
    out, labels = run_transform(name, x, y)
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    assert torch.equal(x, x0) and torch.equal(y, y0), "the input was mutated"
    again, labels_again = run_transform(name, x, y)
    assert torch.equal(out, again) and torch.equal(labels, labels_again)
    if name in SOFT_LABELS:
        assert labels.shape == (len(y), 10) and labels.min() >= 0
        assert torch.allclose(labels.sum(1), torch.ones(len(y)))
    else:
        assert torch.equal(labels, y)
    hooks = COUNTERMEASURES.create(name, **HOOK_PARAMS.get(name, {})).train_hooks(10, 32)
    if hooks.attack:
        adv = hooks.attack(model, out, labels, torch.Generator().manual_seed(0))
        assert adv.shape == x.shape and 0 <= adv.min() and adv.max() <= 1
    if hooks.loss:
        loss, logits = hooks.loss(model, out, labels, torch.Generator().manual_seed(0))
        assert loss.dim() == 0 and torch.isfinite(loss) and logits.shape == (len(y), 10)


@pytest.mark.parametrize("name", [n for n in TRAIN_STAGE if n not in ("adv_training", "ueraser")])
def test_augmentation_depends_on_seed(name, rgb):
    """(AT and UEraser draw in their attack and loss hooks: tested below.)"""
    x, y = floats(rgb), rgb.labels
    assert not torch.equal(run_transform(name, x, y, seed=0)[0], run_transform(name, x, y, seed=1)[0])


# ------------------------------------------------------------------ augmentations


def test_vanilla_flip_only_mirrors(rgb):
    x, y = floats(rgb), rgb.labels
    out, _ = run_transform("vanilla", x, y, crop=False)
    same, mirrored = (out == x).flatten(1).all(1), (out == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()


def test_vanilla_crop_pads_four_pixels_on_cifar():
    x = torch.ones(64, 3, 32, 32)
    out, _ = run_transform("vanilla", x, torch.zeros(64, dtype=torch.long), flip=False)
    empty_rows = (out == 0).all(3).all(1).sum(1)  # zero-padded rows brought into view by the crop
    assert empty_rows.max() == 4 and (empty_rows == 0).any()


@pytest.mark.parametrize("size, length", [(32, 16), (224, 112), (16, 8)])
def test_cutout_length_is_half_the_side(size, length):
    x = torch.ones(32, 1, size, size)
    out, _ = run_transform("cutout", x, torch.zeros(32, dtype=torch.long))
    zeros = (out == 0).flatten(1).sum(1)
    assert zeros.max() == length * length and zeros.min() >= (length // 2) ** 2
    assert ((out == 0) | (out == 1)).all()


def test_cutmix_labels_match_the_pasted_area():
    """Each image n is constant n/64: a pasted pixel reveals its source, and λ must equal the kept area."""
    x = (torch.arange(32).float() / 64).view(32, 1, 1, 1).expand(32, 3, 32, 32).contiguous()
    y = torch.arange(32) % 10
    for seed in range(5):
        out, soft = run_transform("cutmix", x, y, seed=seed)
        kept = (out == x).flatten(1).float().mean(1)
        for i in range(32):
            source = int(round(out[i][out[i] != x[i]][0].item() * 64)) if kept[i] < 1 else i
            expected = F.one_hot(y[i], 10) * kept[i] + F.one_hot(y[source], 10) * (1 - kept[i])
            assert torch.allclose(soft[i], expected.float(), atol=1e-6)


def test_mixup_mixes_images_and_labels_alike():
    x = torch.rand(16, 3, 8, 8)
    y = torch.arange(16) % 10
    out, soft = run_transform("mixup", x, y)
    i = next(i for i in range(16) if soft[i].max() < 1)
    lam = soft[i, y[i]].item()
    partners = [j for j in range(16) if torch.allclose(out[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5)]
    assert len(partners) == 1 and soft[i, y[partners[0]]] == pytest.approx(1 - lam, abs=1e-6)
    kept, hard = run_transform("mixup", x, y, keep_label=True)
    assert torch.equal(hard, y) and torch.equal(kept, out)


def test_fastaa_applies_cutout_and_changes_colours(rgb):
    x, y = floats(rgb), rgb.labels
    out, _ = run_transform("fastaa", x, y)
    assert ((out == 0).all(1).flatten(1).sum(1) >= 64).all(), "every image gets a cutout (≥ 8×8 px inside)"
    assert (out - x).abs().flatten(1).mean(1).gt(0.01).float().mean() > 0.5


# ------------------------------------------------------------------ batch image operations vs Pillow


def pil_images(x: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in (x * 255).round().byte().permute(0, 2, 3, 1).numpy()]


def from_pils(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("op, enhance", [(_ops.contrast, ImageEnhance.Contrast),
                                         (_ops.brightness, ImageEnhance.Brightness),
                                         (_ops.sharpness, ImageEnhance.Sharpness)])
@pytest.mark.parametrize("factor", [0.3, 1.6])
def test_enhance_ops_match_pillow(op, enhance, factor, rgb):
    """Within one 8-bit level of Pillow's ImageEnhance (Pillow rounds in integer arithmetic)."""
    x = floats(rgb)
    ours = (op(x, torch.full((len(x),), factor)) * 255).round()
    reference = from_pils([enhance(i).enhance(factor) for i in pil_images(x)]) * 255
    assert (ours - reference).abs().max() <= 1.001


def test_equalize_posterize_solarize_autocontrast_match_pillow(rgb):
    x, n = floats(rgb), len(rgb)
    assert torch.equal(_trivial.equalize(x), from_pils([ImageOps.equalize(i) for i in pil_images(x)]))
    assert torch.allclose(_trivial.posterize(x, torch.full((n,), 3)),
                          from_pils([ImageOps.posterize(i, 3) for i in pil_images(x)]), atol=1e-6)
    assert torch.allclose(_trivial.solarize(x, torch.full((n,), 100 / 255)),
                          from_pils([ImageOps.solarize(i, 100) for i in pil_images(x)]), atol=1e-6)
    ours = (_trivial.autocontrast(x) * 255).round()
    assert (ours - from_pils([ImageOps.autocontrast(i) for i in pil_images(x)]) * 255).abs().max() <= 1.001


# ------------------------------------------------------------------ data stage: goldens


def purify(name: str, data: ImageSet, seed: int = 0, **params) -> ImageSet:
    return COUNTERMEASURES.create(name, **params).purify(data, seed=seed, device=CPU)


def numpy_hwc(data: ImageSet) -> np.ndarray:
    return data.images.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("kernel", [3, 5])
def test_mean_filter_matches_pillow(kernel, rgb):
    """Interior: exactly Pillow's Kernel filter (sum/k², rounded; Pillow copies the border). Everywhere: within one
    level of Pillow's BoxBlur (edges replicated as here, but rounded after each of its two passes)."""
    out = numpy_hwc(purify("mean_filter", rgb, kernel=kernel)).astype(int)
    pad = kernel // 2
    for image, ours in zip(numpy_hwc(rgb), out):
        pil = Image.fromarray(image)
        kernel_ref = np.asarray(pil.filter(ImageFilter.Kernel((kernel, kernel), [1] * kernel ** 2, scale=kernel ** 2)))
        assert np.array_equal(ours[pad:-pad, pad:-pad], kernel_ref[pad:-pad, pad:-pad])
        assert np.abs(ours - np.asarray(pil.filter(ImageFilter.BoxBlur(pad)))).max() <= 1


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_gauss_filter_matches_scipy(sigma, rgb):
    """SciPy's correlate with the normalised 3×3 Gaussian, edges 'nearest' (= replicated), rounded."""
    x = np.arange(3) - 1
    kernel = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma ** 2))
    kernel /= kernel.sum()
    images = rgb.images.numpy().astype(np.float64)
    expected = np.stack([[ndimage.correlate(ch, kernel, mode="nearest") for ch in im] for im in images])
    out = purify("gauss_filter", rgb, sigma=sigma).images.numpy()
    assert np.array_equal(out, np.clip(np.round(expected), 0, 255).astype(np.uint8))


def test_gauss_filter_at_dh_sigma_is_the_identity(rgb):
    """DH's σ = 0.1: neighbour weight e^(−50) — nothing changes at 8 bits (so DH's GaussF ≈ Vanilla)."""
    assert torch.equal(purify("gauss_filter", rgb).images, rgb.images)


def test_gauss_noise_statistics():
    """On mid-grey images (no clipping): mean ≈ 0, std ≈ 25.5 levels (σ = 0.1, plus rounding's 1/12), and the
    normal's 1σ and 2σ masses, checked with NumPy; seeded; different seeds differ."""
    data = ImageSet(torch.full((40, 3, 32, 32), 128, dtype=torch.uint8), torch.arange(40) % 10, 10)
    change = purify("gauss_noise", data, seed=3).images.numpy().astype(np.float64) - 128
    assert abs(change.mean()) < 0.3 and abs(change.std() - math.sqrt(25.5 ** 2 + 1 / 12)) < 0.3
    for k in (1, 2):
        assert abs(np.mean(np.abs(change) <= k * 25.5) - math.erf(k / math.sqrt(2))) < 0.01
    assert np.abs(change).max() <= 127
    assert torch.equal(purify("gauss_noise", data, seed=3).images, purify("gauss_noise", data, seed=3).images)
    assert not torch.equal(purify("gauss_noise", data, seed=3).images, purify("gauss_noise", data, seed=4).images)


def test_gauss_noise_clamps_at_black():
    data = ImageSet(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.long), 1)
    out = purify("gauss_noise", data).images.numpy().astype(np.float64)
    assert abs(np.mean(out == 0) - 0.5) < 0.02 and out.max() > 40


def test_filters_do_not_depend_on_chunking(monkeypatch, rgb):
    import bench.countermeasures.filters as filters

    whole = {n: purify(n, rgb).images for n in ("mean_filter", "median_filter", "gauss_filter")}
    monkeypatch.setattr(filters, "CHUNK", 3 * 32 * 32 * 7)  # 7 images per chunk
    for name, images in whole.items():
        assert torch.equal(purify(name, rgb).images, images)


# ------------------------------------------------------------------ adversarial training


@pytest.mark.parametrize("norm, epsilon, step", [("linf", 8 / 255, 2 / 255), ("l2", 1.0, 0.25)])
def test_adv_training_defaults_are_dh(norm, epsilon, step):
    assert COUNTERMEASURES.create("adv_training", norm=norm).budget() == pytest.approx((epsilon, step))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_within_epsilon_and_raises_the_loss(norm, digits_rgb):
    torch.manual_seed(0)
    x, y = floats(digits_rgb), digits_rgb.labels
    net = fitted(VICTIMS.create("cnn", width=8).build(10, 3, 32), x, y)
    at = COUNTERMEASURES.create("adv_training", norm=norm)
    hooks = at.train_hooks(10, 32)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.zero_grad(set_to_none=True)
    adv = hooks.attack(net, x, y, torch.Generator().manual_seed(0))
    assert net.training, "the model's mode is restored"
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items()), "BN statistics or weights changed"
    assert all(p.grad is None for p in net.parameters()), "the attack left gradients on the weights"
    delta = adv - x
    epsilon = at.budget()[0]
    if norm == "linf":
        assert delta.abs().max() <= epsilon + 1e-6 and delta.abs().max() > 0.9 * epsilon
    else:
        assert delta.flatten(1).norm(dim=1).max() <= epsilon + 1e-4
    assert 0 <= adv.min() and adv.max() <= 1
    net.eval()
    with torch.no_grad():
        clean, attacked = F.cross_entropy(net(x), y).item(), F.cross_entropy(net(adv), y).item()
    assert attacked > clean + 0.5, (clean, attacked)


def test_pgd_keeps_eval_mode_and_is_seeded(rgb):
    net = VICTIMS.create("cnn", width=8).build(10, 3, 32).eval()
    at = COUNTERMEASURES.create("adv_training", steps=2)
    x, y = floats(rgb)[:8], rgb.labels[:8]
    first = at.perturb(net, x, y, torch.Generator().manual_seed(1))
    assert not net.training
    assert torch.equal(first, at.perturb(net, x, y, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, at.perturb(net, x, y, torch.Generator().manual_seed(2)))


# ------------------------------------------------------------------ UEraser


def ueraser_loss(net, x, y, seed=0, **params):
    hooks = COUNTERMEASURES.create("ueraser", **params).train_hooks(10, 32)
    return hooks.loss, hooks.loss(net, x, y, torch.Generator().manual_seed(seed))[0]


def test_ueraser_max_loss_is_at_least_one_draw_and_above_clean_ce(digits_rgb):
    """The max over K draws ≥ the loss of its first draw (= 'lite' with the same generator), and for a model
    fitted on the clean batch it exceeds plain cross-entropy on that batch."""
    torch.manual_seed(0)
    x, y = floats(digits_rgb), digits_rgb.labels
    net = fitted(VICTIMS.create("cnn", width=8).build(10, 3, 32), x, y).eval()  # eval: draws see the same BN
    with torch.no_grad():
        _, worst = ueraser_loss(net, x, y, variant="max")
        _, one = ueraser_loss(net, x, y, variant="lite")
        plain = F.cross_entropy(net(x), y)
    assert worst >= one - 1e-6 and worst > plain
    assert ueraser_loss(net, x, y, variant="max")[1] == worst, "deterministic for a seed"


def test_ueraser_variants_draw_k_times_in_the_adversarial_part(rgb):
    calls = []

    def net(x):
        calls.append(len(x))
        return torch.zeros(len(x), 10, requires_grad=True)

    x, y = floats(rgb)[:4], rgb.labels[:4]
    for variant, expected in (("lite", 1), ("max", 5)):
        calls.clear()
        ueraser_loss(net, x, y, variant=variant)
        assert len(calls) == expected
    loss = COUNTERMEASURES.create("ueraser").train_hooks(10, 32).loss
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(RuntimeError, match="epoch_start"):
        loss(net, x, y, gen)
    for epoch, expected in ((0, 5), (1, 1), (3, 1)):  # standard: the first quarter of 4 epochs
        calls.clear()
        loss.start_epoch(epoch, 4)
        loss(net, x, y, gen)
        assert len(calls) == expected


def test_ueraser_augmentation_is_strong_and_seeded(rgb):
    x = floats(rgb)
    out = _trivial.ueraser_augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, _trivial.ueraser_augment(x, torch.Generator().manual_seed(0)))
    assert (out - x).abs().mean() > 0.05


# ------------------------------------------------------------------ orthogonal projection, early stopping


def test_orthogonal_projection_removes_the_class_directions(rgb):
    """After projection, the fitted linear model's K logits are (nearly) equal for every image; before, they
    separate the classes of a class-wise perturbed set."""
    from bench.core.components import PROTECTIONS

    protected = PROTECTIONS.create("cwn", epsilon=16.0).protect(rgb, seed=0, device=CPU)
    op = COUNTERMEASURES.create("orthogonal_projection", steps=100)
    weight = op.linear_model(protected, CPU)
    out = op.purify(protected, seed=0, device=CPU)
    before = floats(protected).flatten(1) @ weight.T
    after = floats(out).flatten(1) @ weight.T
    spread = lambda logits: (logits.max(1).values - logits.min(1).values).mean()  # noqa: E731
    assert (before.argmax(1) == rgb.labels).float().mean() > 0.9 and out.info["linear_train_accuracy"] > 0.9
    assert spread(after) < 0.05 * spread(before)
    assert torch.equal(out.labels, protected.labels)


def test_early_stop_changes_nothing_and_reports_best():
    """No stage (data and training as ``none``'s) and the best epoch reported; the leaderboard test is below."""
    early = COUNTERMEASURES.create("early_stop")
    assert early.stages == frozenset() and early.reports == "best"
    assert early.train_hooks(10, 32) == TrainHooks()
    data = DATASETS.create("digits", per_class=2).load()[0]
    assert torch.equal(early.purify(data, seed=0, device=CPU).images, data.images)


# ------------------------------------------------------------------ the DH Table I matrices

DH_COLUMNS = ["none", "cutout", "cutmix", "mixup", "mean_filter", "median_filter", "bdr", "grayscale", "gauss_noise",
              "gauss_filter", "jpeg[quality=10]", "jpeg[quality=50]",
              "adv_training[norm=linf]", "adv_training[norm=l2]"]


@pytest.mark.parametrize("name", ["dh-table1", "dh-table1-cpu"])
def test_dh_table1_matrices_follow_the_column_order(name):
    matrix = load_matrix(name)
    assert [c.label for c in matrix.axes["countermeasures"]] == DH_COLUMNS
    assert len(expand(matrix)) == len(matrix.axes["protections"]) * len(DH_COLUMNS)
    protections = {c.name for c in matrix.axes["protections"]}
    assert {"clean", "em", "tap", "ar", "lsp", "ops", "random_noise", "cwn", "cwp"} <= protections


# ------------------------------------------------------------------ through the loop and the pipeline


@pytest.mark.parametrize("name", TRAIN_STAGE)
def test_train_stage_countermeasures_run_in_the_loop(name):
    """One epoch of the real loop on digits with each train-stage countermeasure (soft labels, attack, loss)."""
    from bench.execute.train import train_and_evaluate
    from bench.plan.recipes import make_recipe

    train, test = DATASETS.create("digits", per_class=10, test_per_class=5).load()
    hooks = COUNTERMEASURES.create(name, **HOOK_PARAMS.get(name, {})).train_hooks(train.num_classes, train.size)
    torch.manual_seed(0)
    model = VICTIMS.create("cnn", width=8).build(10, 1, train.size)
    result = train_and_evaluate(model, train, test, make_recipe("quick", epochs=1, batch_size=32), seed=0,
                                device=CPU, augment="crop_flip", hooks=hooks)
    assert result["steps"] == 4 and 0 <= result["final"] <= 1 and 0 <= result["train_acc"][0] <= 1


def test_data_stage_countermeasures_leave_the_test_set_alone(tmp_path):
    """A run with every new data-stage countermeasure: all cells train, and the cached test split is the
    dataset's test split, byte for byte (purification sees only the train set)."""
    from bench.cli import main
    from bench.store.cache import Cache
    from bench.store.records import RecordLog
    from conftest import TINY, tiny_matrix

    extra = ("mean_filter = {}\ngauss_filter = {}\ngauss_noise = {}\northogonal_projection = { steps = 20 }\n"
             "early_stop = {}")
    text = TINY.format(extra_countermeasures=extra).replace("epochs = 2", "epochs = 1")
    matrix = tiny_matrix(tmp_path, "cm", text=text)
    assert main(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--jobs", "1"]) == 0
    records = RecordLog(tmp_path / "r" / "runs" / "cm" / "records.jsonl").read()
    assert len(records) == 12 and all(r.status == "ok" for r in records)
    test = DATASETS.create("digits", per_class=20, test_per_class=10).load()[1]
    cache = Cache(tmp_path / "r" / "cache")
    tests = [cache.load("dataset", folder.name) for folder in (tmp_path / "r" / "cache" / "dataset").glob("*-test")]
    assert len(tests) == 1 and torch.equal(tests[0].images, test.images) and torch.equal(tests[0].labels, test.labels)
    assert {r.countermeasure for r in records} >= {"mean_filter", "gauss_noise", "orthogonal_projection"}


# ------------------------------------------------------------------ needing the core changes proposed with issue 6



def test_ueraser_standard_is_adversarial_for_the_first_quarter_in_the_loop(monkeypatch):
    from bench.execute.train import train_and_evaluate
    from bench.plan.recipes import make_recipe

    train, test = DATASETS.create("digits", per_class=10, test_per_class=5).load()
    hooks = COUNTERMEASURES.create("ueraser", repeats=3).train_hooks(train.num_classes, train.size)
    draws = []
    real = _trivial.ueraser_augment
    monkeypatch.setattr("bench.countermeasures.ueraser.ueraser_augment", lambda x, gen: draws.append(1) or real(x, gen))
    torch.manual_seed(0)
    model = VICTIMS.create("cnn", width=8).build(10, 1, train.size)
    train_and_evaluate(model, train, test, make_recipe("quick", epochs=4, batch_size=50), seed=0, device=CPU,
                       augment="none", hooks=hooks)
    assert len(draws) == 2 * 3 + 3 * 2 * 1  # epoch 1: 2 steps × 3 draws; epochs 2–4: 2 steps × 1 draw


def test_leaderboard_shows_the_best_epoch_for_early_stop():
    from bench.report.leaderboard import build_tables

    base = {"dataset": "d", "victim": "v", "recipe": "quick", "poison_ratio": 1.0, "protection": "cwn",
            "status": "ok", "test_acc_final": 0.2, "test_acc_best": 0.7}
    records = [{**base, "cell": "a", "countermeasure": "none", "countermeasure_name": "none",
                "countermeasure_reports": COUNTERMEASURES.get("none").reports},
               {**base, "cell": "b", "countermeasure": "early_stop", "countermeasure_name": "early_stop",
                "countermeasure_reports": COUNTERMEASURES.get("early_stop").reports}]
    (table,) = build_tables(records, metric="final")
    assert table.mean.loc["cwn", "none"] == pytest.approx(20)
    assert table.mean.loc["cwn", "early_stop"] == pytest.approx(70)
