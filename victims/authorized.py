"""The protector's authorized network (UGE §3.1, §4.1): a fixed architecture with fixed initial parameters θ0.

UGE data stays learnable for exactly this network. The ``uge`` protection draws θ0 here (``initial_network``),
trains the trajectory it matches from it, and publishes θ0 as its ``authorized`` model artifact
(``AuthorizedNetworks``); the ``authorized`` victim and the ``distill`` countermeasure's teacher start from it
(``authorized_start``). For a protection without an authorized network (clean, EM …) they start from the θ0
that the same architecture and seed give, so UGE Table 1's "Original" row is the same network.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import nn

from bench.api import VICTIMS, Models, Victim

DEFAULT_ARCH = "resnet18"  # UGE Table 1: "ResNet-18 is used as the backbone of the authorized network"
SEED_BASE = 1_000_003  # θ0 of init seed s comes from torch.manual_seed(SEED_BASE + s): never a cell's seed


def initial_network(arch: str, init_seed: int, num_classes: int, channels: int, size: int) -> nn.Module:
    """θ0: victim ``arch`` as built under ``torch.manual_seed(SEED_BASE + init_seed)``, without touching the
    caller's random state. A hacker victim of the same architecture, seeded by its cell, starts elsewhere."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED_BASE + init_seed)
        return VICTIMS.create(arch).build(num_classes, channels, size)


class AuthorizedNetworks(nn.Module):
    """The K authorized networks at θ0 (UGE supp. §6.1, Eq. 12): network k is ``arch`` with init seed
    ``init_seed + k``. ``arch`` (a dict) rebuilds it for the saved weights (``bench.store.artifacts``)."""

    def __init__(self, arch: str, init_seed: int, networks: int, classes: int, channels: int, size: int) -> None:
        super().__init__()
        self.arch = {"arch": arch, "init_seed": init_seed, "networks": networks, "classes": classes,
                     "channels": channels, "size": size}
        self.nets = nn.ModuleList(initial_network(arch, init_seed + k, classes, channels, size) for k in range(networks))
        # The normalisation the protection fitted them under (NaN until ``fix_stats``): UGE's trajectory and L_gm
        # use the clean set's channel statistics, so the authorized network must see x_u normalised the same way.
        self.register_buffer("mean", torch.full((channels,), float("nan")))
        self.register_buffer("std", torch.full((channels,), float("nan")))

    def fix_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)

    def stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fitted normalisation, or None where the protection fixed none."""
        return None if torch.isnan(self.mean).any() else (self.mean.clone(), self.std.clone())


def authorized_arch(models: Models, arch: str | None) -> str:
    """The architecture ``authorized_start`` builds: the protection's, else ``arch`` (None: ResNet-18)."""
    return models["authorized"].arch["arch"] if "authorized" in models else arch or DEFAULT_ARCH


def authorized_stats(models: Models) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The normalisation the protection's authorized networks were fitted under (None: the train set's own)."""
    return models["authorized"].stats() if "authorized" in models else None


def authorized_start(models: Models, arch: str | None, init_seed: int | None, index: int, num_classes: int,
                     channels: int, size: int) -> nn.Module:
    """A trainable copy of authorized network ``index`` at θ0: the protection's, where it fits one, else the one
    ``arch`` (None: ResNet-18) and ``init_seed`` (None: 0) give. Parameters that contradict the protection's raise."""
    if "authorized" not in models:
        return initial_network(authorized_arch(models, arch), (init_seed or 0) + index, num_classes, channels, size)
    nets = models["authorized"]
    given = nets.arch
    if index >= given["networks"]:
        raise ValueError(f"authorized network index {index}, but the protection has {given['networks']} (0-based)")
    for name, value in (("arch", arch), ("init_seed", init_seed)):
        if value is not None and value != given[name]:
            raise ValueError(f"{name} = {value!r}, but the protection's authorized network has {name} = "
                             f"{given[name]!r}: omit {name} to take the protection's")
    if (given["classes"], given["channels"], given["size"]) != (num_classes, channels, size):
        raise ValueError(f"the protection's authorized network is for {given['classes']} classes, {given['channels']}×"
                         f"{given['size']}² images, not {num_classes} classes, {channels}×{size}²")
    return copy.deepcopy(nets.nets[index]).train().requires_grad_(True)


@VICTIMS.register("authorized")
class Authorized(Victim):
    """The authorized network, trained normally (SGD, the recipe) on the (protected) set: UGE Table 1's
    "Acc. (Authorized)" column (Table 2's Net-1, Net-2 by ``index``). It starts from exactly the protection's
    θ0 (its ``authorized`` model, ``uses_models``); for a protection without one, from ``arch``/``init_seed``'s.

    Attributes:
        arch: its architecture (None: the protection's, else ResNet-18).
        init_seed: the seed of its θ0 (None: the protection's, else 0).
        index: which of the protection's authorized networks (0-based).
    """

    paper: ClassVar[str] = "UGE §3.1, §4.1, Table 1 (Acc. Authorized), Table 2"
    uses_models: ClassVar[tuple[str, ...]] = ("authorized",)
    reference_params: ClassVar[int] = 11_173_962  # its default architecture, ResNet-18 (victims/resnet.py)
    version: ClassVar[int] = 2  # 2: normalises as the protection fitted θ0 (``input_stats``; UGE: clean statistics)
    arch: str | None = None
    init_seed: int | None = None
    index: int = 0

    def __post_init__(self) -> None:
        if self.arch is not None and (self.arch == "authorized" or self.arch not in VICTIMS):
            raise ValueError(f"authorized arch {self.arch!r} is not a victim (victims: {', '.join(VICTIMS.names())})")
        if self.index < 0 or (self.init_seed is not None and self.init_seed < 0):
            raise ValueError("authorized needs index ≥ 0 and init_seed ≥ 0")

    def build(self, num_classes: int, in_channels: int, image_size: int, models: Models | None = None) -> nn.Module:
        return authorized_start(models or Models(), self.arch, self.init_seed, self.index, num_classes, in_channels,
                                image_size)

    def input_stats(self, models: Models | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        return authorized_stats(models or Models())


