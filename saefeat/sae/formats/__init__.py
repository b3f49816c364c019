"""Reading and writing the SAE layouts people publish (safetensors and npz only, never pickles).

One module per layout, each with its detection, weight files and parser, tried in this order:
- saefeat (`native`):     ``saefeat.json`` + ``sae.safetensors``
- Gemma Scope:            ``params.npz`` (JumpReLU)
- SAELens:                ``cfg.json`` + ``sae_weights.safetensors`` (pre-v6 and v6 configs, trainer checkpoints)
- sparsify (EleutherAI):  ``cfg.json`` + ``sae.safetensors``

Every tensor and every setting of a file is applied exactly or refused by name (`SAEFormatError`); provenance and
training-only settings are on each parser's explicit allowlist. An SAE's `content_hash` covers its parsed config
and the bytes of every file it was read from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from saefeat.errors import MissingFileError, SaefeatError, SAEFormatError, SAESiteError
from saefeat.hashing import update_with_file
from saefeat.sae.formats import gemmascope, native, saelens, sparsify
from saefeat.sae.formats._common import Format, Parsed
from saefeat.sae.model import SAE
from saefeat.sae.sites import check_site, hook_name, read_point, same_point

SAEFEAT_META = native.META
SAEFEAT_WEIGHTS = native.WEIGHTS
DEFAULTS_DIR = Path(__file__).resolve().parent.parent.parent / "weights"
FORMATS: tuple[Format, ...] = (native.FORMAT, gemmascope.FORMAT, saelens.FORMAT, sparsify.FORMAT)

__all__ = [
    "DEFAULTS_DIR", "FORMATS", "SAEFEAT_META", "SAEFEAT_WEIGHTS", "Format", "Parsed", "check_compatible",
    "content_hash", "default_sae_path", "detect_format", "file_hash", "load_sae", "resolve_sae", "sae_folder",
    "save_sae", "shipped_sae_layers", "state_hash",
]


def file_hash(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        update_with_file(h, p)
    return h.hexdigest()[:16]


def state_hash(sae: SAE) -> str:
    """Hash of an in-memory SAE's weights and settings (for SAEs that were never saved)."""
    h = hashlib.sha256(json.dumps(asdict(sae.cfg), sort_keys=True, default=str).encode())
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _parsed_hash(fmt: str, parsed: Parsed) -> str:
    """The parsed config (every field but free-form metadata) and the bytes of every file read."""
    cfg = asdict(parsed.cfg)
    cfg.pop("extra")
    h = hashlib.sha256(json.dumps({"format": fmt, **cfg}, sort_keys=True, default=str).encode())
    for p in parsed.files:
        h.update(p.name.encode())
        h.update(bytes.fromhex(file_hash(p)))
    return h.hexdigest()[:16]


def default_sae_path(host: str, layer: int | None = None) -> Path:
    """Folder of the SAE shipped with the package for an offline host alias: the host's default one, or with
    `layer` the one shipped for that layer (`weights/<host>/layer<N>/` beside the default)."""
    path = DEFAULTS_DIR / host
    if not (path / SAEFEAT_META).is_file():
        shipped = sorted(p.name for p in DEFAULTS_DIR.glob("*") if (p / SAEFEAT_META).is_file())
        raise MissingFileError(f"no default SAE ships for host {host!r}; shipped defaults: {shipped}")
    if layer is None:
        return path
    layers = shipped_sae_layers(host)
    if layer not in layers:
        raise MissingFileError(f"no SAE ships for host {host!r} at layer {layer}; shipped at layers "
                               f"{sorted(layers)} (sae=default picks the one for embed.layer; pass sae=PATH "
                               "for your own)")
    return layers[layer]


def sae_folder(spec: str | Path, host: str, layer: int | None = None) -> Path:
    """Where an SAE spec points: ``"default"`` is the folder shipped for `host` at `layer`, any other spec a
    path as given."""
    return default_sae_path(host, layer) if str(spec) == "default" else Path(spec)


def shipped_sae_layers(host: str) -> dict[int, Path]:
    """Layer -> folder of every SAE shipped for `host` (its default and the `layer<N>/` ones)."""
    root = DEFAULTS_DIR / host
    out: dict[int, Path] = {}
    for folder in [*sorted(root.glob("layer*")), root]:
        meta = folder / SAEFEAT_META
        if meta.is_file():
            out[int(json.loads(meta.read_text())["layer"])] = folder
    return out


def default_sentence_sae_path(model: str) -> Path:
    """Folder of the SAE over `model`'s sentence embeddings shipped with the package (`sae_sentence`)."""
    path = DEFAULTS_DIR / model / "sentence"
    if not (path / SAEFEAT_META).is_file():
        raise MissingFileError(f"no sentence-embedding SAE ships for {model!r}; train one with "
                               "benchmarks/train_sentence_sae.py and pass baselines.sentence_sae=PATH")
    return path


def _format_of(path: Path) -> Format:
    if path.is_file():
        path = path.parent
    for fmt in FORMATS:
        if fmt.detect(path):
            return fmt
    subdirs = sorted(p.name for p in path.glob("*") if p.is_dir() and any(f.detect(p) for f in FORMATS))
    hint = f"; it holds SAEs in sub-folders, pass one of: {subdirs}" if subdirs else ""
    if any(path.glob("*.pt")) or any(path.glob("*.pkl")) or any(path.glob("*.bin")):
        hint += "; pickled weights (.pt/.pkl/.bin) are never loaded, convert them to safetensors"
    raise SAEFormatError(f"no known SAE layout in {path}{hint}")


def detect_format(path: Path) -> str:
    """Name of the layout stored at `path` (a folder, or a weights file inside one)."""
    return _format_of(Path(path)).name


def _parse(path: str | Path) -> tuple[Path, Format, Parsed]:
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"SAE path not found: {path}")
    if path.is_file():
        path = path.parent
    fmt = _format_of(path)
    return path, fmt, fmt.parse(path)


def content_hash(path: str | Path) -> str:
    """The `content_hash` the SAE stored at `path` gets when loaded."""
    _, fmt, parsed = _parse(path)
    return _parsed_hash(fmt.name, parsed)


def load_sae(path: str | Path, device: str | torch.device | None = None) -> SAE:
    """Load an SAE from a folder in any supported layout (see module docstring)."""
    path, fmt, parsed = _parse(path)
    sae = SAE(parsed.cfg)
    expected = sae.state_dict()
    extra = sorted(set(parsed.weights) - set(expected))
    if extra:  # a parser's own refusal names these first; this guards the SAE class against a parser's slip
        raise SAEFormatError(f"{path}: {fmt.name} tensors {extra} are not applied by a {sae.cfg.architecture} SAE")
    missing = sorted(set(expected) - set(parsed.weights))
    if missing:
        raise SAEFormatError(f"{path}: {fmt.name} weights lack {missing}")
    for name, want in expected.items():
        if tuple(parsed.weights[name].shape) != tuple(want.shape):
            raise SAEFormatError(f"{path}: tensor {name} has shape {tuple(parsed.weights[name].shape)}, "
                                 f"expected {tuple(want.shape)}")
    bad = [name for name, t in parsed.weights.items() if not torch.isfinite(t.float()).all()]
    if bad:  # a NaN would silently zero every embedding
        raise SAEFormatError(f"{path}: tensor(s) {sorted(bad)} hold NaN or infinite values")
    sae.load_state_dict({k: v.float() for k, v in parsed.weights.items()})
    sae.content_hash = _parsed_hash(fmt.name, parsed)
    if device is not None:
        sae = sae.to(device)
    return sae.eval().requires_grad_(False)


def save_sae(sae: SAE, path: str | Path, meta: dict[str, Any] | None = None, half: bool = False) -> Path:
    """Write the saefeat layout: `sae.safetensors` (fp16 if `half`) and `saefeat.json` (config, then `meta`),
    swapped in together so that no reader sees one without the other."""
    path = native.save(sae, Path(path), meta, half)
    sae.content_hash = content_hash(path)
    return path


def resolve_sae(spec: str | Path | SAE, host: str, device: str | torch.device | None = None,
                layer: int | None = None) -> SAE:
    """An SAE from a spec: an SAE object, ``"default"`` (the one shipped for `host`, at `layer` when given), or a
    path."""
    if isinstance(spec, SAE):
        if not spec.content_hash:
            spec.content_hash = state_hash(spec)
        return spec.to(device) if device is not None else spec
    return load_sae(sae_folder(spec, host, layer), device)


def check_compatible(sae: SAE, host_name: str, d_model: int, layer: int | None, site: str = "output") -> None:
    """Refuse an SAE that does not fit the host's width, or that was trained at another point of the host than
    the one the caller reads (`layer`'s ``"output"`` or ``"input"``); both sides are named."""
    c = sae.cfg
    if sae.d_in != d_model:
        raise SaefeatError(
            f"SAE d_in={sae.d_in} does not match the hidden size of host {host_name!r} (d_model={d_model}); "
            f"this SAE was trained for host={c.host!r}"
        )
    check_site(c)
    if layer is None:
        return
    want = read_point(c, layer if c.layer is None else None)
    if not same_point(want, (int(layer), site)):
        trained = c.hook_name or hook_name(*want)
        raise SAESiteError(
            f"SAE was trained on layer {c.layer} of {c.host!r} ({trained}, read at {hook_name(*want)}), but "
            f"{hook_name(int(layer), site)} (layer {layer}'s {site}) was requested"
        )
