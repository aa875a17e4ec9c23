"""Gradient analysis of protected training data (ConfounderGAN App. A, Eq. 6–7, Fig. 7).

Both metrics compare a model h (a checkpoint of a victim being trained on the protected set; any
``nn.Module`` that takes float [0, 1] images, e.g. ``nn.Sequential(Normalize(mean, std), victim)``) on each
protected image x + G(x) against its clean original x, with the ground-truth label t. Images are given as
uint8 N×C×H×W (or float [0, 1]); the model is evaluated in eval mode (its mode is restored), batch-wise, in
fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bench.execute.train import capped_batch

METRIC_CHUNK = 1 << 24  # pixel values per part of ``perturbation_metrics`` (64 MB of int32)


def confidence_ascent_ratio(model: nn.Module, clean: torch.Tensor, protected: torch.Tensor, labels: torch.Tensor,
                            device: torch.device | str = "cpu", batch_size: int = 256) -> float:
    """CAR (App. A, Eq. 6): the fraction of images whose confidence in the true class rises with the noise,
    (1/n)·Σ 1(h(x + G(x))_t − h(x)_t > 0), where h(·)_t is the softmax probability of class t.

    Near 1 means h already 'knows' the protected images (little left to learn from them).
    """
    rises = 0
    with _evaluating(model):
        for x, x_protected, t in _batches(clean, protected, labels, device, batch_size):
            with torch.no_grad():
                before = F.softmax(model(x).float(), 1).gather(1, t[:, None])
                after = F.softmax(model(x_protected).float(), 1).gather(1, t[:, None])
            rises += (after > before).sum().item()
    return rises / len(labels)


def gradient_compression_ratio(model: nn.Module, clean: torch.Tensor, protected: torch.Tensor, labels: torch.Tensor,
                               device: torch.device | str = "cpu", batch_size: int = 256,
                               layer: nn.Linear | None = None) -> float:
    """GCR (App. A, Eq. 7): the mean over images of ‖∇_W ℓ(x + G(x), t)‖₂ / ‖∇_W ℓ(x, t)‖₂, with ℓ the
    cross-entropy and W the weight matrix of the classifier layer (``layer``; default: the model's last
    ``nn.Linear``; its bias is left out, as Eq. 7 names W).

    Per-sample gradients are exact and batch-wise: ∇_W ℓᵢ = Σ_tokens gᵢ ⊗ aᵢ, with aᵢ the layer's input and
    gᵢ = ∂ℓᵢ/∂zᵢ at its output, so ‖∇_W ℓᵢ‖₂ = ‖gᵢ‖·‖aᵢ‖ for a 2-D input. A clean gradient of exactly 0
    (a perfectly confident, correct h) is floored at 1e-12. Below 1: protected images carry less gradient.
    """
    layer = layer or [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    ratios = []
    with _evaluating(model):
        for x, x_protected, t in _batches(clean, protected, labels, device, batch_size):
            clean_norm = _weight_gradient_norms(model, layer, x, t)
            ratios.append(_weight_gradient_norms(model, layer, x_protected, t) / clean_norm.clamp_min(1e-12))
    return torch.cat(ratios).mean().item()


def _weight_gradient_norms(model: nn.Module, layer: nn.Linear, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """‖∂ℓᵢ/∂W‖₂ for every sample i of the batch (eval mode: samples are independent)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen["a"] = inputs[0].detach()
        output.retain_grad()
        seen["z"] = output

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            loss = F.cross_entropy(model(x).float(), t, reduction="sum")  # ∂(Σ ℓ)/∂zᵢ = ∂ℓᵢ/∂zᵢ
            loss.backward(inputs=[seen["z"]])
    finally:
        handle.remove()
    a, g = seen["a"].float(), seen["z"].grad.float()
    if a.dim() == 2:
        return g.norm(dim=1) * a.norm(dim=1)
    return torch.einsum("n...o,n...i->noi", g, a).flatten(1).norm(dim=1)


def _batches(clean: torch.Tensor, protected: torch.Tensor, labels: torch.Tensor, device: torch.device | str,
             batch_size: int):
    if clean.shape != protected.shape or len(labels) != len(clean):
        raise ValueError(f"clean {tuple(clean.shape)}, protected {tuple(protected.shape)} and "
                         f"{len(labels)} labels do not match")
    batch_size = capped_batch(batch_size, clean)
    for start in range(0, len(labels), batch_size):
        yield (_as_float(clean[start:start + batch_size], device), _as_float(protected[start:start + batch_size], device),
               labels[start:start + batch_size].to(device))


def _as_float(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    images = images.to(device)
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


class _evaluating:
    """Context: the model in eval mode, its previous mode restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def perturbation_metrics(clean: torch.Tensor, protected: torch.Tensor) -> dict[str, float | None]:
    """L∞ and mean per-image L2 of ``protected − clean`` in [0, 1] units, and mean per-image PSNR (dB).

    Images left unchanged are left out of the PSNR mean (their PSNR is infinite); ``None`` if all are.
    """
    if len(clean) == 0:
        return {"linf": 0.0, "l2": 0.0, "psnr": None}
    step, linf, squares = max(1, METRIC_CHUNK // clean[0].numel()), 0, []
    for first in range(0, len(clean), step):  # in parts, from exact integer differences: no float copy of the set
        diff = (protected[first:first + step].to(torch.int32) - clean[first:first + step].to(torch.int32)).flatten(1)
        linf = max(linf, int(diff.abs().max()))
        squares.append(diff.double().pow(2).sum(1))
    mse = torch.cat(squares) / (255 ** 2 * clean[0].numel())
    changed = mse > 0
    psnr = (10 * torch.log10(1 / mse[changed])).mean().item() if changed.any() else None
    return {"linf": linf / 255, "l2": mse.mul(clean[0].numel()).sqrt().mean().item(),
            "psnr": None if psnr is None or math.isnan(psnr) else psnr}
