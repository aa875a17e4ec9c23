"""DH's latent feature concentration loss L_conc (§III-B2 Eq. 10; fidelity audit finding 1): 𝒢 must tell independent
perturbation maps apart, so that pulling a class's maps together does something, and the fit records every loss term.
"""

from __future__ import annotations

import pytest
import torch

import bench.protections  # noqa: F401  (registers)
from bench.core.components import PROTECTIONS, ImageSet
from bench.data.datasets import DATASETS
from bench.protections.dh.losses import concentration_loss, extractor

CPU = torch.device("cpu")
MAPS = 16


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return DATASETS.create("digits", per_class=20, test_per_class=1).load()[0]


@pytest.fixture(scope="module")
def features(digits):
    torch.set_num_threads(1)
    return extractor("classifier", digits, arch="resnet20", epochs=3, seed=0, device=CPU)[0]


def _uniform_maps(digits: ImageSet, seed: int) -> torch.Tensor:
    """Independent uniform ±8/255 perturbation maps, the budget's scale."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(MAPS, digits.channels, digits.size, digits.size, generator=gen) * 2 - 1) * 8 / 255


def test_independent_perturbation_maps_are_far_apart_in_the_extractors_features(digits, features):
    """Raw ±8/255 maps gave 1 − cos ≈ 4e-5 (the eval-mode batch-norm offsets dominate 𝒢's features): L_conc did
    nothing. Each pair (a_i, b_i) shares a class, so the sum over ordered same-class pairs is 2 Σ_i (1 − cos)."""
    maps = torch.cat([_uniform_maps(digits, 0), _uniform_maps(digits, 1)])
    labels = torch.arange(MAPS).repeat(2)
    with torch.no_grad():
        mean_distance = concentration_loss(features, maps, labels).item() / (2 * MAPS)
    assert mean_distance > 1e-2, mean_distance


def test_the_loss_ignores_the_maps_scale_and_is_zero_for_one_map_per_class(digits, features):
    maps, labels = _uniform_maps(digits, 2), torch.arange(MAPS) % 4
    with torch.no_grad():
        loss = concentration_loss(features, maps, labels)
        assert torch.allclose(concentration_loss(features, 0.5 * maps + 0.5, labels), loss, rtol=1e-2)
        assert concentration_loss(features, maps, torch.arange(MAPS)).item() == pytest.approx(0, abs=1e-5)


def test_the_fit_records_every_loss_term_and_the_concentration_term_acts(digits):
    """DH(S) with 3 variants: a class's images hide different images, so their fresh network's maps differ (in DH(C)
    they hide one image and are alike from the start). Per pair after 3 iterations (maps still tiny, near the
    standardisation's std floor): 4.6e-6 with raw maps (version 3), 8.5e-5 standardised."""
    torch.set_num_threads(1)
    dh = PROTECTIONS.create("dh", source="skimage", extractor="classifier", extractor_epochs=1, blocks=2, growth=8,
                            iterations=3, batch_size=8, mode="sample", variants=3)
    info = dh.fit(digits, seed=0, device=CPU).data.info
    losses = info["losses"]
    assert set(losses) == {"hide", "freq", "reveal", "conc", "total"}
    weighted = losses["hide"] + dh.omega1 * losses["freq"] + dh.omega2 * losses["reveal"] + dh.omega3 * losses["conc"]
    assert losses["total"] == pytest.approx(weighted, rel=1e-5)
    assert 0 < info["conc_pairs"] < 8 * 7
    assert losses["conc"] / info["conc_pairs"] > 3e-5, "1 − cos per same-class pair: L_conc is inert"
