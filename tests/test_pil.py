"""PIL (perturbation-induced linearization): budget, determinism, its bias-free linear surrogate, what it optimises,
and that a victim learns less from its output on real images.

Generic contracts (shape, dtype, labels, no mutation, determinism, L∞ budget) also run in test_components.py.
"""

from __future__ import annotations

import pytest
import torch

from bench.core.components import PROTECTIONS, ImageSet
from bench.core.registry import ConfigError
from bench.data.datasets import DATASETS
from bench.protections.pil import LinearSurrogate
from tests.test_surrogate_protections import change, victim_accuracy

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> tuple[ImageSet, ImageSet]:
    """500 real greyscale train images (50 per class) and 300 test images, 1×16×16."""
    return DATASETS.create("digits", per_class=50, test_per_class=30).load()


@pytest.mark.parametrize("epsilon", [8.0, 5.0])
def test_budget_holds_after_8bit_rounding(digits, epsilon):
    """|x′ − x| ≤ ε in whole pixel steps on the published uint8 images, and the noise uses its budget."""
    train = digits[0]
    out = PROTECTIONS.create("pil", epsilon=epsilon).protect(train, seed=0, device=CPU)
    d = change(out, train)
    assert out.images.dtype == torch.uint8 and d.abs().max() <= epsilon
    assert (d != 0).float().mean() > 0.3 and d.abs().max() == epsilon
    assert torch.equal(out.labels, train.labels)


def test_deterministic_per_seed(digits):
    train = digits[0].subset(torch.arange(0, 100))
    pil = PROTECTIONS.create("pil", model_epochs=3)
    a, b = (pil.protect(train, seed=3, device=CPU) for _ in range(2))
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, pil.protect(train, seed=4, device=CPU).images)


def test_surrogate_is_linear_and_bias_free(digits):
    """The trained surrogate maps 0 to 0 and is additive and homogeneous: a bias, or an affine normalisation such
    as bench's victims carry, would break all three."""
    train = digits[0]
    model = PROTECTIONS.create("pil", batch_size=64).surrogate(train, seed=0, device=CPU)
    assert isinstance(model, LinearSurrogate) and not model.training
    assert all("bias" not in name for name, _ in model.named_parameters())
    a, b = torch.rand(2, 4, *train.images.shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(torch.zeros_like(a)), torch.zeros(4, train.num_classes))
        assert torch.allclose(model(a + b), model(a) + model(b), atol=1e-5)
        assert torch.allclose(model(-3 * a), -3 * model(a), atol=1e-5)


def test_surrogate_learns_the_clean_set(digits):
    """With enough steps (batch 64: 8 a epoch) the linear classifier fits the digits well above chance."""
    out = PROTECTIONS.create("pil", batch_size=64).protect(digits[0], seed=0, device=CPU)
    assert out.info["surrogate_clean_accuracy"] > 0.6


def test_noise_is_a_linear_shortcut_and_hides_the_class(digits):
    """PIL's two objectives, on its own surrogate: f(δ) predicts the label, f(x − δ) (published) no longer does.
    At ε = 32/255 (α = ε/10), as below: at 8/255 the clamp to [0, 1] of the black background drops much of δ
    (measured 0.76 → 0.66; at 32/255 0.76 → 0.19)."""
    out = PROTECTIONS.create("pil", batch_size=64, epsilon=32, step_size=3.2).protect(digits[0], seed=0, device=CPU)
    info = out.info
    assert info["shortcut_accuracy"] > 0.9
    assert info["obfuscated_accuracy"] < info["surrogate_clean_accuracy"] - 0.3


def test_the_obfuscation_term_pushes_the_published_images_towards_uniform(digits):
    """Judged on the published images, not the component's report: the KL term alone (λ = 0) leaves the surrogate's
    output on x − δ far nearer uniform than the shortcut term alone (λ = 1). Measured KL(U ‖ f(x − δ)): clean 0.144,
    λ = 0 0.014, 0.5 0.037, the default 0.9 0.046, 1 0.048 (at 0.9 the term's weight is 0.1, too small to test)."""
    import torch.nn.functional as F

    train = digits[0]
    params = dict(batch_size=64, epsilon=32, step_size=3.2)
    model = PROTECTIONS.create("pil", **params).surrogate(train, seed=0, device=CPU)

    def kl_to_uniform(lam: float) -> float:
        published = PROTECTIONS.create("pil", lam=lam, **params).protect(train, seed=0, device=CPU)
        logits = model(published.images.float() / 255)
        uniform = torch.full_like(logits, 1 / train.num_classes)
        return F.kl_div(F.log_softmax(logits, 1), uniform, reduction="batchmean").item()

    with_term, without = kl_to_uniform(0.0), kl_to_uniform(1.0)
    print(f"KL(U || f(x - delta)): lam 0 {with_term:.3f}, lam 1 {without:.3f}")
    assert with_term < 0.5 * without


@pytest.mark.parametrize("params", [{"lam": 1.5}, {"epsilon": 300.0}, {"steps": 0}])
def test_wrong_parameters_are_refused(params):
    with pytest.raises(ConfigError):
        PROTECTIONS.create("pil", **params)


def test_victim_learns_less_from_protected_digits(digits):
    """A CNN trained on PIL digits scores far below one trained on clean digits.

    Digits are coarse, high-contrast images (mostly black background, so clamp(x − δ, 0, 1) drops about half of δ
    there) that a CNN learns in a few epochs: at ε = 8/255 the drop is small (measured 0.95 → 0.94). At ε = 32/255,
    with the step scaled as the official defaults scale it (α = ε/10; 0.8/255 steps could not even reach the
    ball's edge in 30 steps): 0.95 → 0.45 (seed 0) and 0.30 (seed 1)."""
    train, test = digits
    clean = victim_accuracy(train, test)
    protected = victim_accuracy(PROTECTIONS.create("pil", epsilon=32, step_size=3.2).protect(train, seed=0, device=CPU),
                                test)
    print(f"pil digits: clean {clean:.3f} protected {protected:.3f}")
    assert clean > 0.8 and protected < clean - 0.3
