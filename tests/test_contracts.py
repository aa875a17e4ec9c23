"""Harness contracts: declared capabilities (checked at registration and at planning), the model-artifact
protocol across stages, and the traps that once gave wrong results without an error."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import ClassVar

import pytest
import torch

from bench.core.components import Countermeasure, ImageSet, Protection, TrainHooks
from bench.core.registry import Registry
from bench.data.datasets import DATASETS
from bench.execute.train import train_and_evaluate
from bench.plan.recipes import make_recipe
from bench.store.records import RecordLog
from tests.conftest import REPO, run_subprocess, tiny_matrix

CPU = torch.device("cpu")


def records(results) -> list[dict]:
    return RecordLog(results / "runs" / "needs" / "records.jsonl").read() or \
        RecordLog(results / "runs" / "tiny" / "records.jsonl").read()


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return DATASETS.create("digits", per_class=4).load()[0]


# ------------------------------------------------------------------ no silent casts


@pytest.mark.parametrize("images", [torch.rand(40, 1, 16, 16), torch.full((40, 1, 16, 16), 300, dtype=torch.int16)])
def test_with_images_rejects_non_uint8_and_says_how_to_convert(digits, images):
    """Float images in [0, 1] used to become zeros, int16 values wrapped around."""
    with pytest.raises(TypeError, match=r"uint8.*round\(\).*clamp"):
        digits.with_images(images)


def test_with_images_rejects_another_shape(digits):
    with pytest.raises(ValueError, match="shape"):
        digits.with_images(digits.images[:3])


# ------------------------------------------------------------------ stages declared and checked at registration


def local_registry() -> Registry:
    return Registry("countermeasure", Countermeasure)


def test_train_hooks_with_the_data_stage_is_rejected_at_registration():
    """It used to do nothing: the harness only called train_hooks for stage 'train'."""
    with pytest.raises(TypeError, match="overrides train_hooks but 'train' is not in its stages"):
        @local_registry().register("silent_test")
        class Silent(Countermeasure):
            stages: ClassVar[frozenset[str]] = frozenset({"data"})

            def purify(self, train, *, seed, device):
                return train

            def train_hooks(self, num_classes, image_size):
                return TrainHooks(batch_transform=lambda x, y, gen: (1 - x, y))


@pytest.mark.parametrize("stages, message", [(frozenset(), "overrides purify/fit but 'data' is not"),
                                             (frozenset({"data", "train"}), "does not override train_hooks"),
                                             (frozenset({"test"}), "subset of")])
def test_stage_declarations_must_match_the_methods(stages, message):
    """A class that overrides purify only, declaring ``stages``."""
    cls = type("Mismatch", (Countermeasure,), {"__annotations__": {"stages": "ClassVar[frozenset[str]]"},
                                               "stages": stages, "purify": lambda self, train, *, seed, device: train})
    with pytest.raises(TypeError, match=message):
        local_registry().register("mismatch_test")(cls)


def test_protection_capabilities_must_match_the_methods():
    registry = Registry("protection", Protection)
    with pytest.raises(TypeError, match="encrypts_unseen"):
        @registry.register("liar_test")
        class Liar(Protection):
            encrypts_unseen: ClassVar[bool] = True

            def protect(self, train, *, seed, device):
                return train
    with pytest.raises(TypeError, match="surrogate_param 'net' is not a parameter"):
        @registry.register("nosurrogate_test")
        class NoSurrogate(Protection):
            surrogate_param: ClassVar[str | None] = "net"

            def protect(self, train, *, seed, device):
                return train


BOTH = '''
from typing import ClassVar
from bench.core.components import COUNTERMEASURES, Countermeasure, ImageSet, TrainHooks


@COUNTERMEASURES.register("both_test")
class Both(Countermeasure):
    """A data stage (invert the images) and a train stage (every batch labelled class 0)."""
    paper: ClassVar[str] = "test plugin"
    stages: ClassVar[frozenset[str]] = frozenset({"data", "train"})

    def purify(self, train, *, seed, device):
        return train.with_images(255 - train.images, inverted=True)

    def train_hooks(self, num_classes, image_size):
        return TrainHooks(batch_transform=lambda x, y, gen: (x, y * 0))
'''


def test_a_countermeasure_may_have_a_data_and_a_train_stage(tmp_path):
    """Both stages run: the purified set is cached (its info recorded) and the hook relabels every batch, so the
    victim learns to answer class 0: train accuracy against the hook's labels 1, test accuracy exactly chance."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "both.py").write_text(BOTH)
    matrix = tiny_matrix(tmp_path, extra_countermeasures="both_test = {}")
    proc = run_subprocess(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--jobs", "1",
                           "--only", "protection=clean"], tmp_path, {"BENCH_PLUGINS": str(plugins)})
    assert proc.returncode == 0, proc.stderr
    by = {r.countermeasure: r for r in records(tmp_path / "r")}
    assert by["both_test"].countermeasure_stage == "data+train" and by["both_test"].purify_info == {"inverted": True}
    assert by["both_test"].train_acc[-1] == 1.0 and by["both_test"].test_acc_final == pytest.approx(0.1)


# ------------------------------------------------------------------ hooks get the cell's generator


def test_attack_and_loss_hooks_get_the_cells_generator(digits):
    """They used to fetch one through batch_transform, with a silent manual_seed(0) fallback."""
    seen: list[float] = []

    def attack(model, x, y, gen):
        seen.append(torch.rand(1, generator=gen).item())
        return x

    def loss(model, x, y, gen):
        seen.append(torch.rand(1, generator=gen).item())
        logits = model(x)
        return torch.nn.functional.cross_entropy(logits, y), logits

    def run(seed: int) -> list[float]:
        seen.clear()
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
        train_and_evaluate(model, digits, digits, make_recipe("quick", epochs=1, batch_size=20), seed=seed,
                           device=CPU, augment="none", hooks=TrainHooks(attack=attack, loss=loss))
        return list(seen)

    first = run(0)
    assert len(first) == 4 and len(set(first)) == 4, "two steps, two hooks, each a fresh draw of one generator"
    assert run(0) == first and run(1) != first


# ------------------------------------------------------------------ plugins: import errors stick


BROKEN = "from bench.core.components import PROTECTIONS\nraise RuntimeError('half-written plugin')\n"


def test_a_broken_plugin_fails_every_registry_call_naming_the_file(tmp_path):
    """Discovery used to set its done-flag first: after the error, later calls saw a partial registry."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "halfway.py").write_text(BROKEN)
    code = ("from bench.core.components import PROTECTIONS, VICTIMS\n"
            "from bench.core.registry import PluginImportError\n"
            "for call in (PROTECTIONS.names, lambda: VICTIMS.get('cnn'), lambda: 'em' in PROTECTIONS):\n"
            "    try:\n"
            "        call()\n"
            "    except PluginImportError as err:\n"
            "        print('refused:', err)\n"
            "    else:\n"
            "        print('answered')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "BENCH_PLUGINS": str(plugins), "PYTHONPATH": str(REPO)})
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("refused:") for line in lines), proc.stdout + proc.stderr
    assert all(f"{plugins / 'halfway.py'}:2" in line and "half-written plugin" in line for line in lines)


@pytest.mark.parametrize("args", [["list"], ["run", "--matrix", "smoke", "--dry-run"]])
def test_a_broken_plugin_fails_bench_commands_with_exit_2(tmp_path, args):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "halfway.py").write_text(BROKEN)
    proc = run_subprocess([*args, "--results", str(tmp_path / "r")] if args[0] == "run" else args, tmp_path,
                          {"BENCH_PLUGINS": str(plugins)})
    assert proc.returncode == 2 and "halfway.py" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ planning refuses impossible cells


NEEDS_GENERATOR = '''
from typing import ClassVar
import torch
from bench.core.components import COUNTERMEASURES, VICTIMS, Countermeasure, Fitted, Models, Pretrained, Victim


@VICTIMS.register("from_generator_test")
class FromGenerator(Victim):
    """A victim built from the protection's generator (a stand-in for UGE's authorized network)."""
    paper: ClassVar[str] = "test plugin"
    needs_models: ClassVar[tuple[str, ...]] = ("generator",)

    def build(self, num_classes, in_channels, image_size, *, models):
        assert not models["generator"].training
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size ** 2, num_classes))


@COUNTERMEASURES.register("regenerate_test")
class Regenerate(Countermeasure):
    """Needs the protection's generator: re-encrypts the train set with it (a stand-in for an attacker who
    trains on pairs the protection's own model makes)."""
    paper: ClassVar[str] = "test plugin"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})
    needs_models: ClassVar[tuple[str, ...]] = ("generator",)

    def purify(self, train, *, seed, device, models):
        generator = models["generator"]
        return train.with_images(train.images, generator_arch=generator.arch, generator_training=generator.training)


@COUNTERMEASURES.register("denoise_test")
class Denoise(Countermeasure):
    """Fits a (stand-in) denoiser in its data stage; the harness keeps it beside the purified set."""
    paper: ClassVar[str] = "test plugin"
    stages: ClassVar[frozenset[str]] = frozenset({"data"})
    fits: ClassVar[tuple[str, ...]] = ("denoiser",)

    @classmethod
    def build_model(cls, kind, arch):
        net = torch.nn.Conv2d(arch["channels"], arch["channels"], 3, padding=1)
        net.arch = arch
        return net

    def fit(self, train, *, seed, device):
        torch.manual_seed(seed)
        net = self.build_model("denoiser", {"channels": train.channels})
        return Fitted(train.with_images(train.images, fitted=True), Models({"denoiser": net}))


@COUNTERMEASURES.register("weights_test")
class NeedsWeights(Countermeasure):
    paper: ClassVar[str] = "test plugin"
    pretrained: ClassVar[tuple[Pretrained, ...]] = (Pretrained("TestNet", "BENCH_TEST_WEIGHTS", files="testnet.pt"),)
'''

CELLS = """
seeds = [0]
[datasets.digits]
test_per_class = 5
per_class = 10
[recipe]
epochs = 1
name = "quick"
[protections]
cwn = {{}}
confoundergan = {{ surrogate = "{surrogate}", surrogate_epochs = 1, epochs = 1, width = 8 }}
[countermeasures]
{countermeasure} = {{}}
[victims]
{victim}
{exclude}
"""


def plan(tmp_path, countermeasure: str, exclude: str = "", surrogate: str = "cnn", env: dict | None = None,
         dry_run: bool = True, victim: str = "cnn = { width = 8 }") -> subprocess.CompletedProcess:
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "needs.py").write_text(NEEDS_GENERATOR)
    text = CELLS.format(countermeasure=countermeasure, exclude=exclude, surrogate=surrogate, victim=victim)
    matrix = tiny_matrix(tmp_path, "needs", text=text)
    return run_subprocess(["run", "--matrix", str(matrix), "--results", str(tmp_path / "r"), "--jobs", "1",
                           *(["--dry-run"] if dry_run else [])], tmp_path, {"BENCH_PLUGINS": str(plugins), **(env or {})})


def test_a_countermeasure_needing_a_model_the_protection_lacks_is_refused_at_planning(tmp_path):
    proc = plan(tmp_path, "regenerate_test")
    assert proc.returncode == 2 and not (tmp_path / "r" / "cache").exists(), "refused before loading any data"
    assert "cell digits × cwn × regenerate_test × cnn" in proc.stderr
    assert "needs the protection's generator model (needs_models), but cwn fits no model" in proc.stderr
    assert "confoundergan × regenerate_test" not in proc.stderr


def test_a_countermeasure_gets_the_protections_fitted_model(tmp_path):
    """Excluding the impossible cell, the countermeasure receives the generator its protection fitted, loaded
    and verified from the protected set's cache entry."""
    proc = plan(tmp_path, "regenerate_test", exclude="[[exclude]]\nprotection = \"cwn\"", dry_run=False)
    assert proc.returncode == 0, proc.stderr
    (record,) = records(tmp_path / "r")
    assert record.purify_info == {"generator_arch": {"channels": 1, "size": 16, "width": 8, "epsilon": 8.0},
                                     "generator_training": False}
    assert record.protect_models == ["generator"] and record.protection_key


def test_a_victim_may_start_from_the_protections_model(tmp_path):
    """A victim that needs the protection's generator is refused with cwn and built from it with confoundergan."""
    refused = plan(tmp_path, "none", victim="from_generator_test = {}")
    assert refused.returncode == 2 and "cwn × none × from_generator_test" in refused.stderr
    assert "from_generator_test needs the protection's generator model" in refused.stderr
    proc = plan(tmp_path, "none", victim="from_generator_test = {}", exclude="[[exclude]]\nprotection = \"cwn\"",
                dry_run=False)
    assert proc.returncode == 0, proc.stderr
    (record,) = records(tmp_path / "r")
    assert record.status == "ok" and record.victim == "from_generator_test"


def test_a_protection_cannot_need_models():
    with pytest.raises(TypeError, match="only countermeasures and victims"):
        @Registry("protection", Protection).register("needy_test")
        class Needy(Protection):
            needs_models: ClassVar[tuple[str, ...]] = ("generator",)

            def protect(self, train, *, seed, device):
                return train


def test_a_countermeasure_fitting_a_model_keeps_it_beside_its_purified_set(tmp_path):
    proc = plan(tmp_path, "denoise_test", exclude="[[exclude]]\nprotection = \"confoundergan\"", dry_run=False)
    assert proc.returncode == 0, proc.stderr
    (record,) = records(tmp_path / "r")
    assert record.purify_models == ["denoiser"] and record.purify_info == {"fitted": True}
    (entry,) = (tmp_path / "r" / "cache" / "purified").iterdir()
    code = ("import torch; from pathlib import Path; from bench.store.artifacts import load_models; "
            f"net = load_models(Path({str(entry)!r}), ('denoiser',), torch.device('cpu'))['denoiser']; "
            "print(type(net).__name__, net.arch)")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "BENCH_PLUGINS": str(tmp_path / "plugins"), "PYTHONPATH": str(REPO)})
    assert loaded.stdout.strip() == "Conv2d {'channels': 1}", loaded.stderr


def test_a_surrogate_that_is_no_victim_is_refused_at_planning(tmp_path):
    proc = plan(tmp_path, "none", surrogate="resnet1B")
    assert proc.returncode == 2
    assert "confoundergan's surrogate = 'resnet1B' is not a registered victim" in proc.stderr


def test_missing_pretrained_weights_are_refused_at_planning_naming_where_to_put_them(tmp_path):
    proc = plan(tmp_path, "weights_test")
    assert proc.returncode == 2 and "TestNet weights not found: place testnet.pt" in proc.stderr
    assert "$BENCH_TEST_WEIGHTS" in proc.stderr and "2 cell(s)" in proc.stderr
    weights = tmp_path / "testnet.pt"
    weights.write_bytes(b"stand-in")
    assert plan(tmp_path, "weights_test", env={"BENCH_TEST_WEIGHTS": str(weights)}).returncode == 0


def test_expensive_components_are_noted_when_planned_on_a_cpu(tmp_path):
    proc = plan(tmp_path, "none", env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0 and "confoundergan is expensive on a CPU" in proc.stderr


# ------------------------------------------------------------------ the CLI


def test_bench_list_shows_capabilities():
    proc = run_subprocess(["list", "protections"], REPO)
    lines = proc.stdout.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("  confoundergan:")))
    assert "fits models: generator" in lines[at + 2] and "encrypts unseen images" in lines[at + 2]
    assert "trains a surrogate victim (parameter surrogate, default resnet18)" in lines[at + 2]
    proc = run_subprocess(["list", "countermeasures"], REPO)
    assert "stages: data" in proc.stdout and "stages: train" in proc.stdout and "reports the best epoch" in proc.stdout


def test_a_piped_cli_exits_quietly_when_the_reader_leaves():
    """`bench list | head` used to end in a BrokenPipeError traceback."""
    proc = subprocess.run(f"{sys.executable} -m bench list protections | head -1", shell=True, cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout == "protections:\n" and proc.stderr == ""
