"""The word-filter baseline of SAE steering: words over-represented in toxic text, banned at decode time."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer


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
