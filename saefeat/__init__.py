"""saefeat: sparse-autoencoder features as interpretable document representations."""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "load_host": "saefeat.hosts",
    "HostModel": "saefeat.hosts",
    "load_sae": "saefeat.sae.formats",
    "save_sae": "saefeat.sae.formats",
    "SAE": "saefeat.sae.model",
    "SAEConfig": "saefeat.sae.model",
    "SAEEmbedder": "saefeat.embed.embedder",
    "EmbedConfig": "saefeat.embed.config",
    "BaselineConfig": "saefeat.embed.config",
    "SAEVectorizer": "saefeat.embed.vectorizers",
    "DenseVectorizer": "saefeat.embed.vectorizers",
    "SentenceVectorizer": "saefeat.embed.vectorizers",
    "make_representation": "saefeat.representations",
    "embed_corpus": "saefeat.engine",
    "read_embeddings": "saefeat.engine",
    "RayOptions": "saefeat.engine",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    # lazy imports keep `import saefeat` (and the CLI's start-up) fast
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'saefeat' has no attribute {name!r}")
