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


def feature_distance(encoder: E.Encoder, x: torch.Tensor, x_u: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 7–9: −‖F_i − F′_i‖² + ‖F′_i − F′_t‖² + max(0, α − ‖F′_i − F_t‖²), batch mean; F′_t is the other
    class feature least similar to the clean image's."""
    with torch.no_grad():
        clean = F.normalize(encoder.images(x), dim=1)
    feats = F.normalize(encoder.images(x_u), dim=1)
    text = F.normalize(encoder.classes, dim=1)
    similarity = (clean @ text.T).scatter(1, y[:, None], float("inf"))
    far = text[similarity.argmin(1)]
    return (-(clean - feats).pow(2).sum(1) + (feats - far).pow(2).sum(1)
            + F.relu(alpha - (feats - text[y]).pow(2).sum(1))).mean()


def undistill(net: nn.Module, hacker: nn.Module, x_u: torch.Tensor, y: torch.Tensor, omega: float) -> torch.Tensor:
    """Eq. 11: CE(f_θ(x_u), y) − ω·KL(f_θ(x_u) ‖ f′_θA(x_u))."""
    logits = net(x_u)
    kl = F.kl_div(F.log_softmax(hacker(x_u), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) - omega * kl
