"""A small Vision Transformer (Dosovitskiy et al. 2021) trained from scratch on CIFAR-sized images."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bench.api import VICTIMS
from bench.victims._imagenet import FromImageNet


class Attention(nn.Module):
    """Multi-head self-attention: bias-free q/k/v projection, output projection + dropout."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer encoder block: x + MSA(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Patch embedding (a patch×patch stride-patch conv), class token, learned positional embedding, pre-norm
    encoder, LayerNorm + linear head on the class token.

    The positional embedding is learned for the token grid of ``image_size``; an input of another size is
    accepted and the embedding is bicubically interpolated to its grid.
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int, patch: int, dim: int, depth: int,
                 heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.grid = max(1, image_size // patch)
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, self.grid ** 2 + 1, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim, dropout) for _ in range(depth)))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def positions(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.pos
        cls, grid = self.pos[:, :1], self.pos[:, 1:]
        grid = grid.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.positions(h, w)
        x = self.blocks(self.drop(x))
        return self.head(x[:, 0])


@VICTIMS.register("vit")
class ViT(FromImageNet):
    """A small ViT for CIFAR (ViT of DH §IV-A / Table III): 9.5 M parameters at 32 px, 10 classes.

    Defaults are the CIFAR ViT of Yoshioka's vision-transformers-cifar10 (kentaroy47, ``--net vit``), whose
    sizes APBench's ``Vit_cifar`` also uses: patch 4, dim 512, depth 6, 8 heads of 64, MLP 512 (1× dim, not
    ViT's 4×: set ``mlp_dim = 2048`` for that, 19.0 M), dropout 0.1 on embeddings, MLP and projections.
    Plain ViT (no shifted patches / locality attention). Patch size from the image size: 4 at ≤ 64 px
    (7×7, 8×8, 16×16 tokens at 28, 32, 64 px), 16 above (ViT-B/16's 14×14 tokens at 224 px); the positional
    embedding is learned for that grid, and interpolated if a differently sized input arrives. Class token and
    positional embedding start from a truncated N(0, 0.02²) as in the ViT paper's code (the CIFAR repo: N(0, 1)).
    ``weights = 'imagenet'``: torchvision's ViT-B/16 (86 M parameters, 224 px, dim 768, depth 12, 12 heads, MLP
    3072, no dropout) with its ViT_B_16_Weights.IMAGENET1K_V1 weights and a new head, inputs resized to 224 px
    (``bench.victims._imagenet``); the size parameters then stay at their defaults.
    """

    paper: ClassVar[str] = ("Dosovitskiy et al. 2021; CIFAR sizes of kentaroy47/vision-transformers-cifar10; "
                            "victim of DH §IV-A Table III (ViT)")
    # kentaroy47/vision-transformers-cifar10 ViT(image_size=32, patch_size=4, num_classes=10, dim=512, depth=6,
    # heads=8, mlp_dim=512): patch 25,088 + tokens 33,792 + 6 blocks × 1,576,448 + head 6,154.
    reference_params: ClassVar[int] = 9_523_722
    dim: int = 512
    depth: int = 6
    heads: int = 8
    mlp_dim: int = 512
    dropout: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weights and (self.dim, self.depth, self.heads, self.mlp_dim, self.dropout) != (512, 6, 8, 512, 0.1):
            raise ValueError("vit weights = 'imagenet' is torchvision's ViT-B/16 with its own sizes: leave dim, "
                             "depth, heads, mlp_dim and dropout unset, or weights unset for the CIFAR ViT")
        if min(self.dim, self.depth, self.heads, self.mlp_dim) < 1 or self.dim % self.heads:
            raise ValueError(f"vit needs positive sizes and dim divisible by heads, got dim={self.dim}, "
                             f"heads={self.heads}, depth={self.depth}, mlp_dim={self.mlp_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"vit dropout must be in [0, 1), got {self.dropout}")

    @staticmethod
    def patch_size(image_size: int) -> int:
        return 4 if image_size <= 64 else 16

    def scratch(self, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return VisionTransformer(num_classes, in_channels, image_size, self.patch_size(image_size), self.dim,
                                 self.depth, self.heads, self.mlp_dim, self.dropout)
