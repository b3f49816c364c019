"""Device auto-detection and mixed-precision contexts."""

from __future__ import annotations

import contextlib
import functools

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return `device` as a torch.device, or CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs whose matmuls run bf16 natively (AVX512-BF16 or AMX), where bf16 is ~2x faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """"auto" is bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere; "fp32" forces exact fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    return precision


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast when the resolved precision is bf16, else a no-op."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
