"""LSP and AR against their official code (GitHub issue 14), on real data.

LSP: dayu11/Availability-Attacks-Create-Shortcuts ``synthetic_perturbations/cifar_train.py`` (d27ab29) draws one
pattern per image from class clusters (sklearn ``make_classification``) and normalises it, after upsampling,
to the L2 budget before clipping. AR: psandovalsegura/autoregressive-poisoning ``autoregressive_param_finder.py``
(bf350b0) keeps a process if 3 realisations have an unscaled crop norm ≤ 50 and one responds ≥ 10 to every
earlier process's filter. The checks below are written from those files, independently of bench's code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import make_classification

from bench.core.components import PROTECTIONS, ImageSet
from bench.data.datasets import DATASETS
from bench.protections.ar import OFFSETS, ar_fill, crops_within, find_processes, start_signals
from bench.protections.shortcuts import lsp_patterns
from conftest import require_cifar10_jpeg

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    """200 real greyscale digits (20 per class), 1×16×16."""
    return DATASETS.create("digits", per_class=20).load()[0]


@pytest.fixture(scope="module")
def cifar() -> ImageSet:
    """100 real CIFAR-10 images (10 per class) of the JPEG copy, 3×32×32; skips without it."""
    path = require_cifar10_jpeg()
    return DATASETS.create("cifar10-jpeg", path=str(path), per_class=10, test_per_class=1).load()[0]


# ------------------------------------------------------------------ lsp


def official_lsp(labels: np.ndarray, num_classes: int, channels: int, size: int, patch: int, seed: int,
                 eps: float = 6.0) -> np.ndarray:
    """cifar_train.py's synthetic noise in [0, 1] units, N×C×H×W (before it is added and clipped), with the
    data set's size as n_samples and ``random_state=seed`` for its global numpy seed."""
    n, num_patch = len(labels), math.ceil(size / patch)
    features = num_patch * num_patch * channels
    data, label = make_classification(n_samples=n, n_features=features, n_classes=num_classes,
                                      n_informative=features, n_redundant=0, n_repeated=0, class_sep=10.,
                                      flip_y=0., n_clusters_per_class=1, random_state=seed)
    data = data.reshape([n, num_patch, num_patch, channels]).astype(np.float32)
    data = np.repeat(np.repeat(data, patch, 2), patch, 1)[:, :size, :size, :]
    flat = data.reshape([n, -1])
    data = (flat / np.linalg.norm(flat, axis=1, keepdims=True)).reshape(data.shape) * np.sqrt(
        (eps / 255) ** 2 * size * size * channels)
    noise = np.zeros_like(data)
    for k in range(num_classes):
        noise[labels == k] = data[label == k][:int((labels == k).sum())]
    return noise.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("data", ["digits", "cifar"])
def test_lsp_default_is_the_official_sample_wise_draw(data, request):
    """Balanced real data (so K × largest class = the official n_samples): bench's patterns are the official
    draw; each image its own, all at the L2 budget before clipping, linearly separable by class; the
    published images are the patterns added, rounded and clamped."""
    train = request.getfixturevalue(data)
    channels, size = train.channels, train.size
    out = PROTECTIONS.create("lsp").protect(train, seed=3, device=CPU)
    budget = 6 / 255 * math.sqrt(channels * size * size)
    unit = lsp_patterns(train.labels, train.num_classes, channels, size, 4, "samplewise", 3)
    patterns = unit * budget
    official = official_lsp(train.labels.numpy(), train.num_classes, channels, size, size // 4, 3)
    assert np.allclose(patterns.numpy(), official, rtol=0, atol=1e-6)
    assert torch.allclose(patterns.flatten(1).norm(dim=1), torch.full((len(train),), budget), rtol=1e-5)
    assert out.info["l2_budget"] == pytest.approx(budget, rel=1e-5)
    expected = (train.images.float() + unit * (6 * math.sqrt(channels * size * size))).round().clamp(0, 255)
    assert torch.equal(out.images, expected.to(torch.uint8))
    for k in range(train.num_classes):  # no two images of a class share a pattern
        members = patterns[train.labels == k].flatten(1)
        assert torch.cdist(members, members).add(torch.eye(len(members)) * budget).min() > 1e-3 * budget
    centres = torch.stack([patterns[train.labels == k].flatten(1).mean(0) for k in range(train.num_classes)])
    nearest = torch.cdist(patterns.flatten(1), centres).argmin(1)
    assert (nearest == train.labels).float().mean() == 1.0


def test_lsp_classwise_variant_gives_one_pattern_per_class(digits):
    """mode="classwise": on mid-grey images (nothing clips) every image of a class gets the same change and
    classes differ; patterns are unit L2 before the budget."""
    flat = ImageSet(torch.full_like(digits.images, 128), digits.labels, digits.num_classes)
    out = PROTECTIONS.create("lsp", mode="classwise").protect(flat, seed=0, device=CPU)
    change = out.images.long() - 128
    for k in range(digits.num_classes):
        members = change[digits.labels == k]
        assert (members == members[:1]).all()
    firsts = torch.stack([change[digits.labels == k][0] for k in range(digits.num_classes)]).flatten(1)
    assert len({tuple(row.tolist()) for row in firsts}) == digits.num_classes
    patterns = lsp_patterns(digits.labels, digits.num_classes, 1, 16, 4, "classwise", 0)
    assert patterns.shape == (digits.num_classes, 1, 16, 16)
    assert torch.allclose(patterns.flatten(1).norm(dim=1), torch.ones(digits.num_classes))


def test_lsp_rejects_what_make_classification_cannot_draw(digits):
    with pytest.raises(ValueError, match="raise grid"):
        PROTECTIONS.create("lsp", grid=1).protect(digits, seed=0, device=CPU)  # 2¹ vertices for 10 classes
    with pytest.raises(ValueError, match="samplewise"):
        PROTECTIONS.create("lsp", mode="sample")


# ------------------------------------------------------------------ ar


def official_filters(coef: torch.Tensor) -> torch.Tensor:
    """ARProcessPerturb3Channel's b (K×C×3×3, b[c][2][2] = 0) from bench's K×C×8 coefficients, whose k-th
    entry weighs the pixel OFFSETS[k] = (dr, dc) back, i.e. window position (2 − dr, 2 − dc)."""
    b = torch.zeros((*coef.shape[:2], 3, 3), dtype=torch.float64)
    for k, (dr, dc) in enumerate(OFFSETS.tolist()):
        b[:, :, 2 - dr, 2 - dc] = coef[:, :, k]
    return b


def official_generate(b: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """``generate(size=(36, 36), crop=4)`` before scaling, for many processes at once: b P×C×3×3, start
    P×C×36×36 → P×C×32×32; the raster loop of grouped 3×3 convolutions, each pixel from updated ones."""
    signal, (p, c) = start.clone(), b.shape[:2]
    weight = b.reshape(p * c, 1, 3, 3)
    for i in range(34):
        for j in range(34):
            window = signal[:, :, i:i + 3, j:j + 3].reshape(1, p * c, 3, 3)
            signal[:, :, i + 2, j + 2] = F.conv2d(window, weight, groups=p * c).view(p, c)
    return signal[:, :, 4:, 4:]


def official_finder_accepts(coef: torch.Tensor, starts: torch.Tensor, min_response: float) -> list[str]:
    """autoregressive_param_finder.py's tests of each process in order, from the trials' start signals: every
    trial's unscaled crop finite with L2 ≤ 50 (·√(C/3) for C channels); after the first process, the last
    trial scaled to L2 = 1 has ``response(get_filter(), gen)`` = Σ relu(conv2d(gen, filter)) ≥ min_response
    (·√(C/3)) for every earlier process's filter (b with −1 at the centre). Returns the failures."""
    count, trials, channels = starts.shape[:3]
    scale = math.sqrt(channels / 3)
    b = official_filters(coef)
    gens = official_generate(b.repeat_interleave(trials, 0), starts.flatten(0, 1)).view(count, trials, channels, 32, 32)
    norms = gens.flatten(2).norm(dim=2)
    filters = b.clone()
    filters[:, :, 2, 2] = -1
    failures = []
    for k in range(count):
        if not (norms[k].isfinite().all() and (norms[k] <= 50 * scale).all()):
            failures.append(f"process {k}: crop norms {norms[k].tolist()} over {50 * scale:.2f}")
        if k:  # response(filters[j], gen) for every j < k at once: output channel j is filter j's
            responses = F.relu(F.conv2d((gens[k, -1] / norms[k, -1])[None], filters[:k])).sum((0, 2, 3))
            failures += [f"process {k}: response {r:.2f} to process {j}'s filter"
                         for j, r in enumerate(responses.tolist()) if r < min_response * scale]
    return failures


@pytest.mark.parametrize("channels, count, min_response, seed", [(3, 10, 10.0, 1), (1, 10, 10.0, 0),
                                                                  (3, 100, 3.0, 0)])
def test_every_ar_process_passes_the_official_finder(channels, count, min_response, seed):
    """Each process bench keeps passes the official finder's stability bound and response test, checked on
    the start signals that admitted it; coefficients sum to 1 per channel (the official normalisation)."""
    found = find_processes(count, channels, "bounded", min_response, torch.Generator().manual_seed(seed))
    assert found.coefficients.shape == (count, channels, 8)
    assert found.starts.shape == (count, 3, channels, 36, 36)
    assert torch.allclose(found.coefficients.sum(-1), torch.ones(count, channels, dtype=torch.float64))
    assert official_finder_accepts(found.coefficients, found.starts, min_response) == []


def test_the_check_rejects_the_old_search():
    """Processes kept by bench's former search (one channel each; 3 trials with RMS over the crop ≤ 1, i.e.
    L2 ≤ 55.4 over 3 channels; no response test), grouped 3 channels a class, fail the official finder."""
    gen = torch.Generator().manual_seed(0)
    coef = torch.randn((256, 8), generator=gen, dtype=torch.float64)
    coef = coef / coef.sum(-1, keepdim=True)
    starts = torch.randn((256, 3, 36, 36), generator=gen, dtype=torch.float64)
    rms = ar_fill(starts.clone(), coef[:, None])[..., 4:, 4:].pow(2).mean((-2, -1))  # 256 processes × 3 trials
    ok = (rms.isfinite() & (rms <= 1)).all(1)
    assert ok.sum() >= 30
    failures = official_finder_accepts(coef[ok][:30].view(10, 3, 8),
                                       starts[ok][:30].view(10, 3, 3, 36, 36).transpose(1, 2), 10.0)
    assert any("response" in f for f in failures)


def test_protect_searches_with_the_official_threshold(digits):
    """``ar`` on real digits searches with the official threshold for 10 classes (10) and reports how many
    candidates it drew; unset, 3 beyond 10 classes, none for the contractive variant."""
    out = PROTECTIONS.create("ar").protect(digits, seed=0, device=CPU)
    found = find_processes(10, 1, "bounded", 10.0, torch.Generator().manual_seed(0))
    assert out.info["min_response"] == 10.0 and out.info["candidates_drawn"] == found.draws
    assert PROTECTIONS.create("ar").threshold(100) == 3.0
    assert PROTECTIONS.create("ar", coefficients="contractive").threshold(10) == 0.0
    assert PROTECTIONS.create("ar", min_response=5).threshold(100) == 5.0
    with pytest.raises(ValueError, match="min_response"):
        PROTECTIONS.create("ar", min_response=-1)


def test_finder_fill_is_the_raster_recursion():
    """The finder's diagonal fill with early exit keeps exactly the realisations within the bound, with
    ``ar_fill``'s values (which equal the official raster loop, test_synthetic_protections.py)."""
    gen = torch.Generator().manual_seed(0)
    coef = torch.randn((256, 8), generator=gen, dtype=torch.float64)
    coef = coef / coef.sum(-1, keepdim=True)
    start = start_signals((256,), gen)
    ok, crops = crops_within(start, coef, 50.0)
    reference = ar_fill(start.clone(), coef)[..., 4:, 4:]
    norms = reference.flatten(1).norm(dim=1)
    assert torch.equal(ok, norms.isfinite() & (norms <= 50)) and 10 < ok.sum() < 200
    assert torch.allclose(crops, reference[ok], rtol=1e-10, atol=1e-12)
    b = official_filters(coef[ok][:4, None])
    assert torch.allclose(official_generate(b, start[ok][:4, None])[:, 0], crops[:4], rtol=1e-10, atol=1e-12)
