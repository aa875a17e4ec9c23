"""Matrix expansion is a pure function: table-driven cases over parse_matrix → expand → select."""

from __future__ import annotations

import pytest

from bench.matrix import expand, load_matrix, parse_matrix, select, MATRIX_DIR
from bench.registry import ConfigError


def doc(**overrides):
    """A minimal valid matrix document with ``overrides``."""
    base = {"datasets": ["digits"], "protections": ["clean"], "countermeasures": ["none"], "victims": ["cnn"]}
    return {**base, **overrides}


def labels(cells, key):
    return [cell.labels()[key] for cell in cells]


EXPANSIONS = [
    # (document overrides, expected number of cells, axis to inspect, expected labels on that axis)
    ({}, 1, "protection", ["clean"]),
    ({"protections": ["clean", "cwp", "cwn"]}, 3, "protection", ["clean", "cwp", "cwn"]),
    ({"countermeasures": {"jpeg": {"quality": [10, 50]}}}, 2, "countermeasure", ["jpeg[quality=10]", "jpeg[quality=50]"]),
    ({"countermeasures": {"jpeg": {"quality": 30}}}, 1, "countermeasure", ["jpeg"]),
    ({"protections": {"cwn": {"epsilon": [4, 8]}, "cwp": {"size_fraction": [0.25, 0.5]}}}, 4, "protection",
     ["cwn[epsilon=4]", "cwn[epsilon=8]", "cwp[size_fraction=0.25]", "cwp[size_fraction=0.5]"]),
    ({"datasets": {"digits": {"size": [8, 16], "per_class": [5, 10]}}}, 4, "dataset",
     ["digits[size=8,per_class=5]", "digits[size=8,per_class=10]", "digits[size=16,per_class=5]",
      "digits[size=16,per_class=10]"]),
    ({"seeds": [0, 1, 2]}, 3, "seed", ["0", "1", "2"]),
    ({"seeds": 7}, 1, "seed", ["7"]),
    ({"poison_ratio": [0.5, 1.0]}, 2, "poison_ratio", ["0.5", "1"]),
    ({"seeds": [0, 1], "poison_ratio": [0.5, 1.0], "protections": ["clean", "cwp"]}, 8, "seed",
     ["0", "0", "1", "1", "0", "0", "1", "1"]),
    ({"victims": ["cnn", "resnet18"], "protections": ["clean", "cwp"]}, 4, "victim", ["cnn", "cnn", "resnet18", "resnet18"]),
    ({"protections": ["clean", "cwp", "cwn"], "countermeasures": ["none", "bdr"],
      "exclude": [{"protection": "cw*", "countermeasure": "bdr"}]}, 4, "protection", ["clean", "clean", "cwp", "cwn"]),
    ({"protections": ["clean", "cwp"], "seeds": [0, 1], "exclude": [{"seed": 1}]}, 2, "seed", ["0", "0"]),
]


@pytest.mark.parametrize("overrides, count, axis, expected", EXPANSIONS)
def test_expansion(overrides, count, axis, expected):
    cells = expand(parse_matrix(doc(**overrides), "t"))
    assert len(cells) == count
    assert labels(cells, axis) == expected


def test_expansion_is_pure_and_ordered():
    """Same input, same cells; order: dataset, victim, protection, countermeasure, seed, ratio."""
    matrix = parse_matrix(doc(protections=["clean", "cwp"], countermeasures=["none", "bdr"]), "t")
    first, second = expand(matrix), expand(matrix)
    assert first == second
    assert [(c.protection.label, c.countermeasure.label) for c in first] == [
        ("clean", "none"), ("clean", "bdr"), ("cwp", "none"), ("cwp", "bdr")]


def test_choice_carries_full_parameters():
    cell = expand(parse_matrix(doc(countermeasures={"jpeg": {}}), "t"))[0]
    assert cell.countermeasure.kwargs == {"quality": 10}


SELECTIONS = [
    (["protection=c*"], 6),
    (["protection=cwp"], 2),
    (["protection=c*", "countermeasure=none"], 3),
    (["countermeasure=b?r"], 3),
    (["victim=resnet*"], 0),
]


@pytest.mark.parametrize("only, count", SELECTIONS)
def test_select(only, count):
    cells = expand(parse_matrix(doc(protections=["clean", "cwp", "cwn"], countermeasures=["none", "bdr"]), "t"))
    assert len(select(cells, only)) == count


ERRORS = [
    # (document overrides, substrings the message must contain)
    ({"seed": [0]}, ["'seed'", "'seeds'"]),
    ({"protections": ["cwpp"]}, ["protections.cwpp", "'cwp'"]),
    ({"countermeasures": {"jpeg": {"qualty": 10}}}, ["countermeasures.jpeg", "'quality'"]),
    ({"countermeasures": {"jpeg": {"quality": "high"}}}, ["countermeasures.jpeg", "quality", "int"]),
    ({"countermeasures": {"jpeg": {"quality": 0}}}, ["countermeasures.jpeg", "quality"]),
    ({"countermeasures": {"jpeg": {"quality": []}}}, ["countermeasures.jpeg", "empty"]),
    ({"countermeasures": {"bdr": {"bits": True}}}, ["countermeasures.bdr", "bits"]),
    ({"poison_ratio": 0}, ["poison_ratio"]),
    ({"poison_ratio": [1.5]}, ["poison_ratio"]),
    ({"seeds": [0.5]}, ["seeds", "integers"]),
    ({"exclude": [{"protectoin": "clean"}]}, ["exclude[0].protectoin", "'protection'"]),
    ({"recipe": {"name": "quick", "epoch": 3}}, ["recipe", "epoch"]),
    ({"recipe": {"name": "quik"}}, ["recipe", "quik"]),
    ({"victims": []}, ["victims"]),
    ({"datasets": {"digits": {"size": 2}}}, ["datasets.digits", "size"]),
]


@pytest.mark.parametrize("overrides, needles", ERRORS)
def test_errors_name_key_and_close_match(overrides, needles):
    with pytest.raises(ConfigError) as err:
        parse_matrix(doc(**overrides), "t")
    for needle in needles:
        assert needle in str(err.value)


def test_missing_axis_is_an_error():
    raw = doc()
    del raw["victims"]
    with pytest.raises(ConfigError, match="victims"):
        parse_matrix(raw, "t")


@pytest.mark.parametrize("only", [["protection"], ["protocol=clean"]])
def test_bad_only_filter(only):
    with pytest.raises(ConfigError, match="KEY=GLOB"):
        select([], only)


def test_load_matrix_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("protections = [\n")
    with pytest.raises(ConfigError, match="bad.toml.*TOML"):
        load_matrix(str(bad))
    with pytest.raises(ConfigError, match="did you mean 'smoke'"):
        load_matrix("smok")


@pytest.mark.parametrize("path", sorted(MATRIX_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_named_matrices_load_and_expand(path):
    assert expand(load_matrix(path.stem))
