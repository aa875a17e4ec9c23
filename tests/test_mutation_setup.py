"""`make mutate`'s configuration (tests/mutate.py) stays true to the checkout: every module and test file it names
exists, and every equivalent mutant listed names a mutated module, a change and a reason."""

from __future__ import annotations

import tomllib

from tests.conftest import REPO
from tests.mutate import MODULES, mutmut_config


def test_every_module_and_test_file_named_exists():
    for module, tests in MODULES.items():
        assert (REPO / module).is_file(), module
        assert all((REPO / "tests" / name.split("::")[0]).is_file() for name in tests), (module, tests)
        config = tomllib.loads(mutmut_config(module))["tool"]["mutmut"]
        assert config["only_mutate"] == [module] and config["pytest_add_cli_args_test_selection"]


def test_every_listed_equivalent_mutant_is_explained():
    listed = tomllib.loads((REPO / "tests" / "equivalent_mutants.toml").read_text()).get("equivalent", [])
    for item in listed:
        assert set(item) == {"module", "function", "change", "reason"}, item
        assert item["module"] in MODULES and item["function"] and item["reason"].strip(), item
        changed = item["change"].strip().splitlines()
        assert changed and all(line[:2] in ("- ", "+ ") for line in changed), item
    keys = [(item["module"], item["function"], item["change"].strip()) for item in listed]
    assert len(keys) == len(set(keys)), "an equivalent mutant is listed twice"
