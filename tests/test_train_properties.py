"""Properties of the one training loop (``bench.execute.train``) that a record's numbers rest on: the recipe's
optimiser and schedule reach torch, the normalisation statistics are exact, the test set is scored image for image,
the curves, budget, timing and precision fields say what happened, hooks get what they are documented to get, and
a diverged loss is reported with the epoch and step it happened at.

Most loop tests use ``Oracle``: a "model" that reads each image's label and index from its pixels, so its accuracy
on any batch is known exactly (right for images with index below ``k``), while one parameter still trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bench.execute.train as loop
from bench.core.components import ImageSet, TrainHooks
from bench.execute.train import (
    EVAL_VALUES,
    Normalize,
    TrainingDiverged,
    _check_finite,
    _cross_entropy,
    _optimizer,
    _schedule,
    capped_batch,
    channel_stats,
    data_placement,
    evaluate,
    to_input,
    train_and_evaluate,
)
from bench.plan.recipes import make_recipe

CPU = torch.device("cpu")
IDENTITY = (torch.zeros(1), torch.ones(1))  # normalisation stats that leave [0, 1] inputs as they are


class Clock:
    """A stand-in for the loop's ``time`` module: time moves only when the test's models say so."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Oracle(nn.Module):
    """Predicts an image's own label (pixel 0 = label × 25) when its index (pixel 1) is below ``k``, else the next
    label; logs (training, autocast on, indices) per call; a training call costs 1 s of ``clock``, an evaluation
    call 100 s. ``w`` gets the loss's gradient; ``extra`` only while ``use_extra``."""

    def __init__(self, k: int = 1000, clock: Clock | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(10))
        self.extra = nn.Parameter(torch.ones(1))
        self.conv = nn.Conv2d(2, 2, 3)  # unused: shows the weights' memory format
        self.k, self.clock, self.use_extra = k, clock, False
        self.log: list[tuple[bool, bool, list[int]]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = (x[:, 0, 0, 0] * 255 / 25).round().long() % 10
        index = (x[:, 0, 0, 1] * 255).round().long()
        self.log.append((self.training, torch.is_autocast_enabled("cpu"), index.tolist()))
        if self.clock:
            self.clock.now += 1.0 if self.training else 100.0
        predicted = torch.where(index < self.k, labels, (labels + 1) % 10)
        logits = F.one_hot(predicted, 10).float() * 10 + self.w
        return logits + self.extra * 0 if self.use_extra else logits


def _coded(n: int) -> ImageSet:
    """``n`` 1×2×2 images: pixel 0 codes the label (index mod 10), pixel 1 the index."""
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (labels * 25).to(torch.uint8), torch.arange(n).to(torch.uint8)
    return ImageSet(images, labels, 10)


def _fit(model: nn.Module, hooks: TrainHooks | None = None, *, n: int = 40, augment: str = "none",
         stats: tuple[torch.Tensor, torch.Tensor] | None = IDENTITY, evaluate_every_epoch: bool = True,
         on_epoch: Callable[[int, float, float], None] | None = None, **recipe: Any) -> dict[str, Any]:
    """Train on ``n`` coded images (batch 16, 2 epochs, constant lr 0.01, fp32 unless overridden), test on 20."""
    settings = {"epochs": 2, "batch_size": 16, "precision": "fp32", "schedule": "constant", "lr": 0.01, **recipe}
    return train_and_evaluate(model, _coded(n), _coded(20), make_recipe("quick", **settings), seed=0, device=CPU,
                              augment=augment, hooks=hooks, stats=stats, evaluate_every_epoch=evaluate_every_epoch,
                              on_epoch=on_epoch)


def _training_indices(model: Oracle) -> list[list[int]]:
    return [index for training, _, index in model.log if training]


# ------------------------------------------------------------------ divergence


def test_check_finite_names_the_epoch_and_the_steps():
    """A non-finite loss sum is reported with its value, the 1-based epoch, and the one step or the step range."""
    _check_finite(torch.tensor(3.0), 0, 1, 1)
    with pytest.raises(TrainingDiverged, match=r"^loss became inf at epoch 1, step 3$"):
        _check_finite(torch.tensor(math.inf), 0, 3, 3)
    with pytest.raises(TrainingDiverged, match=r"^loss became nan at epoch 2, one of steps 2-5$"):
        _check_finite(torch.tensor(math.nan), 1, 2, 5)


def test_divergence_on_the_cpu_names_the_exact_step():
    """On the CPU every step is checked: an infinite loss at the 6th step (epoch 2, 4 steps an epoch) stops training
    with an error naming epoch 2 and step 6, and the loss's sign."""
    calls = []

    def loss(model, x, y, gen):
        calls.append(len(x))
        logits = model(x)
        return F.cross_entropy(logits.float(), y) + (math.inf if len(calls) == 6 else 0.0), logits

    with pytest.raises(TrainingDiverged, match=r"^loss became inf at epoch 2, step 6$"):
        _fit(Oracle(), TrainHooks(loss=loss), batch_size=10)
    assert len(calls) == 6


# ------------------------------------------------------------------ optimiser, loss and schedule


@pytest.mark.parametrize("overrides, kind, expected", [
    pytest.param({"optimizer": "adam", "lr": 0.003, "weight_decay": 0.01}, torch.optim.Adam,
                 {"lr": 0.003, "weight_decay": 0.01}, id="adam"),
    pytest.param({"lr": 0.02, "momentum": 0.8, "weight_decay": 1e-3, "nesterov": True}, torch.optim.SGD,
                 {"lr": 0.02, "momentum": 0.8, "weight_decay": 1e-3, "nesterov": True}, id="sgd-nesterov"),
    pytest.param({"momentum": 0.0, "nesterov": True}, torch.optim.SGD, {"momentum": 0.0, "nesterov": False},
                 id="nesterov-needs-momentum")])
def test_the_recipes_optimiser_settings_reach_torch(overrides, kind, expected):
    """The optimiser the recipe names, over every parameter of the model, with its lr, momentum, weight decay and
    Nesterov flag (Nesterov only with momentum, which torch requires)."""
    model = nn.Linear(3, 2)
    optimizer = _optimizer(make_recipe("quick", **overrides), model)
    group = optimizer.param_groups[0]
    assert type(optimizer) is kind and group["params"] == list(model.parameters())
    assert {key: group[key] for key in expected} == expected
    assert all(type(group[key]) is type(value) for key, value in expected.items())


def test_label_smoothing_reaches_the_loss():
    """The default loss is cross-entropy with the recipe's label smoothing, on float logits."""
    model = nn.Linear(4, 3)
    x, y = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1])
    loss, logits = _cross_entropy(model, x, y, make_recipe("quick", label_smoothing=0.2))
    assert torch.equal(logits, model(x))
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y, label_smoothing=0.2).item())
    assert loss.item() != pytest.approx(F.cross_entropy(model(x), y).item())


def test_triangle_schedule_rises_to_1_and_falls_to_0():
    """Triangle: lr × step/rise while warming up (rise = warmup × total, at least 1 step), then linear to 0 at the
    last step, peaking at exactly 1."""
    short = _schedule(make_recipe("fast", warmup=0.1), 10, 5)  # rise: 1 step
    assert [short(k) for k in (0, 1, 5, 10)] == [0.0, 1.0, pytest.approx(5 / 9), 0.0]
    assert _schedule(make_recipe("fast", warmup=0.25), 100, 10)(5) == pytest.approx(0.2)
    late = _schedule(make_recipe("fast", warmup=0.9), 10, 5)  # rise 9: one step of decay left
    assert late(9) == 1.0 and late(10) == 0.0
    whole = _schedule(make_recipe("fast", warmup=0.95), 10, 5)  # rise rounds to the whole budget
    assert whole(5) == 0.5 and whole(10) == 0.0


# ------------------------------------------------------------------ statistics, inputs, placement


def test_channel_stats_are_exact_per_channel_over_chunks(monkeypatch):
    """Mean and unbiased std per channel, in [0, 1] units, equal the float64 computation over the whole set, for
    non-square images split over several chunks (2 images a chunk here)."""
    images = torch.randint(0, 256, (5, 3, 2, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[0] = 255  # the first image counts too
    monkeypatch.setattr(loop, "STATS_CHUNK_BYTES", 2 * 3 * 2 * 4)
    mean, std = channel_stats(images)
    reference = images.double() / 255
    assert mean.dtype == std.dtype == torch.float32
    torch.testing.assert_close(mean, reference.mean((0, 2, 3)).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(std, reference.std((0, 2, 3)).float(), rtol=1e-6, atol=0)


def test_channel_stats_keep_their_precision_on_large_near_constant_sets():
    """65,536 pixels of 199–201: the std (≈ 0.0032) is the float64 one, with no loss to float32 sums."""
    images = (200 + torch.randint(-1, 2, (64, 1, 32, 32), generator=torch.Generator().manual_seed(0))).to(torch.uint8)
    _, std = channel_stats(images)
    torch.testing.assert_close(std, (images.double() / 255).std((0, 2, 3)).float(), rtol=1e-6, atol=0)


def test_channel_stats_edge_cases():
    """No pixels: NaN mean and std; one pixel: its value and a NaN std; two pixels: the unbiased std; a constant set:
    std clamped to 1e-3 (no division by 0 in Normalize). Float32 even where torch's default dtype is float64."""
    mean, std = channel_stats(torch.empty(0, 2, 3, 3, dtype=torch.uint8))
    assert mean.isnan().all() and std.isnan().all()
    mean, std = channel_stats(torch.full((1, 1, 1, 1), 51, dtype=torch.uint8))
    assert mean.item() == pytest.approx(0.2) and std.isnan().all()
    _, std = channel_stats(torch.tensor([[[[0, 255]]]], dtype=torch.uint8))
    assert std.item() == pytest.approx(math.sqrt(0.5))
    _, std = channel_stats(torch.full((3, 2, 4, 4), 7, dtype=torch.uint8))
    assert std.tolist() == [pytest.approx(1e-3)] * 2
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        mean, std = channel_stats(torch.full((2, 1, 2, 2), 9, dtype=torch.uint8))
    finally:
        torch.set_default_dtype(default)
    assert mean.dtype == std.dtype == torch.float32


def test_normalize_standardises_each_channel_with_broadcastable_buffers():
    """(x - mean_c) / std_c per channel of an N×C×H×W batch; the buffers (saved in state_dicts) are 1×C×1×1."""
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.5, 0.25, 2.0])
    norm = Normalize(mean, std)
    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(norm(x), (x - mean[:, None, None]) / std[:, None, None])
    assert {k: tuple(v.shape) for k, v in norm.state_dict().items()} == {"mean": (1, 3, 1, 1), "std": (1, 3, 1, 1)}


def test_to_input_maps_uint8_to_the_unit_interval():
    """0 → 0 and 255 → exactly 1, float, channels_last."""
    x = to_input(torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous())
    assert x.dtype == torch.float32 and x[0, :, 0, 0].tolist() == [0.0, pytest.approx(0.2), 1.0]
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_capped_batch_bounds_the_evaluation_batch_by_input_values():
    """At most EVAL_VALUES input values a batch (all channels counted), an int, and never below 1 image."""
    cifar = torch.empty(0, 3, 32, 32, dtype=torch.uint8)
    assert capped_batch(64, cifar) == 64
    cap = capped_batch(4096, cifar)
    assert cap == EVAL_VALUES // (3 * 32 * 32) == 1024 and type(cap) is int
    assert capped_batch(64, torch.empty(0, 3, 2048, 2048, dtype=torch.uint8)) == 1


def test_data_placement_by_device_and_free_memory(monkeypatch):
    """CPU: ``host``; a non-CUDA accelerator: ``device``; CUDA: ``device`` while the set's bytes (element size
    counted) are at most ``fraction`` of that GPU's free memory, else ``host-pinned``."""
    images = torch.zeros(100, dtype=torch.float32)  # 400 bytes
    assert data_placement(images, CPU) == "host"
    assert data_placement(images, torch.device("meta")) == "device"
    asked = []
    free = {"bytes": 1600}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: asked.append(device) or (free["bytes"], 10**9))
    gpu = torch.device("cuda", 1)
    assert data_placement(images, gpu) == "device"  # 400 ≤ 0.25 × 1600
    free["bytes"] = 1599
    assert data_placement(images, gpu) == "host-pinned"
    assert data_placement(images, gpu, fraction=0.5) == "device"
    assert asked == [gpu] * 3


# ------------------------------------------------------------------ evaluation


def test_evaluation_scores_every_test_image_once_under_the_precision():
    """20 test images, batches of 7: the model sees images 0–19 once each, in order, under bf16 autocast when asked,
    and the accuracy is the share right over all batches (13 of 20 here)."""
    oracle = Oracle(k=13)
    accuracy = evaluate(oracle, _coded(20), 7, "bf16")
    assert accuracy == 13 / 20
    assert [index for _, _, index in oracle.log] == [list(range(7)), list(range(7, 14)), list(range(14, 20))]
    assert all(autocast for _, autocast, _ in oracle.log) and not any(training for training, _, _ in oracle.log)
    oracle.log.clear()
    assert evaluate(oracle, _coded(20), 64) == 13 / 20 and not any(autocast for _, autocast, _ in oracle.log)


# ------------------------------------------------------------------ the loop's results


def test_curves_fields_and_progress_calls():
    """4 epochs, test every 3rd: test_acc is NaN where not evaluated, final/best/best_epoch come from the evaluated
    epochs, train_acc counts each epoch's predictions over the whole train set, on_epoch gets (1-based epoch, train
    accuracy, test accuracy); the model is Normalize (with the stats given) then the victim, channels_last."""
    oracle, ks, calls = Oracle(), [40, 20, 15, 10], []
    hooks = TrainHooks(epoch_start=lambda epoch, epochs: setattr(oracle, "k", ks[epoch]))
    result = _fit(oracle, hooks, epochs=4, eval_every=3, on_epoch=lambda *args: calls.append(args))
    assert result["train_acc"] == [1.0, 0.5, 15 / 40, 10 / 40]
    assert result["test_acc"][:2] == [pytest.approx(math.nan, nan_ok=True)] * 2 and result["test_acc"][2:] == [0.75, 0.5]
    assert (result["final"], result["best"], result["best_epoch"]) == (0.5, 0.75, 3)
    assert [c[:2] for c in calls] == [(1, 1.0), (2, 0.5), (3, 15 / 40), (4, 10 / 40)]
    assert [c[2] for c in calls][2:] == [0.75, 0.5] and all(math.isnan(c[2]) for c in calls[:2])
    assert result["steps"] == 12 and result["precision"] == "fp32" and result["data_placement"] == "host"
    assert result["tf32_conv"] is False and result["compile_seconds"] is None
    norm, victim = result["model"]
    assert isinstance(norm, Normalize) and victim is oracle
    assert norm.mean.flatten().tolist() == [0.0] and norm.std.flatten().tolist() == [1.0]
    assert victim.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not victim.conv.weight.is_contiguous()


def test_without_stats_the_model_normalises_with_the_train_sets_own():
    """No ``stats``: the Normalize layer holds ``channel_stats`` of the train images."""
    result = _fit(Oracle(), stats=None, epochs=1)
    mean, std = channel_stats(_coded(40).images)
    assert torch.equal(result["model"][0].mean.flatten(), mean) and torch.equal(result["model"][0].std.flatten(), std)


def test_evaluation_only_after_the_last_epoch_when_asked():
    """``evaluate_every_epoch=False``: only the last epoch is tested, even with eval_every 1."""
    result = _fit(Oracle(), evaluate_every_epoch=False, epochs=3)
    assert math.isnan(result["test_acc"][0]) and math.isnan(result["test_acc"][1]) and result["test_acc"][2] == 1.0


def test_iteration_budget_and_soft_labels_in_train_accuracy():
    """An iteration budget that ends mid-epoch (4 steps of 16, 3 steps an epoch): the last epoch's train accuracy
    is over the 16 images it trained on; soft labels (N×K) are scored by their argmax."""
    def soft(x, y, gen):
        return x, F.one_hot(y, 10).float() * 0.9 + 0.01

    result = _fit(Oracle(), TrainHooks(batch_transform=soft), iterations=4, epochs=9)
    assert result["steps"] == 4 and result["train_acc"] == [1.0, 1.0] and len(result["test_acc"]) == 2


def test_hooks_get_the_model_labels_and_the_precision(monkeypatch):
    """attack and loss get the trained model (Normalize included) and the batch's labels; they, the model's training
    calls and the evaluation run under bf16 autocast with precision bf16, and under none with fp32."""
    for precision in ("bf16", "fp32"):
        oracle, seen = Oracle(), []

        def attack(model, x, y, gen, seen=seen):
            seen.append(("attack", model, y.clone(), torch.is_autocast_enabled("cpu")))
            return x

        def loss(model, x, y, gen, seen=seen):
            seen.append(("loss", model, y.clone(), torch.is_autocast_enabled("cpu")))
            logits = model(x)
            return F.cross_entropy(logits.float(), y), logits

        result = _fit(oracle, TrainHooks(attack=attack, loss=loss), epochs=1, precision=precision)
        on = precision == "bf16"
        assert result["precision"] == precision and len(seen) == 6
        labels = [torch.tensor(index) % 10 for index in _training_indices(oracle)]
        for (_, model, y, autocast), expected in zip(seen, [label for label in labels for _ in range(2)]):
            assert model is result["model"] and torch.equal(y, expected) and autocast is on
        assert [autocast for _, autocast, _ in oracle.log] == [on] * len(oracle.log) and not oracle.log[-1][0]


def test_a_parameter_the_loss_stops_using_stays_put():
    """Gradients are dropped between steps (set to None, not zero-filled): a parameter the loss used in epoch 1 but
    not in epoch 2 gets no weight decay or momentum step in epoch 2."""
    oracle, kept = Oracle(), {}

    def epoch_start(epoch, epochs):
        oracle.use_extra = epoch == 0
        if epoch == 1:
            kept["extra"] = oracle.extra.detach().clone()

    _fit(oracle, TrainHooks(epoch_start=epoch_start), momentum=0.9, weight_decay=0.1)
    assert kept["extra"].item() < 1.0  # epoch 1 decayed it
    assert torch.equal(oracle.extra.detach(), kept["extra"])


def test_batches_depend_on_the_seed_only_not_on_the_global_rng():
    """Batch order and augmentation come from the loop's own generator: a hook that draws from torch's global RNG
    changes neither (2 epochs, random flips)."""
    def run(draw: bool) -> list[torch.Tensor]:
        seen = []

        def transform(x, y, gen):
            if draw:
                torch.rand(3)
            seen.append(x.clone())
            return x, y

        _fit(Oracle(), TrainHooks(batch_transform=transform), augment="flip")
        return seen

    quiet, drawing = run(False), run(True)
    assert len(quiet) == 6 and all(torch.equal(a, b) for a, b in zip(quiet, drawing))


def test_host_pinned_placement_trains_on_the_same_batches(monkeypatch):
    """A set placed ``host-pinned`` (batches gathered on the host) trains on the same batches to the same weights as
    one kept resident, and the result says where it was; placement is decided on the train images."""
    resident = Oracle()
    plain = _fit(resident)
    asked = []
    monkeypatch.setattr(loop, "data_placement", lambda images, device: asked.append((images, device)) or "host-pinned")
    streamed = Oracle()
    pinned = _fit(streamed)
    assert (plain["data_placement"], pinned["data_placement"]) == ("host", "host-pinned")
    assert _training_indices(streamed) == _training_indices(resident) and len(_training_indices(streamed)) == 6
    assert torch.equal(streamed.w, resident.w) and pinned["train_acc"] == plain["train_acc"]
    assert len(asked) == 1 and torch.equal(asked[0][0], _coded(40).images) and asked[0][1] == CPU


def test_images_per_second_counts_training_time_only(monkeypatch):
    """images_per_s: images trained / seconds in training steps (evaluation excluded): 80 images over 6 steps of 1 s."""
    clock = Clock()
    monkeypatch.setattr(loop, "time", clock)
    result = _fit(Oracle(clock=clock))
    assert result["images_per_s"] == 80 / 6 and result["compile_seconds"] is None


def _fake_compile(clock: Clock, compiled: list[nn.Module]) -> Callable[..., nn.Module]:
    """``torch.compile`` stand-in: compiling a graph costs 50 s of ``clock``; static shapes (``dynamic=False``)
    compile one graph per batch size, dynamic ones one graph in all."""

    class Compiled(nn.Module):
        def __init__(self, net: nn.Module, static: bool) -> None:
            super().__init__()
            self.net, self.static, self.graphs = net, static, set()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            graph = len(x) if self.static else "any"
            if graph not in self.graphs:
                self.graphs.add(graph)
                clock.now += 50.0
            return self.net(x)

    def compile_(model: nn.Module, *, dynamic: bool | None = None) -> nn.Module:
        compiled.append(model)
        return Compiled(model, dynamic is False)

    return compile_


def test_compiled_steps_are_timed_apart(monkeypatch):
    """With ``compile``: one static graph per batch size (16 and 8 here), the first step of each is
    ``compile_seconds`` (2 × 51 s) and leaves the rate: 56 images over the other 4 one-second steps. If every step
    compiled, the rate is None."""
    clock, compiled = Clock(), []
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(torch, "compile", _fake_compile(clock, compiled))
    result = _fit(Oracle(clock=clock), compile=True)
    assert len(compiled) == 1 and compiled[0] is result["model"]
    assert result["compile_seconds"] == 102.0 and result["images_per_s"] == 14.0
    once = _fit(Oracle(clock=clock), compile=True, iterations=1)
    assert once["steps"] == 1 and once["compile_seconds"] == 51.0 and once["images_per_s"] is None
