"""The representations every task compares, each a scikit-learn transformer built by name."""

from __future__ import annotations

import numpy as np
from sklearn.base import TransformerMixin
from sklearn.feature_extraction.text import TfidfVectorizer

from saefeat.embed.config import BaselineConfig, EmbedConfig
from saefeat.embed.vectorizers import (
    DenseVectorizer,
    SAEVectorizer,
    SentenceSAEVectorizer,
    SentenceVectorizer,
)
from saefeat.errors import SaefeatError

REPRESENTATIONS = ("sae", "dense", "sentence", "tfidf", "sae_sentence")
# representations whose features are SAE latents (retrieval's hybrid fuses sae with a dense side)
SAE_BASED = ("sae", "hybrid", "sae_sentence")


def make_representation(name: str, embed: EmbedConfig | None = None,
                        baselines: BaselineConfig | None = None) -> TransformerMixin:
    """A transformer mapping documents to features for `name` in (sae, dense, sentence, tfidf, sae_sentence).

    `sae` and `dense` read the host as `embed` says; `sentence` and `tfidf` are set by `baselines` (the sentence
    model runs on `embed`'s device and precision, with its batch size and cache).
    """
    embed, baselines = embed or EmbedConfig(), baselines or BaselineConfig()
    if name == "sae":
        return SAEVectorizer(embed)
    if name == "dense":
        return DenseVectorizer(embed, pooling=baselines.dense_pooling)
    if name == "sentence":
        return SentenceVectorizer(model=baselines.sentence_model, batch_size=embed.batch_size, device=embed.device,
                                  cache_dir=embed.cache_dir if embed.cache else False,
                                  show_progress_bar=embed.show_progress_bar, precision=embed.precision,
                                  long_docs=baselines.sentence_long_docs, backend=embed.backend)
    if name == "sae_sentence":
        return SentenceSAEVectorizer(sae=baselines.sentence_sae, model=baselines.sentence_model,
                                     pooling=baselines.sentence_sae_pooling, batch_size=embed.batch_size,
                                     device=embed.device, cache_dir=embed.cache_dir if embed.cache else False,
                                     show_progress_bar=embed.show_progress_bar, precision=embed.precision,
                                     backend=embed.backend)
    if name == "tfidf":
        return TfidfVectorizer(sublinear_tf=True, min_df=3, max_df=0.95, max_features=baselines.tfidf_max_features,
                               ngram_range=(1, 2), dtype=np.float32)
    raise SaefeatError(f"unknown representation {name!r}; valid: {', '.join(REPRESENTATIONS)}")


def describe_representation(name: str, embed: EmbedConfig | None = None,
                            baselines: BaselineConfig | None = None) -> dict[str, str]:
    """What `name`'s features are computed with, resolved (host and its weight hash, layer, hook, SAE and its hash,
    pooling, precision, backend, device, kernel): the params of a child run. {} for a name that is not a
    representation (a task's own row sets, say); the host is loaded for `sae`, `dense` and `hybrid`."""
    from saefeat.embed.vectorizers import get_embedder
    from saefeat.provenance import embedder_provenance
    from saefeat.sae.formats import sae_folder

    embed, baselines = embed or EmbedConfig(), baselines or BaselineConfig()
    if name in ("sae", "hybrid", "dense"):  # the host's activations (and its SAE) as `embed` reads them
        out = embedder_provenance(get_embedder(embed))
        if name == "dense":
            drop = ("sae_hash", "sae_k", "topk_kernel")
            return {k: v for k, v in out.items() if k not in drop} | {"pooling": baselines.dense_pooling}
        return out | {"sae_id": str(sae_folder(embed.sae, embed.model, embed.layer)), "pooling": embed.pooling,
                      "pool_k": str(embed.pool_k) if embed.pooling in ("topk", "log1p_topk") else "none"}
    if name in ("sentence", "sae_sentence"):  # the device and precision the vectorizer itself resolves
        from saefeat.device import resolve_device

        rep = make_representation(name, embed, baselines)
        rt = rep.runtime
        out = {"sentence_model": baselines.sentence_model, "device": str(resolve_device(rep.device)),
               "backend": rt.backend, "precision": rt.precision}
        if name == "sae_sentence":
            sae = rep.sae_model
            out |= {"sae_id": baselines.sentence_sae, "sae_hash": sae.content_hash, "sae_k": str(sae.cfg.k),
                    "pooling": baselines.sentence_sae_pooling}
        return out
    if name == "tfidf":
        return {"tfidf_max_features": str(baselines.tfidf_max_features)}
    return {}
