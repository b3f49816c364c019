"""The representations every task compares, each a scikit-learn transformer built by name."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import TransformerMixin
from sklearn.feature_extraction.text import TfidfVectorizer

from saefeat.embed.vectorizers import DenseVectorizer, SAEVectorizer, SentenceVectorizer

REPRESENTATIONS = ("sae", "dense", "sentence", "tfidf")


def make_representation(name: str, model: str = "minilm", sae: str = "default", layer: int | None = None,
                        pooling: str = "max", dense_pooling: str = "mean", sentence_model: str = "minilm",
                        tfidf_max_features: int | None = 20_000, **embed: Any) -> TransformerMixin:
    """A transformer mapping documents to features for `name` in (sae, dense, sentence, tfidf).

    `embed` holds the embedding options (k, sae_k, window, overlap, max_tokens, batch_size, device,
    cache_dir, show_progress_bar) used by the `sae` and `dense` representations. `tfidf` keeps the
    `tfidf_max_features` most frequent uni- and bigrams (None: all).
    """
    if name == "sae":
        return SAEVectorizer(model=model, sae=sae, layer=layer, pooling=pooling, **embed)
    if name == "dense":
        embed = {k: v for k, v in embed.items() if k not in ("k", "sae_k")}
        return DenseVectorizer(model=model, sae=sae, layer=layer, pooling=dense_pooling, **embed)
    if name == "sentence":
        keep = {k: embed[k] for k in ("batch_size", "device", "cache_dir", "show_progress_bar", "precision")
                if k in embed}
        return SentenceVectorizer(model=sentence_model, **keep)
    if name == "tfidf":
        return TfidfVectorizer(sublinear_tf=True, min_df=3, max_df=0.95, max_features=tfidf_max_features,
                               ngram_range=(1, 2), dtype=np.float32)
    raise ValueError(f"unknown representation {name!r}; valid: {', '.join(REPRESENTATIONS)}")


def representation_from_config(name: str, cfg: Any) -> TransformerMixin:
    """Build a representation from a resolved run config (keys `model`, `sae`, `embed`)."""
    e = cfg.embed
    return make_representation(
        name, model=cfg.model.path, sae=cfg.sae.path, layer=cfg.model.layer, pooling=e.pooling,
        dense_pooling=e.dense_pooling, sentence_model=e.sentence_model, tfidf_max_features=e.tfidf_max_features,
        k=e.k, sae_k=cfg.sae.k,
        window=cfg.model.window, overlap=e.overlap, max_tokens=e.max_tokens, batch_size=e.batch_size,
        device=e.device, cache_dir=e.cache_dir, show_progress_bar=e.show_progress_bar, precision=e.precision,
        backend=e.backend,
    )
