"""Numeric settings of training on a device: the resolved precision (bf16 where the hardware computes it natively),
autocast, and the process-wide cuDNN / determinism switches (``configure_cuda``)."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any

import torch

CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs for deterministic matmuls (PyTorch's reproducibility notes)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where bf16 autocast is ~2.5× faster."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32`` for this recipe setting on this device (``precision_reason`` says why)."""
    if precision != "auto":
        return precision
    return "bf16" if _native_bf16(device) else "fp32"


def precision_reason(precision: str, device: torch.device) -> str:
    """One line: why ``resolve_precision`` gives what it gives for this setting on this device."""
    resolved = resolve_precision(precision, device)
    if precision != "auto":
        return f"{resolved}: set by the recipe"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = "computes bf16 natively" if major >= 8 else "has no native bf16 (emulated, slow convolutions)"
        return f"{resolved}: CUDA capability {major}.{minor} {native}"
    if device.type == "cpu":
        return f"{resolved}: this CPU {'has' if cpu_has_bf16() else 'lacks'} AVX-512 BF16 / AMX"
    return f"{resolved}: no bf16 rule for device type {device.type!r}"


def _native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":  # below sm80 bf16 autocast is emulated and convolutions leave cuDNN (pytorch#81139)
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and cpu_has_bf16()


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast on ``device`` when ``precision`` is bf16, else nothing."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def configure_cuda(deterministic: bool) -> None:
    """Set this process's cuDNN and determinism switches; call it once at process start, before any CUDA work.

    ``deterministic=False``: cuDNN autotunes its algorithms per shape (``cudnn.benchmark``: faster, not bitwise
    repeatable). ``True``: no autotuning, deterministic cuDNN algorithms, ``torch.use_deterministic_algorithms(True,
    warn_only=True)`` (ops without a deterministic kernel warn instead of failing) and ``CUBLAS_WORKSPACE_CONFIG``
    set where unset, which cuBLAS reads only when CUDA initialises: it warns if CUDA is already initialised without
    it. The determinism switch also holds for CPU ops (deterministic kernels, ``torch.empty`` filled). TF32 is left as PyTorch's default (on for convolutions, off for matmuls, so fp32 matmuls keep their numbers);
    the train result records the convolution setting (``tf32_conv``).
    """
    if deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_initialized():
            warnings.warn("configure_cuda(deterministic=True) after CUDA initialised: CUBLAS_WORKSPACE_CONFIG "
                          "comes too late for cuBLAS in this process; call it before any CUDA work", stacklevel=2)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
