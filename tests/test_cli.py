"""`bench list` and `bench show`: what they print, how names resolve, what listing imports; ε units and their warning."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib

import pytest

from bench.api import PROTECTIONS, pixel_steps
from bench.cli import main
from bench.core.components import VICTIMS
from bench.core.units import units
from bench.plan.matrix import parse_matrix
from bench.plan.recipes import RECIPES, Recipe
from bench.report.catalog import MATRIX_DIR, parameter_count
from tests.conftest import REPO


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_matrices_gives_each_description_recipe_reference_and_cpu_alternative(capsys):
    code, out, _ = run(capsys, "list", "matrices")
    assert code == 0
    for path in sorted(MATRIX_DIR.glob("*.toml")):
        raw = tomllib.loads(path.read_text())
        assert f"  {path.stem}: {raw['description']}\n" in out
    assert "recipe: dh; reference: dh-table1; cpu_alternative: dh-table1-cpu" in out  # dh-table1's line
    assert "recipe: cpu; reference: —; cpu_alternative: —" in out  # smoke-sized matrices name none


def test_list_recipes_gives_key_settings_overrides_and_source(capsys):
    code, out, _ = run(capsys, "list", "recipes")
    assert code == 0
    for name, recipe in RECIPES.items():
        assert f"  {name}: " in out and f"      source: {recipe.source}\n" in out
    assert "  dh: 40,000 iterations, batch 128, sgd lr 0.1 momentum 0.9 wd 0.0005, cosine" in out
    assert "  apbench: 200 epochs, batch 256, sgd lr 0.1 momentum 0.9 wd 0.0005, step ×0.5 at epochs [100]" in out
    assert "      for cnn: optimizer='adam', lr=0.001, epochs=100, weight_decay=0.0\n" in out  # uge's CNN


def test_list_marks_pixel_step_parameters_and_markdown_stays_the_readme_table(capsys):
    _, out, _ = run(capsys, "list", "protections")
    assert "  em: mode='samplewise', epsilon=8.0 [1/255], steps=None, step_size=0.8 [1/255]," in out
    _, out, _ = run(capsys, "list", "countermeasures")
    assert "  adv_training: norm='linf', epsilon=None, steps=10, step_size=None, random_start=True\n" in out
    _, out, _ = run(capsys, "list", "--markdown")
    assert "| protection | `em` | mode='samplewise', epsilon=8.0, steps=None, step_size=0.8," in out  # no units
    code, _, err = run(capsys, "list", "matrices", "--markdown")
    assert code == 2 and "--markdown prints the README's component table" in err


def test_list_without_a_kind_lists_all_six(capsys):
    _, out, _ = run(capsys, "list")
    headers = [line.split(" ")[0] for line in out.splitlines() if not line.startswith(" ")]
    assert headers == ["protections:", "countermeasures:", "victims:", "datasets:", "matrices", "recipes"]


def test_show_a_component(capsys):
    code, out, _ = run(capsys, "show", "protections/em")
    assert code == 0
    cls = PROTECTIONS.get("em")
    assert out.startswith(f"protections/em (protection, version {cls.version})\nfile: protections/em.py:")
    assert f"follows: {cls.paper}\n" in out and "capabilities: needs labels; trains a surrogate victim" in out
    assert "  epsilon: float = 8.0 [1/255]\n" in out and "  steps: int | None = None\n" in out
    assert "  surrogate: str = 'resnet18'\n" in out
    assert cls.__doc__.splitlines()[0] in out  # the whole docstring follows
    code, out, _ = run(capsys, "show", "resnet18")  # a bare name that only one kind has
    assert code == 0 and "victims/resnet18" in out and "model size at 3×32×32, 10 classes: 11,173,962 weights" in out


def test_show_a_matrix_validates_it_and_counts_its_cells(capsys):
    code, out, _ = run(capsys, "show", "smoke")
    assert code == 0
    assert out.startswith("matrices/smoke\nfile: bench/matrices/smoke.toml\ndescription: Smoke test")
    assert "cells: 20\n" in out and "recipe: quick (epochs=10)\n" in out
    assert "protections (4):\n  clean\n  random_noise\n  cwp: size_fraction=0.375\n  cwn\n" in out
    assert "victims (1):\n  cnn: width=16\n" in out
    code, out, _ = run(capsys, "show", str(MATRIX_DIR / "smoke.toml"))  # a path works too
    assert code == 0 and "cells: 20\n" in out


def test_show_a_recipe_gives_every_field(capsys):
    code, out, _ = run(capsys, "show", "recipes/uge")
    assert code == 0 and out.startswith("recipes/uge\nfile: bench/plan/recipes.py\n")
    for field in dataclasses.fields(Recipe):
        assert f"\n{field.name}:" in out
    assert "victim_overrides:\n  cnn: optimizer='adam', lr=0.001, epochs=100, weight_decay=0.0\n" in out


def test_a_name_shared_by_kinds_shows_each_and_says_how_to_pick(capsys):
    code, out, _ = run(capsys, "show", "dh")  # DH the protection and dh the recipe
    assert code == 0
    assert "`bench show protections/dh`, `bench show recipes/dh`" in out.splitlines()[0]
    assert "\nprotections/dh (protection, version" in out and "\nrecipes/dh\n" in out
    code, out, _ = run(capsys, "show", "recipe/dh")  # the singular names the kind too
    assert code == 0 and out.startswith("recipes/dh\n") and "protections/dh" not in out


@pytest.mark.parametrize(("name", "message"), [
    ("emm", "unknown name 'emm'; did you mean protections/em, protections/rem?"),
    ("protections/emx", "unknown protection 'emx'; did you mean protections/em"),
    ("matrices/smokes", "unknown matrix 'smokes'; did you mean matrices/smoke?"),
    ("widgets/em", "unknown kind 'widgets'; write KIND/NAME with KIND one of protections, countermeasures"),
])
def test_an_unknown_name_exits_2_with_close_matches(capsys, name, message):
    code, out, err = run(capsys, "show", name)
    assert code == 2 and out == "" and message in err


def test_victim_sizes_built_on_the_meta_device_match_real_builds():
    for name in VICTIMS.names():
        cls = VICTIMS.get(name)
        if not cls.needs_models:
            real = sum(p.numel() for p in cls().build(10, 3, 32).parameters())
            assert parameter_count(cls) == real, name


MATRIX = {"datasets": ["digits"], "victims": ["cnn"], "countermeasures": ["none"]}


def test_a_budget_below_one_warns_with_the_value_in_pixel_steps(capsys):
    parse_matrix({**MATRIX, "protections": {"em": {"epsilon": 0.031}}}, "m")
    err = capsys.readouterr().err
    assert err == ("bench: warning: key 'protections.em': bench counts ε in 1/255 steps: epsilon = 0.031 gives "
                   "almost no perturbation; did you mean 8?\n")
    parse_matrix({**MATRIX, "protections": {"rem": {"adv_epsilon": [4 / 255, 4.0]}}}, "m")  # one warning per variant
    assert capsys.readouterr().err.count("adv_epsilon = 0.0156863 gives almost no perturbation; did you mean 4?") == 1


def test_no_warning_for_budgets_in_pixel_steps_steps_below_one_or_other_units(capsys):
    parse_matrix({**MATRIX, "protections": {"em": {"epsilon": 8, "step_size": 0.5}, "cwn": {"epsilon": 0}},
                  "countermeasures": {"adv_training": {"epsilon": 8 / 255}}}, "m")  # AT counts in [0, 1] units
    assert capsys.readouterr().err == ""


def test_pixel_steps_declares_the_unit_as_field_metadata():
    field = dataclasses.fields(PROTECTIONS.get("rem"))
    assert {f.name: dict(f.metadata) for f in field if f.metadata} == {
        "epsilon": {"unit": "1/255", "budget": True}, "step_size": {"unit": "1/255", "budget": False},
        "adv_epsilon": {"unit": "1/255", "budget": True}, "adv_step_size": {"unit": "1/255", "budget": False}}
    assert units(PROTECTIONS.get("uge")) == {} and dataclasses.field(default=1.0).metadata == {}  # rho in [0, 1]

    @dataclasses.dataclass(frozen=True)
    class Mine:
        epsilon: float = pixel_steps(16.0)

    assert Mine().epsilon == 16.0 and units(Mine) == {"epsilon": "1/255"}


def test_listing_victims_imports_nothing_heavy():
    """`bench list victims` stays near `import torch`: no torchvision.models/dynamo, diffusion, NLP or table stacks.
    (Timing it would be flaky on a shared machine; what is imported is not.)"""
    script = ("import contextlib, io, sys\nfrom bench.cli import main\n"
              "with contextlib.redirect_stdout(io.StringIO()):\n    assert main(['list', 'victims']) == 0\n"
              "print(' '.join(sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stdout.split())
    heavy = ["diffusers", "transformers", "torch._dynamo", "pandas", "matplotlib"]
    assert [name for name in heavy if name in loaded] == []
