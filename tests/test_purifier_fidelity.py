"""Fidelity of the purification countermeasures to their official code (issue 36, fidelity audit findings 2, 10, 11):
UEraser's JPEG variant for TAP and AR (APBench @9a6fb91), orthogonal projection's basis, the DEVIATIONS rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.transforms.v2.functional import jpeg

from bench.core.components import COUNTERMEASURES, PROTECTIONS, ImageSet
from bench.countermeasures import _trivial, ueraser
from bench.data.datasets import DATASETS
from bench.plan.matrix import expand, load_matrix
from conftest import require_cifar10_jpeg

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rgb() -> ImageSet:
    """40 real RGB images (4 per class) of the CIFAR-10 JPEG copy; skips without it."""
    return DATASETS.create("cifar10-jpeg", path=str(require_cifar10_jpeg()), per_class=4, test_per_class=1).load()[0]


def seen_by_model(monkeypatch: pytest.MonkeyPatch, x: torch.Tensor, **params) -> tuple[torch.Tensor, list[float]]:
    """The batch the model sees in one lite step, with the augmentation replaced by the identity, and the plasma
    probabilities the augmentation was called with."""
    plasma = []

    def identity(images: torch.Tensor, gen: torch.Generator, p_plasma: float = 1.0) -> torch.Tensor:
        plasma.append(p_plasma)
        return images

    monkeypatch.setattr(ueraser, "ueraser_augment", identity)
    seen = []
    loss = COUNTERMEASURES.create("ueraser", variant="lite", **params).train_hooks(10, 32).loss
    loss(lambda batch: seen.append(batch) or torch.zeros(len(batch), 10), x, torch.zeros(len(x), dtype=torch.long),
         torch.Generator().manual_seed(0))
    return seen[0], plasma


def test_ueraser_jpeg_draws_pass_a_jpeg_round_trip_first(monkeypatch, rgb):
    """APBench @9a6fb91's ``UEraser_jpeg``: a JPEG copy at one quality in 10–99, then the augmentation at plasma
    p 0.8; plain ``UEraser`` feeds the batch on at plasma p 1.0."""
    x = rgb.images.float() / 255
    plain, p_plain = seen_by_model(monkeypatch, x)
    assert torch.equal(plain, x) and p_plain == [1.0]
    copy, p_jpeg = seen_by_model(monkeypatch, x, jpeg=True)
    assert p_jpeg == [0.8]
    first = [q for q in range(10, 100) if torch.equal(copy[:1], jpeg(rgb.images[:1], q).float() / 255)]
    assert any(torch.equal(copy, jpeg(rgb.images, q).float() / 255) for q in first), \
        "the model saw a JPEG round trip of the batch at one quality in 10..99"
    assert (copy != x).float().mean() > 0.5  # most values change (at q 10–99 on these photographs)


def test_random_jpeg_is_seeded_and_keeps_dtype_and_range(rgb):
    x = rgb.images.float() / 255
    out = _trivial.random_jpeg(x, torch.Generator().manual_seed(3))
    assert out.dtype == x.dtype and out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, _trivial.random_jpeg(x, torch.Generator().manual_seed(3)))


UERASER_MATRICES = ["purification-cpu", "purification", "dh-table2", "full", "full-cpu"]


@pytest.mark.parametrize("name", UERASER_MATRICES)
def test_matrices_run_ueraser_jpeg_on_tap_and_ar_only(name):
    cells = expand(load_matrix(ROOT / "bench" / "matrices" / f"{name}.toml"))
    jpeg_of = {}
    for cell in cells:
        labels = cell.labels()
        if labels["countermeasure"].startswith("ueraser"):
            jpeg_of.setdefault(labels["protection"], set()).add(labels["countermeasure"])
    assert jpeg_of and all(len(v) == 1 for v in jpeg_of.values()), "one UEraser per row"
    assert {p for p, v in jpeg_of.items() if v == {"ueraser[jpeg=True]"}} == {"tap", "ar"}


def test_orthogonal_projection_basis_stays_in_the_span_of_the_class_weights(rgb):
    """Every basis column lies in the span of the centred class weights (rank K − 1); version 1's QR of the K
    centred rows added a K-th column set by round-off, wholly outside it (norm 1.0 outside the span)."""
    protected = PROTECTIONS.create("cwn", epsilon=16.0).protect(rgb, seed=0, device=CPU)
    op = COUNTERMEASURES.create("orthogonal_projection", steps=50)
    weight = op.linear_model(protected, CPU).double()
    basis = op.basis(weight)
    centred = (weight - weight.mean(0, keepdim=True)).T
    span, _ = torch.linalg.qr(centred[:, :-1])  # K − 1 centred rows are independent and span the centred ones
    outside = basis - span @ (span.T @ basis)
    assert basis.shape == (weight.shape[1], weight.shape[0] - 1)
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype), atol=1e-9)
    assert outside.norm(dim=0).max() < 1e-6


def test_deviations_rows_of_the_purifiers_are_current():
    text = (ROOT / "bench" / "DEVIATIONS.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if line.startswith("| `")}
    assert "9a6fb91" in rows["ueraser"] and "6076a27" in rows["ueraser"] and "discards" not in rows["ueraser"]
    assert "clip_sample" in rows["diffpure"]
    assert "no diffusion purifier" not in text
