"""Ranking SAE latents by how well they separate toxic from non-toxic text."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import rankdata

from saefeat.detox.filter import ToxicityFilter, representation_settings
from saefeat.embed.config import EmbedConfig
from saefeat.errors import SaefeatError

SCORES = ("mean_diff", "freq_diff", "grad_x_act")
RANK_RULES = {"combined": SCORES, "separation": ("mean_diff", "freq_diff"), "grad_x_act": ("grad_x_act",)}


def latent_scores(X: sp.spmatrix | np.ndarray, y: np.ndarray, coef: np.ndarray | None = None) -> pd.DataFrame:
    """Per-latent separation statistics of pooled SAE features `X` (n_docs x d_sae) against 0/1 labels `y`.

    Columns: mean activation in toxic / clean documents and its difference (`mean_diff`), firing frequency
    in each and its difference (`freq_diff`), the mean activation of the latent where it fires in toxic
    documents (`act_toxic`, the scale of clamp values), and, when the weights `coef` of a linear classifier
    over the same features are given, gradient x activation of its logit averaged over toxic documents
    (`grad_x_act`, as in GradSAE: for a linear logit the gradient is the weight).
    """
    y = np.asarray(y).astype(int)
    if X.shape[0] != len(y):
        raise SaefeatError(f"X has {X.shape[0]} rows but y has {len(y)} labels")
    if len(np.unique(y)) < 2:
        raise SaefeatError("latent scores need both toxic (1) and non-toxic (0) documents")
    X = sp.csr_matrix(X, dtype=np.float64)
    tox, clean = X[y == 1], X[y == 0]
    mean_t, mean_c = np.asarray(tox.mean(0)).ravel(), np.asarray(clean.mean(0)).ravel()
    fires_t = np.asarray((tox > 0).sum(0)).ravel()
    freq_t, freq_c = fires_t / tox.shape[0], np.asarray((clean > 0).sum(0)).ravel() / clean.shape[0]
    df = pd.DataFrame({
        "latent": np.arange(X.shape[1]),
        "mean_toxic": mean_t, "mean_clean": mean_c, "mean_diff": mean_t - mean_c,
        "freq_toxic": freq_t, "freq_clean": freq_c, "freq_diff": freq_t - freq_c,
        "act_toxic": np.asarray(tox.sum(0)).ravel() / np.maximum(fires_t, 1),
    })
    if coef is not None:
        coef = np.asarray(coef, dtype=np.float64).ravel()
        if len(coef) != X.shape[1]:
            raise SaefeatError(f"coef has {len(coef)} weights but X has {X.shape[1]} features")
        df["grad_x_act"] = coef * mean_t
    return df


def rank_toxic_latents(X: sp.spmatrix | np.ndarray, y: np.ndarray, coef: np.ndarray | None = None,
                       n: int = 20, min_freq_toxic: float = 0.01, max_freq_clean: float = 0.5,
                       rank_by: str = "combined") -> pd.DataFrame:
    """The `n` latents most associated with toxicity, best first.

    Candidates fire more often and more strongly in toxic text (and, with `coef`, push the classifier
    towards toxic), fire in at least `min_freq_toxic` of toxic documents and in at most `max_freq_clean`
    of clean ones (a latent that fires almost everywhere is not specific). They are ordered by the mean of
    their percentile ranks (`score`, in (0, 1]) over the scores of `rank_by`: `combined` (all available),
    `separation` (mean and frequency differences) or `grad_x_act` (GradSAE's rule alone; needs `coef`).
    """
    if rank_by not in RANK_RULES:
        raise SaefeatError(f"unknown latent ranking rule {rank_by!r}; valid: {', '.join(RANK_RULES)}")
    if rank_by == "grad_x_act" and coef is None:
        raise SaefeatError("ranking by grad_x_act needs the classifier weights (coef)")
    df = latent_scores(X, y, coef)
    keep = (df.mean_diff > 0) & (df.freq_diff > 0) & (df.freq_toxic >= min_freq_toxic) \
        & (df.freq_clean <= max_freq_clean)
    if "grad_x_act" in df:
        keep &= df.grad_x_act > 0
    cand = df[keep].copy()
    if cand.empty:
        raise SaefeatError("no latent fires more in toxic than in clean text under the given frequency limits")
    names = [s for s in RANK_RULES[rank_by] if s in cand]
    cand["score"] = np.mean([rankdata(cand[s]) / len(cand) for s in names], axis=0)
    return cand.sort_values("score", ascending=False).head(n).reset_index(drop=True)


def find_toxic_latents(texts: Sequence[str], labels: Sequence[int], embed: EmbedConfig, n: int = 20,
                       C: float = 1.0, max_freq_clean: float = 0.5,
                       rank_by: Sequence[str] = ("combined",)) -> tuple[dict[str, pd.DataFrame], ToxicityFilter]:
    """Rank the latents of `embed`'s SAE on labelled texts: max-pooled features, a fitted linear probe for
    gradient x activation, and `rank_toxic_latents` under each rule of `rank_by`.
    Returns ({rule: ranking}, the fitted probe)."""
    probe = ToxicityFilter("sae", representation_settings(embed.replace(pooling="max")), C=C)
    probe.fit(texts, labels)
    X, y = probe.transform(list(texts)), np.asarray(labels)
    rankings = {rule: rank_toxic_latents(X, y, probe.coef_, n=n, max_freq_clean=max_freq_clean, rank_by=rule)
                for rule in rank_by}
    return rankings, probe
