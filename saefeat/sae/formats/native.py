"""saefeat's own layout: ``saefeat.json`` (the SAEConfig fields, then the caller's metadata) + ``sae.safetensors``.

Every `SAEConfig` field is applied; the other top-level keys are the metadata `save_sae` was given (recipe,
metrics), which never changes encode or decode. ``format_version`` guards the rule: a file from a newer saefeat,
which may hold fields this one does not apply, is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from saefeat.atomic import atomic_dir
from saefeat.errors import SaefeatError, SAEFormatError
from saefeat.sae.formats._common import (
    BASE_TENSORS,
    Format,
    Parsed,
    read_json,
    read_safetensors,
    refuse_unknown_tensors,
    require_tensors,
)
from saefeat.sae.model import SAE, SAEConfig
from saefeat.sae.sites import SITES, parse_hook

META = "saefeat.json"
WEIGHTS = "sae.safetensors"
FORMAT_VERSION = 2  # 2: `site` and `context_size` recorded (files without them are resid_post)
_FIELDS = tuple(f.name for f in fields(SAEConfig) if f.name != "extra")
_RESERVED = {"format", "format_version", *_FIELDS}


def detect(path: Path) -> bool:
    return (path / META).is_file()


def parse(path: Path) -> Parsed:
    meta_path = path / META
    meta = read_json(meta_path)
    if meta.get("format", "saefeat") != "saefeat":
        raise SAEFormatError(f"{meta_path}: format={meta['format']!r}, expected 'saefeat'")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SAEFormatError(f"{meta_path}: format_version={version!r} is newer than this saefeat reads "
                             f"({FORMAT_VERSION}); upgrade saefeat")
    for key in ("d_in", "d_sae"):
        if key not in meta:
            raise SAEFormatError(f"{meta_path}: lacks {key!r}")
    values = {k: meta[k] for k in _FIELDS if k in meta}
    values.setdefault("site", "resid_post")  # files from before sites were recorded
    if values["site"] not in SITES:
        raise SAEFormatError(f"{meta_path}: unknown site {values['site']!r}; known: {SITES}")
    if values.get("context_size") is None:
        values["context_size"] = _recipe_seq_len(meta.get("recipe"))
    _check_hook(values, meta_path)
    extra = {k: v for k, v in meta.items() if k not in _RESERVED}
    try:
        cfg = SAEConfig(**values, extra=extra)
    except (TypeError, ValueError) as e:
        raise SAEFormatError(f"{meta_path}: {e}") from e
    weights_path = path / WEIGHTS
    weights = read_safetensors(weights_path)
    known = (*BASE_TENSORS, "threshold") if cfg.architecture in ("jumprelu", "batchtopk") else BASE_TENSORS
    refuse_unknown_tensors(weights, known, weights_path, f"saefeat {cfg.architecture} SAE")
    require_tensors(weights, known, weights_path, f"saefeat {cfg.architecture} SAE")
    return Parsed(cfg, weights, [meta_path, weights_path])


def _recipe_seq_len(recipe: Any) -> int | None:
    """The training window (content tokens) of the `train-sae` recipe stored with the SAE, if any."""
    train = recipe.get("train") if isinstance(recipe, dict) else None
    seq_len = train.get("seq_len") if isinstance(train, dict) else None
    return int(seq_len) if isinstance(seq_len, int) and not isinstance(seq_len, bool) else None


def _check_hook(values: dict[str, Any], where: Path) -> None:
    """A hook name that names another site or layer than the fields do is a contradiction: refuse it."""
    site, layer = parse_hook(values.get("hook_name"))
    if site == "unknown":
        return
    if site != values["site"] or (layer is not None and values.get("layer") not in (None, layer)):
        raise SAEFormatError(f"{where}: hook_name={values['hook_name']!r} contradicts site={values['site']!r}, "
                             f"layer={values.get('layer')!r}")


def save(sae: SAE, path: Path, meta: dict[str, Any] | None = None, half: bool = False) -> Path:
    """Write the layout into `path` as one swap: a reader sees the old folder or the new one, never a mix."""
    cfg = asdict(sae.cfg)
    extra = cfg.pop("extra") | (meta or {})
    clash = sorted(set(extra) & _RESERVED)
    if clash:
        raise SaefeatError(f"save_sae: metadata keys {clash} would overwrite the SAE's own fields")
    if path.exists():
        if not path.is_dir():
            raise SaefeatError(f"save_sae: {path} exists and is not a folder")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in (META, WEIGHTS))
        if foreign:
            raise SaefeatError(f"save_sae replaces the whole folder {path}, which holds other files {foreign[:5]}; "
                               "save into a new or empty folder")
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sae.state_dict().items()}
    doc = {"format": "saefeat", "format_version": FORMAT_VERSION, **cfg, "source_format": "saefeat", **extra}
    text = json.dumps(doc, indent=2, default=str)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / META).write_text(text)

    return atomic_dir(path, write)


FORMAT = Format("saefeat", detect, (META, WEIGHTS), parse)
