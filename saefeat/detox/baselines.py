"""Baselines for SAE steering: a difference-in-means steering vector and banned words at decode time."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.feature_extraction.text import CountVectorizer

from saefeat.detox.steering import VectorSteering
from saefeat.embed.embedder import SAEEmbedder
from saefeat.errors import SaefeatError


def diff_in_means(embedder: SAEEmbedder, texts: Sequence[str], labels: Sequence[int], alpha: float = 1.0,
                  batch_size: int = 32) -> VectorSteering:
    """Steering away from toxic text at the embedder's layer: alpha * (mean clean - mean toxic).

    Each document's residual stream is averaged over its tokens, then the documents of each class.
    """
    y = np.asarray(labels).astype(int)
    if len(np.unique(y)) < 2:
        raise SaefeatError("a difference in means needs toxic (1) and non-toxic (0) texts")
    dense = embedder.encode_dense(list(texts), pooling="mean", batch_size=batch_size)
    vector = dense[y == 0].mean(0) - dense[y == 1].mean(0)
    return VectorSteering(torch.from_numpy(vector), embedder.layer, alpha)


def toxic_words(texts: Sequence[str], labels: Sequence[int], n: int = 100, min_count: int = 10) -> list[str]:
    """The `n` words most over-represented in toxic texts (smoothed log-odds of document frequency).

    Words must occur in at least `min_count` toxic documents. Derived from data, so the list also holds
    identity terms that co-occur with abuse; that is the known weakness of word filtering.
    """
    y = np.asarray(labels).astype(int)
    vec = CountVectorizer(lowercase=True, binary=True, token_pattern=r"(?u)\b[a-z][a-z']{2,}\b")
    X = vec.fit_transform(list(texts))
    tox = np.asarray(X[y == 1].sum(0)).ravel()
    clean = np.asarray(X[y == 0].sum(0)).ravel()
    log_odds = np.log((tox + 1) / ((y == 1).sum() + 1)) - np.log((clean + 1) / ((y == 0).sum() + 1))
    log_odds[tox < min_count] = -np.inf
    order = np.argsort(-log_odds)[:n]
    words = vec.get_feature_names_out()
    return [str(words[i]) for i in order if np.isfinite(log_odds[i])]


def bad_words_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Token sequences of each word as it can appear in generated text (with and without a leading space,
    lower, capitalised and upper case), for `generate(bad_words_ids=...)`."""
    seqs: dict[tuple[int, ...], None] = {}
    for w in words:
        for form in {w.lower(), w.capitalize(), w.upper()}:
            for variant in (form, " " + form):
                ids = tuple(tokenizer(variant, add_special_tokens=False)["input_ids"])
                if ids:
                    seqs[ids] = None
    return [list(s) for s in seqs]
