"""HiNet, the invertible hiding network of DH (semantic deep hiding, §III-B1), with its Haar wavelet transform."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INIT_SCALE = 0.01  # HiNet config.init_scale: std of every weight and bias except the dense blocks' last conv
# Rows: LL, HL, LH, HH; columns: the 2×2 block's pixels (0,0), (0,1), (1,0), (1,1) as (row, col) offsets.
# Orthonormal (HiNet divides by 2, not 4), so the inverse transform is the transpose.
_HAAR = ((1, 1, 1, 1), (-1, 1, -1, 1), (-1, -1, 1, 1), (1, -1, -1, 1))
_HAAR_T = tuple(zip(*_HAAR))


def _mix(parts: torch.Tensor, matrix: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """out[k] = ½ Σ_q matrix[k][q] · parts[q] along dim 2. Signed sums, not a matmul, so bf16 autocast leaves the
    transform in the input's precision (its LL band feeds L_freq)."""
    terms = parts.unbind(2)
    return torch.stack([sum(w * t for w, t in zip(row, terms)) / 2 for row in matrix], 2)


def _check_even(x: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"the Haar DWT needs N×C×H×W images with even H and W, got shape {tuple(x.shape)}; "
                         "crop or pad the images to an even size first (e.g. F.pad(x, (0, W % 2, 0, H % 2)))")


def _check_bands(z: torch.Tensor, name: str) -> None:
    if z.dim() != 4 or z.shape[1] % 4:
        raise ValueError(f"{name} needs N×4C×h×w Haar sub-bands (a dwt output), got shape {tuple(z.shape)}")


def dwt(x: torch.Tensor) -> torch.Tensor:
    """One-level Haar DWT as HiNet's: N×C×H×W → N×4C×H/2×W/2, bands LL, HL, LH, HH, each C channels."""
    _check_even(x)
    n, c, h, w = x.shape
    pixels = F.pixel_unshuffle(x, 2).reshape(n, c, 4, h // 2, w // 2)  # dim 2: the 4 pixels of each 2×2 block
    return _mix(pixels, _HAAR).transpose(1, 2).reshape(n, 4 * c, h // 2, w // 2)


def idwt(z: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`dwt`: N×4C×h×w → N×C×2h×2w."""
    _check_bands(z, "idwt")
    n, c4, h, w = z.shape
    pixels = _mix(z.reshape(n, 4, c4 // 4, h, w).transpose(1, 2), _HAAR_T)
    return F.pixel_shuffle(pixels.reshape(n, c4, h, w), 2)


def low_band(z: torch.Tensor) -> torch.Tensor:
    """The LL sub-band (first quarter of the channels) of a :func:`dwt` output: twice each 2×2 block's mean."""
    _check_bands(z, "low_band")
    return z[:, : z.shape[1] // 4]


class DenseBlock(nn.Module):
    """HiNet's sub-network (ResidualDenseBlock_out): five 3×3 convs, each fed all earlier features, no residual."""

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels + k * growth, growth if k < 4 else channels, 3, 1, 1)
                                   for k in range(5))
        self.act = nn.LeakyReLU()  # PyTorch's default slope 0.01, as HiNet's nn.LeakyReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last features: oneDNN convolves channels-last, so NCHW ones were reordered for every conv and its
        # backward; and x in the convs' dtype, as under autocast a mixed cat comes out fp32 to be cast back for each
        # conv. The convs see the same values (bf16 forward: same bytes); 0.445 → 0.314 s per training iteration here.
        # The output goes back to NCHW, the layout the wavelets and couplings work in.
        x = x.contiguous(memory_format=torch.channels_last)
        first = self.act(self.convs[0](x))
        features = [x.to(first.dtype), first]
        for conv in self.convs[1:-1]:
            features.append(self.act(conv(torch.cat(features, 1))))
        return self.convs[-1](torch.cat(features, 1)).contiguous()


class CouplingBlock(nn.Module):
    """One affine coupling block (DH Eq. 3–4; HiNet's INV_block) and its exact inverse."""

    def __init__(self, channels: int, clamp: float, growth: int) -> None:
        super().__init__()
        self.clamp = clamp
        self.phi, self.rho, self.eta = (DenseBlock(channels, growth) for _ in range(3))  # HiNet's f, r, y

    def scale(self, s: torch.Tensor) -> torch.Tensor:
        # HiNet's e(s): exp(α·ρ) with ρ softly bounded, so each block scales by at most exp(±clamp).
        return torch.exp(self.clamp * 2 * (torch.sigmoid(s) - 0.5))

    def forward(self, zc: torch.Tensor, zh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zc = zc + self.phi(zh)
        return zc, zh * self.scale(self.rho(zc)) + self.eta(zc)

    def inverse(self, zc: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # DH's Eq. 5–6 garble the indices; this is the algebraic inverse of forward, as HiNet's rev=True.
        r = (r - self.eta(zc)) / self.scale(self.rho(zc))
        return zc - self.phi(r), r


class HidingNetwork(nn.Module):
    """HiNet (Jing et al., ICCV 2021) as DH §III-B1 Eq. 3–6 uses it: hide a secret image in a cover image.

    Cover and secret are Haar-DWT'd to z_c, z_h (4C channels each) and pass ``blocks`` affine coupling blocks:
    z_c ← z_c + φ(z_h); z_h ← z_h ⊙ e(ρ(z_c)) + η(z_c) (Eq. 3–4). The stego image (DH's unlearnable example)
    is x_ue = IDWT(z_c^N); z_h^N is the latent r that the reveal process replaces by N(0, 1) noise. Revealing
    runs the blocks backwards (Eq. 5–6) from (DWT(x_ue), r) and IDWTs both halves.

    HiNet official code (TomTomTommi/HiNet): the Haar DWT/IWT (divided by 2, bands LL, HL, LH, HH, band-major
    channel order), the coupling equations and their order (φ on z_h first, then ρ, η on the updated z_c),
    e(s) = exp(clamp·2·(sigmoid(s) − 0.5)) with clamp 2.0, 16 blocks, the 5-conv dense sub-network (growth 32,
    LeakyReLU 0.01, no residual), and the initialisation: every weight and bias ~ N(0, 0.01²) except the last
    conv of each sub-network, which is zero, so the untrained network is the identity (stego = cover).

    Args:
        channels: image channels C (1, 3, ...); the sub-networks map 4C wavelet channels to 4C.
        blocks: number N of coupling blocks.
        clamp: α, the bound of the log-scale in e(s).
        growth: channels added by each of the dense block's first four convs.
    """

    def __init__(self, channels: int, blocks: int = 16, clamp: float = 2.0, growth: int = 32) -> None:
        super().__init__()
        self.channels = channels
        self.blocks = nn.ModuleList(CouplingBlock(4 * channels, clamp, growth) for _ in range(blocks))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """HiNet's init_model: N(0, INIT_SCALE²) everywhere, zero last convs (near-identity, stable start)."""
        for sub in (m for m in self.modules() if isinstance(m, DenseBlock)):
            for conv in sub.convs:
                std = 0.0 if conv is sub.convs[-1] else INIT_SCALE
                conv.weight.normal_(0.0, std)
                conv.bias.normal_(0.0, std)

    def _check(self, *images: torch.Tensor) -> None:
        for x in images:
            _check_even(x)
            if x.shape[1] != self.channels or x.shape != images[0].shape:
                shapes = [tuple(y.shape) for y in images]
                raise ValueError(f"expected matching N×{self.channels}×H×W tensors, got shapes {shapes}")

    def hide(self, cover: torch.Tensor, secret: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward hiding (Eq. 3–4): N×C×H×W images in [0, 1] → (stego x_ue, not clamped; latent r = z_h^N)."""
        self._check(cover, secret)
        zc, zh = dwt(cover), dwt(secret)
        for block in self.blocks:
            zc, zh = block(zc, zh)
        return idwt(zc), zh

    def reveal(self, stego: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backward revealing (Eq. 5–6): (stego, wavelet-domain r) → (recovered cover x'_c, secret x'_h)."""
        if latent.shape != self.latent_shape(stego):  # also checks the stego's size and channels
            raise ValueError(f"latent must have shape {tuple(self.latent_shape(stego))}, got {tuple(latent.shape)}")
        zc, r = dwt(stego), latent
        for block in reversed(self.blocks):
            zc, r = block.inverse(zc, r)
        return idwt(zc), idwt(r)

    def latent_shape(self, images: torch.Tensor) -> torch.Size:
        """Shape of the latent r (and of the reveal's noise) for a batch of N×C×H×W images."""
        self._check(images)
        return torch.Size((images.shape[0], 4 * self.channels, images.shape[2] // 2, images.shape[3] // 2))
