"""Offline latent labels: the tokens most over-represented at a latent's peaks against the corpus.

Scores are weighted log-odds with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008), so a token
that is frequent everywhere ("the", ",") needs far more peaks than a rare one to make the label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from saefeat.explain.tokens import token_name


@dataclass
class TokenLabel:
    """A label with the tokens it names, their z-scores and their share of the peaks."""

    label: str
    tokens: list[str]
    scores: list[float]
    shares: list[float]


def log_odds_z(counts: np.ndarray, background: np.ndarray, prior: float = 100.0) -> np.ndarray:
    """z-scores of each token's log-odds in `counts` against `background` (both per-vocabulary counts)."""
    counts = counts.astype(np.float64)
    background = background.astype(np.float64)
    n, big_n = counts.sum(), background.sum()
    alpha = prior * (background + 1.0) / (big_n + len(background))  # smoothed so unseen tokens stay finite
    a0 = alpha.sum()
    fg = np.log(counts + alpha) - np.log(n + a0 - counts - alpha)
    bg = np.log(background + alpha) - np.log(big_n + a0 - background - alpha)
    return (fg - bg) / np.sqrt(1.0 / (counts + alpha) + 1.0 / (background + alpha))


def label_from_tokens(peak_ids: Sequence[int], background: np.ndarray, tokenizer,
                      context_ids: Sequence[int] = (), max_tokens: int = 3, min_share: float = 0.1) -> TokenLabel:
    """Label a latent from the token ids at its peaks (one per top context) against corpus counts.

    Tokens that recur at the peaks and score highest make the label ("revenue | sales"). When no peak
    token recurs the latent reads context rather than a token, and the label names the over-represented
    tokens of the windows instead, prefixed "near:".
    """
    peak_ids = np.asarray(list(peak_ids), dtype=np.int64)
    if len(peak_ids) == 0:
        return TokenLabel("(never fires)", [], [], [])
    vocab = len(background)
    label = _best(np.bincount(peak_ids, minlength=vocab)[:vocab], background, tokenizer, max_tokens,
                  min_share, min_count=2 if len(peak_ids) >= 3 else 1)
    if label.tokens:
        return label
    ctx = np.asarray(list(context_ids), dtype=np.int64)
    if len(ctx):
        near = _best(np.bincount(ctx, minlength=vocab)[:vocab], background, tokenizer, max_tokens,
                     min_share=0.0, min_count=2)
        if near.tokens:
            return TokenLabel("near: " + near.label, near.tokens, near.scores, near.shares)
    # nothing recurs: name the single strongest peak token
    return _best(np.bincount(peak_ids[:1], minlength=vocab)[:vocab], background, tokenizer, 1, 0.0, 1)


def _best(counts: np.ndarray, background: np.ndarray, tokenizer, max_tokens: int, min_share: float,
          min_count: int) -> TokenLabel:
    z = log_odds_z(counts, background)
    n = counts.sum()
    cand = np.flatnonzero((counts >= min_count) & (counts / max(n, 1) >= min_share) & (z > 0))
    cand = cand[np.argsort(-z[cand], kind="stable")]
    names: list[str] = []
    keep: list[int] = []
    for t in cand:
        name = token_name(tokenizer, int(t))
        if name.lower() in (x.lower() for x in names):  # "Revenue" and " revenue" are one word to a reader
            continue
        names.append(name)
        keep.append(int(t))
        if len(keep) == max_tokens:
            break
    return TokenLabel(" | ".join(names), names, [float(z[t]) for t in keep], [float(counts[t] / n) for t in keep])
