"""The dense side of an index: unit-length vectors in a FAISS flat inner-product index (exact cosine)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from saefeat.errors import SaefeatError

DENSE_KINDS = ("sentence", "dense")


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32 C-contiguous as FAISS wants."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def embedder_representation(name: str, embedder: Any, baselines: Any, batch_size: int,
                            show_progress_bar: bool | None) -> Any:
    """The representation `name` (`make_representation`) run with the embedder's own device, precision, backend and
    cache, at this batch size and progress setting."""
    from saefeat.representations import make_representation

    embed = embedder.config.replace(batch_size=batch_size, show_progress_bar=show_progress_bar)
    return make_representation(name, embed, baselines)


def encode_dense_side(kind: str, texts: Sequence[str], embedder: Any, sentence_model: str = "minilm",
                      batch_size: int = 32, show_progress_bar: bool | None = None) -> np.ndarray:
    """Dense vectors of `texts`: `sentence` (the full sentence-transformers model, run with the embedder's own
    device, precision, backend and cache) or `dense` (the SAE's layer, mean-pooled, from the same forward pass and
    cache as the SAE latents)."""
    if kind == "sentence":
        from saefeat.embed.config import BaselineConfig

        vec = embedder_representation("sentence", embedder, BaselineConfig(sentence_model=sentence_model), batch_size,
                                      show_progress_bar)
        return vec.transform(list(texts))
    if kind == "dense":
        return embedder.encode_dense(list(texts), pooling="mean", batch_size=batch_size,
                                     show_progress_bar=show_progress_bar)
    raise SaefeatError(f"unknown dense side {kind!r}; valid: {', '.join(DENSE_KINDS)} or none")


class DenseSide:
    """Exact cosine search over unit vectors with FAISS (`IndexFlatIP`)."""

    def __init__(self, index: Any):
        self.index = index

    @classmethod
    def from_vectors(cls, vectors: np.ndarray) -> DenseSide:
        import faiss

        x = normalize(vectors)
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        return cls(index)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, vectors: np.ndarray) -> None:
        self.index.add(normalize(vectors))

    def vectors(self) -> np.ndarray:
        """The stored unit vectors, (n, dim), as a read-only view of FAISS's own buffer (no copy)."""
        import faiss

        if len(self) == 0:
            return np.zeros((0, self.dim), np.float32)
        v = faiss.rev_swig_ptr(self.index.get_xb(), len(self) * self.dim).reshape(len(self), self.dim)
        v.flags.writeable = False
        return v

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the k nearest documents per query, best first."""
        k = min(k, len(self))
        scores, rows = self.index.search(normalize(queries), k)
        return scores, rows

    def scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Cosine of one query with the documents at `rows`."""
        q = normalize(query.reshape(1, -1))[0]
        return self.vectors()[np.asarray(rows, dtype=np.int64)] @ q


class DenseRetriever:
    """Documents as dense vectors and an encoder of text queries: a `Retriever` over the documents' cosine.

    `encode` maps a list of query texts to vectors in the documents' space (e.g. the same sentence model).
    """

    def __init__(self, side: DenseSide, encode: Callable[[list[str]], np.ndarray]):
        self.side, self.encode = side, encode

    @classmethod
    def build(cls, kind: str, docs: Sequence[str], embedder: Any, sentence_model: str = "minilm",
              batch_size: int = 32, show_progress_bar: bool | None = None) -> DenseRetriever:
        """Encode `docs` as the dense side `kind` (see `encode_dense_side`); queries are encoded the same way."""
        vectors = encode_dense_side(kind, docs, embedder, sentence_model, batch_size, show_progress_bar)
        return cls(DenseSide.from_vectors(vectors),
                   lambda queries: encode_dense_side(kind, queries, embedder, sentence_model, batch_size, False))

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores), each (n_queries, k), best first."""
        scores, rows = self.side.search(self.encode(list(queries)), k)
        return rows, scores
