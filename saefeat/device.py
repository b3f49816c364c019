"""Device auto-detection, the runtime (backend and precision) a pass runs with, and mixed-precision contexts."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass

import torch

from saefeat.errors import SaefeatError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return `device` as a torch.device, or CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SaefeatError(f"device={device!r} is not a device torch knows (cpu, cuda, cuda:1, ...)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SaefeatError(f"device={device!r} was asked for, but CUDA is not available on this machine")
    return dev


PRECISIONS = ("auto", "fp32", "bf16", "int8")
BACKENDS = ("auto", "torch", "onnx")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True on CPUs whose matmuls run bf16 natively (AVX512-BF16 or AMX), where bf16 is ~2x faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


@dataclass(frozen=True)
class Runtime:
    """What a host pass runs on: `backend` torch|onnx and `precision` fp32|bf16|int8, both resolved."""

    backend: str
    precision: str

    @property
    def autocast_precision(self) -> str:
        """Precision of the torch parts (the SAE step, and the host on the torch backend)."""
        return "bf16" if self.precision == "bf16" else "fp32"


def resolve_runtime(device: torch.device, precision: str = "auto", backend: str = "auto",
                    onnx_capable: bool = True) -> Runtime:
    """Resolve `precision` and `backend` to what runs.

    CUDA, and CPUs with native bf16 (AVX512-BF16/AMX): torch with bf16 autocast. Other CPUs: ONNX Runtime int8
    (the host truncated after the SAE's block, per-channel dynamic quantization) when onnxruntime is installed and
    the host can be exported (`onnx_capable`), else exact torch fp32. `fp32` alone means exact torch fp32;
    `int8` means ONNX Runtime; `bf16` means torch.
    """
    if precision not in PRECISIONS:
        raise SaefeatError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if backend not in BACKENDS:
        raise SaefeatError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device.type != "cpu" and (backend == "onnx" or precision == "int8"):
        raise SaefeatError(f"backend=onnx and precision=int8 run on CPU only; on {device.type} use backend=torch "
                         "with precision bf16 or fp32")
    if backend == "auto":
        fast_cpu_path = precision == "auto" and device.type == "cpu" and not cpu_has_native_bf16() \
            and onnx_capable and onnxruntime_available()
        backend = "onnx" if precision == "int8" or fast_cpu_path else "torch"
    if backend == "onnx":
        if not onnxruntime_available():
            raise SaefeatError("backend=onnx needs onnxruntime (pip install onnxruntime onnx)")
        if not onnx_capable:
            raise SaefeatError("backend=onnx supports encoder hosts only (BERT-style); use backend=torch")
        if precision == "bf16":
            raise SaefeatError("backend=onnx runs fp32 or int8, not bf16; use backend=torch for bf16")
        return Runtime("onnx", "int8" if precision == "auto" else precision)
    if precision == "int8":
        raise SaefeatError("precision=int8 runs on backend=onnx (ONNX Runtime's int8 kernels), not torch")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    return Runtime("torch", precision)


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """The torch precision of `precision` on `device`: "auto" is bf16 on CUDA and on CPUs with native bf16."""
    return resolve_runtime(device, precision, "torch").precision


def autocast(device: torch.device, precision: str = "auto"):
    """bf16 autocast when the resolved torch precision is bf16, else a no-op."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
