"""SAEIndex: a sparse inverted index of pooled SAE latents, a document store and an optional dense side.

    index = SAEIndex.build(docs, EmbedConfig(model="minilm", sae="default"), dense="sentence")
    index.search("statins lower cholesterol", k=10)                 # SAE latents, idf-weighted cosine
    index.search("statins lower cholesterol", k=10, mode="hybrid")  # fused with the dense side
    index.search_property(positives=["...", "..."], k=50)          # by what the examples share (a PU classifier)
    index.save("idx/"); index = SAEIndex.load("idx/")
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from saefeat.data import check_texts
from saefeat.embed.config import EmbedConfig
from saefeat.embed.pooling import SPARSE_POOLINGS, pool
from saefeat.errors import SaefeatError
from saefeat.retrieval.dense import DENSE_KINDS, DenseSide, encode_dense_side
from saefeat.retrieval.properties import (
    PROPERTY_METHODS,
    Property,
    fit_property_classifier,
    latent_labels,
    property_from_description,
    select_latents,
)
from saefeat.retrieval.store import IndexMismatchError, read_data, read_manifest, write_index

MODES = ("sae", "dense", "hybrid")
# the pooling an index uses unless told otherwise: the probing suite's pick on SciFact train queries (nDCG@10 0.785
# against 0.763 for max, k=48 SAE; configs/tasks/retrieval.yaml), and on property retrieval (mean AP 0.554 / 0.531)
RETRIEVAL_POOLING = "sqrt_max"


@dataclass
class Hit:
    """One search result; `latents` are (latent id, contribution to the score), largest first."""

    rank: int
    doc_id: str
    score: float
    text: str
    latents: list[tuple[int, float]] = field(default_factory=list)


def idf_weights(df: np.ndarray, n_docs: int) -> np.ndarray:
    """BM25's idf, log(1 + (N - df + 0.5) / (df + 0.5)): positive, near zero for latents that fire everywhere."""
    df = np.asarray(df, np.float64)
    return np.log1p((n_docs - df + 0.5) / (df + 0.5)).astype(np.float32)


def embedder_identity(embedder: Any) -> dict[str, Any]:
    """What must match between an index and the embedder that encodes its queries."""
    return {"host": embedder.model_name, "host_fingerprint": embedder.host.fingerprint, "layer": embedder.layer,
            "sae_hash": embedder.sae.content_hash, "sae_k": embedder.sae.cfg.k, "d_sae": embedder.d_sae}


def _default_sae_spec(embedder: Any) -> str | None:
    """"default" when the embedder's SAE is the one shipped for its host, else None (unknown path)."""
    from saefeat.sae.formats import content_hash, default_sae_path

    try:
        path = default_sae_path(embedder.model_name, embedder.config.layer)
    except FileNotFoundError:
        return None
    return "default" if content_hash(path) == embedder.sae.content_hash else None


class SAEIndex:
    """Documents indexed by their pooled SAE latents (latent -> postings), with optional dense vectors.

    Scores: `sae` is the cosine of idf-weighted latent vectors (latents that fire in every document carry
    almost no weight); `dense` is the cosine of dense vectors; `hybrid` min-max normalises both over the
    union of their top candidates and mixes them with weight `alpha` on the SAE side.
    """

    def __init__(self, embedder: Any, postings: sp.spmatrix, ids: Sequence[str], texts: Sequence[str],
                 pooling: str = RETRIEVAL_POOLING, k: int = 64, dense: DenseSide | None = None,
                 dense_kind: str | None = None, sentence_model: str = "minilm", sae_spec: str | None = None,
                 batch_size: int = 32):
        if pooling not in SPARSE_POOLINGS:
            raise SaefeatError(f"unknown pooling {pooling!r}; valid: {', '.join(SPARSE_POOLINGS)}")
        self.embedder, self.pooling, self.k = embedder, pooling, int(k)
        self.dense, self.dense_kind, self.sentence_model = dense, dense_kind, sentence_model
        self.sae_spec, self.batch_size = sae_spec, batch_size
        self._X = sp.csc_matrix(postings, dtype=np.float32)
        self._X.sort_indices()
        self.ids, self.texts = list(ids), list(texts)
        self._refresh()

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def build(cls, docs: Sequence[str], config: EmbedConfig | None = None, ids: Sequence[str] | None = None,
              dense: str | None = "sentence", sentence_model: str = "minilm", embedder: Any | None = None,
              show_progress_bar: bool | None = None) -> SAEIndex:
        """Encode `docs` and index them.

        Args:
            docs: document texts.
            config: how documents are embedded (host, SAE, pooling, pool_k, ...); see `EmbedConfig`. None: the
                defaults, with `RETRIEVAL_POOLING` (sqrt_max).
            ids: document ids (default "0", "1", ...); must be unique.
            dense: `sentence`, `dense` or None: the dense side used by `mode="dense"` and `"hybrid"`.
            embedder: an SAEEmbedder to use instead of the one `config` describes (its pooling still applies).
        """
        if isinstance(docs, str):
            raise SaefeatError("expected a list of documents, got a single string")
        docs = check_texts(list(docs), field="docs")
        if dense is not None and dense not in DENSE_KINDS:
            raise SaefeatError(f"unknown dense side {dense!r}; valid: {', '.join(DENSE_KINDS)} or none")
        if not docs:
            raise SaefeatError("no documents to index")
        config = config or (embedder.config if embedder is not None else EmbedConfig(pooling=RETRIEVAL_POOLING))
        if embedder is None:
            from saefeat.embed.vectorizers import get_embedder

            sae = config.sae
            sae_spec = str(sae) if str(sae) == "default" else str(Path(sae).resolve())
            embedder = get_embedder(config)
        else:
            sae_spec = _default_sae_spec(embedder)
        empty = sp.csc_matrix((0, embedder.d_sae), dtype=np.float32)
        index = cls(embedder, empty, [], [], pooling=config.pooling, k=config.pool_k, sentence_model=sentence_model,
                    sae_spec=sae_spec, batch_size=config.batch_size, dense_kind=dense)
        return index.add(docs, ids=ids, show_progress_bar=show_progress_bar)

    @classmethod
    def from_shards(cls, folder: str | Path, pooling: str | None = None, pool_k: int | None = None,
                    dense: str | None = None, sentence_model: str = "minilm",
                    show_progress_bar: bool | None = None) -> SAEIndex:
        """Index a shard folder written by `saefeat embed output=FOLDER` (either backend) without re-embedding:
        each shard is pooled as it is read, so the token statistics of the whole corpus are never in memory.

        The texts come from the input file the manifest names, the query embedder from its spec; `pooling`
        defaults to `RETRIEVAL_POOLING` (sqrt_max), `pool_k` to EmbedConfig's (64). `dense` (None here: it is a
        second pass over every document) adds a dense side as in `build`.
        """
        from saefeat.data import load_texts
        from saefeat.embed.vectorizers import get_embedder
        from saefeat.engine.shards import read_embeddings
        from saefeat.engine.shards import read_manifest as read_shard_manifest

        folder = Path(folder)
        manifest = read_shard_manifest(folder)
        if manifest is None:
            raise SaefeatError(f"{folder} is not a shard folder of `saefeat embed` (no manifest.json)")
        spec = {k: v for k, v in manifest["spec"].items() if k != "sae_hash"}
        config = EmbedConfig(**spec, pooling=pooling or RETRIEVAL_POOLING, **({"pool_k": pool_k} if pool_k else {}))
        embedder = get_embedder(config)
        if embedder.sae.content_hash != manifest.get("sae"):
            raise SaefeatError(f"{folder}: its shards were computed with SAE {manifest.get('sae')}, but "
                               f"{config.sae} is now {embedder.sae.content_hash}")
        texts, ids = load_texts(manifest["input"], manifest["text_field"], manifest["id_field"], allow_empty=True)
        X, shard_ids = read_embeddings(folder, config.pooling, config.pool_k)  # pooled shard by shard, input order
        if shard_ids != ids:
            raise SaefeatError(f"{folder}: its {len(shard_ids)} rows are not the rows of {manifest['input']} now "
                               f"({len(ids)} rows)")
        sae_spec = config.sae if config.sae == "default" else str(Path(config.sae).resolve())
        index = cls(embedder, sp.csc_matrix((0, embedder.d_sae), dtype=np.float32), [], [], pooling=config.pooling,
                    k=config.pool_k, sentence_model=sentence_model, sae_spec=sae_spec,
                    batch_size=config.batch_size, dense_kind=dense)
        D = index.encode_dense(texts, show_progress_bar=show_progress_bar) if dense is not None else None
        return index.add_vectors(X, ids, texts, D)

    def add(self, docs: Sequence[str], ids: Sequence[str] | None = None,
            show_progress_bar: bool | None = None) -> SAEIndex:
        """Encode and append documents; the result equals building the index from all documents at once."""
        docs = check_texts(list(docs), field="docs")
        ids = [str(len(self.ids) + i) for i in range(len(docs))] if ids is None else [str(i) for i in ids]
        if len(ids) != len(docs):
            raise SaefeatError(f"got {len(ids)} ids for {len(docs)} documents")
        self._check_new_ids(ids)
        X = self.encode(docs, show_progress_bar=show_progress_bar)
        D = self.encode_dense(docs, show_progress_bar=show_progress_bar) if self.dense_kind is not None else None
        return self.add_vectors(X, ids, docs, D)

    def add_vectors(self, X: sp.spmatrix, ids: Sequence[str], texts: Sequence[str],
                    dense_vectors: np.ndarray | None = None) -> SAEIndex:
        """Append already-encoded documents (rows of pooled latents, and dense vectors if the index has them)."""
        ids = [str(i) for i in ids]
        if X.shape[0] != len(ids) or len(texts) != len(ids):
            raise SaefeatError(f"{X.shape[0]} vectors, {len(ids)} ids and {len(texts)} texts do not line up")
        if X.shape[1] != self.d_sae:
            raise SaefeatError(f"vectors have {X.shape[1]} latents, the index has {self.d_sae}")
        if (self.dense_kind is None) != (dense_vectors is None):
            raise SaefeatError("dense vectors must be given exactly when the index has a dense side")
        self._check_new_ids(ids)
        self._X = sp.vstack([self._X, sp.csc_matrix(X, dtype=np.float32)], format="csc")
        self._X.sort_indices()
        self.ids += ids
        self.texts += list(texts)
        if dense_vectors is not None:
            if self.dense is None:
                self.dense = DenseSide.from_vectors(dense_vectors)
            else:
                self.dense.add(dense_vectors)
        self._refresh()
        return self

    def _check_new_ids(self, ids: list[str]) -> None:
        seen = set(self.ids)
        dup = [i for i in ids if i in seen]
        if len(set(ids)) != len(ids):
            dup += sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise SaefeatError(f"duplicate document ids: {dup[:10]}")

    def _refresh(self) -> None:
        """Recompute the statistics that depend on the whole collection (idf, norms, weighted postings)."""
        n = self._X.shape[0]
        self.df = np.diff(self._X.indptr).astype(np.int64)
        self.idf = idf_weights(self.df, n)
        W = self._X @ sp.diags(self.idf)
        norms = np.sqrt(np.asarray(W.multiply(W).sum(axis=1)).ravel())
        self._inv_norm = (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)
        self._W = sp.csc_matrix(sp.diags(self._inv_norm) @ W, dtype=np.float32)
        self._W.sort_indices()
        self._X_rows = self._X.tocsr()
        self._id_row = {d: i for i, d in enumerate(self.ids)}

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the index folder atomically (a complete copy, then a rename)."""
        manifest = {"n_docs": len(self), "d_sae": self.d_sae, "pooling": self.pooling, "k": self.k,
                    "embedder": embedder_identity(self.embedder) | {
                        "sae": self.sae_spec, "window": self.embedder.window, "overlap": self.embedder.overlap,
                        "max_tokens": self.embedder.max_tokens},
                    "dense": None if self.dense is None else {"kind": self.dense_kind, "dim": self.dense.dim,
                                                              "sentence_model": self.sentence_model}}
        return write_index(path, self._X, self.ids, self.texts, None if self.dense is None else self.dense.index,
                           manifest)

    @classmethod
    def load(cls, path: str | Path, embedder: Any | None = None, batch_size: int = 32,
             cache_dir: str | Path | None = None) -> SAEIndex:
        """Load an index; the embedder (given, or rebuilt from the manifest) must be the one it was built with."""
        manifest = read_manifest(path)
        ident = manifest["embedder"]
        if embedder is None:
            if not ident.get("sae"):
                raise IndexMismatchError(f"{path} was built with an SAE given as an object or unknown path "
                                         f"(hash {ident['sae_hash']}); pass embedder= to load it")
            from saefeat.embed.vectorizers import get_embedder

            config = EmbedConfig(model=ident["host"], sae=ident["sae"], layer=ident["layer"],
                                 window=ident["window"], overlap=ident["overlap"], max_tokens=ident["max_tokens"],
                                 cache_dir=None if cache_dir is None else str(cache_dir))
            try:
                embedder = get_embedder(config)
            except FileNotFoundError as e:
                raise IndexMismatchError(f"{path}: the SAE it was built with cannot be loaded ({e})") from e
            if embedder.sae.is_topk and ident["sae_k"] != embedder.sae.cfg.k:
                embedder = get_embedder(config.replace(sae_k=ident["sae_k"]))
        check_same_embedder(ident, embedder, path)
        X, ids, texts, dense_index = read_data(path, manifest)
        dense_cfg = manifest.get("dense") or {}
        return cls(embedder, X, ids, texts, pooling=manifest["pooling"], k=manifest["k"],
                   dense=None if dense_index is None else DenseSide(dense_index), dense_kind=dense_cfg.get("kind"),
                   sentence_model=dense_cfg.get("sentence_model", "minilm"), sae_spec=ident.get("sae"),
                   batch_size=batch_size)

    # ---- encoding ---------------------------------------------------------------------------
    @property
    def d_sae(self) -> int:
        return self._X.shape[1]

    def __len__(self) -> int:
        return self._X.shape[0]

    @property
    def vectors(self) -> sp.csr_matrix:
        """The indexed documents' pooled latents, (n_docs, d_sae) CSR."""
        return self._X_rows

    def encode(self, texts: Sequence[str], show_progress_bar: bool | None = None) -> sp.csr_matrix:
        """Texts -> pooled latents with the index's pooling (cached by the embedder)."""
        stats = self.embedder.encode_stats(list(texts), "sae", self.batch_size, show_progress_bar)
        return pool(stats, self.pooling, self.k)

    def encode_dense(self, texts: Sequence[str], show_progress_bar: bool | None = None) -> np.ndarray:
        if self.dense_kind is None:
            raise SaefeatError("this index has no dense side; build it with dense='sentence' or dense='dense'")
        return encode_dense_side(self.dense_kind, texts, self.embedder, self.sentence_model, self.batch_size,
                                 show_progress_bar)

    # ---- scoring ----------------------------------------------------------------------------
    def sae_scores(self, q: sp.spmatrix, exclude_latents: Iterable[int] = ()) -> np.ndarray:
        """Idf-weighted cosine of one query vector (1 x d_sae) with every document, using only the postings
        of the latents active in the query."""
        cols, vals = self._query_weights(q, exclude_latents)
        if len(cols) == 0:
            return np.zeros(len(self), np.float32)
        return np.asarray(self._W[:, cols] @ vals).ravel()

    def _query_weights(self, q: sp.spmatrix, exclude_latents: Iterable[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Latents of a query and their idf-weighted, unit-length weights."""
        q = sp.csr_matrix(q)
        cols, vals = q.indices, q.data.astype(np.float32) * self.idf[q.indices]
        exclude = np.asarray(list(exclude_latents), dtype=np.int64)
        if exclude.size:
            keep = ~np.isin(cols, exclude)
            cols, vals = cols[keep], vals[keep]
        norm = float(np.linalg.norm(vals))
        return (cols, vals / norm) if norm > 0 else (cols[:0], vals[:0])

    def property_scores(self, prop: Property) -> np.ndarray:
        """Every document's score by `prop` (a classifier property weighted like this index reuses its norms)."""
        same = prop.norm_idf is not None and np.array_equal(prop.norm_idf, self.idf)
        return prop.score(self._X, self._inv_norm if same else None)

    def search(self, query: str | Sequence[str], k: int = 10, mode: str = "sae", alpha: float = 0.5,
               exclude_latents: Iterable[int] = (), explain: int = 3) -> list[Hit] | list[list[Hit]]:
        """Top-k documents for a query (or for each of a list of queries).

        Args:
            mode: `sae`, `dense` or `hybrid`.
            alpha: weight of the SAE side in `hybrid`.
            exclude_latents: latents ignored in the query (concept filtering).
            explain: number of matching latents reported per hit.
        """
        if mode not in MODES:
            raise SaefeatError(f"unknown search mode {mode!r}; valid: {', '.join(MODES)}")
        if mode != "sae" and self.dense is None:
            raise SaefeatError(f"mode={mode!r} needs a dense side; this index was built with dense=None")
        if k < 1:
            raise SaefeatError(f"k must be at least 1, got {k}")
        if not 0.0 <= alpha <= 1.0:
            raise SaefeatError(f"alpha (the SAE side's weight in hybrid) must be in [0, 1], got {alpha}")
        single = isinstance(query, str)
        queries = check_texts([query] if single else list(query), field="query", allow_empty=False)
        Q = self.encode(queries, show_progress_bar=False) if mode != "dense" else None
        D = self.encode_dense(queries, show_progress_bar=False) if mode != "sae" else None
        exclude = list(exclude_latents)
        out = []
        for i in range(len(queries)):
            rows, scores = self.rank(None if Q is None else Q[i], None if D is None else D[i], k, mode, alpha,
                                     exclude)
            hits = [Hit(r + 1, self.ids[d], float(s), self.texts[d]) for r, (d, s) in enumerate(zip(rows, scores))]
            if Q is not None and explain:
                for h, d in zip(hits, rows):
                    h.latents = self.hit_latents(d, Q[i], explain, exclude)
            out.append(hits)
        return out[0] if single else out

    def rank(self, q: sp.spmatrix | None, qd: np.ndarray | None, k: int, mode: str = "sae", alpha: float = 0.5,
             exclude_latents: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the top-k documents for an already-encoded query."""
        k = min(k, len(self))
        if mode == "sae":
            return top_k(self.sae_scores(q, exclude_latents), k)
        if mode == "dense":
            scores, rows = self.dense.search(qd.reshape(1, -1), k)
            return rows[0], scores[0]
        s_sae = self.sae_scores(q, exclude_latents)
        depth = max(k, 100)
        cand_sae, _ = top_k(s_sae, depth)
        _, cand_dense = self.dense.search(qd.reshape(1, -1), min(depth, len(self)))
        cand = np.union1d(cand_sae, cand_dense[0][cand_dense[0] >= 0])
        fused = alpha * _minmax(s_sae[cand]) + (1 - alpha) * _minmax(self.dense.scores(qd, cand))
        order = np.argsort(-fused, kind="stable")[:k]
        return cand[order], fused[order].astype(np.float32)

    def hit_latents(self, row: int, q: sp.spmatrix, n: int | None = None,
                    exclude_latents: Iterable[int] = ()) -> list[tuple[int, float]]:
        """Why document `row` scored as it did for an encoded query `q` (1 x d_sae): the latents they share,
        each with its share of the `sae` score (the shares sum to the score), largest first, at most `n`."""
        cols, vals = self._query_weights(q, exclude_latents)
        doc = self._X_rows[row]
        common, qi, di = np.intersect1d(cols, doc.indices, return_indices=True)
        contrib = vals[qi] * doc.data[di] * self.idf[common] * self._inv_norm[row]
        order = np.argsort(-contrib)[:n]
        return [(int(common[j]), float(contrib[j])) for j in order]

    # ---- properties -------------------------------------------------------------------------
    def property(self, positives: Sequence[str] | sp.spmatrix, negatives: Sequence[str] | sp.spmatrix | None = None,
                 n_latents: int = 16, min_support: float = 0.3, exclude_latents: Iterable[int] = (),
                 method: str = "classifier", C: float = 0.1) -> Property:
        """What the positive examples share against the indexed corpus (and the negatives).

        method: `classifier` (default; a logistic regression of the examples against the corpus, on the index's
        idf-weighted unit vectors, strength `C`) or `latents` (the `n_latents` latents that fire in at least
        `min_support` of the examples far more often than in the corpus). See `saefeat.retrieval.properties`.
        """
        if method not in PROPERTY_METHODS:
            raise SaefeatError(f"unknown property method {method!r}; valid: {', '.join(PROPERTY_METHODS)}")
        pos = positives if sp.issparse(positives) else self.encode(check_texts(list(positives), field="examples"))
        neg = negatives
        if negatives is not None and not sp.issparse(negatives):
            neg = self.encode(check_texts(list(negatives), field="negatives"))
        if method == "classifier":
            return fit_property_classifier(pos, self._X_rows, self.idf, neg, C=C, exclude=exclude_latents)
        return select_latents(pos, self.df, len(self), neg, n_latents=n_latents, min_support=min_support,
                              exclude=exclude_latents)

    def describe(self, description: str, n_latents: int = 8, min_similarity: float = 0.3,
                 exclude_latents: Iterable[int] = (), labels_dir: str | None = None) -> Property:
        """A property from a short description matched against the SAE's latent labels (`saefeat.explain`)."""
        labels = latent_labels(self.embedder.sae.content_hash, labels_dir)
        return property_from_description(description, labels, n_latents, min_similarity, self.sentence_model,
                                         exclude_latents)

    def search_property(self, prop: Property | Sequence[str], k: int = 10, negatives: Sequence[str] | None = None,
                        n_latents: int = 16, exclude_latents: Iterable[int] = (), explain: int = 3,
                        method: str = "classifier") -> list[Hit]:
        """Top-k documents by a property (or by the property `method` builds from the given positive texts)."""
        exclude = list(exclude_latents)
        if not isinstance(prop, Property):
            prop = self.property(prop, negatives, n_latents=n_latents, exclude_latents=exclude, method=method)
        elif exclude:
            prop = prop.without(exclude)
        if k < 1:
            raise SaefeatError(f"k must be at least 1, got {k}")
        rows, scores = top_k(self.property_scores(prop), min(k, len(self)))
        coef = dict(zip(prop.latents.tolist(), prop.coefficients().tolist()))
        hits = []
        for r, (d, s) in enumerate(zip(rows, scores)):
            doc = self._X_rows[d]
            contrib = sorted(((int(j), float(v * coef[j])) for j, v in zip(doc.indices, doc.data) if j in coef),
                             key=lambda t: -t[1])
            hits.append(Hit(r + 1, self.ids[d], float(s), self.texts[d], contrib[:explain]))
        return hits

    def doc(self, doc_id: str) -> str:
        return self.texts[self._id_row[doc_id]]


def check_same_embedder(ident: dict[str, Any], embedder: Any, where: str | Path = "index") -> None:
    """Refuse an embedder whose host, layer or SAE differs from the one an index was built with."""
    have = embedder_identity(embedder)
    diffs = [f"{key}: index has {ident.get(key)!r}, embedder has {have[key]!r}"
             for key in ("host", "host_fingerprint", "layer", "sae_hash", "sae_k", "d_sae")
             if ident.get(key) != have[key]]
    if diffs:
        raise IndexMismatchError(f"{where} was built with another embedder ({'; '.join(diffs)}); "
                                 f"load it with the same host and SAE, or rebuild it")


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scores) of the k largest scores, best first; ties keep the lower row first."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = part[np.lexsort((part, -scores[part]))]
    return order, scores[order]


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(x)), float(np.max(x))
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


