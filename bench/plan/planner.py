"""Planning a matrix before anything runs: each cell's cache keys, and every capability check.

A cell is refused here (``ConfigError``: ``bench run`` exits 2, naming the cell and the reason) when it asks a
component for something it has not declared: an ``ood`` mix with a protection that cannot encrypt unseen
images, a countermeasure that needs a model its protection does not fit, a surrogate that is not a victim,
pretrained weights that are neither on this machine nor (online) downloadable from the hub. Components that are
expensive on a CPU are warned about.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

from bench.core.components import COUNTERMEASURES, DATA, PROTECTIONS, VICTIMS, Countermeasure, Protection, Victim
from bench.core.registry import ConfigError
from bench.data import mixes
from bench.data.datasets import DATASETS, fingerprint
from bench.plan.matrix import Cell, Choice
from bench.plan.recipes import make_recipe
from bench.store import keys
from bench.store.cache import Cache
from bench.store.keys import make_key
from bench.store.records import Record

MAX_LISTED = 10  # refused cells named in one error


@dataclasses.dataclass(frozen=True)
class Plan:
    """A cell with its cache keys (``protection_key``/``purify_key`` are ``None`` where a stage is the
    identity) and the source its train set is assembled from."""

    cell: Cell
    source: mixes.TrainSource
    purify_key: str | None
    cell_key: str
    protection_fits: tuple[str, ...] = ()  # the models its protected set must hold
    purify_fits: tuple[str, ...] = ()  # the models its purified set must hold

    @property
    def dataset_key(self) -> str:
        return self.source.dataset_key

    @property
    def protection_key(self) -> str | None:
        return self.source.protection_key

    @property
    def crafting_key(self) -> str:
        """The dataset its protection is fitted on: the train set's, or the larger set of ``protect_per_class``."""
        return self.source.crafted_key or self.source.dataset_key


@dataclasses.dataclass(frozen=True)
class Components:
    """The cell's components, built from their choices."""

    protection: Protection
    countermeasure: Countermeasure
    victim: Victim

    @classmethod
    def of(cls, cell: Cell) -> Components:
        return cls(PROTECTIONS.create(cell.protection.name, **cell.protection.kwargs),
                   COUNTERMEASURES.create(cell.countermeasure.name, **cell.countermeasure.kwargs),
                   VICTIMS.create(cell.victim.name, **cell.victim.kwargs))


def crafting(choice: Choice) -> Choice | None:
    """The dataset that a dataset choice's protections are crafted on, where it sets ``protect_per_class``: the same
    dataset with that many images a class (else None)."""
    per_class = DATASETS.create(choice.name, **choice.kwargs).protect_per_class
    if per_class is None:
        return None
    params = {**choice.kwargs, "per_class": per_class}
    del params["protect_per_class"]
    return Choice(choice.name, tuple(params.items()), f"{choice.label} (crafting set, {per_class}/class)")


def dataset_choices(cells: Iterable[Cell]) -> set[Choice]:
    """The datasets that ``cells`` train on, with those their protections are crafted on."""
    trained = {cell.dataset for cell in cells}
    return trained | {crafted for choice in trained if (crafted := crafting(choice))}


def prepare_datasets(cache: Cache, choices: Iterable[Choice]) -> dict[Choice, str]:
    """Each dataset's key (``prepare_dataset``), once every one has been checked for missing files: a run with one
    missing stops before it decodes or loads any."""
    choices = sorted(choices, key=lambda c: c.label)
    if missing := [m for c in choices if (m := DATASETS.create(c.name, **c.kwargs).missing())]:
        raise ConfigError("\n".join(missing))
    return {choice: prepare_dataset(cache, choice) for choice in choices}


def prepare_dataset(cache: Cache, choice: Any) -> str:
    """Load a dataset once (files decoded into the cache), key it by its spec and content, and store train/test in
    the cache for workers."""
    dataset = DATASETS.create(choice.name, **choice.kwargs)
    train, test = dataset.load(cache)
    key = make_key({"dataset": dataset.spec(), "content": fingerprint(train, test)})
    for split, data in (("train", train), ("test", test)):
        if not cache.valid("dataset", f"{key}-{split}"):
            cache.save("dataset", f"{key}-{split}", data, {"spec": dataset.spec(), "split": split})
    return key


@dataclasses.dataclass(frozen=True)
class KnownKey:
    """A dataset's key found without loading it, and where: ``cache`` (its entry's manifest), ``records`` (a record
    of the same dataset spec: the files are fingerprinted when a run loads them) or ``none`` (a placeholder key,
    under which nothing is cached or recorded)."""

    key: str
    source: str


def known_dataset_key(cache: Cache, choice: Any, records: Iterable[Record] = ()) -> KnownKey:
    """The key ``prepare_dataset`` gives a dataset of this spec, from the cache's manifests, else from the newest
    record of a dataset of the same spec (a fresh clone's committed records), without loading the data."""
    spec = DATASETS.create(choice.name, **choice.kwargs).spec()
    for key, manifest in cache.entries("dataset"):  # those whose manifest checks out
        if key.endswith("-train") and make_key(manifest.get("spec")) == make_key(spec):
            return KnownKey(key.removesuffix("-train"), "cache")
    same = [r for r in records if r.dataset_name == choice.name and _dataset_spec(r) == spec
            and r.components["dataset"].version == spec["version"]]
    if same:
        return KnownKey(max(same, key=lambda r: r.finished_at).dataset_key, "records")
    return KnownKey(f"unprepared-{make_key(spec)}", "none")


def _dataset_spec(record: Record) -> dict[str, Any] | None:
    """The spec of a record's dataset as this bench builds it (None where it no longer builds)."""
    try:
        return DATASETS.create(record.dataset_name, **record.dataset_params).spec()
    except ConfigError:
        return None


def check_cells(cells: list[Cell], device: str, warn: Callable[[str], None], refuse: bool = True,
                deterministic: bool = False) -> tuple[list[Components], list[list[str]]]:
    """Every cell's components and the reasons each cannot run (before any data is loaded). With ``refuse``
    one ConfigError lists the refused cells (up to ``MAX_LISTED``); a dry run lists them itself first and then
    calls ``refusal``. Notes through ``warn`` components expensive on a CPU and, for a ``deterministic`` CUDA run,
    those that cannot honour it (``cuda_nondeterministic``, surrogates included)."""
    warned, built, reasons = set(), [], []
    for cell in cells:
        components = Components.of(cell)
        reasons.append(missing_capabilities(cell, components))
        surrogates = _surrogates(components) if device == "cpu" or deterministic else []
        for component in (components.protection, components.countermeasure, components.victim, *surrogates):
            if device == "cpu" and component.expensive_on_cpu and component.name not in warned:
                warned.add(component.name)
                warn(f"bench: note: {component.name} is expensive on a CPU (declared expensive_on_cpu); its cells "
                     "may take hours at full size")
            if deterministic and device == "cuda" and component.cuda_nondeterministic and \
                    f"det {component.name}" not in warned:
                warned.add(f"det {component.name}")
                warn(f"bench: note: --deterministic: {component.name} cannot honour it ("
                     f"{component.cuda_nondeterministic}); its cells may differ between reruns")
        built.append(components)
    if refuse and (error := refusal(cells, reasons)):
        raise error
    return built, reasons


def _surrogates(built: Components) -> list[Any]:
    """The victims a cell's protection and countermeasure train as surrogates (named by their ``surrogate_param``)."""
    names = [getattr(c, c.surrogate_param) for c in (built.protection, built.countermeasure) if c.surrogate_param]
    return [VICTIMS.get(name) for name in names if isinstance(name, str) and name in VICTIMS.names()]


def refusal(cells: list[Cell], reasons: list[list[str]]) -> ConfigError | None:
    """The error listing the cells that cannot run, or None when every cell can."""
    refused = [f"{_describe(cell)}: {'; '.join(why)}" for cell, why in zip(cells, reasons) if why]
    if not refused:
        return None
    more = f"\n  … and {len(refused) - MAX_LISTED} more" if len(refused) > MAX_LISTED else ""
    return ConfigError(f"{len(refused)} cell(s) ask for what their components cannot do:\n  "
                       + "\n  ".join(refused[:MAX_LISTED]) + more
                       + "\nexclude such combinations with [[exclude]] tables, or choose other components")


def missing_capabilities(cell: Cell, built: Components) -> list[str]:
    """Every reason this cell cannot run as declared (empty when it can)."""
    protection = type(built.protection)
    reasons = [r for r in [mix_refusal(cell)] if r]
    offered = set(protection.fits) if mixes.uses_protection(cell.mix) else set()
    for component in (built.countermeasure, built.victim):
        lacking = [k for k in component.needs_models if k not in offered]
        if lacking:
            why = "mix 'clean_only' uses no protection" if not mixes.uses_protection(cell.mix) else \
                f"{protection.name} fits {', '.join(protection.fits) or 'no model'}"
            reasons.append(f"{component.name} needs the protection's {', '.join(lacking)} model (needs_models), "
                           f"but {why}")
    for component in (built.protection, built.countermeasure, built.victim):
        param = component.surrogate_param
        if param is not None and getattr(component, param) not in VICTIMS:
            reasons.append(f"{component.name}'s {param} = {getattr(component, param)!r} is not a registered victim "
                           f"(victims: {', '.join(VICTIMS.names())})")
        # refused only where nothing can supply them: no $env path, no cached copy, and offline (or no hub id)
        reasons += [weights.missing() for weights in component.pretrained_needed() if not weights.resolve().available]
    return reasons


def mix_refusal(cell: Cell) -> str | None:
    """Why the cell's protection cannot serve its mix on its dataset (``None`` if it can)."""
    return mixes.missing_capability(cell.mix, PROTECTIONS.get(cell.protection.name), crafting(cell.dataset) is not None)


def plan_cell(cell: Cell, dataset_keys: Mapping[Choice, str], recipe: dict[str, Any],
              built: Components | None = None) -> Plan:
    """The cell's cache keys, from everything that determines each stage's output; ``dataset_keys`` holds the
    keys of ``dataset_choices``: the cell's dataset's and, with ``protect_per_class``, its crafting set's."""
    built, crafted = built or Components.of(cell), crafting(cell.dataset)
    if reason := mix_refusal(cell):
        raise ConfigError(f"{_describe(cell)}: {reason}")
    protection, countermeasure, victim = built.protection, built.countermeasure, built.victim
    dataset_key, crafted_key = dataset_keys[cell.dataset], dataset_keys[crafted] if crafted else None
    ratio = mixes.fitted_on(cell.mix, cell.poison_ratio)
    protection_key = None if protection.identity or not mixes.uses_protection(cell.mix) else keys.protection_key(
        crafted_key or dataset_key, protection.spec(), cell.seed, ratio)
    source = mixes.TrainSource(dataset_key, protection_key, cell.poison_ratio, cell.seed, cell.mix,
                               crafted_key if protection_key else None)
    unused = protection.spec() if not mixes.uses_protection(cell.mix) else None
    common = keys.train_source(dataset_key, protection_key, cell.poison_ratio, cell.seed, cell.mix, unused)
    purify_key = keys.purify_key(common, countermeasure.spec()) if DATA in countermeasure.stages else None
    own_recipe = dataclasses.asdict(make_recipe(**recipe).for_dataset(cell.dataset.name).for_victim(victim.name))
    cell_key = keys.cell_key(common, countermeasure.spec(), victim.spec(), own_recipe)
    return Plan(cell, source, purify_key, cell_key, protection.fits if protection_key else (),
                countermeasure.fits if purify_key else ())


def to_train(plans: list[Plan], recorded: dict[str, Record], redo: set[Cell], retry_failed: bool) -> set[str]:
    """The keys of the cells a run trains: never recorded, asked for again (``--rerun``, ``--force``), or failed
    where failures are retried."""
    return {p.cell_key for p in plans if p.cell_key not in recorded or p.cell in redo
            or (retry_failed and not recorded[p.cell_key].ok)}


def _describe(cell: Cell) -> str:
    labels = cell.labels()
    return "cell " + " × ".join(labels[k] for k in ("dataset", "protection", "countermeasure", "victim")) + \
        f" (seed {labels['seed']}, poison_ratio {labels['poison_ratio']}, mix {labels['mix']})"
