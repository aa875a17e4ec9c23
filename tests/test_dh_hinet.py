"""DH's HiNet (protections/dh/hinet.py): the Haar DWT, exact invertibility, the identity start, true coupling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.protections.dh.hinet import HidingNetwork, dwt, idwt, low_band


def randomise(net: nn.Module, std: float = 0.05) -> nn.Module:
    """Every conv weight and bias ~ N(0, std²): HiNet's zero last convs make the untrained network the identity,
    which would hide a wrong inverse."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, std)
                m.bias.normal_(0.0, std)
    return net


def pair(channels: int, size: int = 16, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(channels)
    return (torch.rand(2, channels, size, size, generator=g, dtype=dtype),
            torch.rand(2, channels, size, size, generator=g, dtype=dtype))


def test_dwt_round_trip_shape_and_bands() -> None:
    x = torch.rand(2, 3, 16, 12)
    z = dwt(x)
    assert z.shape == (2, 12, 8, 6)
    assert torch.allclose(idwt(z), x, atol=1e-6)
    # HiNet divides by 2 (orthonormal Haar): LL = 2 × the 2×2 block's mean, so the transform keeps the L2 norm.
    assert torch.allclose(low_band(z), 2 * F.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(z.norm(), x.norm(), rtol=1e-5)
    # Sub-band order LL, HL, LH, HH (band-major): HL differences columns, LH rows, HH the diagonals.
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    expected = torch.cat([a + b + c + d, b + d - a - c, c + d - a - b, a + d - b - c], 1) / 2
    assert torch.allclose(z, expected, atol=1e-6)
    # channels_last inputs give the same numbers.
    assert torch.allclose(dwt(x.to(memory_format=torch.channels_last)), z, atol=1e-6)
    assert torch.allclose(idwt(z.to(memory_format=torch.channels_last)), x, atol=1e-6)


def test_dwt_rejects_odd_sizes() -> None:
    with pytest.raises(ValueError, match="even"):
        dwt(torch.rand(1, 3, 15, 16))
    with pytest.raises(ValueError, match="even"):
        HidingNetwork(3, blocks=1).hide(torch.rand(1, 3, 16, 9), torch.rand(1, 3, 16, 9))


@pytest.mark.parametrize("channels", [1, 3])
def test_reveal_inverts_hide_with_random_weights(channels: int) -> None:
    # float64: std-0.05 weights give latents of ~10² after 4 blocks (C=3), where float32 inverts only to 3e-4–1e-3.
    torch.manual_seed(0)
    net = randomise(HidingNetwork(channels, blocks=4).double())
    cover, secret = pair(channels)
    stego, latent = net.hide(cover, secret)
    assert stego.shape == cover.shape and latent.shape == net.latent_shape(cover) == (2, 4 * channels, 8, 8)
    assert (stego - cover).abs().max() > 0.1  # the randomised network really changes the image
    recovered, revealed = net.reveal(stego, latent)
    assert recovered.shape == revealed.shape == cover.shape
    assert torch.allclose(recovered, cover, atol=1e-4) and torch.allclose(revealed, secret, atol=1e-4)
    # DH's reveal feeds N(0, 1) noise as the latent: shapes still hold.
    noisy = net.reveal(stego, torch.randn(net.latent_shape(stego), dtype=torch.float64))
    assert all(y.shape == cover.shape and torch.isfinite(y).all() for y in noisy)


def test_default_sixteen_blocks_invert_in_float32() -> None:
    # The paper's 16 blocks on a tiny input; std 0.01 (HiNet's init scale, now on the last convs too) keeps the
    # 16 compounded scalings moderate, and float32 then inverts to ~1e-6 (measured 7e-7).
    torch.manual_seed(0)
    net = randomise(HidingNetwork(3), std=0.01)
    assert len(net.blocks) == 16
    cover, secret = pair(3, size=8, dtype=torch.float32)
    with torch.no_grad():
        stego, latent = net.hide(cover, secret)
        recovered, revealed = net.reveal(stego, latent)
    assert (stego - cover).abs().max() > 0.1
    assert torch.allclose(recovered, cover, atol=1e-4) and torch.allclose(revealed, secret, atol=1e-4)


def test_hide_is_differentiable() -> None:
    torch.manual_seed(0)
    net = randomise(HidingNetwork(3, blocks=2))
    cover, secret = pair(3, dtype=torch.float32)
    stego, latent = net.hide(cover, secret)
    # The stego term reaches every φ and all but the last block's ρ, η; the latent term reaches those too.
    (((stego - cover) ** 2).mean() + (latent**2).mean()).backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values()), [
        name for name, g in grads.items() if g is None or not g.abs().sum() > 0]


def test_default_init_is_the_identity() -> None:
    # HiNet's init zeroes the last conv of φ, ρ, η: φ = η = 0 and e(ρ) = e(0) = 1, so the stego image equals the
    # cover up to DWT/IDWT rounding (measured 1.2e-7 in float32) and the latent is DWT(secret).
    net = HidingNetwork(3, blocks=4)
    cover, secret = pair(3, dtype=torch.float32)
    with torch.no_grad():
        stego, latent = net.hide(cover, secret)
    assert (stego - cover).abs().max() < 1e-6
    assert (latent - dwt(secret)).abs().max() < 1e-6


def test_blocks_are_true_couplings() -> None:
    torch.manual_seed(0)
    net = randomise(HidingNetwork(3, blocks=3).double())
    cover, secret = pair(3, size=8)
    with torch.no_grad():
        stego, latent = net.hide(cover, secret)
        last = net.blocks[-1]
        for sub, moves_stego in ((last.rho, False), (last.eta, False), (last.phi, True), (net.blocks[0].rho, True)):
            sub.convs[-1].bias.add_(0.1)
            stego2, latent2 = net.hide(cover, secret)
            # Eq. 3–4: the last block's ρ, η act on z_h after z_c^N is final, so they cannot move the stego image;
            # φ and any earlier sub-network can. The latent changes in every case.
            assert (stego2 - stego).abs().max() > 1e-3 if moves_stego else torch.equal(stego2, stego)
            assert (latent2 - latent).abs().max() > 1e-3
            recovered, revealed = net.reveal(stego2, latent2)  # inversion holds whatever the weights
            assert torch.allclose(recovered, cover, atol=1e-4) and torch.allclose(revealed, secret, atol=1e-4)
            stego, latent = stego2, latent2


def test_wavelets_and_couplings_keep_fp32_under_bf16_autocast() -> None:
    """DH trains under bf16 autocast: only the sub-networks' convs drop to bf16. The Haar transform (whose LL band
    feeds L_freq) and the coupling sums stay fp32, so the stego image is as precise as the cover."""
    net = randomise(HidingNetwork(3, blocks=2, growth=8))
    cover, secret = pair(3, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = dwt(cover)
        stego, latent = net.hide(cover, secret)
    assert z.dtype == stego.dtype == latent.dtype == torch.float32
    assert torch.equal(z, dwt(cover))
    assert (stego - cover).abs().max() > 0  # the randomised network does hide something


def test_concentration_loss_is_non_negative_under_bf16_autocast() -> None:
    """1 − cos of near-collinear features: in bf16 the cosines overshoot 1 and the loss went below 0 (seen: −0.17)."""
    from bench.protections.dh.losses import concentration_loss

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, 3, padding=1)
    base = torch.rand(1, 3, 8, 8)
    perturbation = base + 1e-3 * torch.rand(24, 3, 8, 8)  # 24 maps of one class, nearly the same
    labels = torch.zeros(24, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = concentration_loss(conv, perturbation, labels)
    assert loss.dtype == torch.float32
    assert 0 <= loss.item() < 0.05


def test_dense_block_channels_last_matches_the_plain_computation() -> None:
    """The sub-network runs channels-last and feeds x to its convs in their dtype (for speed); its output is the
    plain NCHW computation's, bit for bit under bf16 autocast, and comes back NCHW-contiguous."""
    from bench.protections.dh.hinet import DenseBlock

    block = randomise(DenseBlock(12, 8))
    x = torch.rand(4, 12, 8, 8, generator=torch.Generator().manual_seed(0))

    def plain(x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in block.convs[:-1]:
            features.append(block.act(conv(torch.cat(features, 1))))
        return block.convs[-1](torch.cat(features, 1))

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = block(x), plain(x)
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    assert torch.equal(out, expected)
    assert torch.allclose(block(x), plain(x), atol=1e-5)  # fp32: oneDNN's channels-last kernels, same sums
