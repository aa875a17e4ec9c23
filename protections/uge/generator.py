"""UGE's generator (supp. Table 4, Fig. 5) and publishing with it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cbl(conv: nn.Module) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(conv.out_channels), nn.LeakyReLU(0.2, inplace=True)]


class ResBlock(nn.Module):
    """conv-BN-LeakyReLU-Dropout-conv-BN with an identity shortcut (UGE Table 4)."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(*_cbl(nn.Conv2d(width, width, 3, 1, 1)), nn.Dropout(dropout),
                                  nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


OUTPUTS = ("normalised", "clamp", "tanh")


class Generator(nn.Module):
    """G (UGE supp. Table 4, Fig. 5): conv 7×7, two stride-2 convs 3×3, 6 residual blocks, two stride-2
    transposed convs 3×3 (each BN-LeakyReLU), an output conv 7×7 giving a map a. Inputs are padded (replicate) to
    a multiple of 4 and cropped back: any size works.

    ``output``: how Eq. 3's x_u = Clamp(G(x), x − ρ, x + ρ) is read (the paper is silent on G's output scale).
    ``normalised`` (default, version 2): x + ρ·BN(a) clamped to the ρ-ball, a batch norm (affine) on the output
    map, so that neither its scale nor a constant offset can run away. ``clamp``: x + ρ·a clamped; ``tanh``
    (version 1): x + ρ·tanh(a). Under Adam (lr 1e-3) every weight of the output conv moves by ≈ lr a step in
    the same direction, so a's per-channel offset outgrows ±1 within a few steps: at uge-table1-cpu's settings
    both collapsed to one constant colour shift (δ = (−ρ, +ρ, −ρ) on 99 % of pixels; the fd, gm+fd and
    gm+fd+ud rows published byte-identical images; fidelity audit, finding 3; figures in DEVIATIONS.md)."""

    def __init__(self, channels: int, width: int, rho: float, dropout: float, output: str = "normalised") -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"uge generator output {output!r}: one of {OUTPUTS}")
        self.arch = {"channels": channels, "width": width, "rho": rho, "dropout": dropout, "output": output}
        w = (width, 2 * width, 4 * width)
        self.net = nn.Sequential(
            *_cbl(nn.Conv2d(channels, w[0], 7, 1, 3)), *_cbl(nn.Conv2d(w[0], w[1], 3, 2, 1)),
            *_cbl(nn.Conv2d(w[1], w[2], 3, 2, 1)), *(ResBlock(w[2], dropout) for _ in range(6)),
            *_cbl(nn.ConvTranspose2d(w[2], w[1], 3, 2, 1, output_padding=1)),
            *_cbl(nn.ConvTranspose2d(w[1], w[0], 3, 2, 1, output_padding=1)), nn.Conv2d(w[0], channels, 7, 1, 3),
            *([nn.BatchNorm2d(channels)] if output == "normalised" else []))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        padded = F.pad(x, (0, -w % 4, 0, -h % 4), mode="replicate")
        rho, a = self.arch["rho"], self.net(padded)[..., :h, :w]
        out = x + rho * (torch.tanh(a) if self.arch["output"] == "tanh" else a)
        return torch.minimum(torch.maximum(out, x - rho), x + rho).clamp(0, 1)


@torch.no_grad()
def recalibrate(generator: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Batch-norm statistics averaged over one pass of ``x`` (dropout off), so the published G(x) is the trained G
    whatever the number of steps (running averages with momentum 0.1 lag far behind in short CPU fits)."""
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm2d)]
    generator.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    for start in range(0, len(x), batch_size):
        generator(x[start:start + batch_size])
    for m in norms:
        m.momentum = 0.1
    generator.eval()


@torch.no_grad()
def encrypt(generator: nn.Module, images: torch.Tensor, *, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """uint8 N×C×H×W → uint8 round(255·G(x)), batch-wise on ``device`` (|x_u − x| ≤ ρ + 1/255)."""
    generator.eval()
    out = [generator(images[i:i + batch_size].to(device).float().div(255)).mul(255).round().to(torch.uint8).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else images.clone()
