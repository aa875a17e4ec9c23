"""Matrix parsing and expansion as pure functions: parse_matrix → expand → select, plus load_matrix on files."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from bench.core.registry import ConfigError
from bench.plan.layout import Layout
from bench.plan.matrix import CELL_KEYS, MATRIX_DIR, expand, load_matrix, narrow, parse_matrix, select
from tests.conftest import record_json


def doc(**overrides):
    """A minimal valid matrix document (one cell) with ``overrides``."""
    base = {"datasets": ["digits"], "protections": ["clean"], "countermeasures": ["none"], "victims": ["cnn"]}
    return {**base, **overrides}


def cells_of(**overrides):
    return expand(parse_matrix(doc(**overrides), "t"))


def axis(cells, key):
    return [cell.labels()[key] for cell in cells]


# ------------------------------------------------------------------ expansion

EXPANSIONS = [
    pytest.param({}, "protection", ["clean"], id="minimal"),
    pytest.param({"protections": ["clean", "cwp"]}, "protection", ["clean", "cwp"], id="list-shorthand"),
    pytest.param({"protections": {"clean": {}, "cwp": {}, "cwn": {}}}, "protection", ["clean", "cwp", "cwn"],
                 id="table-keeps-order"),
    pytest.param({"countermeasures": {"jpeg": {"quality": [10, 50]}}}, "countermeasure",
                 ["jpeg[quality=10]", "jpeg[quality=50]"], id="one-sweep"),
    pytest.param({"countermeasures": {"jpeg": {"quality": 30}}}, "countermeasure", ["jpeg"], id="scalar-not-swept"),
    pytest.param({"countermeasures": {"none": {}, "jpeg": {"quality": [10, 50]}, "bdr": {"bits": [1, 2, 3]}}},
                 "countermeasure", ["none", "jpeg[quality=10]", "jpeg[quality=50]", "bdr[bits=1]", "bdr[bits=2]",
                                    "bdr[bits=3]"], id="sweeps-on-two-components"),
    pytest.param({"datasets": {"digits": {"size": [8, 16], "per_class": [5, 10, 20]}}}, "dataset",
                 [f"digits[size={s},per_class={p}]" for s in (8, 16) for p in (5, 10, 20)], id="two-sweeps-product"),
    pytest.param({"datasets": {"digits": {"size": [8, 16], "per_class": 5}}}, "dataset",
                 ["digits[size=8]", "digits[size=16]"], id="sweep-beside-scalar"),
    pytest.param({"seeds": [0, 1, 2]}, "seed", ["0", "1", "2"], id="seeds"),
    pytest.param({"seeds": 7}, "seed", ["7"], id="scalar-seed"),
    pytest.param({"poison_ratio": [0.25, 0.5, 1.0]}, "poison_ratio", ["0.25", "0.5", "1"], id="ratios"),
    pytest.param({"poison_ratio": 0.5}, "poison_ratio", ["0.5"], id="scalar-ratio"),
    pytest.param({"seeds": [0, 1], "poison_ratio": [0.5, 1.0]}, "seed", ["0", "0", "1", "1"], id="seeds-x-ratios-seed"),
    pytest.param({"seeds": [0, 1], "poison_ratio": [0.5, 1.0]}, "poison_ratio", ["0.5", "1", "0.5", "1"],
                 id="seeds-x-ratios-ratio"),
    pytest.param({"victims": {"cnn": {"width": [8, 16]}, "resnet18": {}}}, "victim",
                 ["cnn[width=8]", "cnn[width=16]", "resnet18"], id="victim-sweep"),
]


@pytest.mark.parametrize("overrides, key, expected", EXPANSIONS)
def test_expansion_labels(overrides, key, expected):
    assert axis(cells_of(**overrides), key) == expected


def test_defaults_seed_ratio_recipe():
    matrix = parse_matrix(doc(), "mine")
    assert matrix.name == "mine" and matrix.seeds == (0,) and matrix.poison_ratios == (1.0,)
    assert matrix.recipe == {"name": "quick"} and matrix.exclude == ()


def test_name_from_document_overrides_default():
    assert parse_matrix(doc(name="given", description="d"), "default").name == "given"


def test_swept_choices_carry_full_parameters():
    """Each swept variant's Choice holds every parameter (defaults included), not just the swept one."""
    cells = cells_of(datasets={"digits": {"size": [8, 16], "per_class": 5}})
    assert [c.dataset.kwargs for c in cells] == [
        {"per_class": 5, "size": 8, "test_fraction": 0.2, "test_per_class": None, "protect_per_class": None},
        {"per_class": 5, "size": 16, "test_fraction": 0.2, "test_per_class": None, "protect_per_class": None}]
    assert cells_of(countermeasures={"jpeg": {}})[0].countermeasure.kwargs == {"quality": 10}


def test_swept_values_are_coerced():
    """An int swept into a float field is stored as float in the Choice parameters."""
    cells = cells_of(protections={"cwn": {"epsilon": [4, 8]}})
    assert [c.protection.kwargs["epsilon"] for c in cells] == [4.0, 8.0]
    assert all(type(c.protection.kwargs["epsilon"]) is float for c in cells)


def test_cell_count_and_order():
    """Order is the product datasets × victims × protections × countermeasures × seeds × ratios."""
    raw = doc(datasets={"digits": {"size": [8, 16]}}, victims=["cnn", "resnet18"], protections=["clean", "cwp"],
              countermeasures=["none", "bdr"], seeds=[0, 1], poison_ratio=[0.5, 1.0])
    cells = expand(parse_matrix(raw, "t"))
    assert len(cells) == 2 ** 6
    got = [(c.dataset.label, c.victim.label, c.protection.label, c.countermeasure.label, c.seed, c.poison_ratio)
           for c in cells]
    want = list(itertools.product(["digits[size=8]", "digits[size=16]"], ["cnn", "resnet18"], ["clean", "cwp"],
                                  ["none", "bdr"], [0, 1], [0.5, 1.0]))
    assert got == want
    assert len(set(cells)) == len(cells)


def test_expand_is_pure():
    matrix = parse_matrix(doc(protections=["clean", "cwp"], seeds=[0, 1]), "t")
    assert expand(matrix) == expand(matrix)
    assert parse_matrix(doc(protections=["clean", "cwp"], seeds=[0, 1]), "t") == matrix


def test_parse_does_not_mutate_input():
    raw = doc(countermeasures={"jpeg": {"quality": [10, 50]}}, recipe={"epochs": 2})
    snapshot = repr(raw)
    parse_matrix(raw, "t")
    assert repr(raw) == snapshot


# ------------------------------------------------------------------ exclude

BIG = {"protections": ["clean", "cwp", "cwn", "random_noise"],
       "countermeasures": {"none": {}, "jpeg": {"quality": [10, 50]}, "bdr": {}}}

EXCLUDES = [
    pytest.param([{"protection": "cw*", "countermeasure": "jpeg*"}],
                 [(p, c) for p in ("clean", "cwp", "cwn", "random_noise")
                  for c in ("none", "jpeg[quality=10]", "jpeg[quality=50]", "bdr")
                  if not (p.startswith("cw") and c.startswith("jpeg"))], id="two-globs-and"),
    pytest.param([{"protection": "clean"}],
                 [(p, c) for p in ("cwp", "cwn", "random_noise")
                  for c in ("none", "jpeg[quality=10]", "jpeg[quality=50]", "bdr")], id="one-key"),
    pytest.param([{"countermeasure": "jpeg[[]quality=10]"}, {"protection": "random_noise", "countermeasure": "bdr"}],
                 [(p, c) for p in ("clean", "cwp", "cwn", "random_noise")
                  for c in ("none", "jpeg[quality=50]", "bdr") if (p, c) != ("random_noise", "bdr")],
                 id="two-rules-or"),
    pytest.param([{"protection": "nothing*"}],
                 [(p, c) for p in ("clean", "cwp", "cwn", "random_noise")
                  for c in ("none", "jpeg[quality=10]", "jpeg[quality=50]", "bdr")], id="matches-nothing"),
]


@pytest.mark.parametrize("exclude, expected", EXCLUDES)
def test_exclude(exclude, expected):
    cells = cells_of(**BIG, exclude=exclude)
    assert [(c.protection.label, c.countermeasure.label) for c in cells] == expected


@pytest.mark.parametrize("rule, kept", [
    ({"seed": 1}, [(0, 0.5), (0, 1.0)]),
    ({"seed": "1"}, [(0, 0.5), (0, 1.0)]),
    ({"poison_ratio": 0.5}, [(0, 1.0), (1, 1.0)]),
    ({"poison_ratio": "1"}, [(0, 0.5), (1, 0.5)]),
    ({"poison_ratio": 1.0}, [(0, 0.5), (1, 0.5)]),  # TOML `poison_ratio = 1.0`, as in the shipped matrices
])
def test_exclude_numeric_axes(rule, kept):
    """Numbers in [[exclude]] match the seed / poison-ratio axes however they are written."""
    cells = cells_of(seeds=[0, 1], poison_ratio=[0.5, 1.0], exclude=[rule])
    assert [(c.seed, c.poison_ratio) for c in cells] == kept


# ------------------------------------------------------------------ select

SELECT_DOC = {"protections": ["clean", "cwp", "cwn", "random_noise"], "countermeasures": ["none", "bdr"],
              "seeds": [0, 1]}


@pytest.mark.parametrize("only, expected", [
    pytest.param([], {(p, c, s) for p in ("clean", "cwp", "cwn", "random_noise") for c in ("none", "bdr")
                      for s in (0, 1)}, id="no-filter"),
    pytest.param(["protection=c*"], {(p, c, s) for p in ("clean", "cwp", "cwn") for c in ("none", "bdr")
                                     for s in (0, 1)}, id="glob"),
    pytest.param(["protection=c*", "countermeasure=none"], {(p, "none", s) for p in ("clean", "cwp", "cwn")
                                                            for s in (0, 1)}, id="two-keys-and"),
    pytest.param(["protection=c*", "countermeasure=none", "seed=1"], {(p, "none", 1) for p in ("clean", "cwp", "cwn")},
                 id="three-keys-and"),
    pytest.param(["countermeasure=b?r", "protection=random_noise"], {("random_noise", "bdr", s) for s in (0, 1)},
                 id="question-mark"),
    pytest.param(["protection=cw*", "protection=*n"], {("cwn", c, s) for c in ("none", "bdr") for s in (0, 1)},
                 id="same-key-twice-and"),
])
def test_select(only, expected):
    cells = cells_of(**SELECT_DOC)
    chosen = select(cells, only)
    assert {(c.protection.label, c.countermeasure.label, c.seed) for c in chosen} == expected
    assert chosen == [c for c in cells if c in chosen], "select must keep expansion order"
    assert expand(narrow(parse_matrix(doc(**SELECT_DOC), "t"), only)) == chosen, "--only narrows before expanding"


@pytest.mark.parametrize("only, named, labels", [
    pytest.param(["victim=resnet*"], "victim=resnet*", ["the victim labels here are: cnn"], id="no-label"),
    pytest.param(["protection=c*", "seed=7"], "seed=7", ["seed labels here are: 0, 1"], id="second-filter"),
    pytest.param(["protection=cw*", "protection=r*"], "protection=cw* protection=r*",
                 ["clean, cwp, cwn, random_noise"], id="same-key-disjoint"),
])
def test_a_filter_matching_nothing_names_it_and_the_labels(only, named, labels):
    """--only (and --rerun) that keeps no cell is a usage error naming the filter and the labels there are."""
    matrix = parse_matrix(doc(**SELECT_DOC), "t")
    for call in (lambda: select(expand(matrix), only, "--rerun"), lambda: narrow(matrix, only)):
        with pytest.raises(ConfigError) as info:
            call()
        assert named in str(info.value) and all(label in str(info.value) for label in labels), str(info.value)


@pytest.mark.parametrize("only", [["protection"], ["protection:cwp"], ["protocol=cwp"], ["=cwp"]])
def test_select_rejects_malformed_filters(only):
    with pytest.raises(ConfigError) as info:
        select(cells_of(), only)
    message = str(info.value)
    assert repr(only[0]) in message
    for key in CELL_KEYS:
        assert key in message


# ------------------------------------------------------------------ errors

ERRORS = [
    # (document, strings the message must contain: the key, and a close match where there is one)
    pytest.param({**doc(), "seed": [0]}, ["'seed'", "did you mean 'seeds'"], id="top-level-typo"),
    pytest.param({**doc(), "exclusions": []}, ["'exclusions'", "did you mean 'exclude'"], id="top-level-typo-2"),
    pytest.param({k: v for k, v in doc().items() if k != "victims"}, ["'victims'", "missing"], id="missing-axis"),
    pytest.param(doc(protections=["cwpp"]), ["protections.cwpp", "did you mean 'cwp'"], id="unknown-component"),
    pytest.param(doc(countermeasures={"jepg": {}}), ["countermeasures.jepg", "'jpeg'"], id="unknown-component-table"),
    pytest.param(doc(countermeasures={"jpeg": {"qualty": 50}}), ["countermeasures.jpeg", "'qualty'",
                                                                 "did you mean 'quality'"], id="unknown-parameter"),
    pytest.param(doc(countermeasures={"jpeg": {"qualty": [10, 50]}}), ["countermeasures.jpeg", "'qualty'",
                                                                       "did you mean 'quality'"],
                 id="unknown-swept-parameter"),
    pytest.param(doc(countermeasures={"jpeg": {"quality": "high"}}), ["countermeasures.jpeg", "'quality'", "'high'"],
                 id="bad-type"),
    pytest.param(doc(countermeasures={"jpeg": {"quality": 0}}), ["countermeasures.jpeg", "quality"], id="bad-range"),
    pytest.param(doc(countermeasures={"jpeg": {"quality": [10, 0]}}), ["countermeasures.jpeg", "quality"],
                 id="bad-value-in-sweep"),
    pytest.param(doc(countermeasures={"jpeg": {"quality": []}}), ["countermeasures.jpeg", "'quality'", "empty"],
                 id="empty-sweep"),
    pytest.param(doc(protections=[]), ["'protections'", "non-empty"], id="empty-axis"),
    pytest.param(doc(protections={}), ["'protections'", "non-empty"], id="empty-axis-table"),
    pytest.param(doc(protections={"cwp": 0.5}), ["protections.cwp", "table"], id="axis-entry-not-table"),
    pytest.param(doc(poison_ratio=0), ["'poison_ratio'", "(0, 1]"], id="ratio-zero"),
    pytest.param(doc(poison_ratio=[0.5, 1.5]), ["'poison_ratio'", "(0, 1]"], id="ratio-above-one"),
    pytest.param(doc(poison_ratio=-0.5), ["'poison_ratio'"], id="ratio-negative"),
    pytest.param(doc(poison_ratio="all"), ["'poison_ratio'"], id="ratio-string"),
    pytest.param(doc(seeds=[0.5]), ["'seeds'", "integers"], id="seed-float"),
    pytest.param(doc(seeds=[]), ["'seeds'"], id="seeds-empty"),
    pytest.param(doc(seeds=[True]), ["'seeds'"], id="seed-bool"),
    pytest.param(doc(exclude=[{"protections": "cw*"}]), ["exclude[0].protections", "did you mean 'protection'"],
                 id="exclude-key-typo"),
    pytest.param(doc(exclude=[{"seed": 1}, {"countermesure": "none"}]),
                 ["exclude[1].countermesure", "did you mean 'countermeasure'"], id="exclude-second-rule"),
    pytest.param(doc(recipe={"name": "quick", "epoch": 3}), ["'recipe'", "'epoch'", "epochs"], id="recipe-field"),
    pytest.param(doc(recipe={"name": "quik"}), ["'recipe'", "'quik'", "quick"], id="recipe-name"),
    pytest.param(doc(recipe={"epochs": "ten"}), ["'recipe'", "'epochs'"], id="recipe-bad-type"),
    pytest.param(doc(recipe={"epochs": 0}), ["'recipe'", "epochs"], id="recipe-bad-value"),
    pytest.param(doc(recipe={"optimizer": "adamw"}), ["'recipe'", "optimizer"], id="recipe-bad-choice"),
    pytest.param(doc(layout=["protection"]), ["'layout'", "table"], id="layout-not-table"),
    pytest.param(doc(layout={"row": ["victim"]}), ["layout.row", "did you mean 'rows'"], id="layout-key-typo"),
    pytest.param(doc(layout={"rows": "victim"}), ["layout.rows", "list", 'rows = ["protection"]'], id="layout-rows-str"),
    pytest.param(doc(layout={"rows": []}), ["layout.rows", "non-empty"], id="layout-rows-empty"),
    pytest.param(doc(layout={"rows": ["protections"]}), ["layout.rows", "'protections'", "did you mean 'protection'",
                                                          "protection, countermeasure, victim"], id="layout-rows-axis"),
    pytest.param(doc(layout={"columns": "dataset"}), ["layout.columns", "'dataset'", "protection, countermeasure, victim"],
                 id="layout-columns-axis"),
    pytest.param(doc(layout={"columns": ["victim"]}), ["layout.columns", "one axis", 'columns = "victim"'],
                 id="layout-columns-list"),
    pytest.param(doc(layout={"rows": ["victim", "victim"], "columns": "protection"}), ["layout.rows", "twice"],
                 id="layout-rows-twice"),
    pytest.param(doc(layout={"rows": ["protection", "countermeasure"]}),
                 ["layout.columns", "'countermeasure' is also in rows", "defaults", "set columns to 'victim'"],
                 id="layout-columns-default-in-rows"),
    pytest.param(doc(layout={"rows": ["victim"], "columns": "victim"}), ["layout.columns", "also in rows",
                                                                         "'protection' or 'countermeasure'"],
                 id="layout-columns-in-rows"),
    pytest.param(doc(layout={"rows": ["protection", "countermeasure", "victim"], "columns": "victim"}),
                 ["layout.columns", "leave one axis out of rows"], id="layout-all-axes-in-rows"),
    pytest.param(doc(layout={"labels": "Normal"}), ["layout.labels", "table", '{ none = "Normal" }'],
                 id="layout-labels-not-table"),
    pytest.param(doc(layout={"labels": {"none": 1}}), ["layout.labels", "strings"], id="layout-label-not-str"),
    pytest.param(doc(countermeasures=["none", "jpeg"], layout={"labels": {"jpge": "JPEG"}}),
                 ["layout.labels", "unknown label 'jpge'", "did you mean 'jpeg'", "countermeasure: none, jpeg",
                  "protection: clean"], id="layout-unknown-label"),
    pytest.param(doc(victims=["cnn", "resnet18"], layout={"labels": {"resnet18": "ResNet-18"}}),
                 ["unknown label 'resnet18'", "protection: clean; countermeasure: none)"],
                 id="layout-label-of-a-grouped-axis"),
    pytest.param(doc(countermeasures=["none", "jpeg"], exclude=[{"countermeasure": "jpeg"}],
                     layout={"labels": {"jpeg": "JPEG"}}), ["unknown label 'jpeg'", "countermeasure: none)"],
                 id="layout-label-of-excluded-cells"),
    pytest.param(doc(layout={"summary": "no"}), ["layout.summary", "true or false"], id="layout-summary-not-bool"),
]


@pytest.mark.parametrize("raw, fragments", ERRORS)
def test_parse_errors(raw, fragments):
    with pytest.raises(ConfigError) as info:
        parse_matrix(raw, "t")
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


# ------------------------------------------------------------------ layout

UGE_DOC = doc(protections=["clean", "cwp"], countermeasures=["none", "jpeg"], victims=["cnn", "resnet18"],
              layout={"rows": ["protection", "countermeasure"], "columns": "victim", "summary": False,
                      "labels": {"none": "Normal", "jpeg": "JPEG", "resnet18": "ResNet-18"}})


def test_layout_defaults_and_parse():
    assert parse_matrix(doc(), "t").layout == Layout() == Layout(("protection",), "countermeasure", {}, True)
    assert parse_matrix(doc(layout={}), "t").layout == Layout()
    layout = parse_matrix(UGE_DOC, "t").layout
    assert layout == Layout(("protection", "countermeasure"), "victim", {"none": "Normal", "jpeg": "JPEG",
                                                                         "resnet18": "ResNet-18"}, False)
    assert layout.axes == ("protection", "countermeasure", "victim") and layout.name("cwp") == "cwp"


def test_layout_round_trips_through_matrix_json_into_the_leaderboard(tmp_path):
    """save_resolved writes the layout beside the records; leaderboard() reads it back (records carry none)."""
    import json

    from bench.execute.scheduler import save_resolved
    from bench.report.leaderboard import leaderboard

    matrix = parse_matrix(UGE_DOC, "m")
    run = tmp_path / "runs" / "m"
    save_resolved(matrix, [], run / "matrix.json")
    assert Layout.parse(json.loads((run / "matrix.json").read_text())["layout"]) == matrix.layout
    records = [{**cell.labels(), "cell": str(i), "status": "ok", "test_acc_final": 0.1 * (i + 1), "recipe": "quick",
                "countermeasure_reports": "final", "seed": cell.seed, "poison_ratio": cell.poison_ratio}
               for i, cell in enumerate(expand(matrix))]
    (run / "records.jsonl").write_text("".join(json.dumps(record_json(**r)) + "\n" for r in records))
    tables, _ = leaderboard(tmp_path, "m")
    assert len(tables) == 1
    mean = tables[0].mean
    assert list(mean.index) == ["clean · Normal", "clean · JPEG", "cwp · Normal", "cwp · JPEG"]
    assert list(mean.columns) == ["cnn", "ResNet-18"]
    assert mean.at["cwp · JPEG", "ResNet-18"] == pytest.approx(80)  # cells: victims outermost, then protections


@pytest.mark.parametrize("command", ["run", "leaderboard"])
def test_bad_layout_exits_2(tmp_path, capsys, command):
    """``bench run`` validates the TOML's layout and ``bench leaderboard`` the resolved one, before anything runs."""
    import json

    from bench.cli import main

    path = write(tmp_path, VALID + '[layout]\ncolumns = "victims"\n', "bad.toml")
    if command == "leaderboard":
        run = tmp_path / "r" / "runs" / "bad"
        run.mkdir(parents=True)
        (run / "records.jsonl").write_text("{}\n")
        (run / "matrix.json").write_text(json.dumps({"axes": {}, "layout": {"columns": "victims"}}))
    assert main([command, "--matrix", str(path), "--results", str(tmp_path / "r"),
                 *(["--dry-run"] if command == "run" else [])]) == 2
    assert "layout.columns" in capsys.readouterr().err


# ------------------------------------------------------------------ files


def write(folder: Path, text: str, name: str = "m.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


VALID = """
description = "from a file"
seeds = [0, 1]
[datasets.digits]
per_class = 5
[protections]
clean = {}
cwp = { size_fraction = [0.25, 0.5] }
[countermeasures]
none = {}
[victims]
cnn = { width = 8 }
"""


def test_load_matrix_from_file(tmp_path):
    path = write(tmp_path, VALID, "mine.toml")
    matrix = load_matrix(str(path))
    assert matrix.name == "mine" and matrix.source == str(path) and matrix.description == "from a file"
    cells = expand(matrix)
    assert axis(cells, "protection") == ["clean", "clean", "cwp[size_fraction=0.25]", "cwp[size_fraction=0.25]",
                                         "cwp[size_fraction=0.5]", "cwp[size_fraction=0.5]"]


@pytest.mark.parametrize("text, fragment", [
    ("seed = 3\n" + VALID, "did you mean 'seeds'"),
    (VALID.replace("cnn = { width = 8 }", "cnn = { widht = 8 }"), "did you mean 'width'"),
    (VALID.replace("none = {}", "nope = {}"), "'nope'"),
])
def test_load_matrix_error_names_the_file(tmp_path, text, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_matrix(str(path))
    assert str(path) in str(info.value) and fragment in str(info.value)


@pytest.mark.parametrize("text", ["seeds = [0,", "[protections\nclean = {}", "a = 1\na = 2\n"])
def test_invalid_toml_is_a_config_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_matrix(str(path))
    assert str(path) in str(info.value) and "TOML" in str(info.value)


def test_missing_file_and_unknown_name(tmp_path):
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_matrix(str(missing))
    with pytest.raises(ConfigError, match="did you mean 'smoke'"):
        load_matrix("smok")


SHIPPED = sorted(MATRIX_DIR.glob("*.toml"))


def test_matrices_are_shipped():
    assert SHIPPED, f"no matrices in {MATRIX_DIR}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_matrix_loads_and_expands(path):
    by_path, by_name = load_matrix(str(path)), load_matrix(path.stem)
    cells = expand(by_path)
    assert len(cells) >= 1 and by_name.axes == by_path.axes
    assert len(set(cells)) == len(cells), "duplicate cells"
