"""Reading and writing the SAE layouts people publish (safetensors and npz only, never pickles).

Detected layouts:
- saefeat:     ``saefeat.json`` + ``sae.safetensors``
- SAELens:     ``cfg.json`` + ``sae_weights.safetensors`` (pre-v6 and v6 configs)
- sparsify:    ``cfg.json`` + ``sae.safetensors`` (EleutherAI; ``encoder.weight`` is (d_sae, d_in))
- Gemma Scope: ``params.npz`` (JumpReLU)
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from saefeat.atomic import atomic_write
from saefeat.sae.model import SAE, SAEConfig

SAEFEAT_META = "saefeat.json"
SAEFEAT_WEIGHTS = "sae.safetensors"
DEFAULTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def file_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def state_hash(sae: SAE) -> str:
    """Hash of an in-memory SAE's weights and settings (for SAEs that were never saved)."""
    h = hashlib.sha256(json.dumps(asdict(sae.cfg), sort_keys=True, default=str).encode())
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def default_sae_path(host: str) -> Path:
    """Folder of the SAE shipped with the package for an offline host alias."""
    path = DEFAULTS_DIR / host
    if not (path / SAEFEAT_META).is_file():
        shipped = sorted(p.name for p in DEFAULTS_DIR.glob("*") if (p / SAEFEAT_META).is_file())
        raise FileNotFoundError(f"no default SAE ships for host {host!r}; shipped defaults: {shipped}")
    return path


def detect_format(path: Path) -> str:
    """Name of the layout stored at `path` (a folder, or a weights file inside one)."""
    if path.is_file():
        path = path.parent
    if (path / SAEFEAT_META).is_file():
        return "saefeat"
    if (path / "params.npz").is_file():
        return "gemmascope"
    if (path / "cfg.json").is_file():
        if (path / "sae_weights.safetensors").is_file():
            return "saelens"
        if (path / "sae.safetensors").is_file():
            return "sparsify"
    subdirs = sorted(p.name for p in path.glob("*") if p.is_dir() and (p / "cfg.json").is_file())
    hint = f"; it holds SAEs in sub-folders, pass one of: {subdirs}" if subdirs else ""
    if any(path.glob("*.pt")) or any(path.glob("*.pkl")) or any(path.glob("*.bin")):
        hint += "; pickled weights (.pt/.pkl/.bin) are never loaded, convert them to safetensors"
    raise ValueError(f"no known SAE layout in {path}{hint}")


def _parse_layer(hook: str | None) -> int | None:
    m = re.search(r"(?:blocks|layers|layer)[._](\d+)", hook or "")
    return int(m.group(1)) if m else None


def _load_saelens(path: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    cfg = json.loads((path / "cfg.json").read_text())
    meta = cfg.get("metadata", {}) or {}
    arch = cfg.get("architecture", "standard")
    act_fn = cfg.get("activation_fn_str", cfg.get("activation_fn", "relu"))
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch in ("standard", "relu"):
        arch = "topk" if act_fn == "topk" else "relu"
    if arch not in ("relu", "jumprelu", "topk", "batchtopk"):
        raise ValueError(f"{path}: SAELens architecture {arch!r} is not supported (relu, jumprelu, topk, batchtopk)")
    weights = load_file(str(path / "sae_weights.safetensors"))
    if "log_threshold" in weights and "threshold" not in weights:
        weights["threshold"] = weights.pop("log_threshold").exp()
    norm = cfg.get("normalize_activations", "none") or "none"
    scale = 1.0
    if norm == "expected_average_only_in":
        scale = float(cfg.get("norm_scaling_factor") or weights.pop("norm_scaling_factor", torch.tensor(1.0)))
    elif norm not in ("none", None):
        raise ValueError(f"{path}: normalize_activations={norm!r} is not supported")
    hook = meta.get("hook_name", cfg.get("hook_name"))
    layer = cfg.get("hook_layer", meta.get("hook_layer"))
    conf = SAEConfig(
        d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]), architecture=arch, k=int(k) if k else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), input_scale=scale,
        host=meta.get("model_name", cfg.get("model_name")), layer=layer if layer is not None else _parse_layer(hook),
        hook_name=hook, source_format="saelens",
    )
    return conf, weights


def _load_sparsify(path: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    cfg = json.loads((path / "cfg.json").read_text())
    raw = load_file(str(path / "sae.safetensors"))
    if "W_skip" in raw:
        raise ValueError(f"{path}: sparsify transcoders with a skip connection are not supported")
    enc = raw["encoder.weight"]  # (d_sae, d_in)
    d_sae, d_in = enc.shape
    weights = {"W_enc": enc.T.contiguous(), "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
    conf = SAEConfig(
        d_in=int(cfg.get("d_in", d_in)), d_sae=int(d_sae), architecture="topk", k=int(cfg["k"]),
        apply_b_dec_to_input=True, layer=_parse_layer(path.name), hook_name=path.name, source_format="sparsify",
    )
    return conf, weights


def _load_gemmascope(path: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    with np.load(path / "params.npz", allow_pickle=False) as npz:
        weights = {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in npz.files}
    d_in, d_sae = weights["W_enc"].shape
    conf = SAEConfig(
        d_in=int(d_in), d_sae=int(d_sae), architecture="jumprelu", apply_b_dec_to_input=False,
        layer=_parse_layer(str(path)), source_format="gemmascope",
    )
    return conf, weights


def _load_saefeat(path: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    meta = json.loads((path / SAEFEAT_META).read_text())
    keys = {f for f in SAEConfig.__dataclass_fields__}
    conf = SAEConfig(**{k: v for k, v in meta.items() if k in keys})
    conf.extra = {k: v for k, v in meta.items() if k not in keys} | conf.extra
    return conf, load_file(str(path / SAEFEAT_WEIGHTS))


_LOADERS = {"saefeat": _load_saefeat, "saelens": _load_saelens, "sparsify": _load_sparsify,
            "gemmascope": _load_gemmascope}
_WEIGHT_FILES = {"saefeat": SAEFEAT_WEIGHTS, "saelens": "sae_weights.safetensors", "sparsify": "sae.safetensors",
                 "gemmascope": "params.npz"}


def load_sae(path: str | Path, device: str | torch.device | None = None) -> SAE:
    """Load an SAE from a folder in any supported layout (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SAE path not found: {path}")
    if path.is_file():
        path = path.parent
    fmt = detect_format(path)
    conf, weights = _LOADERS[fmt](path)
    sae = SAE(conf)
    expected = set(sae.state_dict())
    missing = expected - set(weights)
    if missing:
        raise ValueError(f"{path}: {fmt} weights lack {sorted(missing)}")
    for name in expected:
        want = tuple(sae.state_dict()[name].shape)
        if tuple(weights[name].shape) != want:
            raise ValueError(f"{path}: tensor {name} has shape {tuple(weights[name].shape)}, expected {want}")
    sae.load_state_dict({k: weights[k].float() for k in expected})
    sae.content_hash = file_hash(path / _WEIGHT_FILES[fmt])
    if device is not None:
        sae = sae.to(device)
    return sae.eval().requires_grad_(False)



def save_sae(sae: SAE, path: str | Path, meta: dict[str, Any] | None = None, half: bool = False) -> Path:
    """Write the saefeat layout: `sae.safetensors` (fp16 if `half`) and `saefeat.json` metadata."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sae.state_dict().items()}
    atomic_write(path / SAEFEAT_WEIGHTS, lambda tmp: save_file(tensors, tmp))
    cfg = asdict(sae.cfg)
    extra = cfg.pop("extra") | (meta or {})
    doc = {"format": "saefeat", **cfg, "source_format": "saefeat", **extra}
    atomic_write(path / SAEFEAT_META, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2, default=str)))
    sae.content_hash = file_hash(path / SAEFEAT_WEIGHTS)
    return path


def resolve_sae(spec: str | Path | SAE, host: str, device: str | torch.device | None = None) -> SAE:
    """An SAE from a spec: an SAE object, ``"default"`` (the one shipped for `host`), or a path."""
    if isinstance(spec, SAE):
        if not spec.content_hash:
            spec.content_hash = state_hash(spec)
        return spec.to(device) if device is not None else spec
    if str(spec) == "default":
        return load_sae(default_sae_path(host), device)
    return load_sae(spec, device)


def check_compatible(sae: SAE, host_name: str, d_model: int, layer: int | None) -> None:
    """Refuse an SAE whose width does not match the host's hidden size, with both named."""
    if sae.d_in != d_model:
        raise ValueError(
            f"SAE d_in={sae.d_in} does not match the hidden size of host {host_name!r} (d_model={d_model}); "
            f"this SAE was trained for host={sae.cfg.host!r}"
        )
    if layer is not None and sae.cfg.layer is not None and sae.cfg.layer != layer:
        raise ValueError(
            f"SAE was trained on layer {sae.cfg.layer} of {sae.cfg.host!r}, but layer {layer} was requested"
        )
