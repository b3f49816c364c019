"""Gemma Scope: ``params.npz`` (JumpReLU; W_enc (d_in, d_sae), no b_dec on the input), read without pickles.

The file holds no config: the layer and site come from its path as the releases lay it out,
``gemma-scope-<model>-<res|mlp|att>[-canonical]/layer_L/width_<w>/<...>/params.npz`` (a Hugging Face cache path
``models--google--gemma-scope-...-res/snapshots/<rev>/layer_L/...`` too). ``-res`` is the residual stream after
block L, ``-mlp`` the MLP output, ``-att`` the attention output before its projection (hook_z); without a repo
name the site is unknown and saefeat will not read it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from saefeat.errors import SAEFormatError
from saefeat.sae.formats._common import BASE_TENSORS, Format, Parsed, refuse_unknown_tensors, require_tensors
from saefeat.sae.model import SAEConfig

WEIGHTS = "params.npz"
_TENSORS = (*BASE_TENSORS, "threshold")
_REPO = re.compile(r"gemma-scope-.+-(res|mlp|att|transcoders)(?:-canonical)?$")
_SITES = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}
_HOOKS = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_z": "attn.hook_z"}
_LAYER = re.compile(r"^layer_(\d+)$")


def detect(path: Path) -> bool:
    return (path / WEIGHTS).is_file()


def site_and_layer(path: Path) -> tuple[str, int | None]:
    """(site, layer) from a Gemma Scope file's path; site "unknown" when no release name is in it."""
    site, layer = "unknown", None
    for part in path.resolve().parts:
        m = _REPO.search(part)
        if m:
            if m.group(1) == "transcoders":
                raise SAEFormatError(f"{path}: Gemma Scope transcoders are not supported")
            site = _SITES[m.group(1)]
        m = _LAYER.match(part)
        if m:
            layer = int(m.group(1))
    return site, layer


def parse(path: Path) -> Parsed:
    w_path = path / WEIGHTS
    try:
        with np.load(w_path, allow_pickle=False) as npz:
            weights = {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in npz.files}
    except (OSError, ValueError) as e:
        raise SAEFormatError(f"{w_path}: unreadable npz file ({e})") from e
    refuse_unknown_tensors(weights, _TENSORS, w_path, "Gemma Scope JumpReLU SAE")
    require_tensors(weights, _TENSORS, w_path, "Gemma Scope JumpReLU SAE")
    d_in, d_sae = (int(n) for n in weights["W_enc"].shape)
    site, layer = site_and_layer(path)
    hook = f"blocks.{layer}.{_HOOKS[site]}" if site in _HOOKS and layer is not None else None
    conf = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="jumprelu", apply_b_dec_to_input=False, layer=layer,
                     hook_name=hook, site=site, source_format="gemmascope")
    return Parsed(conf, weights, [w_path])


FORMAT = Format("gemmascope", detect, (WEIGHTS,), parse)
