"""Where in the host an SAE was trained (its *site*) and where saefeat must read the residual stream for it.

A site is named once, whatever layout the SAE came in: SAELens hook names (``blocks.3.hook_resid_pre``),
sparsify hookpoint folders (``layers.3.mlp``, GPT-2's ``h.3``) and Gemma Scope repo names all map to one of
`SITES`. saefeat reads the residual stream only, at a block's output or input (see `read_point`).
"""

from __future__ import annotations

import re

from saefeat.errors import SaefeatError, SAESiteError
from saefeat.sae.model import SAEConfig

# residual stream: after block L, before block L (= after block L-1), between attention and MLP of block L
RESIDUAL_SITES = ("resid_post", "resid_pre", "resid_mid")
SITES = (*RESIDUAL_SITES, "mlp_out", "attn_out", "attn_z", "mlp_in", "attn_in", "mlp_post", "mlp_pre",
         "attn_result", "attn_q", "attn_k", "attn_v", "ln1_normalized", "ln2_normalized", "sentence_embedding",
         "unknown")  # sentence_embedding: a sentence-transformers model's pooled output (saefeat.sae.sentence)
READABLE = ("resid_post", "resid_pre")

# TransformerLens hook names below ``blocks.L.``
_LENS_HOOKS = {
    "hook_resid_post": "resid_post", "hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid",
    "hook_mlp_out": "mlp_out", "hook_attn_out": "attn_out", "hook_mlp_in": "mlp_in", "hook_attn_in": "attn_in",
    "attn.hook_z": "attn_z", "attn.hook_result": "attn_result", "attn.hook_q": "attn_q", "attn.hook_k": "attn_k",
    "attn.hook_v": "attn_v", "mlp.hook_post": "mlp_post", "mlp.hook_pre": "mlp_pre",
    "ln1.hook_normalized": "ln1_normalized", "ln2.hook_normalized": "ln2_normalized",
}
_LENS = re.compile(r"^blocks\.(\d+)\.(.+)$")
# Hugging Face module names (sparsify hookpoints, SAELens hooks on HF models): a block, or its MLP / attention
_MODULE = re.compile(r"^(?:.*\.)?(?:layers|layer|h|blocks|block)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")
_MODULE_PARTS = {None: "resid_post", "mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out",
                 "attention": "attn_out"}
_FIRST_NUMBER = re.compile(r"(?:blocks|layers|layer|h)[._](\d+)")


def parse_hook(hook: str | None) -> tuple[str, int | None]:
    """(site, layer) of a SAELens hook name or an HF module / sparsify hookpoint name; ("unknown", ...) when the
    name is not one saefeat knows (the layer is still taken from it when it holds one)."""
    hook = (hook or "").strip()
    m = _LENS.match(hook)
    if m and m.group(2) in _LENS_HOOKS:
        return _LENS_HOOKS[m.group(2)], int(m.group(1))
    m = _MODULE.match(hook)
    if m:
        return _MODULE_PARTS[m.group(2)], int(m.group(1))
    n = _FIRST_NUMBER.search(hook)
    return "unknown", int(n.group(1)) if n else None


def hook_name(block: int, side: str) -> str:
    """The SAELens hook name of the residual stream at block `block`'s ``"output"`` or ``"input"``."""
    if side not in ("output", "input"):
        raise SaefeatError(f"side must be 'output' or 'input', got {side!r}")
    return f"blocks.{int(block)}.hook_resid_{'post' if side == 'output' else 'pre'}"


def check_site(cfg: SAEConfig) -> None:
    """Raise `SAESiteError` unless the SAE was trained on the residual stream at a block's output or input."""
    if cfg.site in READABLE:
        return
    hook = f"hook {cfg.hook_name!r}, " if cfg.hook_name else ""
    what = ("a hook name saefeat does not know; a sparsify folder is named after its hookpoint, e.g. layers.3"
            if cfg.site == "unknown" else "not the residual stream")
    raise SAESiteError(
        f"the SAE was trained at {hook}site {cfg.site!r} ({what}); saefeat reads the residual stream only: a "
        "block's output (resid_post: blocks.L.hook_resid_post, sparsify layers.L) or input (resid_pre: "
        "blocks.L.hook_resid_pre)"
    )


def read_point(cfg: SAEConfig, layer: int | None = None) -> tuple[int, str]:
    """(block, "output" | "input"): where saefeat must read the residual stream for an SAE with this config.

    resid_post L is block L's output; resid_pre L is block L's input (block L-1's output; the embeddings' output
    for L = 0). `layer` stands in for a layer the SAE does not record. Any other site raises `SAESiteError`.
    """
    check_site(cfg)
    where = f"hook {cfg.hook_name!r}" if cfg.hook_name else f"site {cfg.site!r}"
    if cfg.layer is not None and layer is not None and int(layer) != cfg.layer:
        raise SAESiteError(f"the SAE was trained at {where} of layer {cfg.layer}, but layer {layer} was requested")
    block = cfg.layer if cfg.layer is not None else layer
    if block is None:
        raise SAESiteError(f"the SAE ({where}) does not record its layer; pass the layer it was trained on")
    return int(block), "output" if cfg.site == "resid_post" else "input"


def same_point(a: tuple[int, str], b: tuple[int, str]) -> bool:
    """Whether two (block, side) points read the same residual stream (block L's input is block L-1's output)."""

    def norm(p: tuple[int, str]) -> tuple[int, str]:
        return (p[0] - 1, "output") if p[1] == "input" and p[0] > 0 else (int(p[0]), p[1])

    return norm(a) == norm(b)


def host_read_point(cfg: SAEConfig, layer: int | None = None) -> tuple[int, str]:
    """`read_point` in the form a host hook takes it: block L's input is read as block L-1's output, so only
    resid_pre of block 0 needs a hook at a block's input."""
    block, side = read_point(cfg, layer)
    return (block - 1, "output") if side == "input" and block > 0 else (block, side)
