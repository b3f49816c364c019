"""What the format parsers share: the parsed result, the format record, file reading and the apply-or-refuse checks.

The rule every parser follows: each tensor and each config key of a file is either applied exactly, listed as
provenance / training-only (no effect on encode or decode), or refused by name with the file named.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from saefeat.errors import SAEFormatError
from saefeat.sae.model import SAEConfig

BASE_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass
class Parsed:
    """A parser's result: the SAE's config, its tensors in saefeat's naming, and every file it read."""

    cfg: SAEConfig
    weights: dict[str, torch.Tensor]
    files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class Format:
    """One on-disk layout: how to recognise a folder in it, its weight files, and its parser."""

    name: str
    detect: Callable[[Path], bool]
    weight_files: tuple[str, ...]
    parse: Callable[[Path], Parsed]


def read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAEFormatError(f"{path}: unreadable SAE config ({e})") from e
    if not isinstance(doc, dict):
        raise SAEFormatError(f"{path}: an SAE config must be a JSON object, got {type(doc).__name__}")
    return doc


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise SAEFormatError(f"{path}: unreadable safetensors file ({e})") from e


def refuse_unknown_keys(doc: dict[str, Any], known: Iterable[str], where: Path, what: str = "config key") -> None:
    """Refuse the first key of `doc` that is not in `known`, naming it and the file."""
    known = set(known)
    unknown = sorted(k for k in doc if k not in known)
    if unknown:
        raise SAEFormatError(
            f"{where}: unknown {what} {unknown[0]!r}"
            + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + "; saefeat applies or refuses every setting of an SAE file and does not know this one"
        )


def refuse_unknown_tensors(weights: dict[str, torch.Tensor], known: Iterable[str], where: Path, what: str) -> None:
    """Refuse any tensor saefeat would not apply, naming it, the file and the SAE kind."""
    known = set(known)
    unknown = sorted(k for k in weights if k not in known)
    if unknown:
        raise SAEFormatError(
            f"{where}: tensor {unknown[0]!r}" + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + f" is not part of a {what} as saefeat applies it (it reads {sorted(known)}); refusing rather than "
            "dropping it"
        )


def require_tensors(weights: dict[str, torch.Tensor], needed: Iterable[str], where: Path, what: str) -> None:
    missing = [k for k in needed if k not in weights]
    if missing:
        raise SAEFormatError(f"{where}: a {what} needs tensors {missing}; the file holds {sorted(weights)}")


def fold_decoder_norms(weights: dict[str, torch.Tensor], where: Path, flag: str) -> None:
    """Fold the decoder row norms into the weights, in place, so that encoding multiplies pre-activations by
    ||W_dec[i]|| and decoding divides activations by it, as `flag` asks (exact in real arithmetic)."""
    W_dec = weights["W_dec"].double()
    norms = W_dec.norm(dim=-1)
    zero = (norms == 0).nonzero().flatten().tolist()
    if zero:
        raise SAEFormatError(f"{where}: {flag} with all-zero decoder rows (latents {zero[:5]}) cannot be folded "
                             "exactly into the weights")
    weights["W_enc"] = (weights["W_enc"].double() * norms).to(weights["W_enc"].dtype)
    weights["b_enc"] = (weights["b_enc"].double() * norms).to(weights["b_enc"].dtype)
    weights["W_dec"] = (W_dec / norms[:, None]).to(weights["W_dec"].dtype)


def as_int(value: Any, key: str, where: Path) -> int | None:
    """An integer setting, or None when absent; a non-integer value is refused by name."""
    if value is None:
        return None
    try:
        ok = not isinstance(value, bool) and float(value).is_integer()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SAEFormatError(f"{where}: {key}={value!r} is not an integer")
    return int(value)
