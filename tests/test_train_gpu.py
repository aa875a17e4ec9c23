"""The training loop on a GPU (issue 34): precision by capability, few host syncs, data placement, cuDNN switches,
compile time kept out of the rate, device tensors from plugins. CUDA behaviour is faked here; the ``gpu`` tests
check it on a real device."""

from __future__ import annotations

import math
import os
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.core.components import VICTIMS, ImageSet, TrainHooks
from bench.data.datasets import DATASETS
from bench.execute import stages
from bench.execute import train as loop
from bench.execute.augment import host_to_device
from bench.execute.precision import configure_cuda, precision_reason, resolve_precision
from bench.execute.syncs import SYNC_WARNING, count_host_syncs
from bench.plan.recipes import make_recipe

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def digits():
    return DATASETS.create("digits", per_class=23, test_per_class=10).load()


def _run(digits, device=CPU, victim="cnn", hooks=None, **recipe):
    train, test = digits
    torch.manual_seed(0)
    model = VICTIMS.create(victim, **({"width": 8} if victim == "cnn" else {})).build(10, 1, train.size)
    recipe = make_recipe("quick", **{"epochs": 2, "batch_size": 32, "precision": "fp32", **recipe})
    return loop.train_and_evaluate(model, train, test, recipe, seed=3, device=device, augment="crop_flip", hooks=hooks)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [v.detach().cpu() for _, v in sorted(model.state_dict().items())]


def _reference(digits, epochs: int, batch_size: int) -> list[torch.Tensor]:
    """The plain loop the harness's must equal bit for bit on the CPU: float64 statistics, the same draws in the
    same order (permutation, crop offsets, flips), fp32, SGD with the quick recipe's cosine schedule."""
    train, _ = digits
    recipe = make_recipe("quick", epochs=epochs, batch_size=batch_size, precision="fp32")
    torch.manual_seed(0)
    model = VICTIMS.create("cnn", width=8).build(10, 1, train.size)
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    pixels = train.images.double().div(255).transpose(0, 1).flatten(1)
    mean, std = pixels.mean(1).float(), pixels.std(1).clamp_min(1e-3).float()
    net = nn.Sequential(loop.Normalize(mean, std), model).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                          nesterov=recipe.nesterov)
    total = epochs * math.ceil(len(train) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    n, c, h, w = train.images.shape
    pad = max(1, w // 8)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for first in range(0, n, batch_size):
            index = order[first:first + batch_size]
            x = F.pad(train.images[index].float().div_(255).contiguous(memory_format=torch.channels_last), (pad,) * 4)
            k = len(index)
            dy, dx = (torch.randint(0, 2 * pad + 1, (k,), generator=gen) for _ in range(2))
            x = x[torch.arange(k)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  (dy[:, None] + torch.arange(h))[:, None, :, None], (dx[:, None] + torch.arange(w))[:, None, None, :]]
            flip = torch.rand(k, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = F.cross_entropy(net(x).float(), train.labels[index], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return _weights(net)


def test_auto_precision_is_bf16_only_on_gpus_that_compute_it(monkeypatch):
    """sm < 80 (V100, T4) emulates bf16 and leaves cuDNN for bf16 convolutions: fp32 there, and the reason says so."""
    for capability, expected in (((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_precision("auto", CUDA) == expected
        assert precision_reason("auto", CUDA).startswith(f"{expected}: CUDA capability {capability[0]}.{capability[1]}")
    assert resolve_precision("bf16", CUDA) == "bf16" and precision_reason("fp32", CUDA) == "fp32: set by the recipe"


def test_channel_stats_equal_the_float64_statistics_without_a_float_copy(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    sets = [torch.randint(0, 256, (300, 3, 9, 9), dtype=torch.uint8, generator=generator),
            torch.randint(0, 7, (41, 1, 16, 16), dtype=torch.uint8, generator=generator),
            torch.full((5, 2, 4, 4), 200, dtype=torch.uint8)]  # std 0: clamped to 1e-3
    expected = []
    for images in sets:
        x = images.double().div(255).transpose(0, 1).flatten(1)
        expected.append((x.mean(1).float(), x.std(1).clamp_min(1e-3).float()))
    monkeypatch.setattr(loop, "STATS_CHUNK_BYTES", 1000)  # several chunks per set
    for name in ("double", "float"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, **k: pytest.fail("a float copy of the images"))
    for images, (mean, std) in zip(sets, expected):
        got = loop.channel_stats(images)
        assert torch.equal(got[0], mean) and torch.equal(got[1], std)


def test_data_stays_on_the_gpu_only_where_it_fits(monkeypatch):
    images = torch.zeros(100, 3, 32, 32, dtype=torch.uint8)  # 307,200 bytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 307_200, 10**12))
    assert loop.data_placement(images, CUDA) == "device"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 307_200 - 1, 10**12))
    assert loop.data_placement(images, CUDA) == "host-pinned"
    assert loop.data_placement(images, CPU) == "host"


def test_streamed_and_resident_training_equal_a_plain_reference_loop(digits, monkeypatch):
    """Byte-identical CPU results: the loop (the set resident, or streamed batch by batch as from pinned memory)
    gives the weights of a plain loop with the same draws, to the bit."""
    resident = _run(digits, epochs=2, batch_size=32)
    monkeypatch.setattr(loop, "data_placement", lambda images, device: "host-pinned")
    streamed = _run(digits, epochs=2, batch_size=32)
    assert (resident["data_placement"], streamed["data_placement"]) == ("host", "host-pinned")
    reference = _reference(digits, epochs=2, batch_size=32)
    for mine in (resident, streamed):
        assert all(torch.equal(a, b) for a, b in zip(_weights(mine["model"]), reference, strict=True))
    assert resident["train_acc"] == streamed["train_acc"] and resident["test_acc"] == streamed["test_acc"]


def test_the_loop_reads_results_back_once_per_epoch_not_per_step(digits, monkeypatch):
    """On the CPU an ``.item()`` costs nothing; on a GPU each waits for the device. 16 steps: 2 per epoch (train and
    test accuracy), not one per step."""
    calls = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append(1) or item(self))
    result = _run(digits, epochs=2, batch_size=29)
    assert result["steps"] == 16 and len(calls) == 4


def test_divergence_names_the_window_of_steps():
    with pytest.raises(loop.TrainingDiverged, match=r"loss became nan at epoch 2, one of steps 51-100"):
        loop._check_finite(torch.tensor(float("nan")), 1, 51, 100)
    with pytest.raises(loop.TrainingDiverged, match=r"loss became inf at epoch 1, step 7$"):
        loop._check_finite(torch.tensor(float("inf")), 0, 7, 7)
    loop._check_finite(torch.tensor(1e30), 0, 1, 50)


def test_random_draws_reach_a_gpu_through_pinned_memory(monkeypatch):
    moves = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: moves.append("pinned") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moves.append((a, k)) or self)
    host_to_device(torch.arange(3), CUDA)
    assert moves == ["pinned", ((CUDA,), {"non_blocking": True})]


def test_count_host_syncs_counts_the_sync_warnings_and_restores_the_mode(monkeypatch):
    modes = [2]  # "error" before
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: modes[-1])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def work():
        assert modes[-1] == "warn"
        for message in (SYNC_WARNING, "something else", SYNC_WARNING):
            warnings.warn(message, UserWarning, stacklevel=1)

    assert count_host_syncs(work) == 2 and modes[-1] == 2
    with pytest.raises(ZeroDivisionError):
        count_host_syncs(lambda: 1 / 0)
    assert modes[-1] == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        count_host_syncs(work)


@pytest.fixture
def cuda_switches():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def test_configure_cuda(monkeypatch, cuda_switches):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    configure_cuda(deterministic=False)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    configure_cuda(deterministic=True)
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    configure_cuda(deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's own setting stays
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.warns(UserWarning, match="before any CUDA work"):
        configure_cuda(deterministic=True)


def test_compile_is_static_and_its_seconds_are_kept_out_of_the_rate(digits, monkeypatch):
    """A fake compiler that takes 1 s for each new batch size: 230 images in batches of 64 are 2 graphs (64, 38)."""
    seen_kwargs, shapes = [], set()

    class SlowToCompile(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training and x.shape[0] not in shapes:
                shapes.add(x.shape[0])
                time.sleep(1.0)
            return self.inner(x)

    def fake_compile(module, **kwargs):
        seen_kwargs.append(kwargs)
        return SlowToCompile(module)

    monkeypatch.setattr(torch, "compile", fake_compile)
    result = _run(digits, epochs=3, batch_size=64, compile=True)
    assert seen_kwargs == [{"dynamic": False}] and shapes == {64, 38}
    assert 2.0 <= result["compile_seconds"] < 10
    assert result["images_per_s"] > 2 * 690 / result["compile_seconds"]  # the sleeps would cap it at 690 / 2 s
    assert _run(digits, epochs=1)["compile_seconds"] is None


def test_cpu_results_say_where_the_data_was_and_that_no_tf32_ran(digits):
    result = _run(digits, epochs=1)
    assert (result["data_placement"], result["tf32_conv"], result["compile_seconds"]) == ("host", False, None)


ONE_CELL = """description = "one cell"\nseeds = [0]\n[recipe]\nname = "quick"\nepochs = 1
[datasets.digits]\nper_class = 10\ntest_per_class = 5\n[protections]\nclean = {}\n[countermeasures]\nnone = {}
[victims.cnn]\nwidth = 8\n"""


def test_records_say_where_the_data_was(tmp_path):
    from bench.cli import main
    from bench.store.records import RecordLog

    (tmp_path / "one.toml").write_text(ONE_CELL)
    assert main(["run", "--matrix", str(tmp_path / "one.toml"), "--results", str(tmp_path / "r"), "--jobs", "1",
                 "--device", "cpu"]) == 0
    (record,) = RecordLog(tmp_path / "r" / "runs" / "one" / "records.jsonl").read()
    assert record.ok and (record.data_placement, record.tf32_conv, record.compile_seconds) == ("host", False, None)


def test_device_tensors_from_a_component_come_back_to_the_cpu(monkeypatch):
    """'meta' stands in for a GPU: ``with_images`` copies to the CPU; a set built around them is refused by name."""
    clean = ImageSet(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4), 4)
    on_device = torch.empty(4, 1, 8, 8, dtype=torch.uint8, device="meta")
    cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self: torch.ones(self.shape, dtype=self.dtype)
                        if self.device.type == "meta" else cpu(self))
    moved = clean.with_images(on_device)
    assert moved.images.device.type == "cpu" and torch.equal(moved.images, torch.ones(4, 1, 8, 8, dtype=torch.uint8))
    stages._check_output(clean, moved, "protection p")
    with pytest.raises(RuntimeError, match=r"protection p returned tensors on meta \(images\), cpu \(labels\): "
                                           r"components return CPU "):
        stages._check_output(clean, ImageSet(on_device, clean.labels, 4), "protection p")


@pytest.mark.gpu
@needs_cuda
def test_gpu_steps_wait_for_the_device_rarely(digits):
    """Syncs grow by well under one per added step (epoch ends and eval batches still sync)."""
    few, many = (count_host_syncs(lambda e=e: _run(digits, CUDA, epochs=e, batch_size=8)) for e in (1, 3))
    assert (many - few) / (2 * math.ceil(230 / 8)) < 0.5, (few, many)


@pytest.mark.gpu
@needs_cuda
def test_gpu_streamed_batches_equal_resident_ones(digits, monkeypatch):
    """The same augmented batches and labels whether the set sits on the GPU or streams from pinned memory (the
    weights may differ in the last bits: CUDA's backward kernels are not all deterministic)."""
    batches = {"device": [], "host-pinned": []}

    def run(placement):
        monkeypatch.setattr(loop, "data_placement", lambda images, device: placement)
        keep = lambda x, y, gen: batches[placement].append((x.cpu(), y.cpu())) or (x, y)
        return _run(digits, CUDA, hooks=TrainHooks(batch_transform=keep))

    assert run("device")["data_placement"] == "device" and run("host-pinned")["data_placement"] == "host-pinned"
    assert len(batches["device"]) == 16
    for (x, y), (x2, y2) in zip(batches["device"], batches["host-pinned"], strict=True):
        assert x.device.type == "cpu" and torch.equal(x, x2) and torch.equal(y, y2)


@pytest.mark.gpu
@needs_cuda
def test_gpu_result_names_the_resolved_precision_and_tf32():
    result = _run(DATASETS.create("digits", per_class=5, test_per_class=2).load(), CUDA, epochs=1, precision="auto")
    major = torch.cuda.get_device_capability(CUDA)[0]
    assert result["precision"] == ("bf16" if major >= 8 else "fp32")
    assert result["tf32_conv"] == torch.backends.cudnn.allow_tf32 and result["data_placement"] == "device"
