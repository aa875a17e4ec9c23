"""The stages of one cell (``bench.execute.stages``), run in-process on a tiny digits cache: what protect, purify
and train write to the cache and the record, the checks each makes of a component's output (with errors naming
the component and the problem), the models each hands on, and how an OS error is recognised as the storage's.

Jobs are planned by the planner (``plan_cell``) on 6 digits a class; test components (registered for this module
only) report the seed, device, models and attacker they were given, so that each wire of a stage is observable.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from bench.core.components import COUNTERMEASURES, PROTECTIONS, VICTIMS, Countermeasure, Protection, Victim
from bench.core.exchange import Fitted, ImageSet, Models, TrainHooks
from bench.data import mixes
from bench.data.datasets import DATASETS
from bench.execute import stages
from bench.execute.metrics import perturbation_metrics
from bench.execute.stages import (
    STORAGE_ERRNOS,
    ProtectJob,
    PurifyJob,
    SetBuilt,
    TrainJob,
    failed_record,
    identity,
    protect_job,
    purify_job,
    stage_reports,
    storage_failure,
    train_job,
)
from bench.plan.matrix import Cell, Choice
from bench.plan.planner import Plan, plan_cell, prepare_dataset
from bench.plan.recipes import make_recipe
from bench.store.artifacts import load_models
from bench.store.cache import Cache, library_versions
from bench.store.records import Made

CPU, META = torch.device("cpu"), torch.device("meta")
DIGITS = Choice("digits", (("per_class", 6), ("test_per_class", 3)), "digits")  # 60 train, 30 test images
RECIPE = {"name": "quick", "epochs": 2, "batch_size": 32}
HOOK_CALLS: list[dict[str, Any]] = []  # what ModelProbe.train_hooks was given, and the epochs its hooks saw
VICTIM_CALLS: list[tuple] = []  # what KeyedVictim.build and input_stats were given


# ------------------------------------------------------------------ test components


def _key_model(key: int) -> nn.Module:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(float(key))
    model.arch = {"key": key}
    return model


def _shift(images: torch.Tensor, key: int) -> torch.Tensor:
    return ((images.to(torch.int32) + key) % 256).to(torch.uint8)


class KeyedShift(Protection):
    """Adds a key (seed + step) to every pixel, fitting a ``key`` model that encrypts unseen images alike; its info
    reports the seed, device and number of images it was fitted with."""
    paper: ClassVar[str] = "test protection"
    fits: ClassVar[tuple[str, ...]] = ("key",)
    encrypts_unseen: ClassVar[bool] = True
    step: int = 1

    def fit(self, train: ImageSet, *, seed: int, device: torch.device) -> Fitted:
        key = seed % 50 + self.step
        return Fitted(train.with_images(_shift(train.images, key), seed=seed, device=str(device), fitted=len(train)),
                      Models({"key": _key_model(key)}))

    def encrypt(self, models: Models, images: torch.Tensor, *, device: torch.device) -> torch.Tensor:
        model = models["key"]
        if model.weight.device.type != torch.device(device).type:
            raise RuntimeError(f"key model on {model.weight.device}, not on {device}")
        return _shift(images, model.arch["key"])

    @classmethod
    def build_model(cls, kind: str, arch: dict[str, Any]) -> nn.Module:
        return _key_model(arch["key"])


class Relabel(Protection):
    """Breaks the contract: shifts every label."""
    paper: ClassVar[str] = "test protection"

    def protect(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        return ImageSet(train.images.clone(), (train.labels + 1) % train.num_classes, train.num_classes)


class WrongModels(Protection):
    """Breaks the contract: declares a ``key`` model and returns a ``lock`` one."""
    paper: ClassVar[str] = "test protection"
    fits: ClassVar[tuple[str, ...]] = ("key",)

    def fit(self, train: ImageSet, *, seed: int, device: torch.device) -> Fitted:
        return Fitted(train.with_images(train.images.clone()), Models({"lock": _key_model(0)}))

    @classmethod
    def build_model(cls, kind: str, arch: dict[str, Any]) -> nn.Module:
        return _key_model(arch["key"])


class AttackProbe(Countermeasure):
    """A data stage whose output is what its attacker's protection makes of the attacker's natural images; its info
    says how the attacker protects, and the seed, device and ``tag`` it was given."""
    paper: ClassVar[str] = "test countermeasure"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})
    needs_attacker: ClassVar[bool] = True
    tag: int = 0

    def purify(self, train: ImageSet, *, seed: int, device: torch.device, attacker: Any) -> ImageSet:
        attacked = attacker.protect(attacker.clean)
        return train.with_images(attacked.images, how=attacker.how, tag=self.tag, seed=seed, device=str(device))


class ModelProbe(Countermeasure):
    """Needs the protection's ``key`` model in its data stage, fits a ``teacher`` there and gets both back in its
    train hooks (recorded in ``HOOK_CALLS``); its info lists the models and their device."""
    paper: ClassVar[str] = "test countermeasure"
    stages: ClassVar[frozenset[str]] = frozenset({"data", "train"})
    needs_models: ClassVar[tuple[str, ...]] = ("key",)
    fits: ClassVar[tuple[str, ...]] = ("teacher",)

    def fit(self, train: ImageSet, *, seed: int, device: torch.device, models: Models) -> Fitted:
        devices = sorted({m.weight.device.type for m in models.values()})
        return Fitted(train.with_images(train.images.clone(), models=sorted(models), on=devices,
                                        key=models["key"].arch["key"]), Models({"teacher": _key_model(seed + 100)}))

    def train_hooks(self, num_classes: int, image_size: int, models: Models) -> TrainHooks:
        HOOK_CALLS.append({"num_classes": num_classes, "image_size": image_size, "keys": _keys(models), "epochs": []})
        return TrainHooks(epoch_start=lambda epoch, epochs: HOOK_CALLS[-1]["epochs"].append((epoch, epochs)))

    @classmethod
    def build_model(cls, kind: str, arch: dict[str, Any]) -> nn.Module:
        return _key_model(arch["key"])


class Halve(Countermeasure):
    """A data stage that ``returns_subset``: the first half of the train set."""
    paper: ClassVar[str] = "test countermeasure"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})
    returns_subset: ClassVar[bool] = True

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        return train.subset(torch.arange(len(train) // 2))


class RelabelData(Countermeasure):
    """Breaks the contract in the data stage: shifts every label."""
    paper: ClassVar[str] = "test countermeasure"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})

    def purify(self, train: ImageSet, *, seed: int, device: torch.device) -> ImageSet:
        return ImageSet(train.images, (train.labels + 1) % train.num_classes, train.num_classes)


def _keys(models: Models | None) -> dict[str, int] | None:
    return None if models is None else {kind: model.arch["key"] for kind, model in models.items()}


class KeyedVictim(Victim):
    """A width-4 plain CNN that uses the protection's ``key`` model (or ``authorized``) where it fits one, and
    records what its build and input statistics were given (``VICTIM_CALLS``)."""
    paper: ClassVar[str] = "test victim"
    uses_models: ClassVar[tuple[str, ...]] = ("key", "authorized")

    def build(self, num_classes: int, in_channels: int, image_size: int, models: Models | None = None) -> nn.Module:
        VICTIM_CALLS.append(("build", num_classes, in_channels, image_size, _keys(models)))
        return VICTIMS.create("cnn", width=4).build(num_classes, in_channels, image_size)

    def input_stats(self, models: Models | None = None) -> None:
        VICTIM_CALLS.append(("stats", _keys(models)))  # None: the train set's own statistics


ADDED = {PROTECTIONS: {"keyed_shift_st": KeyedShift, "relabel_st": Relabel, "wrong_models_st": WrongModels},
         COUNTERMEASURES: {"attack_probe_st": AttackProbe, "model_probe_st": ModelProbe, "halve_st": Halve,
                           "relabel_data_st": RelabelData},
         VICTIMS: {"keyed_cnn_st": KeyedVictim}}


@pytest.fixture(scope="module", autouse=True)
def _components():
    """The test components, registered for this module only."""
    for registry, classes in ADDED.items():
        for name, cls in classes.items():
            registry.register(name)(cls)
    yield
    for registry, classes in ADDED.items():
        for name in classes:
            registry._classes.pop(name, None)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, str]:
    """A cache holding the digits' train and test sets, and their dataset key."""
    root = tmp_path_factory.mktemp("base") / "cache"
    return root, prepare_dataset(Cache(root), DIGITS)


@pytest.fixture
def world(base, tmp_path) -> tuple[Cache, str]:
    """A fresh copy of the base cache for one test."""
    shutil.copytree(base[0], tmp_path / "cache")
    return Cache(tmp_path / "cache"), base[1]


def choice(name: str, label: str | None = None, **params: Any) -> Choice:
    return Choice(name, tuple(params.items()), label or name)


def plan_of(world: tuple[Cache, str], protection: Choice | None = None, countermeasure: Choice | None = None,
            seed: int = 0, ratio: float = 1.0, mix: str = "protected", victim: Choice | None = None) -> Plan:
    """The planner's plan of a digits cell (default: cwp × none × a width-4 CNN)."""
    cell = Cell(DIGITS, protection or choice("cwp", size_fraction=0.375), countermeasure or choice("none"),
                victim or choice("cnn", width=4), seed, ratio, mix)
    return plan_cell(cell, {DIGITS: world[1]}, RECIPE)


def protect(world: tuple[Cache, str], plan: Plan, device: torch.device = CPU, redo: bool = False,
            threads: int = 1) -> SetBuilt:
    cell = plan.cell
    return protect_job(ProtectJob(world[0].root, threads, plan.protection_key, plan.crafting_key, cell.protection,
                                  cell.seed, mixes.fitted_on(cell.mix, cell.poison_ratio), plan.protection_fits,
                                  redo=redo), device)


def train_of(world: tuple[Cache, str], plan: Plan, upstream: str | None = None, **options: Any) -> TrainJob:
    return TrainJob(world[0].root, options.pop("threads", 2), plan, "m", {**RECIPE, **options.pop("recipe", {})},
                    upstream, options.pop("show_epochs", False), **options)


def images(cache: Cache, kind: str, key: str) -> torch.Tensor:
    data = cache.load(kind, key)
    assert data is not None, f"no valid {kind}/{key}"
    return data.images


def clean_train(world: tuple[Cache, str]) -> ImageSet:
    data = world[0].load("dataset", f"{world[1]}-train")
    assert data is not None
    return data


# ------------------------------------------------------------------ storage_failure


@pytest.mark.parametrize("code", STORAGE_ERRNOS)
def test_each_storage_errno_is_the_storages_failure_with_its_message_and_path(code):
    """A full disk, a quota, a read-only or forbidden folder, an I/O error: (errno, strerror, path as text)."""
    err = OSError(code, f"strerror {code}", Path("/results/cache/x.npy"))
    assert storage_failure(err) == (code, f"strerror {code}", "/results/cache/x.npy")


def test_a_storage_error_without_a_path_or_strerror_still_names_what_happened():
    """No filename: path None; no strerror: the error's own text is the message."""
    assert storage_failure(OSError(errno.ENOSPC, "No space left on device")) == \
        (errno.ENOSPC, "No space left on device", None)
    bare = OSError("the disk failed")
    bare.errno = errno.EIO
    assert storage_failure(bare) == (errno.EIO, "the disk failed", None)


def test_numpys_short_write_counts_as_a_full_disk():
    """numpy's "N requested and M written" (an OSError without errno) is reported as a full disk, quoting it."""
    err = OSError("800 requested and 400 written")
    assert storage_failure(err) == (None, "No space left on device (800 requested and 400 written)", None)


@pytest.mark.parametrize("err", [
    pytest.param(ValueError("800 requested and 400 written"), id="not-an-OSError"),
    pytest.param(OSError(errno.ENOENT, "No such file", "/x"), id="missing-file"),
    pytest.param(OSError(errno.ENOENT, "nothing was written"), id="other-errno-ending-written"),
    pytest.param(OSError("the disk said no"), id="no-errno"),
    pytest.param(OSError("400 written"), id="written-but-not-requested"),
    pytest.param(OSError("800 requested and 400 written, then more"), id="requested-but-not-ending-written"),
    pytest.param(OSError(errno.ENOENT, "800 requested and 400 written"), id="short-write-text-with-errno"),
])
def test_other_errors_are_not_the_storages(err):
    """Anything else (another errno, another error type, text that only looks alike) is the cell's own failure."""
    assert storage_failure(err) is None


# ------------------------------------------------------------------ job keys and defaults


def test_job_keys_and_defaults(world):
    """A purify job is keyed by its plan's purify key ("" for none), a train job by its cell key; jobs neither
    rebuild nor force determinism unless asked, and a protect job's models default to none."""
    plan = plan_of(world, countermeasure=choice("bdr"))
    assert PurifyJob(world[0].root, 1, plan).key == plan.purify_key and plan.purify_key
    assert PurifyJob(world[0].root, 1, plan_of(world)).key == ""
    job = train_of(world, plan)
    assert job.key == plan.cell_key and (job.redo, job.deterministic) == (False, False)
    assert PurifyJob(world[0].root, 1, plan).redo is False
    protect_defaults = ProtectJob(world[0].root, 1, "k", world[1], plan.cell.protection, 0, None)
    assert (protect_defaults.fits, protect_defaults.redo) == ((), False)


# ------------------------------------------------------------------ protect_job


def test_protect_job_caches_the_protected_set_with_its_manifest(world):
    """The protected set is the protection (with the cell's parameters) run on the clean train set; the manifest
    holds its spec, seed, seconds, device, info (with the number of protected images) and perturbation metrics;
    the job reports its key and the same seconds."""
    cache, _ = world
    plan = plan_of(world, protection=choice("cwp", size_fraction=0.375))
    before = time.perf_counter()
    built = protect(world, plan)
    elapsed = time.perf_counter() - before
    protection = PROTECTIONS.create("cwp", size_fraction=0.375)
    assert protection.spec() != PROTECTIONS.create("cwp").spec()
    clean = clean_train(world)
    expected = protection.fit(clean, seed=0, device=CPU).data
    assert torch.equal(images(cache, "protected", plan.protection_key), expected.images)
    manifest = cache.manifest("protected", plan.protection_key)
    assert manifest["spec"] == protection.spec() and manifest["seed"] == 0 and manifest["device"] == "cpu"
    assert manifest["info"] == {**expected.info, "protected_images": 60}
    assert {k: manifest[k] for k in ("linf", "l2", "psnr")} == perturbation_metrics(clean.images, expected.images)
    assert built == SetBuilt(plan.protection_key, manifest["seconds"])
    assert 0 < built.seconds <= elapsed and built.error is None and built.full is None


def test_protect_job_fits_with_the_jobs_seed_device_and_fitted_part_and_saves_its_models(world):
    """A protection fitted on half of each class (``fit_subset``) gets the job's seed and device, the rest stays
    clean, and the models it fits are saved with the set, loadable by kind."""
    cache, _ = world
    plan = plan_of(world, protection=choice("keyed_shift_st", step=2), seed=3, ratio=0.5, mix="fit_subset")
    protect(world, plan)
    manifest = cache.manifest("protected", plan.protection_key)
    assert manifest["info"] == {"seed": 3, "device": "cpu", "fitted": 30, "fitted_on": 30, "encrypted_unseen": 30,
                                "protected_images": 60}
    assert manifest["spec"]["params"] == {"step": 2} and manifest["seed"] == 3
    assert sorted(manifest["models"]) == ["key"]
    (key_model,) = load_models(cache.path("protected", plan.protection_key), ("key",), CPU).values()
    assert key_model.arch == {"key": 5} and key_model.weight.item() == 5.0
    assert torch.equal(images(cache, "protected", plan.protection_key), _shift(clean_train(world).images, 5))


def test_protect_job_on_another_device_says_so(world):
    """The device the job ran on reaches the protection and the manifest."""
    cache, _ = world
    plan = plan_of(world, protection=choice("keyed_shift_st"))
    protect(world, plan, device=META)
    manifest = cache.manifest("protected", plan.protection_key)
    assert manifest["device"] == "meta" and manifest["info"]["device"] == "meta"


def test_protect_job_keeps_a_concurrent_writers_entry_unless_it_rebuilds(world):
    """A valid entry already at the key (another run's) is kept by a plain job and replaced by a redo."""
    cache, _ = world
    plan = plan_of(world, protection=choice("keyed_shift_st"))
    clean = clean_train(world)
    cache.save("protected", plan.protection_key, clean, {"seconds": 0.0}, models=Models({"key": _key_model(9)}))
    protect(world, plan)
    assert torch.equal(images(cache, "protected", plan.protection_key), clean.images)
    protect(world, plan, redo=True)
    assert torch.equal(images(cache, "protected", plan.protection_key), _shift(clean.images, 1))
    assert cache.manifest("protected", plan.protection_key)["models"]["key"]["arch"] == {"key": 1}


def test_protect_job_refuses_a_protection_that_changes_the_labels(world):
    """Labels changed: the error names the protection by its label and the problem; nothing is cached."""
    cache, _ = world
    plan = plan_of(world, protection=choice("relabel_st", "my-relabel"))
    with pytest.raises(RuntimeError, match="^protection my-relabel changed the shape or the labels of the train set$"):
        protect(world, plan)
    assert cache.load("protected", plan.protection_key) is None


def test_protect_job_refuses_models_other_than_declared(world):
    """Models other than those declared: the error names the protection, its declaration and what it returned."""
    plan = plan_of(world, protection=choice("wrong_models_st"))
    with pytest.raises(RuntimeError, match=r"^wrong_models_st declares fits = \('key',\) but returned models "
                                           r"\['lock'\]$"):
        protect(world, plan)


# ------------------------------------------------------------------ purify_job


def test_purify_job_caches_the_purified_set_with_its_manifest(world):
    """The countermeasure (with the cell's parameters) runs on the assembled train set; the manifest holds its spec,
    the cell's seed, seconds, device and info; the job reports its key and the same seconds."""
    cache, _ = world
    plan = plan_of(world, protection=choice("cwp", size_fraction=0.375), countermeasure=choice("bdr", bits=3), seed=1)
    protect(world, plan)
    before = time.perf_counter()
    built = purify_job(PurifyJob(cache.root, 1, plan), CPU)
    elapsed = time.perf_counter() - before
    countermeasure = COUNTERMEASURES.create("bdr", bits=3)
    assert countermeasure.spec() != COUNTERMEASURES.create("bdr").spec()
    expected = countermeasure.fit(mixes.assemble(cache, plan.source).train, seed=1, device=CPU).data
    assert torch.equal(images(cache, "purified", plan.purify_key), expected.images)
    manifest = cache.manifest("purified", plan.purify_key)
    assert manifest["spec"] == countermeasure.spec() and manifest["seed"] == 1 and manifest["device"] == "cpu"
    assert manifest["info"] == expected.info and manifest["models"] == {}
    assert built == SetBuilt(plan.purify_key, manifest["seconds"]) and 0 < built.seconds <= elapsed


def test_purify_job_gives_the_attacker_the_cells_protection_with_its_parameters(world):
    """An adaptive countermeasure's attacker runs the cell's protection (its parameters, a seed of its own) on
    the attacker's natural images; the countermeasure gets its own parameters, the cell's seed and the device."""
    cache, _ = world
    plan = plan_of(world, protection=choice("cwp", size_fraction=0.375), countermeasure=choice("attack_probe_st", tag=4),
                   seed=2)
    protect(world, plan)
    purify_job(PurifyJob(cache.root, 1, plan), CPU)
    clean = clean_train(world)
    own_run = PROTECTIONS.create("cwp", size_fraction=0.375).protect(clean, seed=2 + mixes.ATTACKER_SEED, device=CPU)
    assert torch.equal(images(cache, "purified", plan.purify_key), own_run.images)
    info = cache.manifest("purified", plan.purify_key)["info"]
    assert info == {"how": f"runs cwp on its own images (seed {2 + mixes.ATTACKER_SEED})", "tag": 4, "seed": 2,
                    "device": "cpu"}


def test_purify_job_attacker_encrypts_with_the_protections_fitted_models(world):
    """Where the protection encrypts unseen images, the attacker encrypts with the models the protect stage
    fitted (loaded from its cache entry, onto the job's device), not with a protection of its own."""
    cache, _ = world
    plan = plan_of(world, protection=choice("keyed_shift_st", step=3), countermeasure=choice("attack_probe_st"), seed=1)
    protect(world, plan)
    purify_job(PurifyJob(cache.root, 1, plan), CPU)
    assert torch.equal(images(cache, "purified", plan.purify_key), _shift(clean_train(world).images, 4))
    assert cache.manifest("purified", plan.purify_key)["info"]["how"] == "encrypts with keyed_shift_st's fitted key"


def test_purify_job_attacker_models_are_on_the_jobs_device(world):
    """On another device the attacker's models are loaded there (the test protection refuses models elsewhere)."""
    cache, _ = world
    plan = plan_of(world, protection=choice("keyed_shift_st"), countermeasure=choice("attack_probe_st"))
    protect(world, plan)
    purify_job(PurifyJob(cache.root, 1, plan), META)
    assert cache.manifest("purified", plan.purify_key)["info"]["device"] == "meta"


def test_purify_job_with_a_clean_protection_attacks_with_the_identity(world):
    """With the clean protection (no protected set, no models) the attacker's protection changes nothing."""
    cache, _ = world
    plan = plan_of(world, protection=choice("clean"), countermeasure=choice("attack_probe_st"))
    assert plan.protection_key is None
    purify_job(PurifyJob(cache.root, 1, plan), CPU)
    assert torch.equal(images(cache, "purified", plan.purify_key), clean_train(world).images)


def test_purify_job_hands_the_protections_models_and_saves_its_own(world):
    """A countermeasure that needs the protection's models gets them (on the job's device); the models it fits
    are saved with the purified set."""
    cache, _ = world
    plan = plan_of(world, protection=choice("keyed_shift_st"), countermeasure=choice("model_probe_st"), seed=5)
    protect(world, plan)
    purify_job(PurifyJob(cache.root, 1, plan), CPU)
    manifest = cache.manifest("purified", plan.purify_key)
    assert manifest["info"] == {"models": ["key"], "on": ["cpu"], "key": 6}
    assert sorted(manifest["models"]) == ["teacher"] and manifest["models"]["teacher"]["arch"] == {"key": 105}
    purify_job(PurifyJob(cache.root, 1, plan, redo=True), META)
    assert cache.manifest("purified", plan.purify_key)["info"]["on"] == ["meta"]


def test_purify_job_keeps_a_concurrent_writers_entry_unless_it_rebuilds(world):
    """A valid entry already at the purify key is kept by a plain job and replaced by a redo."""
    cache, _ = world
    plan = plan_of(world, protection=choice("clean"), countermeasure=choice("bdr", bits=1))
    clean = clean_train(world)
    cache.save("purified", plan.purify_key, clean, {"seconds": 0.0})
    purify_job(PurifyJob(cache.root, 1, plan), CPU)
    assert torch.equal(images(cache, "purified", plan.purify_key), clean.images)
    purify_job(PurifyJob(cache.root, 1, plan, redo=True), CPU)
    assert not torch.equal(images(cache, "purified", plan.purify_key), clean.images)


def test_purify_job_accepts_a_subset_from_a_countermeasure_that_returns_one(world):
    """A ``returns_subset`` countermeasure may return fewer images (the check allows it only for those)."""
    cache, _ = world
    plan = plan_of(world, protection=choice("clean"), countermeasure=choice("halve_st"))
    purify_job(PurifyJob(cache.root, 1, plan), CPU)
    assert torch.equal(images(cache, "purified", plan.purify_key), clean_train(world).images[:30])


# ------------------------------------------------------------------ _check_output, _check_models


def _set(n: int = 4, classes: int = 3, side: int = 2, device: str = "cpu") -> ImageSet:
    return ImageSet(torch.zeros(n, 1, side, side, dtype=torch.uint8, device=device),
                    (torch.arange(n) % classes).to(device), classes)


def test_check_output_requires_the_same_images_and_labels():
    """Same shape and labels pass; another count, image size or label fails, naming the stage."""
    before = _set()
    stages._check_output(before, before.with_images(before.images + 1), "protection p")
    changed = [_set(5), _set(side=3), ImageSet(before.images, before.labels.flip(0), 3)]
    for after in changed:
        with pytest.raises(RuntimeError, match="^protection p changed the shape or the labels of the train set$"):
            stages._check_output(before, after, "protection p")


def test_check_output_of_a_subset_allows_fewer_or_as_many_images_of_the_same_kind():
    """``returns_subset``: fewer or as many images (labels free) pass; more images, another image shape or another
    number of classes fail, naming the stage."""
    before = _set(4)
    for after in (_set(3), _set(4), ImageSet(before.images, before.labels.flip(0), 3)):
        stages._check_output(before, after, "countermeasure c", subset=True)
    for after in (_set(5), _set(4, side=3), _set(4, classes=4)):
        with pytest.raises(RuntimeError, match="^countermeasure c returns_subset but changed the image shape or the "
                                               "classes, or added images$"):
            stages._check_output(before, after, "countermeasure c", subset=True)


@pytest.mark.parametrize("subset", [False, True])
def test_check_output_requires_cpu_tensors(subset):
    """Images or labels left on another device: the error names the stage, the device and the fix."""
    before = _set()
    elsewhere = {"meta (images), meta (labels)": _set(device="meta"),
                 "cpu (images), meta (labels)": ImageSet(before.images, before.labels.to("meta"), 3)}
    for devices, after in elsewhere.items():
        with pytest.raises(RuntimeError, match=rf"^protection p returned tensors on {re.escape(devices)}: components "
                                               r"return CPU tensors; call \.cpu\(\) \(ImageSet\.with_images does\)$"):
            stages._check_output(before, after, "protection p", subset=subset)


def test_check_models_compares_the_declared_and_returned_kinds_as_sets():
    """The same kinds in any order pass; a missing or extra kind fails naming the component and both lists."""
    component = dataclasses.make_dataclass("C", [])()
    component.name, component.fits = "comp", ("b", "a")
    stages._check_models(component, Fitted(_set(), Models({"a": nn.Identity(), "b": nn.Identity()})))
    with pytest.raises(RuntimeError, match=r"^comp declares fits = \('b', 'a'\) but returned models \['a'\]$"):
        stages._check_models(component, Fitted(_set(), Models({"a": nn.Identity()})))
    with pytest.raises(RuntimeError, match=r"returned models \['a', 'b', 'c'\]$"):
        stages._check_models(component, Fitted(_set(), Models({k: nn.Identity() for k in "cba"})))


# ------------------------------------------------------------------ _models_for, stage_reports


def _declares(needs: tuple[str, ...] = (), uses: tuple[str, ...] = (), fits: tuple[str, ...] = ()) -> Any:
    return type("Declares", (), {"needs_models": needs, "uses_models": uses, "fits": fits})()


def test_models_for_loads_what_a_component_needs_or_uses(world):
    """Nothing (no ``models`` keyword) for a component that takes none; the needed kinds, and the used kinds the
    protection fits, from the protected entry; with ``own``, the countermeasure's own fitted models too."""
    cache, _ = world
    plan = plan_of(world, protection=choice("keyed_shift_st"), countermeasure=choice("model_probe_st"))
    protect(world, plan)
    purify_job(PurifyJob(cache.root, 1, plan), CPU)
    assert stages._models_for(_declares(), cache, plan, CPU) == {}
    assert stages._models_for(_declares(fits=("teacher",)), cache, plan, CPU) == {}
    for component in (_declares(needs=("key",)), _declares(uses=("key", "authorized"))):
        (models,) = stages._models_for(component, cache, plan, CPU).values()
        assert {k: m.arch for k, m in models.items()} == {"key": {"key": 1}}
    (models,) = stages._models_for(_declares(uses=("authorized",), fits=("teacher",)), cache, plan, CPU,
                                   own=True).values()
    assert {k: m.arch for k, m in models.items()} == {"teacher": {"key": 100}}
    (models,) = stages._models_for(_declares(needs=("key",), fits=("teacher",)), cache, plan, META, own=True).values()
    assert sorted(models) == ["key", "teacher"] and {m.weight.device.type for m in models.values()} == {"meta"}


def test_models_for_own_models_without_a_protected_set(world):
    """A countermeasure's own models load from its purified entry even where the cell has no protected set; a
    plan without a data stage has none to load, which is a planning error."""
    cache, _ = world
    plan = plan_of(world, protection=choice("clean"), countermeasure=choice("model_probe_st"))
    spec = COUNTERMEASURES.create("model_probe_st").spec()
    cache.save("purified", plan.purify_key, clean_train(world), {"spec": spec, "seconds": 0.0},
               models=Models({"teacher": _key_model(7)}))
    (models,) = stages._models_for(_declares(fits=("teacher",)), cache, plan, CPU, own=True).values()
    assert _keys(models) == {"teacher": 7}
    with pytest.raises(AssertionError, match="^a countermeasure that fits models has a data stage$"):
        stages._models_for(_declares(fits=("teacher",)), cache, plan_of(world), CPU, own=True)


def test_stage_reports_read_each_stages_manifest(world):
    """Seconds, info and sorted model kinds of the protect and purify entries; nothing for a stage without a key;
    an entry whose manifest lacks info and models reports them empty."""
    cache, _ = world
    plan = plan_of(world, protection=choice("keyed_shift_st"), countermeasure=choice("model_probe_st"))
    protect(world, plan)
    purify_job(PurifyJob(cache.root, 1, plan), CPU)
    protected, purified = (cache.manifest(k, key) for k, key in (("protected", plan.protection_key),
                                                                 ("purified", plan.purify_key)))
    seconds, reports = stage_reports(cache, plan)
    assert seconds == {"protect": protected["seconds"], "purify": purified["seconds"]}
    assert reports == {"protect_info": protected["info"], "protect_models": ["key"],
                       "purify_info": purified["info"], "purify_models": ["teacher"]}
    assert stage_reports(cache, plan_of(world, protection=choice("clean"))) == ({}, {})
    bare = plan_of(world, protection=choice("cwp", size_fraction=0.25))
    cache.save("protected", bare.protection_key, clean_train(world), {"seconds": 1.5})
    assert stage_reports(cache, bare) == ({"protect": 1.5}, {"protect_info": {}, "protect_models": []})


def test_purify_job_refuses_a_countermeasure_that_changes_the_labels(world):
    """Labels changed by a data stage: the error names the countermeasure by its label; nothing is cached."""
    cache, _ = world
    plan = plan_of(world, countermeasure=choice("relabel_data_st", "my-relabel"))
    protect(world, plan)
    with pytest.raises(RuntimeError, match="^countermeasure my-relabel changed the shape or the labels of the train "
                                           "set$"):
        purify_job(PurifyJob(cache.root, 1, plan), CPU)
    assert cache.load("purified", plan.purify_key) is None


def test_stage_reports_of_an_entry_written_before_manifests_listed_models(world, monkeypatch):
    """An older entry's manifest has no ``models`` field: it reports none, not a TypeError."""
    cache, _ = world
    plan = plan_of(world, protection=choice("cwp", size_fraction=0.25))
    monkeypatch.setattr(cache, "manifest", lambda kind, key: {"seconds": 2.0})
    assert stage_reports(cache, plan) == ({"protect": 2.0}, {"protect_info": {}, "protect_models": []})


# ------------------------------------------------------------------ identity, failed_record


def test_identity_names_the_cell_its_keys_and_what_made_each_component(world):
    """The record's identity: keys, matrix, seed, ratio, mix, the run's determinism, each axis's label, name,
    params and maker (spec name, version, code), the countermeasure's stages (sorted, joined) and reports."""
    plan = plan_of(world, protection=choice("keyed_shift_st", "ks", step=2),
                   countermeasure=choice("model_probe_st", "probe"), seed=4, ratio=0.5)
    got = identity(train_of(world, plan, deterministic=True))
    specs = {"dataset": DATASETS.create("digits", per_class=6, test_per_class=3).spec(),
             "protection": PROTECTIONS.create("keyed_shift_st", step=2).spec(),
             "countermeasure": COUNTERMEASURES.create("model_probe_st").spec(),
             "victim": stages.Components.of(plan.cell).victim.spec()}
    assert specs["protection"]["code"] and "code" not in specs["dataset"]
    assert got == {"cell": plan.cell_key, "matrix": "m", "seed": 4, "poison_ratio": 0.5, "mix": "protected",
                   "dataset_key": world[1], "protection_key": plan.protection_key, "purify_key": plan.purify_key,
                   "deterministic": True,
                   "dataset": "digits", "dataset_name": "digits", "dataset_params": {"per_class": 6, "test_per_class": 3},
                   "protection": "ks", "protection_name": "keyed_shift_st", "protection_params": {"step": 2},
                   "countermeasure": "probe", "countermeasure_name": "model_probe_st", "countermeasure_params": {},
                   "victim": "cnn", "victim_name": "cnn", "victim_params": {"width": 4},
                   "components": {axis: Made(spec["name"], spec["version"], spec.get("code"))
                                  for axis, spec in specs.items()},
                   "countermeasure_stage": "data+train", "countermeasure_reports": "final"}
    plain = identity(train_of(world, plan_of(world, countermeasure=choice("early_stop"))))
    assert (plain["countermeasure_stage"], plain["countermeasure_reports"]) == ("none", "best")
    assert plain["deterministic"] is False


def test_failed_record_keeps_the_cells_identity_and_the_reason(world):
    """A cell whose worker died: its identity, status error with the reason, the device and threads given, the
    library versions, no seconds, and when it was written."""
    plan = plan_of(world)
    job = train_of(world, plan, threads=3)
    before = time.time()
    record = failed_record(job, "cuda:1", "worker died (signal 9)")
    assert dataclasses.asdict(record) == {**dataclasses.asdict(record), **identity(job),
                                          "components": {k: dataclasses.asdict(m) for k, m in identity(job)[
                                              "components"].items()}}
    assert (record.status, record.error, record.device, record.threads) == ("error", "worker died (signal 9)",
                                                                            "cuda:1", 3)
    assert record.seconds == {} and record.versions == library_versions() and not record.ok
    assert before <= record.finished_at <= time.time()
    assert record.test_acc_final is None and record.memory is None


# ------------------------------------------------------------------ train_job


def test_train_job_records_every_field_of_a_protected_purified_cell(world, monkeypatch):
    """A cell with a protection on half of each class and a data-stage countermeasure: the record's identity,
    status, device, threads, versions, memory, time; its seconds per stage (protect/purify from their manifests);
    the recipe resolved for the dataset and victim; the curves and their summaries; the perturbation metrics over
    the protected images only; the stage reports; and CAR/GCR of the trained victim on clean vs protected."""
    cache, _ = world
    plan = plan_of(world, protection=choice("cwp", size_fraction=0.375), countermeasure=choice("bdr"), ratio=0.5)
    protect(world, plan)
    purify_job(PurifyJob(cache.root, 1, plan), CPU)
    measured: list[tuple] = []

    def spy(model, clean, protected, mask, device):
        measured.append((model, clean, protected, mask, device))
        return {"car": 0.25, "gcr": 0.75}

    monkeypatch.setattr(stages, "gradient_metrics", spy)
    job = train_of(world, plan, threads=3)
    before, start = time.time(), time.perf_counter()
    record = train_job(job, CPU)
    elapsed = time.perf_counter() - start
    assert record.status == "ok" and record.error is None, record.error
    assert {k: v for k, v in dataclasses.asdict(record).items() if k in identity(job)} == \
        {**identity(job), "components": {k: dataclasses.asdict(m) for k, m in identity(job)["components"].items()}}
    assert (record.device, record.threads, record.versions) == ("cpu", 3, library_versions())
    assert before <= record.finished_at <= time.time() and record.memory == {"peak_rss": record.memory["peak_rss"]}
    assert record.memory["peak_rss"] > 0
    assert sorted(record.seconds) == ["load", "protect", "purify", "train"]
    seconds, reports = stage_reports(cache, plan)
    assert {k: record.seconds[k] for k in seconds} == seconds and record.seconds["train"] > 0
    assert 0 < record.seconds["load"] + record.seconds["train"] <= elapsed and min(record.seconds.values()) > 0
    assert (record.protect_info, record.protect_models, record.purify_info, record.purify_models) == \
        (reports["protect_info"], [], reports["purify_info"], [])
    recipe = make_recipe(**RECIPE).for_dataset("digits").for_victim("cnn")
    assert (record.recipe, record.recipe_params) == ("quick", dataclasses.asdict(recipe))
    assert len(record.test_acc) == len(record.train_acc) == 2 and record.test_acc_final == record.test_acc[-1]
    assert record.test_acc_best == max(record.test_acc) and record.test_acc[record.best_epoch - 1] == max(record.test_acc)
    assert record.steps == 2 * math.ceil(60 / 32) and record.images_per_s > 0
    assert (record.augment, record.data_placement, record.tf32_conv, record.compile_seconds) == \
        (DATASETS.get("digits").augment, "host", False, None)
    assert record.precision in ("bf16", "fp32")
    sets = mixes.assemble(cache, plan.source)
    assert 0 < int(sets.mask.sum()) < 60
    assert (record.linf, record.l2, record.psnr) == tuple(perturbation_metrics(
        sets.clean.images[sets.mask], sets.train.images[sets.mask]).values())
    assert (record.car, record.gcr) == (0.25, 0.75)
    ((model, clean, protected, mask, device),) = measured
    assert isinstance(model, nn.Module) and device == CPU and torch.equal(mask, sets.mask)
    assert torch.equal(clean.images, sets.clean.images) and torch.equal(protected.images, sets.train.images)


def test_train_job_trains_with_the_matrix_recipe_with_its_dataset_and_then_victim_overrides(world, monkeypatch):
    """The recipe a cell trains with is the matrix's, with its dataset's overrides and then its victim's (which
    win); the record names and holds it, and the training's results."""
    given: list[Any] = []

    def fake_train(job, cache, built, recipe, train, test, device):
        given.append((recipe, len(train), len(test), device))
        return {"model": nn.Identity(), "steps": 7, "test_acc_final": 0.5}

    monkeypatch.setattr(stages, "_train", fake_train)
    matrix_recipe = {"name": "uge", "epochs": 3, "datasets": {"digits": {"batch_size": 10, "lr": 0.5}}}
    record = train_job(train_of(world, plan_of(world, protection=choice("clean")), recipe=matrix_recipe), CPU)
    assert record.status == "ok", record.error
    expected = make_recipe("uge", epochs=3, datasets={"digits": {"batch_size": 10, "lr": 0.5}})
    expected = dataclasses.replace(expected, batch_size=10, lr=1e-3, optimizer="adam", epochs=100, weight_decay=0.0)
    assert given == [(expected, 60, 30, CPU)]
    assert (record.recipe, record.recipe_params, record.steps, record.test_acc_final) == \
        ("uge", dataclasses.asdict(expected), 7, 0.5)


def test_train_job_trains_on_the_purified_set(world):
    """With a data stage, the victim trains on its output: a purified set of the first half of the images gives
    half the steps of the full set."""
    cache, _ = world
    full = train_job(train_of(world, plan_of(world, protection=choice("clean")), recipe={"batch_size": 10}), CPU)
    plan = plan_of(world, protection=choice("clean"), countermeasure=choice("halve_st"))
    purify_job(PurifyJob(cache.root, 1, plan), CPU)
    halved = train_job(train_of(world, plan, recipe={"batch_size": 10}), CPU)
    assert (full.status, halved.status) == ("ok", "ok"), (full.error, halved.error)
    assert (full.steps, halved.steps) == (12, 6)


def test_train_job_of_a_clean_cell_has_zero_perturbation_and_no_gradient_metrics(world):
    """Without a protected set: no protect/purify seconds or reports, a perturbation of zero, no CAR/GCR."""
    record = train_job(train_of(world, plan_of(world, protection=choice("clean")), recipe={"augment": "none"}), CPU)
    assert record.status == "ok", record.error
    assert sorted(record.seconds) == ["load", "train"] and record.protect_info is None and record.purify_info is None
    assert (record.linf, record.l2, record.psnr, record.car, record.gcr) == (0.0, 0.0, None, None, None)
    assert record.augment == "none"


def test_train_job_gives_train_hooks_and_the_victim_their_models_on_the_jobs_device(world, monkeypatch):
    """A countermeasure with a train stage gets hooks built for the set's classes and image size, with the
    protection's models it needs and those its data stage fitted, and training runs them; the victim gets the
    protection's models it uses, for its build and its input statistics; every model is loaded onto the job's
    device; the record lists both stages' models."""
    cache, _ = world
    plan = plan_of(world, protection=choice("keyed_shift_st"), countermeasure=choice("model_probe_st"), seed=2,
                   victim=choice("keyed_cnn_st"))
    protect(world, plan)
    purify_job(PurifyJob(cache.root, 1, plan), CPU)
    HOOK_CALLS.clear()
    VICTIM_CALLS.clear()
    loads: list[tuple] = []

    def spy(folder: Path, kinds: tuple[str, ...], device: torch.device) -> Models:
        loads.append((folder.parent.name, tuple(kinds), device))
        return load_models(folder, kinds, device)

    monkeypatch.setattr(stages, "load_models", spy)
    record = train_job(train_of(world, plan), CPU)
    assert record.status == "ok", record.error
    assert HOOK_CALLS == [{"num_classes": 10, "image_size": 16, "keys": {"key": 3, "teacher": 102},
                           "epochs": [(0, 2), (1, 2)]}]
    assert VICTIM_CALLS == [("build", 10, 1, 16, {"key": 3}), ("stats", {"key": 3})]
    assert sorted(loads) == [("protected", ("key",), CPU), ("protected", ("key",), CPU), ("purified", ("teacher",), CPU)]
    assert (record.protect_models, record.purify_models) == (["key"], ["teacher"])
    assert record.countermeasure_stage == "data+train" and record.car is not None and record.gcr is not None


def test_train_job_does_not_depend_on_the_global_random_state(world):
    """The victim is initialised from the cell's seed: the same cell gives the same curves whatever the global
    generator's state before, and another seed gives others."""
    plan = plan_of(world, protection=choice("clean"))
    records = []
    for state in (1, 2):
        torch.manual_seed(state)
        records.append(train_job(train_of(world, plan), CPU))
    assert records[0].train_acc == records[1].train_acc and records[0].test_acc == records[1].test_acc
    other = train_job(train_of(world, plan_of(world, protection=choice("clean"), seed=1)), CPU)
    assert other.train_acc != records[0].train_acc or other.test_acc != records[0].test_acc


def test_train_job_shows_epochs_only_where_asked(world, capsys):
    """The epoch bar goes to stderr only with ``show_epochs``: epochs done of the total (none for a budget in
    iterations) and the test accuracy, cleared at the end."""
    plan = plan_of(world, protection=choice("clean"))
    train_job(train_of(world, plan), CPU)
    assert "epochs" not in capsys.readouterr().err
    train_job(train_of(world, plan, show_epochs=True), CPU)
    err = capsys.readouterr().err
    assert "  epochs: " in err and "2/2" in err and re.search(r"test=0\.\d\d\d\b", err), err
    assert not err.endswith("\n"), "the bar is left behind"
    train_job(train_of(world, plan, show_epochs=True, recipe={"iterations": 4}), CPU)
    err = capsys.readouterr().err
    assert re.search(r"  epochs: 2it\b", err) and "/2" not in err, "a budget in iterations has no total of epochs"


def test_train_job_of_a_failed_upstream_stage_records_the_error(world):
    """An earlier stage's traceback: nothing is trained; the record has status error quoting it, the identity, the
    device, threads, versions, memory and time, and no measurements."""
    plan = plan_of(world, countermeasure=choice("bdr"))
    job = train_of(world, plan, upstream="Traceback: protect exploded", threads=4, deterministic=True)
    record = train_job(job, CPU)
    assert record.status == "error" and not record.ok
    assert "RuntimeError: an earlier stage failed:\nTraceback: protect exploded" in record.error
    assert record.cell == plan.cell_key and record.deterministic is True and record.purify_key == plan.purify_key
    assert (record.device, record.threads, record.versions) == ("cpu", 4, library_versions())
    assert record.seconds == {} and record.test_acc_final is None and record.recipe is None
    assert set(record.memory) == {"peak_rss"}


def test_train_job_records_a_missing_cache_entry_as_the_cells_error(world):
    """A set the cell needs gone from the cache: status error, naming the entry and the fix."""
    cache, dataset_key = world
    shutil.rmtree(cache.path("dataset", f"{dataset_key}-test"))
    record = train_job(train_of(world, plan_of(world, protection=choice("clean"))), CPU)
    assert record.status == "error"
    assert f"cache entry dataset/{dataset_key}-test is missing or corrupted; rerun to rebuild it" in record.error
    assert set(record.seconds) == set()


def test_train_job_of_a_purified_cell_needs_its_purified_set(world):
    """A cell with a data stage never silently trains on the unpurified set: its missing entry is an error."""
    plan = plan_of(world, protection=choice("clean"), countermeasure=choice("bdr"))
    record = train_job(train_of(world, plan), CPU)
    assert record.status == "error" and f"purified/{plan.purify_key} is missing" in record.error


# ------------------------------------------------------------------ gradient_metrics


@pytest.fixture
def scored(monkeypatch) -> list[tuple]:
    """The arguments CAR and GCR are computed on (both functions are replaced by recorders)."""
    calls: list[tuple] = []

    def record(name: str):
        def metric(*args):
            calls.append((name, *args))
            return float(len(args[1]))
        return metric

    monkeypatch.setattr(stages, "confidence_ascent_ratio", record("car"))
    monkeypatch.setattr(stages, "gradient_compression_ratio", record("gcr"))
    return calls


def _pairs(n: int) -> tuple[ImageSet, ImageSet]:
    clean = ImageSet(torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, 1, 1),
                     torch.arange(n) % 10, 10)
    return clean, clean.with_images(clean.images + 1)


def test_gradient_metrics_score_every_protected_image_against_its_clean_original(scored):
    """Within the limit, CAR and GCR see exactly the masked images, in order, with their clean labels."""
    clean, protected = _pairs(12)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[0, 3, 4, 7, 11]] = True
    model = nn.Identity()
    assert stages.gradient_metrics(model, clean, protected, mask, CPU) == {"car": 5.0, "gcr": 5.0}
    for name, m, x, xp, y, device in scored:
        assert m is model and device == CPU
        assert torch.equal(x, clean.images[mask]) and torch.equal(xp, protected.images[mask])
        assert torch.equal(y, clean.labels[mask])
    assert [call[0] for call in scored] == ["car", "gcr"]


def test_gradient_metrics_take_at_most_limit_evenly_spaced_images_2000_by_default(scored):
    """Over the limit: that many images, evenly spaced from the first masked one to the last; 2000 by default."""
    clean, protected = _pairs(10)
    stages.gradient_metrics(nn.Identity(), clean, protected, torch.ones(10, dtype=torch.bool), CPU, limit=4)
    assert scored[0][2].flatten().tolist() == [0, 3, 6, 9]
    scored.clear()
    clean, protected = _pairs(2001)
    result = stages.gradient_metrics(nn.Identity(), clean, protected, torch.ones(2001, dtype=torch.bool), CPU)
    assert result == {"car": 2000.0, "gcr": 2000.0}
