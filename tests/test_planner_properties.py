"""What the planner promises before anything runs (issue 39, ``bench.plan.planner``).

A refused cell is named exactly and with its reasons; warnings name each expensive or non-deterministic component
once; a plan's train source and keys are the ones the stages and the record upgrade rely on; a dataset's key is
found from the cache or the records without loading it; only what is new, asked for again or failed is trained.
Test components (a victim needing a protection's models, an expensive victim, a countermeasure needing weights, a
dataset that reports the cache it loads into) are registered on copies of the registries, per test.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from bench.core.components import COUNTERMEASURES, PROTECTIONS, VICTIMS, Countermeasure, ImageSet, Pretrained, Victim
from bench.core.registry import ConfigError, discover
from bench.data.datasets import DATASETS, Dataset
from bench.data.mixes import TrainSource
from bench.plan.matrix import Cell, Choice
from bench.plan.planner import (
    Components,
    KnownKey,
    Plan,
    check_cells,
    crafting,
    known_dataset_key,
    missing_capabilities,
    plan_cell,
    prepare_dataset,
    prepare_datasets,
    refusal,
    to_train,
)
from bench.plan.recipes import make_recipe
from bench.store.cache import Cache
from bench.store.keys import make_key
from bench.store.records import Record, upgrade
from tests.conftest import record_json

QUICK = {"name": "quick"}
WEIGHTS_ENV = "BENCH_PLANNER_TEST_WEIGHTS"
WEIGHTS = Pretrained("TestNet", WEIGHTS_ENV, files="testnet.pt")
EXCLUDE_HINT = "\nexclude such combinations with [[exclude]] tables, or choose other components"


def choice(name: str, label: str | None = None, **params: Any) -> Choice:
    return Choice(name, tuple(params.items()), label or name)


DIGITS = choice("digits", per_class=4)
CRAFTED = choice("digits", "digits-4of40", per_class=4, protect_per_class=40)


def cell(protection: str | Choice = "cwn", countermeasure: str | Choice = "none", victim: str | Choice = "cnn", *,
         dataset: Choice = DIGITS, seed: int = 0, ratio: float = 0.5, mix: str = "protected") -> Cell:
    axes = [c if isinstance(c, Choice) else choice(c) for c in (protection, countermeasure, victim)]
    return Cell(dataset, *axes, seed, ratio, mix)


def described(c: Cell) -> str:
    labels = c.labels()
    return (f"cell {labels['dataset']} × {labels['protection']} × {labels['countermeasure']} × {labels['victim']} "
            f"(seed {c.seed}, poison_ratio {labels['poison_ratio']}, mix {c.mix})")


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Test components on copies of the registries; returns the caches the ``probe_test`` dataset was loaded with."""
    discover()  # the built-in components first, into the registries that are copied
    for registry in (PROTECTIONS, COUNTERMEASURES, VICTIMS, DATASETS):
        monkeypatch.setattr(registry, "_classes", dict(registry._classes))
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    loaded_with: list[Any] = []

    @VICTIMS.register("needy_test")
    class Needy(Victim):
        paper: ClassVar[str] = "test plugin"
        needs_models: ClassVar[tuple[str, ...]] = ("generator", "hiding")

        def build(self, num_classes: int, in_channels: int, image_size: int, *, models: Any) -> torch.nn.Module:
            return torch.nn.Flatten()

    @VICTIMS.register("heavy_test")
    class Heavy(Victim):
        paper: ClassVar[str] = "test plugin"
        expensive_on_cpu: ClassVar[bool] = True

        def build(self, num_classes: int, in_channels: int, image_size: int) -> torch.nn.Module:
            return torch.nn.Flatten()

    @COUNTERMEASURES.register("weights_test")
    class NeedsWeights(Countermeasure):
        paper: ClassVar[str] = "test plugin"
        pretrained: ClassVar[tuple[Pretrained, ...]] = (WEIGHTS,)

    @DATASETS.register("probe_test")
    class Probe(Dataset):
        paper: ClassVar[str] = "test plugin"

        def load_full(self, cache: Cache | None = None) -> tuple[ImageSet, ImageSet]:
            loaded_with.append(cache)
            images, labels = torch.arange(4 * 64, dtype=torch.uint8).reshape(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
            return ImageSet(images, labels, 2), ImageSet(images[:2], labels[:2], 2)

    return loaded_with


# -- refusals: named cells, their reasons, the fix ----------------------------------------------------------------

def test_a_refusal_names_each_cell_and_its_reasons_then_the_fix() -> None:
    """The error lists each refused cell (axes' labels, seed, ratio, mix) with its reasons joined by '; '."""
    first, ok, second = cell(seed=3, ratio=0.25, mix="ood"), cell("random_noise"), cell(victim="lenet", ratio=1.0)
    error = refusal([first, ok, second], [["no encrypt", "no model"], [], ["bad weights"]])
    assert isinstance(error, ConfigError)
    assert str(error) == ("2 cell(s) ask for what their components cannot do:\n"
                          "  cell digits × cwn × none × cnn (seed 3, poison_ratio 0.25, mix ood): no encrypt; no model\n"
                          "  cell digits × cwn × none × lenet (seed 0, poison_ratio 1, mix protected): bad weights"
                          + EXCLUDE_HINT)
    assert refusal([first, ok], [[], []]) is None


@pytest.mark.parametrize(("refused", "more"), [(10, ""), (11, "\n  … and 1 more"), (13, "\n  … and 3 more")])
def test_a_refusal_lists_at_most_ten_cells_and_counts_the_rest(refused: int, more: str) -> None:
    cells = [cell(seed=s) for s in range(refused)]
    message = str(refusal(cells, [[f"why {s}"] for s in range(refused)]))
    listed = "\n  ".join(f"{described(c)}: why {c.seed}" for c in cells[:10])
    assert message == f"{refused} cell(s) ask for what their components cannot do:\n  {listed}{more}{EXCLUDE_HINT}"


def test_a_victim_lacking_the_protections_models_is_refused_naming_them(plugins: list[Any]) -> None:
    """needs_models: what is lacking, and what the protection fits instead (or that the mix uses none)."""
    def reasons(c: Cell) -> list[str]:
        return missing_capabilities(c, Components.of(c))

    needs = "needy_test needs the protection's {} model (needs_models), but {}"
    assert reasons(cell("cwn", victim="needy_test")) == [needs.format("generator, hiding", "cwn fits no model")]
    uge = choice("uge", encoder="classifier")  # the default CLIP encoder needs weights: another reason
    assert reasons(cell(uge, victim="needy_test")) == [needs.format("hiding", "uge fits generator, authorized")]
    dh = choice("dh", source="skimage", extractor="classifier")  # the defaults need pretrained weights
    assert reasons(cell(dh, victim="needy_test")) == [needs.format("generator", "dh fits hiding")]
    assert reasons(cell(dh, victim="needy_test", mix="clean_only")) == [
        needs.format("generator, hiding", "mix 'clean_only' uses no protection")]
    assert reasons(cell(dh, victim="cnn")) == []


def test_a_surrogate_that_is_no_victim_is_refused_listing_the_victims(plugins: list[Any]) -> None:
    c = cell(choice("em", surrogate="nope"))
    assert missing_capabilities(c, Components.of(c)) == [
        f"em's surrogate = 'nope' is not a registered victim (victims: {', '.join(VICTIMS.names())})"]
    good = cell(choice("em", surrogate="lenet"))
    assert missing_capabilities(good, Components.of(good)) == []


def test_missing_pretrained_weights_refuse_a_cell_only_while_nothing_supplies_them(
        plugins: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the needs_models reason first: every reason of every component is kept."""
    c = cell("cwn", "weights_test", "needy_test")
    needs = "needy_test needs the protection's generator, hiding model (needs_models), but cwn fits no model"
    assert missing_capabilities(c, Components.of(c)) == [needs, WEIGHTS.missing()]
    assert WEIGHTS_ENV in WEIGHTS.missing()
    (tmp_path / "testnet.pt").write_bytes(b"weights")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "testnet.pt"))
    assert missing_capabilities(c, Components.of(c)) == [needs]


def test_check_cells_refuses_by_default_and_returns_reasons_when_asked_not_to(plugins: list[Any]) -> None:
    cells = [cell("cwn", victim="needy_test"), cell("random_noise", "jpeg", seed=1)]
    with pytest.raises(ConfigError, match=re.escape(f"1 cell(s) ask for what their components cannot do:\n  "
                                                    f"{described(cells[0])}: needy_test needs")):
        check_cells(cells, "cuda", print)
    built, reasons = check_cells(cells, "cuda", print, refuse=False)
    assert built == [Components.of(c) for c in cells]
    assert len(reasons) == 2 and reasons[0][0].startswith("needy_test needs") and reasons[1] == []
    assert check_cells(cells[1:], "cuda", print) == ([Components.of(cells[1])], [[]])


def test_a_surrogate_that_is_no_victim_is_reported_not_crashed_on(plugins: list[Any]) -> None:
    """Even on a CPU, where surrogates are looked up for warnings, an unknown one is a refusal reason."""
    _, reasons = check_cells([cell(choice("em", surrogate="nope"))], "cpu", lambda _: None, refuse=False)
    assert reasons == [[f"em's surrogate = 'nope' is not a registered victim (victims: {', '.join(VICTIMS.names())})"]]


# -- warnings: once per component, surrogates included --------------------------------------------------------------

def expensive(name: str) -> str:
    return (f"bench: note: {name} is expensive on a CPU (declared expensive_on_cpu); its cells may take hours at "
            "full size")


def nondeterministic(name: str) -> str:
    why = VICTIMS.get(name).cuda_nondeterministic
    return f"bench: note: --deterministic: {name} cannot honour it ({why}); its cells may differ between reruns"


def warnings_of(cells: list[Cell], device: str, **flags: bool) -> list[str]:
    said: list[str] = []
    check_cells(cells, device, said.append, **flags)
    return said


def test_a_cpu_run_notes_each_expensive_component_once_surrogates_included(plugins: list[Any]) -> None:
    em = choice("em", surrogate="heavy_test")
    cells = [cell(em, seed=0), cell(em, seed=1)]
    assert warnings_of(cells, "cpu") == [expensive("em"), expensive("heavy_test")]
    assert warnings_of([*cells, cell("cwn", victim="heavy_test")], "cpu") == [expensive("em"), expensive("heavy_test")]
    assert warnings_of(cells, "cpu", deterministic=True) == [expensive("em"), expensive("heavy_test")]
    assert warnings_of([cell("cwn", "jpeg")], "cpu") == []
    assert warnings_of(cells, "cuda") == []


def test_a_deterministic_cuda_run_notes_each_nondeterministic_component_once(plugins: list[Any]) -> None:
    """cnn (the victim) and lenet (em's surrogate) have no deterministic CUDA kernel; em itself has."""
    em = choice("em", surrogate="lenet")
    cells = [cell(em, seed=0), cell(em, seed=1)]
    assert warnings_of(cells, "cuda", deterministic=True) == [nondeterministic("cnn"), nondeterministic("lenet")]
    assert warnings_of(cells, "cuda") == [], "not deterministic unless asked"
    assert warnings_of([cell(choice("em", surrogate="resnet18"), victim="resnet18")], "cuda", deterministic=True) == []


# -- plans: train source, keys, fitted models -------------------------------------------------------------------

def test_crafting_is_the_same_dataset_at_protect_per_class() -> None:
    assert crafting(CRAFTED) == Choice("digits", (("per_class", 40),), "digits-4of40 (crafting set, 40/class)")
    assert crafting(DIGITS) is None


def test_a_plan_says_where_its_train_set_comes_from() -> None:
    plan = plan_cell(cell("cwn", seed=3, ratio=0.25), {DIGITS: "data-A"}, QUICK)
    assert plan.source == TrainSource("data-A", plan.protection_key, 0.25, 3, "protected", None)
    assert plan.protection_key and plan.dataset_key == plan.crafting_key == "data-A"
    crafted = plan_cell(cell("cwn", dataset=CRAFTED, seed=3, mix="protected"), {CRAFTED: "data-A",
                                                                                crafting(CRAFTED): "data-C"}, QUICK)
    assert crafted.source == TrainSource("data-A", crafted.protection_key, 0.5, 3, "protected", "data-C")
    assert crafted.crafting_key == "data-C"
    unused = plan_cell(cell("cwn", dataset=CRAFTED, mix="clean_only"), {CRAFTED: "data-A",
                                                                        crafting(CRAFTED): "data-C"}, QUICK)
    assert unused.source == TrainSource("data-A", None, 0.5, 0, "clean_only", None)
    assert unused.crafting_key == "data-A"


def test_one_protected_set_serves_every_train_size_crafted_on_the_same_set() -> None:
    """protect_per_class: the protection key is the crafting set's; the cells on different train sets differ."""
    a = plan_cell(cell("cwn", dataset=CRAFTED), {CRAFTED: "data-A", crafting(CRAFTED): "data-C"}, QUICK)
    b = plan_cell(cell("cwn", dataset=CRAFTED), {CRAFTED: "data-B", crafting(CRAFTED): "data-C"}, QUICK)
    c = plan_cell(cell("cwn", dataset=CRAFTED), {CRAFTED: "data-A", crafting(CRAFTED): "data-D"}, QUICK)
    assert a.protection_key == b.protection_key != c.protection_key
    assert a.cell_key != b.cell_key


def test_fit_subset_keys_its_protected_set_by_the_ratio_it_was_fitted_on() -> None:
    def key(mix: str, ratio: float) -> str | None:
        return plan_cell(cell("cwn", ratio=ratio, mix=mix), {DIGITS: "data-A"}, QUICK).protection_key

    assert key("protected", 0.5) == key("protected", 0.25), "fitted on the whole set whatever the ratio"
    assert len({key("protected", 0.5), key("fit_subset", 0.5), key("fit_subset", 0.25)} - {None}) == 3


def test_unused_and_identity_protections_have_no_protected_set() -> None:
    keys = {DIGITS: "data-A"}
    assert plan_cell(cell("clean", "jpeg"), keys, QUICK).protection_key is None
    cwn, noise = (plan_cell(cell(p, "jpeg", mix="clean_only"), keys, QUICK) for p in ("cwn", "random_noise"))
    assert cwn.protection_key is None is noise.protection_key
    assert cwn.cell_key != noise.cell_key and cwn.purify_key != noise.purify_key, "each row of a table is its own cell"


def test_a_plan_names_the_models_its_sets_must_hold() -> None:
    keys = {DIGITS: "data-A"}
    both = plan_cell(cell("confoundergan", "dncnn"), keys, QUICK)
    assert (both.protection_fits, both.purify_fits) == (("generator",), ("denoiser",))
    unused = plan_cell(cell("confoundergan", "dncnn", mix="clean_only"), keys, QUICK)
    assert (unused.protection_fits, unused.purify_fits) == ((), ("denoiser",))
    none = plan_cell(cell("confoundergan", "none"), keys, QUICK)
    assert (none.purify_key, none.protection_fits, none.purify_fits) == (None, ("generator",), ())


def test_a_victims_recipe_override_is_keyed_as_the_settings_it_trains_with() -> None:
    """UGE's recipe trains cnn with Adam, lr 1e-3, 100 epochs: the same key as spelling those out."""
    c = cell("cwn")
    spelled = {"name": "uge", "optimizer": "adam", "lr": 1e-3, "epochs": 100, "weight_decay": 0.0}
    assert plan_cell(c, {DIGITS: "data-A"}, {"name": "uge"}).cell_key == plan_cell(c, {DIGITS: "data-A"}, spelled).cell_key


@pytest.mark.parametrize("c", [cell("cwn", "jpeg", seed=2), cell("cwn", "jpeg", mix="fit_subset", ratio=0.25),
                               cell("random_noise", "none", mix="clean_only"), cell("clean", "jpeg", seed=1),
                               cell("cwn", "mixup", victim="lenet", dataset=CRAFTED)],
                         ids=["protected", "fit_subset", "clean_only", "identity", "crafted"])
def test_an_old_record_of_a_planned_cell_is_upgraded_to_the_planners_key(c: Cell) -> None:
    """``records.upgrade`` re-keys schema-1 records with the same formula: their results are reused, not retrained.
    (A record holds its components' full parameters, as a matrix's choices carry them.)"""
    keys = {c.dataset: "data-A", **({crafting(c.dataset): "data-C"} if crafting(c.dataset) else {})}
    plan, built = plan_cell(c, keys, QUICK), Components.of(c)
    raw = record_json(cell="legacy", seed=c.seed, poison_ratio=c.poison_ratio, mix=c.mix, dataset_key="data-A",
                      protection_key=plan.protection_key, purify_key=plan.purify_key,
                      recipe_params=dataclasses.asdict(make_recipe("quick")), dataset_params=c.dataset.kwargs,
                      **{f"{axis}_name": getattr(c, axis).name for axis in ("dataset", "protection", "countermeasure",
                                                                             "victim")},
                      **{f"{axis}_params": getattr(built, axis).params() for axis in ("protection", "countermeasure",
                                                                                      "victim")})
    del raw["schema"], raw["components"]
    assert upgrade(raw)["cell"] == plan.cell_key


def test_a_mix_the_protection_cannot_serve_is_refused_naming_the_cell() -> None:
    ood = cell("cwn", seed=3, mix="ood")
    with pytest.raises(ConfigError, match=re.escape(f"{described(ood)}: mix 'ood' needs a protection that encrypts "
                                                    "unseen images")):
        plan_cell(ood, {DIGITS: "data-A"}, QUICK)
    crafted = cell("cwn", dataset=CRAFTED, mix="fit_subset")
    with pytest.raises(ConfigError, match=re.escape(f"{described(crafted)}: mix 'fit_subset' fits the protection on "
                                                    "part of the train set, but the dataset's protect_per_class")):
        plan_cell(crafted, {CRAFTED: "data-A", crafting(CRAFTED): "data-C"}, QUICK)
    assert plan_cell(cell("cwn", mix="fit_subset"), {DIGITS: "data-A"}, QUICK).protection_key


# -- datasets: keys, cache entries, missing files -------------------------------------------------------------------

SMALL = choice("digits", "digits-2", per_class=2, test_per_class=1, size=8)


def test_a_datasets_key_is_stable_and_its_splits_are_cached_under_it(tmp_path: Path) -> None:
    """The key of a spec and content never changes silently (cached sets and records are found by it)."""
    cache = Cache(tmp_path)
    key = prepare_dataset(cache, SMALL)
    assert key == "908323ecca71439ddf3cea32"
    dataset = DATASETS.create("digits", per_class=2, test_per_class=1, size=8)
    for split, data in zip(("train", "test"), dataset.load()):
        assert torch.equal(cache.load("dataset", f"{key}-{split}").images, data.images)
        manifest = cache.manifest("dataset", f"{key}-{split}")
        assert (manifest["spec"], manifest["split"]) == (dataset.spec(), split)
    assert prepare_dataset(cache, choice("digits", per_class=2, test_per_class=2, size=8)) != key


def test_preparing_a_cached_dataset_again_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Cache(tmp_path)
    key = prepare_dataset(cache, SMALL)
    saved: list[str] = []
    monkeypatch.setattr(Cache, "save", lambda self, kind, key, *args, **kw: saved.append(f"{kind}/{key}"))
    assert prepare_dataset(cache, SMALL) == key and saved == []


def test_a_dataset_is_loaded_into_the_runs_cache(plugins: list[Any], tmp_path: Path) -> None:
    """Datasets of files keep their decoded images in the cache they are handed."""
    cache = Cache(tmp_path)
    prepare_dataset(cache, choice("probe_test"))
    assert plugins == [cache]


def test_prepare_datasets_checks_every_dataset_before_loading_any(tmp_path: Path) -> None:
    """Each missing dataset's message on its own line, in label order; nothing loaded or cached."""
    b, a = (choice("image-folder", label, root=str(tmp_path / label)) for label in ("b-set", "a-set"))
    with pytest.raises(ConfigError) as raised:
        prepare_datasets(Cache(tmp_path / "cache"), [SMALL, b, a])
    assert str(raised.value) == "\n".join(DATASETS.create("image-folder", root=str(tmp_path / label)).missing()
                                          for label in ("a-set", "b-set"))
    assert str(tmp_path / "a-set") in str(raised.value) and not (tmp_path / "cache").exists()


def test_prepare_datasets_keys_each_dataset(tmp_path: Path) -> None:
    cache, other = Cache(tmp_path), choice("digits", "digits-3", per_class=3, test_per_class=1, size=8)
    assert prepare_datasets(cache, [other, SMALL]) == {SMALL: prepare_dataset(cache, SMALL),
                                                       other: prepare_dataset(cache, other)}


def test_a_cached_datasets_key_is_known_without_loading_it(tmp_path: Path) -> None:
    cache, other = Cache(tmp_path), choice("digits", per_class=3, test_per_class=1, size=8)
    keys = {c: prepare_dataset(cache, c) for c in (SMALL, other)}
    for c, key in keys.items():
        assert known_dataset_key(cache, c) == KnownKey(key, "cache")
    fresh = choice("digits", per_class=5, size=8)
    spec = DATASETS.create("digits", per_class=5, size=8).spec()
    assert known_dataset_key(cache, fresh) == KnownKey(f"unprepared-{make_key(spec)}", "none")


def record(key: str, finished: float, version: int = 1, **params: Any) -> Record:
    raw = record_json(dataset_key=key, finished_at=finished, dataset_params=params)
    raw["components"]["dataset"]["version"] = version
    return Record.from_json(raw)


def test_a_datasets_key_is_known_from_the_newest_record_of_its_spec_and_version() -> None:
    """Records of other parameters, of another dataset version or of a dataset that no longer builds are ignored."""
    records = [record("data-old", 1, per_class=4), record("data-new", 3, per_class=4), record("data-mid", 2, per_class=4),
               record("data-other", 9, per_class=8), record("data-stale", 10, version=0, per_class=4),
               record("data-broken", 11, bogus=4)]
    assert known_dataset_key(Cache(Path("/nonexistent/bench-planner")), DIGITS, records) == KnownKey("data-new",
                                                                                                      "records")
    assert known_dataset_key(Cache(Path("/nonexistent/bench-planner")), DIGITS, records[3:]).source == "none"


# -- what a run trains ---------------------------------------------------------------------------------------------

def test_a_run_trains_the_new_the_asked_for_and_where_retried_the_failed() -> None:
    cells = {name: cell(seed=s) for s, name in enumerate(("new", "done", "again", "failed"))}
    plans = [Plan(c, TrainSource("data-A", None, 0.5, c.seed), None, name) for name, c in cells.items()]
    recorded = {name: Record.from_json(record_json(cell=name, status="error" if name == "failed" else "ok"))
                for name in ("done", "again", "failed")}
    assert to_train(plans, recorded, {cells["again"]}, retry_failed=False) == {"new", "again"}
    assert to_train(plans, recorded, {cells["again"]}, retry_failed=True) == {"new", "again", "failed"}
    assert to_train(plans, recorded, set(), retry_failed=True) == {"new", "failed"}
