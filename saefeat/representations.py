"""The representations every task compares, each a scikit-learn transformer built by name."""

from __future__ import annotations

import numpy as np
from sklearn.base import TransformerMixin
from sklearn.feature_extraction.text import TfidfVectorizer

from saefeat.embed.config import BaselineConfig, EmbedConfig
from saefeat.embed.vectorizers import DenseVectorizer, SAEVectorizer, SentenceVectorizer
from saefeat.errors import SaefeatError

REPRESENTATIONS = ("sae", "dense", "sentence", "tfidf")


def make_representation(name: str, embed: EmbedConfig | None = None,
                        baselines: BaselineConfig | None = None) -> TransformerMixin:
    """A transformer mapping documents to features for `name` in (sae, dense, sentence, tfidf).

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
                                  show_progress_bar=embed.show_progress_bar, precision=embed.precision)
    if name == "tfidf":
        return TfidfVectorizer(sublinear_tf=True, min_df=3, max_df=0.95, max_features=baselines.tfidf_max_features,
                               ngram_range=(1, 2), dtype=np.float32)
    raise SaefeatError(f"unknown representation {name!r}; valid: {', '.join(REPRESENTATIONS)}")
