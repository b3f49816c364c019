"""Properties: what a few example texts have in common, as weights on latents, and scoring by them.

A property is built from a few positive example texts (and optionally negatives), in one of two ways:

- `classifier` (`fit_property_classifier`, the default of `SAEIndex.property`): a class-balanced L2 logistic
  regression of the examples against the indexed corpus, read as unlabelled background (PU learning), on the
  idf-weighted, unit-length latent vectors the index searches with. A document's score is the classifier's
  decision value; the weights spread over every latent the examples or the background use.
- `latents` (`select_latents`): each latent is scored by the smoothed log-odds of firing in the positives against
  firing in the background (the indexed corpus, or the negatives where they fire more often). The best latents
  that fire in enough of the positives make the property; a document's score is the weighted sum of its
  activations on those latents, each divided by the latent's typical activation in the positives so that no
  latent dominates by scale alone. A handful of latents: the most readable property, and the weaker ranker.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from saefeat.errors import SaefeatError

PROPERTY_METHODS = ("classifier", "latents")


@dataclass
class Property:
    """Latents that define a property, with a weight and an activation scale each."""

    latents: np.ndarray
    weights: np.ndarray
    scales: np.ndarray
    support: np.ndarray = field(default_factory=lambda: np.zeros(0))  # share of positives where each fires
    description: str = ""
    norm_idf: np.ndarray | None = None  # classifier: the idf that weights a row before it is scaled to unit length
    intercept: float = 0.0

    def __len__(self) -> int:
        return len(self.latents)

    def coefficients(self) -> np.ndarray:
        """Per-latent multipliers of raw activations: weight / scale."""
        return (self.weights / np.maximum(self.scales, 1e-6)).astype(np.float32)

    def without(self, exclude: Iterable[int]) -> Property:
        """The same property with some latents removed (concept filtering)."""
        keep = ~np.isin(self.latents, np.asarray(list(exclude), dtype=np.int64))
        return Property(self.latents[keep], self.weights[keep], self.scales[keep],
                        self.support[keep] if len(self.support) else self.support, self.description,
                        self.norm_idf, self.intercept)

    def score(self, X: sp.spmatrix, inv_norm: np.ndarray | None = None) -> np.ndarray:
        """Property score of each row of X (documents x latents, raw pooled activations). A classifier property
        scales each row by 1 / its idf-weighted norm (`inv_norm`, computed from X when not given)."""
        if len(self) == 0:
            return np.zeros(X.shape[0], np.float32)
        raw = np.asarray(sp.csc_matrix(X)[:, self.latents] @ self.coefficients()).ravel()
        if self.norm_idf is None:
            return raw
        if inv_norm is None:
            inv_norm = 1.0 / np.maximum(_norms(sp.csr_matrix(X) @ sp.diags(self.norm_idf)), 1e-12)
        return (raw * inv_norm + self.intercept).astype(np.float32)

    def table(self) -> list[dict]:
        return [{"latent": int(j), "weight": float(w), "scale": float(s),
                 "support": float(self.support[i]) if len(self.support) else float("nan")}
                for i, (j, w, s) in enumerate(zip(self.latents, self.weights, self.scales))]


def _norms(X: sp.spmatrix) -> np.ndarray:
    return np.sqrt(np.asarray(X.multiply(X).sum(axis=1)).ravel())


def fit_property_classifier(positives: sp.spmatrix, background: sp.spmatrix, idf: np.ndarray,
                            negatives: sp.spmatrix | None = None, C: float = 0.1, max_background: int = 5000,
                            exclude: Iterable[int] = (), seed: int = 0) -> Property:
    """A property as a linear classifier of the positives against the background (PU learning: the background
    is unlabelled and read as negative; classes balanced), on idf-weighted unit-length rows.

    Args:
        positives: (n_pos, d_sae) pooled activations of the positive examples.
        background: the indexed documents' pooled activations; background rows equal to a positive (examples
            taken from the corpus) are left out, and at most `max_background` rows are used (a seeded sample).
        idf: per-latent idf of the index (its row weighting).
        negatives: optional negative examples, added to the background.
        C: inverse L2 strength (0.1, chosen by the probing suite's property probe: benchmarks/sae_probe_bench.py).
        exclude: latents never used (concept filtering): their columns are zeroed before the fit.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    pos, bg = sp.csr_matrix(positives, dtype=np.float32), sp.csr_matrix(background, dtype=np.float32)
    n_pos, d = pos.shape
    if n_pos == 0:
        raise SaefeatError("a property needs at least one positive example")
    if bg.shape[1] != d or len(idf) != d:
        raise SaefeatError(f"positives have {d} latents but the background has {bg.shape[1]} and the idf {len(idf)}")
    rows = np.arange(bg.shape[0])
    if len(rows) > max_background:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_background, replace=False))
    bg = bg[rows]
    seen = {_row_key(pos, i) for i in range(n_pos)}
    bg = bg[[i for i in range(bg.shape[0]) if _row_key(bg, i) not in seen]]
    if negatives is not None and negatives.shape[0]:
        bg = sp.vstack([bg, sp.csr_matrix(negatives, dtype=np.float32)], format="csr")
    if bg.shape[0] == 0:
        raise SaefeatError("a classifier property needs background documents besides the examples")
    weight = np.asarray(idf, np.float64).copy()
    excluded = np.asarray(list(exclude), dtype=np.int64)
    if excluded.size:
        if excluded.min() < 0 or excluded.max() >= d:
            raise SaefeatError(f"excluded latent ids must be in [0, {d}); got {excluded.tolist()}")
        weight[excluded] = 0.0
    X = normalize(sp.vstack([pos, bg], format="csr") @ sp.diags(weight))
    y = np.r_[np.ones(n_pos), np.zeros(bg.shape[0])]
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=2000).fit(X, y)
    coef = model.coef_[0]
    used = np.flatnonzero(coef)
    fires = np.asarray((pos[:, used] > 0).sum(axis=0)).ravel()
    safe_idf = np.maximum(np.asarray(idf, np.float64)[used], 1e-12)
    # coefficients() = weight / scale = coef * idf: the multiplier of a raw activation before the row's norm
    return Property(used.astype(np.int64), coef[used].astype(np.float32), (1.0 / safe_idf).astype(np.float32),
                    (fires / n_pos).astype(np.float32), norm_idf=weight,
                    intercept=float(model.intercept_[0]))


def _row_key(X: sp.csr_matrix, i: int) -> bytes:
    a, b = X.indptr[i], X.indptr[i + 1]
    return X.indices[a:b].tobytes() + X.data[a:b].tobytes()


def _rate(fires: np.ndarray, n: int) -> np.ndarray:
    return (fires + 0.5) / (n + 1.0)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def select_latents(positives: sp.spmatrix, background_df: np.ndarray, n_background: int,
                   negatives: sp.spmatrix | None = None, n_latents: int = 16, min_support: float = 0.3,
                   exclude: Iterable[int] = ()) -> Property:
    """Latents that fire in the positives far more often than in the background.

    Args:
        positives: (n_pos, d_sae) pooled activations of the positive examples.
        background_df: per latent, the number of background documents where it fires.
        n_background: number of background documents.
        negatives: optional (n_neg, d_sae) activations of negative examples; a latent's background rate is
            the larger of its corpus rate and its rate in the negatives.
        n_latents: at most this many latents are kept (those with a positive log-odds only).
        min_support: a latent must fire in at least this share of the positives (and in at least 2 of them
            when there are 2 or more), so one odd example cannot define the property.
        exclude: latents never selected (concept filtering).
    """
    pos = sp.csr_matrix(positives)
    n_pos, d = pos.shape
    if n_pos == 0:
        raise SaefeatError("a property needs at least one positive example")
    if len(background_df) != d:
        raise SaefeatError(f"positives have {d} latents but the background has {len(background_df)}")
    fires = np.asarray((pos > 0).sum(axis=0)).ravel().astype(np.float64)
    p_rate = _rate(fires, n_pos)
    b_rate = _rate(np.asarray(background_df, np.float64), n_background)
    if negatives is not None and negatives.shape[0]:
        neg = sp.csr_matrix(negatives)
        b_rate = np.maximum(b_rate, _rate(np.asarray((neg > 0).sum(axis=0)).ravel(), neg.shape[0]))
    score = _logit(p_rate) - _logit(b_rate)
    need = max(min(2, n_pos), int(np.ceil(min_support * n_pos)))
    score[fires < need] = -np.inf
    excluded = np.asarray(list(exclude), dtype=np.int64)
    if excluded.size:
        if excluded.min() < 0 or excluded.max() >= d:
            raise SaefeatError(f"excluded latent ids must be in [0, {d}); got {excluded.tolist()}")
        score[excluded] = -np.inf
    order = np.argsort(-score, kind="stable")[:n_latents]
    order = order[score[order] > 0]
    sums = np.asarray(pos.sum(axis=0)).ravel()
    scales = sums[order] / np.maximum(fires[order], 1)
    return Property(order.astype(np.int64), score[order].astype(np.float32), scales.astype(np.float32),
                    (fires[order] / n_pos).astype(np.float32))


def latent_labels(sae_hash: str, directory: str | None = None) -> dict[int, tuple[str, float]]:
    """Label and mean activation of every labelled latent in the latent store of an SAE (`saefeat.explain`).

    Raises a ValueError when the SAE has no store with labels (build one with `saefeat describe-latents`).
    """
    from saefeat.explain.store import LatentStore

    store = LatentStore.for_sae(sae_hash, directory)
    if not store.exists:
        raise SaefeatError(f"no latent labels for SAE {sae_hash} (looked for {store.path}); "
                         f"run `saefeat describe-latents` for this SAE first")
    rows = store.con.execute("SELECT latent, COALESCE(NULLIF(llm_label, ''), label), sum_act, n_fire FROM latents "
                             "WHERE COALESCE(NULLIF(llm_label, ''), label) IS NOT NULL").fetchall()
    store.close()
    labels = {int(j): (str(lab), float(s) / max(int(n), 1)) for j, lab, s, n in rows if str(lab).strip()}
    if not labels:
        raise SaefeatError(f"the latent store {store.path} has no labels yet; run `saefeat describe-latents`")
    return labels


def property_from_description(description: str, labels: dict[int, tuple[str, float]], n_latents: int = 8,
                              min_similarity: float = 0.3, sentence_model: str = "minilm",
                              exclude: Iterable[int] = ()) -> Property:
    """A property from a short description: the latents whose labels are closest to it in meaning.

    Labels and description are embedded with the sentence-transformers model; each latent's weight is the
    cosine similarity and its scale its mean activation, so documents are scored as for example-built
    properties.
    """
    from saefeat.embed.vectorizers import SentenceVectorizer

    if not description or not description.strip():
        raise SaefeatError("the property description is empty")
    skip = set(int(x) for x in exclude)
    latents = np.array([j for j in sorted(labels) if j not in skip], dtype=np.int64)
    if latents.size == 0:
        raise SaefeatError("no labelled latents to match the description against")
    vec = SentenceVectorizer(model=sentence_model, show_progress_bar=False)
    emb = vec.transform([description] + [labels[j][0] for j in latents])
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    sims = emb[1:] @ emb[0]
    order = np.argsort(-sims, kind="stable")[:n_latents]
    order = order[sims[order] >= min_similarity]
    scales = np.array([labels[j][1] for j in latents[order]], np.float32)
    return Property(latents[order], sims[order].astype(np.float32), scales, description=description)
