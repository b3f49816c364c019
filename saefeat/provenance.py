"""What a run ran on: library versions, the CPU, the git tree, and the resolved embedding runtime."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import saefeat

_PACKAGES = ("torch", "transformers", "scikit-learn", "onnxruntime", "sentence-transformers", "mlflow")
_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# variables that cap the instruction sets torch's kernels use (oneDNN, ATen, MKL); ONNX Runtime has none
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.cache
def cpu_description() -> str:
    """The CPU model and the instruction-set flags that pick the kernels (e.g. `AMD EPYC [avx2 avx512_bf16]`),
    then any cap set on torch's kernels (e.g. `capped: ONEDNN_MAX_CPU_ISA=AVX2`)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    caps = [f"{v}={os.environ[v]}" for v in ISA_CAPS if os.environ.get(v)]
    capped = f" capped: {' '.join(caps)}" if caps else ""
    return f"{model} [{' '.join(f for f in _CPU_FLAGS if f in flags)}]{capped}"


def git_state() -> tuple[str, bool | None]:
    """(HEAD commit, whether the tree has uncommitted changes) of the checkout saefeat runs from, if any."""
    root = Path(saefeat.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip() or "unknown"
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None or commit == "unknown" else bool(status.strip()))


def environment() -> dict[str, str]:
    """Versions, CPU, thread count and git state, as MLflow tags."""
    from saefeat.device import cpu_has_native_bf16
    from saefeat.sae import topk

    commit, dirty = git_state()
    env = {f"version.{p}": _version(p) for p in _PACKAGES}
    env |= {"version.saefeat": saefeat.__version__, "version.python": platform.python_version(),
            "cpu": cpu_description(), "cpu.native_bf16": str(cpu_has_native_bf16()),
            "torch.threads": str(torch.get_num_threads()), "topk_kernel": str(topk.kernel_enabled()),
            "saefeat.git_commit": commit, "saefeat.git_dirty": "unknown" if dirty is None else str(dirty)}
    return env


def embedder_provenance(embedder: Any) -> dict[str, str]:
    """The resolved settings of an `SAEEmbedder`: what its features were computed with."""
    from saefeat.sae import topk

    e = embedder
    sae = e.sae
    return {"host": str(e.model_name), "host_fingerprint": e.host.fingerprint, "layer": str(e.layer),
            "hook": e.host.hook_name(e.layer), "sae_hash": sae.content_hash if sae else "none",
            "sae_k": str(sae.cfg.k) if sae else "none", "window": str(e.window), "device": str(e.device),
            "backend": e.runtime.backend, "precision": e.runtime.precision, "sae_step": e.sae_step if sae else "none",
            "topk_kernel": str(e.device.type == "cpu" and sae is not None and sae.is_topk and topk.kernel_enabled())}
