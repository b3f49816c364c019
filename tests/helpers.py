"""Small builders shared by tests."""

from __future__ import annotations

from pathlib import Path

import torch

from saefeat.sae import SAE, SAEConfig, save_sae


def random_sae(path: Path, d_in: int = 384, d_sae: int = 512, k: int = 16, layer: int = 3, host: str = "minilm",
               seed: int = 0) -> Path:
    """A random TopK SAE saved in saefeat layout (for tests that must not depend on training)."""
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, host=host, layer=layer))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in ** -0.5)
        sae.W_dec.normal_(0, d_sae ** -0.5)
    save_sae(sae, path)
    return path
