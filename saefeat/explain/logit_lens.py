"""Logit lens of SAE decoder directions: the tokens a latent's write to the residual stream promotes."""

from __future__ import annotations

import torch
from torch import nn

from saefeat.errors import SaefeatError
from saefeat.explain.tokens import token_text
from saefeat.hosts import HostModel
from saefeat.sae.model import SAE

_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "final_norm")


def final_norm(model: nn.Module) -> nn.Module | None:
    """The normalisation applied before the unembedding (model.norm in Llama, transformer.ln_f in GPT-2)."""
    for body in (getattr(model, "model", None), getattr(model, "transformer", None),
                 getattr(model, "gpt_neox", None), getattr(model, "base_model", None), model):
        if body is None:
            continue
        for name in _NORM_NAMES:
            mod = getattr(body, name, None)
            if isinstance(mod, nn.Module):
                return mod
    return None


@torch.no_grad()
def logit_lens(host: HostModel, sae: SAE, k: int = 8, batch: int = 512) -> tuple[list[list[str]], list[list[str]]]:
    """For each latent: the k tokens its decoder row raises most and the k it lowers most.

    The row goes through the host's final norm and unembedding, as if written to the last residual stream.
    Logits are divided by each token's unembedding norm (a cosine): otherwise a few tokens with very large
    unembeddings (in SmolLM2, rare word stems) top every latent's list. Only causal LMs have an unembedding;
    an encoder raises ValueError.
    """
    head = host.model.get_output_embeddings() if host.is_causal else None
    if head is None:
        raise SaefeatError(f"{host.name} has no unembedding (logit lens needs a causal LM)")
    norm = final_norm(host.model)
    tok = host.tokenizer
    promotes: list[list[str]] = []
    suppresses: list[list[str]] = []
    vocab = len(tok)
    scale = head.weight[:vocab].norm(dim=1).clamp_min(1e-6)
    for s in range(0, sae.d_sae, batch):
        x = sae.W_dec[s:s + batch].to(head.weight.device, head.weight.dtype)
        logits = head(norm(x) if norm is not None else x)[:, :vocab] / scale
        for ids, out in ((logits.topk(k).indices, promotes), ((-logits).topk(k).indices, suppresses)):
            for row in ids.tolist():
                out.append([token_text(tok, t) for t in tok.convert_ids_to_tokens(row)])
    return promotes, suppresses
