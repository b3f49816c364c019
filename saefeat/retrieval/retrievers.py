"""Retrievers behind one interface, `search(queries, k) -> (rows, scores)`: the SAE index (`sae`, `hybrid`),
dense vectors (`dense`, `sentence`), the sentence-embedding SAE's codes (`sae_sentence`) and BM25 (`bm25`), so an
evaluation loops over them without knowing which."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from saefeat.embed.config import BaselineConfig
from saefeat.errors import SaefeatError
from saefeat.retrieval.dense import DENSE_KINDS, DenseRetriever, DenseSide, embedder_representation
from saefeat.retrieval.evaluation import BM25
from saefeat.retrieval.index import MODES, SAEIndex

RETRIEVERS = ("sae", "dense", "sentence", "sae_sentence", "hybrid", "bm25")


@runtime_checkable
class Retriever(Protocol):
    """Anything that ranks the documents it holds for text queries."""

    def search(self, queries: Sequence[str], k: int) -> tuple[Sequence[np.ndarray], Sequence[np.ndarray]]:
        """Per query, the rows of its top-k documents and their scores, best first."""
        ...


class IndexRetriever:
    """An SAEIndex as a Retriever, scoring by `mode` (`sae`, `dense` or `hybrid` with weight `alpha` on the SAE).

    The SAE encodings of the queries searched are kept, so `explain` reads the very vectors that ranked a hit.
    """

    def __init__(self, index: SAEIndex, mode: str = "sae", alpha: float = 0.5):
        if mode not in MODES:
            raise SaefeatError(f"unknown search mode {mode!r}; valid: {', '.join(MODES)}")
        if mode != "sae" and index.dense is None:
            raise SaefeatError(f"mode={mode!r} needs a dense side; this index was built with dense=None")
        self.index, self.mode, self.alpha = index, mode, alpha
        self._encoded: dict[str, sp.csr_matrix] = {}

    def search(self, queries: Sequence[str], k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per query, (rows, scores) of the top-k documents."""
        queries = list(queries)
        Q = self.index.encode(queries, show_progress_bar=False) if self.mode != "dense" else None
        D = self.index.encode_dense(queries, show_progress_bar=False) if self.mode != "sae" else None
        if Q is not None:
            self._encoded.update((q, Q[i]) for i, q in enumerate(queries))
        out = [self.index.rank(None if Q is None else Q[i], None if D is None else D[i], k, self.mode, self.alpha)
               for i in range(len(queries))]
        return [r for r, _ in out], [s for _, s in out]

    def explain(self, query: str, row: int, n: int | None = None) -> list[tuple[int, float]]:
        """The latents behind document `row`'s SAE score for `query`: (latent, share of the score), largest first."""
        q = self._encoded.get(query)
        if q is None:
            q = self.index.encode([query], show_progress_bar=False)[0]
        return self.index.hit_latents(int(row), q, n)


def make_retriever(kind: str, index: SAEIndex, alpha: float = 0.5, baselines: BaselineConfig | None = None,
                   batch_size: int = 32, show_progress_bar: bool | None = None) -> Retriever:
    """The retriever `kind` (one of RETRIEVERS) over the documents of `index`.

    `sae` and `hybrid` search the index itself; `dense` and `sentence` encode its texts (the SAE's layer
    mean-pooled, or `baselines.sentence_model`); `sae_sentence` ranks by the cosine of the codes of
    `baselines.sentence_sae` (pooled over chunks as `sentence_sae_pooling` says), computed with the index's own
    embedding settings (device, precision, backend, cache); `bm25` indexes its texts lexically.
    """
    b = baselines or BaselineConfig()
    if kind in ("sae", "hybrid"):
        return IndexRetriever(index, kind, alpha)
    if kind in DENSE_KINDS:
        return DenseRetriever.build(kind, index.texts, index.embedder, b.sentence_model, batch_size,
                                    show_progress_bar)
    if kind == "sae_sentence":
        vec = embedder_representation("sae_sentence", index.embedder, b, batch_size, show_progress_bar)
        docs = vec.transform(index.texts).toarray()
        return DenseRetriever(DenseSide.from_vectors(docs), lambda queries: vec.transform(queries).toarray())
    if kind == "bm25":
        return BM25().fit(index.texts)
    raise SaefeatError(f"unknown retriever {kind!r}; valid: {', '.join(RETRIEVERS)}")


def latent_contributions(retriever: IndexRetriever, queries: Sequence[str], rows: Sequence[np.ndarray],
                         qids: Sequence[str], qrels: Mapping[str, Mapping[str, int]], top: int = 10) -> pd.Series:
    """Summed share of each latent in the SAE scores of the relevant documents ranked in the top `top`.

    `rows[i]` is the ranking of `queries[i]` (id `qids[i]`) by `retriever`; largest total first.
    """
    ids = retriever.index.ids
    total: dict[int, float] = defaultdict(float)
    for i, q in enumerate(qids):
        for r in rows[i][:top]:
            if ids[int(r)] in qrels[q]:
                for j, c in retriever.explain(queries[i], int(r)):
                    total[j] += c
    return pd.Series(total, dtype=float).sort_values(ascending=False)
