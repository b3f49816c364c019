"""Shortcut detection with SAE latents.

A linear classifier on pooled SAE features ranks latents by contribution (|weight| x spread of the
feature). A latent that contributes is a shortcut candidate when

- **paired** (counterfactual pairs given): its activation barely changes between an original and its
  label-flipping edit, so its evidence does not follow the label (invariance = 1 - the share of its
  activation that moves with the flip, near 1); or
- **surface**: the tokens it fires on in its top contexts are dominated by a few token types
  (concentration) that are label-correlated in the training texts (token-label PMI toward the class the
  classifier reads from the latent).

`ShortcutDetector.fit` scores the candidates; `latent_positions` turns the chosen latents into the token
positions where they fire, which DBR masks.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import MaxAbsScaler
from tqdm.auto import tqdm

from saefeat.embed.embedder import SAEEmbedder, TokenActivations
from saefeat.errors import SaefeatError
from saefeat.shortcut.masking import normalize_token

CRITERIA = ("auto", "paired", "surface", "either")


class TokenActivationStore:
    """Per-token SAE activations of a fixed list of texts, computed on first use and kept in memory."""

    def __init__(self, embedder: SAEEmbedder, texts: Sequence[str]):
        self.embedder, self.texts = embedder, list(texts)
        self._acts: dict[int, TokenActivations] = {}

    def __getitem__(self, i: int) -> TokenActivations:
        if i not in self._acts:
            self._acts[i] = self.embedder.encode_tokens(self.texts[i])
        return self._acts[i]

    def prefetch(self, indices: Sequence[int], show_progress_bar: bool = False, desc: str = "token activations",
                 chunk: int = 64, cache_pooled: bool = False) -> None:
        """Compute the activations of many texts at once (their windows share forward batches); `cache_pooled`:
        the embedder caches their pooled features from the same pass (`SAEEmbedder.encode_tokens_batch`)."""
        todo = [int(i) for i in dict.fromkeys(int(i) for i in indices) if int(i) not in self._acts]
        with tqdm(total=len(todo), desc=desc, unit="doc", disable=not show_progress_bar or not todo) as bar:
            for s in range(0, len(todo), chunk):
                part = todo[s:s + chunk]
                batch = getattr(self.embedder, "encode_tokens_batch", None)
                docs = [self.texts[i] for i in part]
                acts = batch(docs, cache_pooled=cache_pooled) if batch else [self.embedder.encode_tokens(d)
                                                                              for d in docs]
                self._acts.update(zip(part, acts))
                bar.update(len(part))


def token_label_pmi(tokens_per_doc: Sequence[set[str]], y: np.ndarray, n_classes: int, alpha: float = 1.0,
                    min_count: int = 3) -> dict[str, np.ndarray]:
    """Document-level PMI(token, class) = log P(class | token in doc) / P(class), add-alpha smoothed.

    Tokens in fewer than `min_count` documents get no entry.
    """
    prior = np.bincount(y, minlength=n_classes) / len(y)
    counts: dict[str, np.ndarray] = {}
    for toks, c in zip(tokens_per_doc, y):
        for t in toks:
            counts.setdefault(t, np.zeros(n_classes))[c] += 1
    out = {}
    for t, n in counts.items():
        total = n.sum()
        if total >= min_count:
            out[t] = np.log((n + alpha) / (total + alpha * n_classes)) - np.log(np.maximum(prior, 1e-12))
    return out


def label_following(X_a: sp.spmatrix | np.ndarray, X_b: sp.spmatrix | np.ndarray, y_a: np.ndarray,
                    y_b: np.ndarray, n_classes: int) -> np.ndarray:
    """How much of each latent's activation follows a label flip, per class: (n_classes, d_sae) in [-1, 1].

    For class c, over the pairs where one side has label c: sum(z_c_side - z_other_side) / sum(z_a + z_b).
    1: the latent fires only on the side with label c; 0: its activation ignores the flip. Latents that
    never fire in the pairs get NaN (no evidence).
    """
    a = sp.csr_matrix(X_a, dtype=np.float64)
    b = sp.csr_matrix(X_b, dtype=np.float64)
    y_a, y_b = np.asarray(y_a), np.asarray(y_b)
    sign = np.zeros((len(y_a), n_classes))
    sign[np.arange(len(y_a)), y_a] += 1.0
    sign[np.arange(len(y_b)), y_b] -= 1.0
    involved = (np.abs(sign) > 0).astype(np.float64)
    diff = (sp.csr_matrix(sign.T) @ (a - b)).toarray()
    total = (sp.csr_matrix(involved.T) @ (a + b)).toarray()
    out = np.full_like(total, np.nan)
    ok = total > 0
    out[ok] = diff[ok] / total[ok]
    return np.clip(out, -1.0, 1.0)


def pair_invariance(X_a, X_b, y_a, y_b, favored: np.ndarray, n_classes: int) -> np.ndarray:
    """Per latent, 1 - the share of its activation that follows label flips toward the class it favors.

    A latent whose evidence survives counterfactual edits (it fires as much after the label flipped) has
    invariance 1; one that fires only on its class's side has 0. `favored[j]` is the class latent j supports.
    """
    follow = label_following(X_a, X_b, y_a, y_b, n_classes)[np.asarray(favored), np.arange(len(favored))]
    return np.where(np.isnan(follow), 0.0, 1.0 - np.clip(follow, 0.0, 1.0))  # no evidence: not a shortcut


class ShortcutDetector:
    """Rank SAE latents as shortcut candidates (see the module docstring).

    Args:
        n_candidates: latents with the largest contribution that are examined.
        n_latents: shortcut latents kept (the best-scoring flagged candidates).
        criterion: auto (paired when pairs are given, else surface), paired, surface or either (the max).
        min_invariance, min_surface: thresholds that flag a candidate under each criterion.
        C: inverse L2 strength of the logistic regression that measures contribution.
        contexts_per_latent: top-activating training texts read token by token per candidate.
        top_tokens: token types counted in a latent's concentration.
    """

    def __init__(self, n_candidates: int = 50, n_latents: int = 10, criterion: str = "auto",
                 min_invariance: float = 0.9, min_surface: float = 0.2, C: float = 1.0,
                 contexts_per_latent: int = 10, top_tokens: int = 3, min_token_count: int = 3, seed: int = 0,
                 show_progress_bar: bool = False):
        if criterion not in CRITERIA:
            raise SaefeatError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        self.n_candidates, self.n_latents, self.criterion = n_candidates, n_latents, criterion
        self.min_invariance, self.min_surface, self.C = min_invariance, min_surface, C
        self.contexts_per_latent, self.top_tokens = contexts_per_latent, top_tokens
        self.min_token_count = min_token_count
        self.seed, self.show_progress_bar = seed, show_progress_bar

    def fit(self, X: sp.spmatrix, y: np.ndarray, texts: Sequence[str], embedder: SAEEmbedder,
            pairs: tuple[sp.spmatrix, sp.spmatrix, np.ndarray, np.ndarray] | None = None,
            store: TokenActivationStore | None = None) -> ShortcutDetector:
        """Score latents of pooled SAE features `X` (n_texts x d_sae) of `texts` with labels `y`.

        pairs: (features of originals, features of their counterfactuals, labels of each), aligned row by
            row. Sum-pooled features are best here: an edit of one of several mentions registers in a sum,
            while a max over the text often hides it.
        store: per-token activations of `texts` (built here when None; kept as `store_`).
        """
        X = sp.csr_matrix(X, dtype=np.float64)
        y = np.asarray(y)
        if X.shape[0] != len(texts) or len(y) != len(texts):
            raise SaefeatError(f"X has {X.shape[0]} rows, y {len(y)} and texts {len(texts)}; they must match")
        n_classes = int(y.max()) + 1
        criterion = self.criterion if self.criterion != "auto" else ("paired" if pairs is not None else "surface")
        if criterion in ("paired",) and pairs is None:
            raise SaefeatError("criterion 'paired' needs counterfactual pairs")
        Xs = MaxAbsScaler().fit_transform(X)
        clf = LogisticRegression(C=self.C, max_iter=3000).fit(Xs, y)
        coef = clf.coef_ if n_classes > 2 else np.vstack([-clf.coef_[0], clf.coef_[0]]) / 2
        mean = np.asarray(Xs.mean(0)).ravel()
        std = np.sqrt(np.maximum(np.asarray(Xs.multiply(Xs).mean(0)).ravel() - mean ** 2, 0))
        contribution = np.abs(coef).sum(0) * std
        favored = coef.argmax(0)
        order = np.argsort(-contribution, kind="stable")
        cand = [int(j) for j in order[: self.n_candidates] if contribution[j] > 0]

        self.store_ = store or TokenActivationStore(embedder, texts)
        contexts = {j: np.argsort(-X[:, j].toarray().ravel(), kind="stable")[: self.contexts_per_latent] for j in cand}
        contexts = {j: [int(i) for i in idx if X[i, j] > 0] for j, idx in contexts.items()}
        self.store_.prefetch([i for idx in contexts.values() for i in idx], self.show_progress_bar,
                             "shortcut contexts")
        tok = embedder.host.tokenizer
        pmi = token_label_pmi([{normalize_token(t) for t in tok.convert_ids_to_tokens(ids)}
                               for ids in embedder.host.tokenize(list(texts))], y, n_classes,
                              min_count=self.min_token_count)
        invariance = pair_invariance(*pairs, favored, n_classes) if pairs is not None else None

        rows = []
        for j in cand:
            mass: Counter[str] = Counter()
            for i in contexts[j]:
                acts = self.store_[i]
                col = acts.acts[:, j].tocoo()
                for r, v in zip(col.row, col.data):
                    mass[normalize_token(acts.tokens[r])] += float(v)
            total = sum(mass.values())
            top = mass.most_common(self.top_tokens)
            concentration = sum(v for _, v in top) / total if total else 0.0
            pmis = [(pmi[t][favored[j]] if t in pmi else 0.0, v) for t, v in top]
            label_pmi = sum(p * v for p, v in pmis) / max(sum(v for _, v in pmis), 1e-12) if top else 0.0
            surface = concentration * float(np.clip(label_pmi / math.log(n_classes), 0.0, 1.0))
            rows.append({"latent": j, "contribution": float(contribution[j]), "favored_class": int(favored[j]),
                         "invariance": float(invariance[j]) if invariance is not None else float("nan"),
                         "concentration": concentration, "label_pmi": label_pmi, "surface": surface,
                         "top_tokens": ", ".join(f"{t} ({v / total:.0%})" for t, v in top) if total else ""})
        df = pd.DataFrame(rows, columns=["latent", "contribution", "favored_class", "invariance", "concentration",
                                         "label_pmi", "surface", "top_tokens"])
        rel = df["contribution"] / df["contribution"].max() if len(df) else df["contribution"]
        if criterion == "paired":
            evidence, flag = df["invariance"], df["invariance"] >= self.min_invariance
        elif criterion == "surface":
            evidence, flag = df["surface"], df["surface"] >= self.min_surface
        else:
            inv = df["invariance"].fillna(0.0)
            evidence = np.maximum(inv, df["surface"])
            flag = (inv >= self.min_invariance) | (df["surface"] >= self.min_surface)
        df["score"] = rel * evidence
        df["is_shortcut"] = flag
        df = df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
        self.criterion_ = criterion
        self.scores_ = df
        self.shortcut_latents_ = [int(j) for j in df.loc[df["is_shortcut"], "latent"].head(self.n_latents)]
        self.classifier_ = clf
        return self


def latent_positions(store: TokenActivationStore, X: sp.spmatrix, latents: Sequence[int],
                     show_progress_bar: bool = False) -> tuple[list[list[int]], list[list[float]]]:
    """Per text, the token positions where any of `latents` fires, and a weight in (0, 1] per position.

    The weight is the activation relative to the latent's strongest activation over the texts (`X` holds
    the texts' pooled features; max pooling makes the column max exact). Only texts whose pooled features
    show a latent are read token by token.
    """
    latents = [int(j) for j in latents]
    n = X.shape[0]
    positions: list[list[int]] = [[] for _ in range(n)]
    weights: list[list[float]] = [[] for _ in range(n)]
    if not latents:
        return positions, weights
    sub = sp.csr_matrix(X)[:, latents]
    docs = np.flatnonzero(np.asarray((sub > 0).sum(1)).ravel())
    store.prefetch(docs, show_progress_bar, "shortcut tokens")
    peak = np.zeros(len(latents))
    for i in docs:
        a = store[int(i)].acts[:, latents].toarray()
        peak = np.maximum(peak, a.max(0))
    for i in docs:
        a = store[int(i)].acts[:, latents].toarray() / np.maximum(peak, 1e-12)
        w = a.max(1)
        pos = np.flatnonzero(w > 0)
        positions[int(i)] = pos.tolist()
        weights[int(i)] = np.clip(w[pos], 0.0, 1.0).tolist()
    return positions, weights
