"""EleutherAI sparsify: ``cfg.json`` + ``sae.safetensors`` in a folder named after its hookpoint
(``layers.3``, ``layers.3.mlp``, ``layers.3.self_attn``, GPT-2's ``h.3``); ``encoder.weight`` is (d_sae, d_in).

Applied: the top-k activation (sparsify's ReLU-then-top-k is saefeat's top-k-then-ReLU), the b_dec subtracted from
the input. Refused by name: ``activation: groupmax``, ``transcode: true``, ``skip_connection`` / ``W_skip``.
"""

from __future__ import annotations

from pathlib import Path

from saefeat.errors import SAEFormatError
from saefeat.sae.formats._common import (
    Format,
    Parsed,
    as_int,
    read_json,
    read_safetensors,
    refuse_unknown_keys,
    refuse_unknown_tensors,
    require_tensors,
)
from saefeat.sae.model import SAEConfig
from saefeat.sae.sites import parse_hook

CONFIG = "cfg.json"
WEIGHTS = "sae.safetensors"
_APPLIED = {"activation", "k", "d_in", "num_latents", "transcode", "skip_connection", "signed"}
# used while training only (decoder renormalisation, the Multi-TopK loss, the width when num_latents is 0)
_TRAINING = {"expansion_factor", "normalize_decoder", "multi_topk"}
_TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


def detect(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def parse(path: Path) -> Parsed:
    cfg_path, w_path = path / CONFIG, path / WEIGHTS
    cfg = read_json(cfg_path)
    refuse_unknown_keys(cfg, _APPLIED | _TRAINING, cfg_path)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SAEFormatError(f"{cfg_path}: sparsify activation={activation!r} is not supported (topk only)")
    if cfg.get("transcode"):
        raise SAEFormatError(f"{cfg_path}: sparsify transcode=true (a transcoder, not an SAE of one activation) "
                             "is not supported")
    if cfg.get("skip_connection"):
        raise SAEFormatError(f"{cfg_path}: sparsify skip_connection=true (a transcoder with a skip connection) "
                             "is not supported")
    if cfg.get("signed"):
        raise SAEFormatError(f"{cfg_path}: sparsify signed=true is not supported")
    raw = read_safetensors(w_path)
    refuse_unknown_tensors(raw, _TENSORS, w_path, "sparsify top-k SAE")
    require_tensors(raw, _TENSORS, w_path, "sparsify top-k SAE")
    enc = raw["encoder.weight"]  # (d_sae, d_in)
    if enc.dim() != 2:
        raise SAEFormatError(f"{w_path}: encoder.weight must be 2-D, has shape {tuple(enc.shape)}")
    d_sae, d_in = (int(n) for n in enc.shape)
    for key, want in (("d_in", d_in), ("num_latents", d_sae)):
        got = as_int(cfg.get(key), key, cfg_path)
        if got not in (None, 0, want) or (key == "d_in" and got == 0):
            raise SAEFormatError(f"{cfg_path}: {key}={got} but encoder.weight has shape {tuple(enc.shape)}")
    k = as_int(cfg.get("k"), "k", cfg_path)
    if not k:
        raise SAEFormatError(f"{cfg_path}: a sparsify SAE needs k")
    site, layer = parse_hook(path.name)
    weights = {"W_enc": enc.T.contiguous(), "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
    conf = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, apply_b_dec_to_input=True, layer=layer,
                     hook_name=path.name, site=site, source_format="sparsify")
    return Parsed(conf, weights, [cfg_path, w_path])


FORMAT = Format("sparsify", detect, (CONFIG, WEIGHTS), parse)
