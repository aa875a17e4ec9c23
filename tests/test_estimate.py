"""The cost estimate before a run (bench.plan.estimate) and the CPU refusal of GPU-sized matrices; no training."""

from __future__ import annotations

import json

import pytest

from bench.cli import main
from bench.core.registry import ConfigError
from bench.plan.estimate import Estimate, estimate, refusal, timings
from bench.plan.matrix import expand, load_matrix, parse_matrix
from bench.plan.recipes import make_recipe
from bench.store.cache import Cache
from tests.conftest import record_json

TRANSFER = {"full": {"resnet50", "vgg19", "densenet121", "vit"}, "full-cpu": {"resnet20", "vgg11", "mobilenetv2", "vit"}}


@pytest.mark.parametrize("name", ["full", "full-cpu"])
def test_full_matrices_load_and_expand(name):
    """14 protections × 18 countermeasures (columns: UEraser's JPEG variant, for TAP and AR, shares its column) on
    the first victim; the transfer victims only with `none`; in `full`, DH Table I's ImageNet block besides (7 rows ×
    14 columns on ResNet-18, its own 8,000 iterations)."""
    matrix = load_matrix(name)
    cells = [c for c in expand(matrix) if c.dataset.name != "imagenet-subset"]
    subset = [c for c in expand(matrix) if c.dataset.name == "imagenet-subset"]
    assert len(subset) == (7 * 14 if name == "full" else 0) and {c.victim.label for c in subset} <= {"resnet18"}
    assert {c.protection.name for c in subset} <= {"clean", "em", "rem", "tap", "lsp", "dh"}
    if subset:
        recipe = make_recipe(**matrix.recipe)
        assert recipe.for_dataset("imagenet-subset").iterations == 8000
        assert recipe.for_dataset("cifar10").iterations == 40_000
    first = {"full": "resnet18", "full-cpu": "cnn"}[name]
    columns = {matrix.layout.name(c.countermeasure.label) for c in cells}
    assert len({c.protection.label for c in cells}) == 14 and len(columns) == 18
    assert sum(c.victim.label == first for c in cells) == 14 * 18
    transfer = [c for c in cells if c.victim.label != first]
    assert {c.victim.label for c in transfer} == TRANSFER[name] and len(transfer) == 14 * 4
    assert {c.countermeasure.label for c in transfer} == {"none"}
    assert matrix.cpu_alternative == ("full-cpu" if name == "full" else None)


def test_cpu_alternative_must_name_a_matrix():
    doc = {"datasets": ["digits"], "protections": ["clean"], "countermeasures": ["none"], "victims": ["cnn"]}
    assert parse_matrix({**doc, "cpu_alternative": "smoke"}, "m").cpu_alternative == "smoke"
    with pytest.raises(ConfigError, match="key 'cpu_alternative': 'smok' is not a named matrix; did you mean 'smoke'"):
        parse_matrix({**doc, "cpu_alternative": "smok"}, "m")
    with pytest.raises(ConfigError, match="unknown top-level key; did you mean 'cpu_alternative'"):
        parse_matrix({**doc, "cpu_alternatives": "smoke"}, "m")


def record(**fields):
    base = {"status": "ok", "device": "cpu", "victim_name": "cnn", "recipe": "quick", "recipe_params": {"batch_size": 128},
            "dataset_name": "digits", "dataset_params": {"per_class": None}, "protection_name": "clean",
            "protection_params": {}, "countermeasure_name": "none", "countermeasure_params": {}, "cell": "x"}
    return record_json(**{**base, **fields})


def test_estimate_uses_recorded_timings(tmp_path):
    """Training scales a recorded rate by images × epochs (× PGD passes for AT); a protected set scales the recorded
    seconds per image; the sum is divided by the jobs. Records of another device or victim are not used."""
    runs = tmp_path / "runs" / "other"
    runs.mkdir(parents=True)
    lines = [record(steps=100, seconds={"train": 10.0}),  # 12,800 images in 10 s: 1,280 /s
             record(protection_name="cwn", protection_params={"epsilon": 8.0}, steps=100,
                    seconds={"train": 10.0, "protect": 1.438}),  # 1,438 digits: 1 ms an image
             record(device="cuda:0", steps=100, seconds={"train": 0.01}), record(victim_name="lenet", steps=1,
                                                                                  seconds={"train": 1e-6})]
    (runs / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    matrix = parse_matrix({"datasets": ["digits"], "protections": {"clean": {}, "cwn": {"epsilon": 8.0}},
                           "countermeasures": {"none": {}, "adv_training": {"steps": 2}}, "victims": ["cnn"],
                           "recipe": {"name": "quick", "epochs": 10}}, "m")
    work = estimate(matrix, expand(matrix), Cache(tmp_path / "cache"), {}, [], timings([tmp_path]), "cpu", jobs=2)
    train = 1_438 * 10 / 1_280
    assert work.seconds == pytest.approx((2 * train + 2 * 3 * train + 1.438) / 2)
    assert (work.cells, work.recorded, work.sets["protected"], work.from_records, work.from_table) == (4, 0, (0, 1), 5, 0)
    line = work.line("m")
    assert "4 cells, 0 recorded" in line and "protected sets 0 cached, 1 to build" in line
    assert "on this CPU (2 jobs; all 5 stages timed from records on this CPU)" in line
    bare = estimate(matrix, expand(matrix), Cache(tmp_path / "cache"), {}, [], [], "cpu", jobs=2)
    assert bare.from_records == 0 and bare.from_table == 5 and "from bench's rate table, 4 uncalibrated" in bare.line("m")


def test_refusal_decision():
    """Only a CPU run over max_hours is refused, naming the CPU alternative and its estimate."""
    matrix = load_matrix("full")
    work = Estimate(308, 0, {}, 310 * 3600.0, 2, "cpu", 0, 461)
    small = Estimate(308, 0, {}, 95 * 60.0, 2, "cpu", 0, 461)
    message = refusal(matrix, work, 12, lambda name: small)
    assert message == ("matrix full: 308 cells, est. 310 h on this CPU (2 jobs) — a GPU job. Run `--matrix full-cpu` "
                       "(est. 95 min) instead, or pass --max-hours 311 to run it anyway.")
    assert refusal(matrix, work, 400, lambda name: small) is None
    assert refusal(matrix, Estimate(308, 0, {}, 310 * 3600.0, 1, "cuda", 0, 461), 12, lambda name: small) is None


def test_run_refuses_before_any_work(tmp_path, monkeypatch, capsys):
    """`bench run` exits 2 naming the alternative, writing neither records nor cache entries; --dry-run and a large
    --max-hours do not refuse."""
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path / "elsewhere"))
    path = tmp_path / "big.toml"
    path.write_text('cpu_alternative = "smoke"\nvictims = ["cnn"]\n[datasets.digits]\n[protections]\ncwn = {}\n'
                    '[countermeasures]\nnone = {}\n')
    results = tmp_path / "r"
    args = ["run", "--matrix", str(path), "--results", str(results), "--device", "cpu", "--jobs", "1"]
    assert main([*args, "--max-hours", "1e-6"]) == 2
    err = capsys.readouterr().err
    assert "matrix big: 1 cells, est. " in err and "a GPU job. Run `--matrix smoke` (est. " in err
    assert "--max-hours 2 to run it anyway" in err and not results.exists()
    assert main([*args, "--max-hours", "1e-6", "--dry-run"]) == 0
    assert "matrix big: 1 cells, 0 recorded, 1 to train" in capsys.readouterr().out
    assert main([*args, "--max-hours", "-1"]) == 2 and "(--max-hours) must be > 0" in capsys.readouterr().err


def test_dry_run_lists_blocked_cells_then_refuses_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """A dry run of a grid with cells lacking weights (offline, none cached) lists every cell (blocked ones say
    why), then exits 2 with the full reasons; it loads and writes no data."""
    monkeypatch.delenv("BENCH_DDPM", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    path = tmp_path / "weights.toml"
    path.write_text('victims = ["cnn"]\n[datasets.digits]\n[protections]\ncwn = {}\n'
                    '[countermeasures]\nnone = {}\ndiffpure = {}\n')
    results = tmp_path / "r"
    assert main(["run", "--matrix", str(path), "--results", str(results), "--device", "cpu", "--dry-run"]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("digits | cwn |")]
    assert len(lines) == 2 and "blocked" not in lines[0] and lines[1].endswith("| blocked: DDPM weights not found")
    assert "dataset digits: not loaded yet" in out and "BENCH_DDPM" in err
    assert not list(results.glob("cache/dataset/*"))
