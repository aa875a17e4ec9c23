"""``bench weights``: every pretrained weight a matrix's cells need, where each would come from now (a local
``$BENCH_*`` path, the hub's or torch's cache, a download at run time, or nowhere), its size and licence; with
``--download``, fetched into the cache beforehand (on a login node, for compute nodes run with ``--offline``).

Nothing here reaches the network except ``--download``. ``--offline`` (here and on ``bench run``) sets
``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` in the environment, so every worker inherits it.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import sys
from pathlib import PurePosixPath

from bench.core.exchange import OFFLINE_VARIABLES, Pretrained, WeightsSource, hub_cache_dir, hub_offline
from bench.core.registry import ConfigError

HEADERS = ("weights", "env", "source now", "size (MB)", "licence", "needed by", "cells")
SHOWN = {"local": "local: {}", "hub-cache": "cache: {}", "download": "download at run time: {}", "missing": "missing"}


@dataclasses.dataclass(frozen=True)
class Need:
    """One distinct weight a matrix needs: where it comes from now, the components and how many cells ask."""

    source: WeightsSource
    components: tuple[str, ...]
    cells: int

    @property
    def weights(self) -> Pretrained:
        return self.source.weights

    def row(self) -> tuple[str, str, str, str, str, str, int]:
        w = self.weights
        return (w.name, f"${w.env}" if w.env else "—", SHOWN[self.source.kind].format(self.source.where),
                f"{w.size_mb:,.0f}" if w.size_mb else "?", w.licence or "?", ", ".join(self.components), self.cells)


def offline_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--offline`` to a command's parser (``bench run``, ``bench weights``)."""
    parser.add_argument("--offline", action="store_true",
                        help="never reach the hub: pretrained weights only from $BENCH_* paths or the hub cache "
                             "(sets HF_HUB_OFFLINE=1 for every job); cells whose weights are elsewhere are refused")


def apply_offline(args: argparse.Namespace) -> None:
    """With ``--offline``: set the offline variables here (workers inherit them) and in a loaded huggingface_hub."""
    if not getattr(args, "offline", False):
        return
    for variable in OFFLINE_VARIABLES:
        os.environ[variable] = "1"
    if "huggingface_hub.constants" in sys.modules:  # it reads the variable once, at import
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench weights`` on the CLI's subcommands."""
    parser = commands.add_parser("weights", help="list the pretrained weights a matrix needs (where from, size, "
                                 "licence); --download fetches them into the hub cache")
    parser.add_argument("--matrix", required=True, help="a name in bench/matrices/ or a .toml path")
    parser.add_argument("--download", action="store_true",
                        help="fetch every weight not at a local path into the hub cache (only the files bench loads); "
                             "needs the network: run it on a login node")
    parser.add_argument("--plugins", action="append", default=[], metavar="PATH|MODULE",
                        help="load these plugins too (repeatable), as `bench run --plugins`")
    offline_flag(parser)
    return parser


def needs(matrix_name: str) -> list[Need]:
    """Each distinct weight the matrix's cells need (components built as the planner builds them), in first-use
    order; one weight asked for by several components (UGE's and DH's CLIP) is one row."""
    from bench.plan.matrix import expand, load_matrix
    from bench.plan.planner import Components

    found: dict[tuple[str, str, str, str], tuple[WeightsSource, list[str], int]] = {}
    for cell in expand(load_matrix(matrix_name)):
        built = Components.of(cell)
        seen: set[tuple[str, str, str, str]] = set()
        for component in (built.protection, built.countermeasure, built.victim):
            for weights in component.pretrained_needed():
                key = (weights.name, weights.env, weights.hub_id, weights.url)
                source, users, cells = found.get(key) or (weights.resolve(), [], 0)
                users += [component.name] if component.name not in users else []
                found[key] = (source, users, cells + (key not in seen))
                seen.add(key)
    return [Need(source, tuple(users), cells) for source, users, cells in found.values()]


def cmd_weights(args: argparse.Namespace) -> int:
    """Print the table (and why any weight is missing); with ``--download``, fetch the downloadable ones first."""
    from tabulate import tabulate

    apply_offline(args)
    if args.download and hub_offline():
        raise ConfigError("--download fetches from the hub, but the hub is offline here (--offline, HF_HUB_OFFLINE "
                          "or TRANSFORMERS_OFFLINE is set): run it on a connected machine (a login node) without them")
    rows = needs(args.matrix)
    failed = [need for need in rows if args.download and not fetch(need)]
    rows = needs(args.matrix) if args.download else rows
    if not rows:
        print(f"matrix {args.matrix}: no cell needs pretrained weights")
        return 0
    print(tabulate([need.row() for need in rows], headers=HEADERS, tablefmt="github", disable_numparse=True))
    fetch_now = [need for need in rows if need.source.kind == "download"]
    if fetch_now:
        print(f"\n{len(fetch_now)} to download at run time (about {sum(n.weights.size_mb for n in fetch_now):,.0f} "
              f"MB, into {hub_cache_dir()} or torch's hub cache); fetch them now with `bench weights --matrix "
              f"{args.matrix} --download`")
    for need in rows:
        if need.source.kind == "missing":
            print(f"\n{need.weights.missing()}")
    return 1 if failed else 0


def fetch(need: Need) -> bool:
    """Fetch one weight into the hub cache (only the files bench loads) or torch's (a URL); False on failure."""
    weights = need.weights
    if need.source.kind not in ("download", "hub-cache"):  # at its $env path, or nowhere to fetch it from
        return True
    print(f"fetching {weights.name} from {weights.hub_id or weights.url} …", flush=True)
    try:
        if weights.url:
            import torch.hub

            torch.hub.load_state_dict_from_url(weights.url, map_location="cpu", progress=True, check_hash=True,
                                               weights_only=True)
        else:
            import huggingface_hub

            files = huggingface_hub.list_repo_files(weights.hub_id)
            huggingface_hub.snapshot_download(weights.hub_id, allow_patterns=patterns(weights, files) or None,
                                              cache_dir=hub_cache_dir())
    except Exception as err:  # network, authentication (gated repositories), disk
        print(f"bench: fetching {weights.name} failed: {type(err).__name__}: {err}", file=sys.stderr)
        return False
    return True


def patterns(weights: Pretrained, files: list[str]) -> list[str]:
    """The repository's files that ``weights.allow`` names (all where it names none), a ``.bin`` dropped where
    its folder has ``.safetensors`` (transformers and diffusers load those first)."""
    chosen = [f for f in files if not weights.allow or any(fnmatch.fnmatch(f, p) for p in weights.allow)]
    safe = {PurePosixPath(f).parent for f in chosen if f.endswith(".safetensors")}
    return [f for f in chosen if not (f.endswith(".bin") and PurePosixPath(f).parent in safe)]
