"""The in-process checks of ``bench selfcheck``: every registered protection, countermeasure and victim at its
``test_params`` (tiny, weights-free budgets) on the device, outputs compared with a CPU run where the result must
not depend on the device, the environment, the host syncs per training step and the loops' throughput; and the
plugin of victims that inject faults into ``bench run`` (``FAULTS_PLUGIN``).

Each check returns a one-line summary, raises ``Skipped`` where it cannot run here (saying why), and raises
anything else where it fails.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any

import torch

from bench.core.components import (COUNTERMEASURES, DATA, PROTECTIONS, TRAIN, VICTIMS, Countermeasure, Fitted, ImageSet,
                                   Models, Protection, TrainHooks)
from bench.core.registry import Registry
from bench.data import mixes
from bench.data.datasets import DATASETS, Cifar10Jpeg
from bench.execute.train import resolve_precision, train_and_evaluate
from bench.plan.recipes import make_recipe

CPU = torch.device("cpu")
# data-stage countermeasures that fit nothing yet compute in float on the device (a fitted linear model): their
# bytes may differ from a CPU run's, so they are not held to it
DEVICE_DEPENDENT = frozenset({"orthogonal_projection"})
FAULTS_PLUGIN = '''"""Fault injection for bench selfcheck."""
import os
import re
import signal

import torch
from torch import nn

from bench.api import VICTIMS, Victim


class _Assert(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.head = nn.Linear(1, classes)

    def forward(self, x):
        if x.is_cuda:  # an out-of-range index: a device-side assert, which poisons the CUDA context
            x = x + x.flatten()[torch.full((1,), 1 << 40, device=x.device)].sum()
        return self.head(x.mean((1, 2, 3))[:, None])


@VICTIMS.register("selfcheck_sigkill")
class SigkillVictim(Victim):
    """The process that builds it dies (SIGKILL), as a worker killed by the OOM killer or a node's loss does."""

    def build(self, num_classes, in_channels, image_size):
        os.kill(os.getpid(), signal.SIGKILL)


@VICTIMS.register("selfcheck_assert")
class AssertVictim(Victim):
    """Its forward pass triggers a CUDA device-side assert."""

    def build(self, num_classes, in_channels, image_size):
        return _Assert(num_classes)
'''


class Skipped(Exception):
    """A check that cannot run here; its message says why."""


@dataclasses.dataclass(frozen=True)
class Found:
    """What earlier checks made and later ones use: fitted protections and countermeasures by name."""

    protected: dict[str, Fitted] = dataclasses.field(default_factory=dict)
    purified: dict[str, Fitted] = dataclasses.field(default_factory=dict)

    def models(self, kinds: tuple[str, ...]) -> dict[str, torch.nn.Module]:
        """The first fitted protection model of each of ``kinds`` that some protection fitted."""
        out: dict[str, torch.nn.Module] = {}
        for fitted in self.protected.values():
            out.update({k: m for k, m in fitted.models.items() if k in kinds and k not in out})
        return out


def load_data(per_class: int, test_per_class: int) -> tuple[ImageSet, ImageSet, str]:
    """CIFAR-10 JPEG where found, else the digits at 32 px as RGB (for colour countermeasures); and its name."""
    if any(path.is_file() for path in Cifar10Jpeg().candidates()):
        train, test = DATASETS.create("cifar10-jpeg", per_class=per_class, test_per_class=test_per_class).load()
        return train, test, "cifar10-jpeg"
    train, test = DATASETS.create("digits", size=32, per_class=per_class, test_per_class=test_per_class).load()

    def rgb(data: ImageSet) -> ImageSet:
        return ImageSet(data.images.expand(-1, 3, -1, -1).contiguous(), data.labels, data.num_classes)

    return rgb(train), rgb(test), "digits"


def environment(device: torch.device) -> str:
    """Versions, the device and what ``precision = "auto"`` resolves to there."""
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"device {device}",
             f"auto precision {resolve_precision('auto', device)}", f"threads {torch.get_num_threads()}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        parts += [props.name, f"sm {props.major}.{props.minor}", f"{props.total_memory / 2**30:.0f} GiB",
                  f"CUDA {torch.version.cuda}", f"cuDNN {torch.backends.cudnn.version()}",
                  f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}"]
    return ", ".join(parts)


def create(registry: Registry, name: str, tmp: str) -> Any:
    """``name`` at its ``test_params``; Skipped where its tests cannot run it or its weights are missing.
    A ``cache`` parameter points into ``tmp`` (so that a cached model never hides the device's training)."""
    cls = registry.get(name)
    if cls.test_skip:
        raise Skipped(cls.test_skip)
    cache = {"cache": f"{tmp}/{name}"} if "cache" in {f.name for f in dataclasses.fields(cls)} else {}
    component = registry.create(name, **{**cls.test_params, **cache})
    if missing := [w.name for w in component.pretrained_needed() if not w.resolve().available]:
        raise Skipped(f"needs {', '.join(missing)} weights")
    return component


def device_free(component: Protection | Countermeasure) -> bool:
    """Whether its output must be byte-identical on any device: it fits, trains and loads nothing."""
    cls = type(component)
    plain = not (cls.fits or cls.surrogate_param or cls.expensive_on_cpu or cls.pretrained)
    if isinstance(component, Protection):
        return plain and not cls.identity
    return plain and DATA in cls.stages and not (cls.needs_attacker or cls.returns_subset or cls.name in DEVICE_DEPENDENT)


def contract(before: ImageSet, after: ImageSet, subset: bool = False) -> str:
    """uint8 on the CPU, the input's shape and labels (a subset: fewer images of its shape); the change made."""
    assert after.images.device == CPU and after.labels.device == CPU, "the output was left on the device"
    assert after.images.dtype == torch.uint8, f"output dtype {after.images.dtype}, not uint8"
    if subset:
        assert after.images.shape[1:] == before.images.shape[1:] and 0 < len(after) <= len(before)
        return f"{len(after)} of {len(before)} images kept"
    assert after.images.shape == before.images.shape and torch.equal(after.labels, before.labels), "shape/labels"
    return f"{(after.images != before.images).float().mean():.0%} of pixels changed"


def _same_as_cpu(component: Any, data: ImageSet, out: ImageSet, run: str) -> str:
    cpu = getattr(component, run)(data, seed=0, device=CPU)
    differ = int((cpu.images != out.images).sum())
    assert differ == 0, f"{differ} pixels differ from the CPU run (a device-free component)"
    return "0 pixels differ from CPU"


def protect(name: str, train: ImageSet, device: torch.device, found: Found, tmp: str) -> str:
    """Fit ``name`` on the device; its contract, its encryption of unseen images, and the CPU's bytes."""
    protection = create(PROTECTIONS, name, tmp)
    fitted = protection.fit(train, seed=0, device=device)
    info = [contract(train, fitted.data)]
    found.protected[name] = fitted
    if fitted.models:
        info.append(f"fitted {', '.join(sorted(fitted.models))}")
    if protection.encrypts_unseen:
        images = train.images[:16]
        labels = {"labels": train.labels[:16]} if protection.encrypt_needs_labels else {}
        out = protection.encrypt(_on(fitted.models, device), images, device=device, **labels)
        assert out.device == CPU and out.dtype == torch.uint8 and out.shape == images.shape, "encrypt's output"
        info.append("encrypts unseen images")
    if device_free(protection):
        info.append(_same_as_cpu(protection, train, fitted.data, "protect"))
    return "; ".join(info)


def purify(name: str, protected: ImageSet, device: torch.device, found: Found, tmp: str) -> str:
    """The data stage of ``name`` on the device (an adaptive attacker and models where it needs them)."""
    countermeasure = create(COUNTERMEASURES, name, tmp)
    if DATA not in countermeasure.stages:
        raise Skipped("no data stage" + (" (train stage: see hooks)" if TRAIN in countermeasure.stages else
                                         " nor train stage: nothing to run"))
    needs: dict[str, Any] = models_for(countermeasure, found, device)
    if countermeasure.needs_attacker:
        needs["attacker"] = _attacker(protected, found, device)
    fitted = countermeasure.fit(protected, seed=0, device=device, **needs)
    found.purified[name] = fitted
    info = [contract(protected, fitted.data, subset=countermeasure.returns_subset)]
    if device_free(countermeasure):
        info.append(_same_as_cpu(countermeasure, protected, fitted.data, "purify"))
    return "; ".join(info)


def hooks(name: str, train: ImageSet, test: ImageSet, device: torch.device, found: Found, steps: tuple[int, int],
          tmp: str) -> str:
    """A few training steps of ``cnn`` with the train-stage hooks of ``name``."""
    countermeasure = create(COUNTERMEASURES, name, tmp)
    if TRAIN not in countermeasure.stages:
        raise Skipped("no train stage" + (" (data stage: see purify)" if DATA in countermeasure.stages else
                                          " nor data stage: nothing to run"))
    if countermeasure.fits and name not in found.purified:
        raise Skipped(f"its data stage fits {', '.join(countermeasure.fits)}, which did not run (see purify)")
    made = countermeasure.train_hooks(train.num_classes, train.size, **models_for(countermeasure, found, device, True))
    assert made != TrainHooks(), "the train stage gives no hooks"
    return tiny_train("cnn", train, test, device, steps, hooks=made, width=8)


def victim(name: str, train: ImageSet, test: ImageSet, device: torch.device, found: Found, steps: tuple[int, int],
           tmp: str) -> str:
    """A few training steps of victim ``name`` (bench's loop: its precision, channels_last) and an evaluation."""
    create(VICTIMS, name, tmp)
    return tiny_train(name, train, test, device, steps, found=found, **VICTIMS.get(name).test_params)


def tiny_train(name: str, train: ImageSet, test: ImageSet, device: torch.device, steps: tuple[int, int],
               hooks: TrainHooks | None = None, found: Found | None = None, **params: Any) -> str:
    """``steps`` = (optimiser steps, batch size) of victim ``name`` in bench's loop; its weights must stay finite."""
    component = VICTIMS.create(name, **params)
    needs = models_for(component, found or Found(), device)
    model = component.build(train.num_classes, train.channels, train.size, **needs)
    recipe = make_recipe("quick", iterations=steps[0], batch_size=steps[1])
    result = train_and_evaluate(model, train, test, recipe, seed=0, device=device, augment="crop_flip", hooks=hooks)
    assert all(torch.isfinite(p).all() for p in result["model"].parameters()), "non-finite weights"
    return f"{result['steps']} steps {result['precision']}, test acc {result['final']:.2f}"


def models_for(component: Any, found: Found, device: torch.device, own: bool = False) -> dict[str, Models]:
    """``{"models": …}`` as the harness gives them (``bench.execute.stages``): the protection models it needs or
    uses, and with ``own`` those its data stage fitted; Skipped where a needed one was fitted by no protection."""
    cls = type(component)
    own_kinds = cls.fits if own else ()
    if not (cls.needs_models or cls.uses_models or own_kinds):
        return {}
    models = found.models(cls.needs_models + cls.uses_models)
    if missing := [k for k in cls.needs_models if k not in models]:
        raise Skipped(f"needs the {', '.join(missing)} model of a protection that fits one (none fitted here)")
    if own_kinds:
        models.update(found.purified[cls.name].models)
    return {"models": _on(models, device)}


def _on(models: Any, device: torch.device) -> Models:
    return Models({kind: model.to(device) for kind, model in dict(models).items()})


def _attacker(protected: ImageSet, found: Found, device: torch.device) -> Any:
    """An adaptive attacker that encrypts with a fitted protection's models (on the device) where one encrypts
    unseen images, else one that runs ``random_noise`` on its own images."""
    name = next((n for n, f in found.protected.items() if PROTECTIONS.get(n).encrypts_unseen and f.models),
                "random_noise")
    protection = PROTECTIONS.create(name, **PROTECTIONS.get(name).test_params)
    models = _on(found.protected[name].models, device) if name in found.protected else Models()
    sets = mixes.TrainSet(protected, protected, torch.ones(len(protected), dtype=torch.bool))
    return mixes.attacker(protection, models, sets, seed=0, device=device)


def host_syncs(train: ImageSet, test: ImageSet, device: torch.device, steps: int) -> str:
    """Host syncs per step of bench's loop (``cnn``, batch 32), counted by ``bench.execute.syncs``; the count of
    a 1-step run (set-up, the evaluation) is taken off."""
    if device.type != "cuda":
        raise Skipped("needs CUDA")
    from bench.execute.syncs import count_host_syncs

    tiny_train("cnn", train, test, device, (2, 32), width=8)  # warm-up: first-call syncs are not the loop's
    one, many = (count_host_syncs(lambda n=n: tiny_train("cnn", train, test, device, (n, 32), width=8))
                 for n in (1, 1 + steps))
    return f"{many - one} syncs in {steps} steps: {(many - one) / steps:.1f} per step ({one} in set-up and evaluation)"


def perf(victim: str, device: torch.device, sizes: Any) -> str:
    """images/s of bench's loop, the reference and the plain loop after a warm-up; ratios at one precision."""
    from bench.execute.perf import PerfSettings, measure

    train, test, _ = load_data(sizes.perf_per_class, 10)
    settings = PerfSettings((victim,), per_class=sizes.perf_per_class, epochs=sizes.perf_epochs,
                            batch_size=128, repeats=sizes.perf_repeats, workers=sizes.perf_workers)
    row = measure(victim, train, test, settings, device)
    return (f"{len(train)} images × {sizes.perf_epochs} epochs: reference {row['reference_images_per_s']:.0f}, "
            f"bench {row['bench_images_per_s']:.0f} ({row['bench_precision']}), bench fp32 "
            f"{row['bench_fp32_images_per_s']:.0f}, plain {row['plain_images_per_s']:.0f} img/s; bench fp32/reference "
            f"{row['ratio']:.2f}, bench/plain {row['ratio_plain']:.2f}")
