"""UGE's three losses (§3.2, Eq. 6, 7–9, 11)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.protections.uge import encoders as E


def gradient_matching(net: nn.Module, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 6 at one checkpoint: 1 − cos(∇θ CE(f(x), y), ∇θ CE(f(x_u), y)) over all parameters, the second
    gradient kept in the graph (the loss is second order through the generator)."""
    params = [p for p in net.parameters() if p.requires_grad]
    clean = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    protected = torch.autograd.grad(F.cross_entropy(net(x_u), y), params, create_graph=True)
    flat = (torch.cat([g.flatten() for g in grads]) for grads in (clean, protected))
    return 1 - F.cosine_similarity(*flat, dim=0)


def least_similar(clean: torch.Tensor, text: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 9's target per image: the other class whose (normalised) feature ``text`` is least similar to the clean
    image's normalised feature (class index)."""
    return (clean @ text.T).scatter(1, y[:, None], float("inf")).argmin(1)


def class_targets(far: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, float]:
    """Each class's modal per-image target (the ``target = 'class'`` variant), and the consistency of the
    per-image rule: the mean over classes of the modal target's share of the class's images."""
    modes, shares = torch.zeros(num_classes, dtype=torch.long, device=y.device), []
    for c in range(num_classes):
        if (y == c).any():
            counts = torch.bincount(far[y == c], minlength=num_classes)
            modes[c] = counts.argmax()
            shares.append(counts.max().item() / counts.sum().item())
    return modes[y], sum(shares) / max(len(shares), 1)


def fd_targets(encoder: E.Encoder, x: torch.Tensor, y: torch.Tensor, num_classes: int, target: str, reduction: str,
               alpha: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 9's least-similar class of every image (``target = 'image'``, the paper) or of its class (``'class'``),
    with the per-image rule's class consistency and the share of clean images inside α (the hinge acting)."""
    with torch.no_grad():
        clean = torch.cat([F.normalize(encoder.images(x[i:i + 256]), dim=1) for i in range(0, len(x), 256)])
    text = F.normalize(encoder.classes, dim=1)
    far = least_similar(clean, text, y)
    modes, consistency = class_targets(far, y, num_classes)
    inside = feature_gap(clean, text[y], reduction) < alpha
    return (modes if target == "class" else far), {"fd_target_consistency": consistency,
                                                   "fd_hinge_active": inside.float().mean().item()}


def feature_gap(a: torch.Tensor, b: torch.Tensor, reduction: str) -> torch.Tensor:
    """Squared distance per row: its mean over the features (``mean``, the paper's MSE) or its sum (``sum``)."""
    gap = (a - b).pow(2)
    return gap.mean(1) if reduction == "mean" else gap.sum(1)


def feature_distance(encoder: E.Encoder, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor, far: torch.Tensor,
                     alpha: float, reduction: str) -> torch.Tensor:
    """Eq. 7–9: ℓ_feat + ℓ_tri = −d(F_i, F′_i) + d(F′_i, F′_t) + max(0, α − d(F′_i, F_t)), batch mean; F′_t is
    class ``far``'s feature. d is the squared distance's mean over the D features (``mean``: "ℓ_feat is calculated
    based on the MSE loss", §3.2) or its sum (``sum``, version 1)."""
    with torch.no_grad():
        clean = F.normalize(encoder.images(x), dim=1)
    feats = F.normalize(encoder.images(x_u), dim=1)
    text = F.normalize(encoder.classes, dim=1)
    d = lambda a, b: feature_gap(a, b, reduction)
    return (-d(clean, feats) + d(feats, text[far]) + F.relu(alpha - d(feats, text[y]))).mean()


def undistill(net: nn.Module, hacker: nn.Module, x_u: torch.Tensor, y: torch.Tensor, omega: float) -> torch.Tensor:
    """Eq. 11: CE(f_θ(x_u), y) − ω·KL(f_θ(x_u) ‖ f′_θA(x_u))."""
    logits = net(x_u)
    kl = F.kl_div(F.log_softmax(hacker(x_u), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) - omega * kl
