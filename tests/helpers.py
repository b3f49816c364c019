"""Small builders shared by tests."""

from __future__ import annotations

from pathlib import Path

from saefeat.sae import SAE, SAEConfig, save_sae
from saefeat.sae.model import random_like


def random_sae(path: Path, d_in: int = 384, d_sae: int = 512, k: int = 16, layer: int = 3, host: str = "minilm",
               seed: int = 0) -> Path:
    """A random TopK SAE saved in saefeat layout (for tests that must not depend on training)."""
    shape = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, host=host, layer=layer))
    save_sae(random_like(shape, seed), path)
    return path
