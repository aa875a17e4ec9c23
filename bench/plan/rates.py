"""The rate tables of the cost estimate (``bench.plan.estimate``): training speed per victim and device kind, the
work of fitting each expensive component, its budget parameters, and how a victim's compute grows with resolution.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import torch

from bench.core.components import COUNTERMEASURES, PROTECTIONS, VICTIMS
from bench.core.registry import is_builtin
from bench.data.datasets import outline_of

# Training 32-px images/s of bench's loop. cpu: a 1-thread fp32 step (batch 64) on the 2-core dev machine, scaled so
# cnn matches dh-table1-cpu's ≈ 100 s per `cpu`-recipe cell; cuda: rough guesses for one H100-class GPU (bf16,
# channels_last), not measured here. A victim not listed counts as resnet18.
TRAIN_RATE = {"cpu": dict(cnn=400, lenet=8000, resnet20=350, resnet32=210, resnet18=38, resnet50=9, vgg11=160, vgg19=50,
                          densenet121=13, mobilenetv2=80, shufflenetv2=165, vit=35),
              "cuda": dict(cnn=60000, lenet=100000, resnet20=30000, resnet32=20000, resnet18=25000, resnet50=8000,
                           vgg11=40000, vgg19=20000, densenet121=5000, mobilenetv2=15000, shufflenetv2=15000, vit=15000)}
# Protect/purify work per train image, in training images of the component's surrogate (the plain CNN where it has
# none), at ``BUDGETS``: the CPU matrices' fits on 500 images (README; EM 99 s, TAP 182 s, REM 936 s, DH 578 s, AR 7 s
# in results/runs/dh-table1-cpu, ConfounderGAN 597 s, UGE 400 s) ÷ that CPU's training factor (0.59, recorded/
# TRAIN_RATE); unlisted components are ≈ free (filters, JPEG…). distill: its teacher's 80 `cpu`-recipe epochs.
# sep and eclipse: coverage-cpu's fits (SEP 179 s, ECLIPSE's DDPM ≈ 600 s + 38 s a purified set, on a CPU that ran
# the `cpu` recipe's cells in 71 s, so ×1.4 to the table's CPU).
WORK_PER_IMAGE = dict(em=135, tap=250, rem=1270, confoundergan=810, uge=475, dh=785, ar=9, diffpure=100, dncnn=200,
                      dncnn_reference=200, dvae=200, orthogonal_projection=10, distill=80, sep=200, eclipse=720)
REFERENCE_IMAGES = 500  # the train images WORK_PER_IMAGE was measured on


@dataclasses.dataclass(frozen=True)
class Term:
    """A share of a component's ``WORK_PER_IMAGE`` that scales with each of ``params`` (value / the reference value
    the table was measured at, multiplied) and with the images, unless ``fixed`` (a set number of iterations)."""

    share: float
    params: tuple[tuple[str, float], ...]
    fixed: bool = False


# The budget parameters that dominate a component's work, at the CPU matrices' settings the table stands for (the
# rest of its work scales with the images only). Shares: rough splits of the fits (surrogate epochs vs the rest).
BUDGETS: dict[str, tuple[Term, ...]] = {
    "tap": (Term(0.5, (("surrogate_epochs", 80),)), Term(0.5, (("steps", 250), ("restarts", 1)))),
    "rem": (Term(0.5, (("train_steps", 500), ("adv_steps", 2))), Term(0.5, (("steps", 5), ("samples", 1)))),
    "em": (Term(0.8, (("model_steps", 10),)),),
    "confoundergan": (Term(0.9, (("epochs", 200),)), Term(0.1, (("surrogate_epochs", 80),))),
    "uge": (Term(0.75, (("epochs", 20),)), Term(0.25, (("encoder_epochs", 80),))),
    "dh": (Term(0.9, (("iterations", 1000), ("blocks", 4), ("batch_size", 24)), fixed=True),
           Term(0.1, (("extractor_epochs", 40),))),
    "dncnn": (Term(1.0, (("epochs", 60),)),), "dvae": (Term(1.0, (("epochs", 20),)),),
    "diffpure": (Term(0.9, (("train_steps", 500), ("train_batch_size", 64)), fixed=True),),
    # SEP: the attack is checkpoints × steps passes (None checkpoints count at the reference); ECLIPSE: its DDPM's
    # FLOPs grow with the width squared (listed twice)
    "sep": (Term(0.15, (("surrogate_epochs", 30),)), Term(0.85, (("steps", 30), ("checkpoints", 10)))),
    "eclipse": (Term(0.94, (("train_steps", 500), ("train_batch_size", 64), ("train_width", 32), ("train_width", 32)),
                     fixed=True), Term(0.06, (("steps", 10),))),
}


def budget(name: str, params: dict[str, Any], images: int, shared: bool = False) -> float:
    """A component's work relative to ``WORK_PER_IMAGE`` × ``images`` at the reference budget (``BUDGETS``); a
    parameter left out or None counts at its reference. ``shared``: a set after the first of the same component on
    the same data, whose fixed terms (an attacker's DDPM, trained once and cached) are already paid."""
    terms = BUDGETS.get(name, ())
    scale = 1 - sum(t.share for t in terms)
    for term in terms:
        ratio = math.prod(float(params.get(p) or ref) / ref for p, ref in term.params)
        paid = term.fixed and shared
        scale += 0 if paid else term.share * ratio * (REFERENCE_IMAGES / max(images, 1) if term.fixed else 1)
    return scale


def table_set_seconds(name: str, params: dict[str, Any], images: float, stage: str, kind: str,
                      shared: bool = False) -> float:
    """Seconds the rate tables give a protected (``protect``) or purified (``purify``) set of ``images`` (32-px
    images' work: see ``set_images``; ``shared`` as ``budget``'s)."""
    component = (PROTECTIONS if stage == "protect" else COUNTERMEASURES).get(name)
    defaults = {f.name: f.default for f in dataclasses.fields(component) if f.default is not dataclasses.MISSING}
    params = {**defaults, **params}
    work = WORK_PER_IMAGE.get(name, 0) * images * budget(name, params, images, shared)
    return work / train_rate(kind, surrogate(stage, name, params))


def train_rate(kind: str, victim: str, params: dict[str, Any] | None = None) -> float:
    rates = TRAIN_RATE[kind if kind in TRAIN_RATE else "cuda"]  # `authorized` trains its `arch`
    return rates.get((params or {}).get("arch") or victim, rates["resnet18"])


def passes(name: str, params: dict[str, Any]) -> float:
    """Forward/backward passes per trained image that a train-stage countermeasure costs."""
    return params["steps"] + 1 if name == "adv_training" else params["repeats"] if name == "ueraser" else 2 if name == "distill" else 1


def surrogate(stage: str, name: str, params: dict[str, Any]) -> str:
    """The victim a protect (``protect``) or purify stage's component trains: its ``surrogate_param``'s (given, else
    its default), else the plain CNN."""
    component = (PROTECTIONS if stage == "protect" else COUNTERMEASURES).get(name)
    chosen = params.get(component.surrogate_param) if component.surrogate_param else None
    default = next((f.default for f in dataclasses.fields(component) if f.name == component.surrogate_param), None)
    found = chosen or default
    return found if isinstance(found, str) else "cnn"


def compute(victim: str, params: dict[str, Any], dataset: str, dataset_params: dict[str, Any]) -> float:
    """The victim's training work per image of ``dataset`` relative to a 32-px image (the rate tables' unit)."""
    outline = outline_of(dataset, dataset_params)
    return _relative_flops(victim, json.dumps(params, sort_keys=True, default=str), outline.channels, outline.side)


@functools.lru_cache(maxsize=256)
def _relative_flops(victim: str, params: str, channels: int, side: int) -> float:
    """Forward FLOPs at ``side`` with ``params`` over the default build's at 32 px, counted on the meta device (no
    memory, no compute): ≈ 49 at 224 px for a plain CNN or VGG, ≈ 3.3 for ResNets (ImageNet stems above 64 px). For a plugin's victim (planning
    runs none of a plugin's code) or one that cannot be built so (it needs fitted models): the pixels' ratio."""
    if victim not in VICTIMS.names() or not is_builtin(VICTIMS.get(victim)):
        return (side / 32) ** 2
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    try:  # the rate tables' unit is the default build at 32 px: parameters that change the work (``weights``) count
        for size, kwargs in ((32, "{}"), (side, params)):
            with torch.device("meta"):
                model, x = VICTIMS.create(victim, **json.loads(kwargs)).build(10, channels, size), torch.empty(1, channels, size, size)
            with FlopCounterMode(display=False) as counter:
                model(x)
            counts.append(counter.get_total_flops())
    except Exception:  # noqa: BLE001  (any victim that needs more than its parameters: the plain estimate)
        return (side / 32) ** 2
    return counts[1] / max(counts[0], 1)
