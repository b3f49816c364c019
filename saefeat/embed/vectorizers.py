"""scikit-learn transformers over the embedding layer; they clone and pickle without model weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin

from saefeat.device import Runtime, autocast, resolve_device, resolve_runtime
from saefeat.embed.cache import StatsCache, default_cache_dir, doc_hash
from saefeat.embed.config import EmbedConfig
from saefeat.embed.embedder import SAEEmbedder
from saefeat.errors import SaefeatError
from saefeat.sae.formats import sae_folder, state_hash
from saefeat.sae.model import SAE

_EMBEDDERS: dict[tuple, SAEEmbedder] = {}


def get_embedder(config: EmbedConfig | None = None, sae: SAE | None = None, **settings: Any) -> SAEEmbedder:
    """The SAEEmbedder for `config` (or `settings`), shared in this process by everything that reads the same
    activations with the same SAE weights; `sae` is an in-memory SAE used in place of `config.sae`."""
    if sae is not None and not isinstance(sae, SAE):  # a path or "default": a setting, not an in-memory SAE
        settings, sae = {**settings, "sae": str(sae)}, None
    config = (config or EmbedConfig()).replace(**settings) if settings else (config or EmbedConfig())
    key = (config.reader_key(), _sae_fingerprint(config, sae))
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = SAEEmbedder.from_config(config, sae=sae)
    return _EMBEDDERS[key]


def _sae_fingerprint(config: EmbedConfig, sae: SAE | None) -> str:
    """Identity of the SAE weights: a hash of an in-memory SAE, or the sizes and times of its files."""
    if sae is not None:
        return state_hash(sae)
    if config.sae is None:
        return "none"
    folder = sae_folder(config.sae, config.model, config.layer)
    folder = folder.parent if folder.is_file() else folder
    if not folder.is_dir():
        return str(folder)  # the embedder raises the clear error
    return "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(folder.iterdir())
                    if f.is_file())


class _LazyModel(TransformerMixin, BaseEstimator):
    """Holds its model in a private attribute that is rebuilt on demand and never pickled."""

    _model_attr = "_embedder"

    def fit(self, X: Sequence[str], y: Any = None) -> _LazyModel:
        """Nothing to learn: the representation is fixed by the host model (and SAE)."""
        self._check_input(X)
        return self

    @staticmethod
    def _check_input(X: Any) -> None:
        if isinstance(X, str):
            raise SaefeatError("expected a list of documents, got a single string")

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop(self._model_attr, None)
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.string = True
        tags.input_tags.two_d_array = False
        tags.requires_fit = False
        return tags


class SAEVectorizer(_LazyModel):
    """Documents -> pooled SAE latents (CSR). Drops into a Pipeline beside TfidfVectorizer."""

    def __init__(self, config: EmbedConfig | None = None):
        self.config = config

    @property
    def embed_config(self) -> EmbedConfig:
        return self.config or EmbedConfig()

    @property
    def embedder(self) -> SAEEmbedder:
        if getattr(self, "_embedder", None) is None:
            self._embedder = get_embedder(self.embed_config)
        return self._embedder

    def transform(self, X: Sequence[str]) -> sp.csr_matrix:
        self._check_input(X)
        return self.embedder.encode(list(X), pooling=self.embed_config.pooling)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.array([f"latent_{i}" for i in range(self.embedder.d_sae)], dtype=object)


class DenseVectorizer(SAEVectorizer):
    """Documents -> the host's dense activations at the SAE's read point (or `layer`), pooled: the `dense`
    baseline. Needs no SAE: with `config.sae=None` it reads `config.layer`, by default the last block."""

    def __init__(self, config: EmbedConfig | None = None, pooling: str = "mean"):
        super().__init__(config)
        self.pooling = pooling

    def transform(self, X: Sequence[str]) -> np.ndarray:
        self._check_input(X)
        return self.embedder.encode_dense(list(X), pooling=self.pooling)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.array([f"dim_{i}" for i in range(self.embedder.host.d_model)], dtype=object)


class SentenceVectorizer(_LazyModel):
    """Documents -> the full model's sentence embedding (sentence-transformers).

    `long_docs`: a document longer than the model's max_seq_length is truncated to it (`truncate`, what
    sentence-transformers' own `encode` does), or split into chunks of that many tokens whose embeddings are
    averaged (`mean`, for long documents such as earnings calls).
    """

    _model_attr = "_st"

    def __init__(self, model: str = "minilm", batch_size: int = 32, device: str | None = None,
                 cache_dir: str | None = None, show_progress_bar: bool | None = None, precision: str = "auto",
                 long_docs: str = "truncate", backend: str = "auto"):
        self.model, self.batch_size, self.device, self.precision = model, batch_size, device, precision
        self.cache_dir, self.show_progress_bar, self.long_docs = cache_dir, show_progress_bar, long_docs
        self.backend = backend

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_onnx", None)
        return state

    @property
    def st(self):
        if getattr(self, "_st", None) is None:
            from sentence_transformers import SentenceTransformer

            from saefeat.hosts import resolve_host_path

            path, gguf = resolve_host_path(self.model)
            if gguf:
                raise SaefeatError(f"{self.model!r} is a GGUF causal LM, not a sentence-transformers model")
            self._st = SentenceTransformer(path, device=str(resolve_device(self.device)))
        return self._st

    def _chunks(self, text: str) -> list[str]:
        if self.long_docs == "truncate":
            return [text]  # sentence-transformers cuts it at max_seq_length
        tok = self.st.tokenizer
        ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        size = self.st.max_seq_length - 2
        if len(ids) <= size:
            return [text]
        return [tok.decode(ids[i:i + size]) for i in range(0, len(ids), size)]

    def transform(self, X: Sequence[str]) -> np.ndarray:
        from saefeat.data import check_texts

        self._check_input(X)
        texts = check_texts(list(X), field="docs")
        cache = self._cache()
        hashes = [doc_hash(t) for t in texts]
        todo, cached = _todo_and_cached(hashes, cache)
        out = np.zeros((len(texts), self._dim()), np.float32)
        if todo:
            emb, owner = self.encode_chunks([texts[i] for i in todo])
            out[todo] = self._store_means(emb, owner, [hashes[i] for i in todo], cache)
        if cached:
            out[cached] = cache.get([hashes[i] for i in cached]).sum
        return out

    CHUNKING = 1  # version of `_chunks`: part of the cache key

    def cache_settings(self) -> dict[str, Any]:
        """What the `sentence` vectors depend on: the model's weights (fingerprint, not only its name), its
        max_seq_length, the chunking and the precision."""
        from saefeat.hosts import _fingerprint, _trained_length, resolve_host_path

        target, _ = resolve_host_path(self.model)
        chunking = self.CHUNKING if self.long_docs == "mean" else "truncate"  # mean keeps the old cache keys
        rt = self.runtime
        s = {"kind": "sentence", "model": self.model, "fingerprint": _fingerprint(target, None),
             "max_seq_length": _trained_length(target), "chunking": chunking, "precision": rt.precision}
        if rt.backend != "torch":  # torch keys as before, so existing caches stay valid
            from saefeat.onnx_host import EXPORT_VERSION

            s |= {"backend": rt.backend, "onnx_export": EXPORT_VERSION}
        return s

    def _cache(self, **extra: Any) -> StatsCache | None:
        """The `sentence` cache, or with `extra` settings another one keyed by the same model settings."""
        if self.cache_dir is False:
            return None
        return StatsCache(self.cache_dir or default_cache_dir(), self.cache_settings() | extra)

    def encode_chunks(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The model's embedding of every chunk of `texts` (max_seq_length tokens each) and the text it came from."""
        pieces, owner = [], []
        for j, text in enumerate(texts):
            for c in self._chunks(text):
                pieces.append(c)
                owner.append(j)
        if self.runtime.backend == "onnx":
            emb = self._onnx_encoder().encode(pieces, self.batch_size, bool(self.show_progress_bar))
        else:
            with autocast(self.st.device, self.runtime.precision):
                emb = self.st.encode(pieces, batch_size=self.batch_size, convert_to_numpy=True,
                                     show_progress_bar=bool(self.show_progress_bar))
        return np.asarray(emb, np.float32), np.asarray(owner, np.int64)

    def _onnx_encoder(self):
        if getattr(self, "_onnx", None) is None:
            from saefeat.embed.onnx_sentence import OnnxSentenceEncoder
            from saefeat.hosts import get_host

            root = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
            self._onnx = OnnxSentenceEncoder(self.st, get_host(self.model, "cpu"), self.runtime.precision, root)
        return self._onnx

    @staticmethod
    def _store_means(emb: np.ndarray, owner: np.ndarray, hashes: list[str], cache: StatsCache | None) -> np.ndarray:
        """Each document's mean chunk embedding (its `sentence` vector), cached when a cache is given."""
        from saefeat.embed.pooling import TokenStats

        sums = np.zeros((len(hashes), emb.shape[1]), np.float32)
        np.add.at(sums, owner, emb)
        counts = np.bincount(owner, minlength=len(hashes))
        vecs = sums / np.maximum(counts, 1)[:, None]
        if cache is not None:
            cache.put(hashes, TokenStats(counts, vecs, vecs))
        return vecs

    def _dim(self) -> int:
        get = getattr(self.st, "get_embedding_dimension", None) or self.st.get_sentence_embedding_dimension
        return int(get())

    @property
    def runtime(self) -> Runtime:
        """What the model runs on, resolved as for `sae` (`saefeat.device.resolve_runtime`): on a CPU without native
        bf16, `auto` runs a Transformer -> mean-pooling model on ONNX Runtime int8 (`saefeat.embed.onnx_sentence`);
        other stacks, and int8 asked of one, run sentence-transformers on torch (int8 there reads as auto)."""
        from saefeat.embed.onnx_sentence import onnx_stack

        dev = resolve_device(self.device)
        capable = dev.type == "cpu" and onnx_stack(self.st) and \
            not getattr(self.st[0].auto_model.config, "is_decoder", False)
        precision = self.precision if capable or self.precision != "int8" else "auto"
        return resolve_runtime(dev, precision, self.backend if capable else "torch", onnx_capable=capable)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.array([f"st_{i}" for i in range(self._dim())], dtype=object)


class SentenceSAEVectorizer(SentenceVectorizer):
    """Documents -> an SAE's codes of the model's sentence embeddings of their chunks, pooled over the chunks
    (`sae_sentence`; `pooling` as for `sae`: max, mean, sum, ...). The SAE must have been trained on this model's
    sentence embeddings (`saefeat.sae.sentence`); `sae="default"` is the one shipped for the model. Chunks it
    encodes also fill the `sentence` cache."""

    def __init__(self, sae: str = "default", model: str = "minilm", pooling: str = "max", batch_size: int = 32,
                 device: str | None = None, cache_dir: str | None = None, show_progress_bar: bool | None = None,
                 precision: str = "auto", backend: str = "auto"):
        super().__init__(model, batch_size, device, cache_dir, show_progress_bar, precision, long_docs="mean",
                         backend=backend)
        self.sae, self.pooling = sae, pooling

    @property
    def sae_model(self) -> SAE:
        if getattr(self, "_sae", None) is None:
            from saefeat.sae.formats import default_sentence_sae_path, load_sae
            from saefeat.sae.sentence import check_sentence_sae

            path = default_sentence_sae_path(self.model) if self.sae == "default" else Path(self.sae)
            sae = load_sae(path).eval()
            check_sentence_sae(sae, self.model, self._dim())
            self._sae = sae
        return self._sae

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_sae", None)
        return state

    def transform(self, X: Sequence[str]) -> sp.csr_matrix:
        from saefeat.data import check_texts
        from saefeat.embed.pooling import TokenStats, pool

        self._check_input(X)
        texts = check_texts(list(X), field="docs")
        sae = self.sae_model
        cache = self._cache(kind="sae_sentence", sae=sae.content_hash)
        hashes = [doc_hash(t) for t in texts]
        todo, cached = _todo_and_cached(hashes, cache)
        parts, order = [], []
        if todo:
            emb, owner = self.encode_chunks([texts[i] for i in todo])
            sentence = self._cache()
            fresh = [j for j, i in enumerate(todo) if sentence is None or hashes[i] not in sentence]
            if sentence is not None and fresh:
                keep = np.isin(owner, fresh)
                remap = np.full(len(todo), -1)
                remap[fresh] = np.arange(len(fresh))
                self._store_means(emb[keep], remap[owner[keep]], [hashes[todo[j]] for j in fresh], sentence)
            stats = chunk_code_stats(sae, emb, owner, len(todo))
            if cache is not None:
                cache.put([hashes[i] for i in todo], stats)
            parts.append(stats)
            order += todo
        if cached:
            parts.append(cache.get([hashes[i] for i in cached]))
            order += cached
        stats = TokenStats.stack(parts) if len(parts) > 1 else parts[0]
        pooled = pool(stats, self.pooling)
        inverse = np.empty(len(order), np.int64)
        inverse[np.asarray(order)] = np.arange(len(order))
        return sp.csr_matrix(pooled[inverse], dtype=np.float32)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.array([f"latent_{i}" for i in range(self.sae_model.d_sae)], dtype=object)


def _todo_and_cached(hashes: list[str], cache: StatsCache | None) -> tuple[list[int], list[int]]:
    """Positions of the documents to compute and of those the cache holds (damaged shards are dropped first)."""
    if cache is None:
        return list(range(len(hashes))), []
    cache.verify(hashes)
    todo = [i for i, h in enumerate(hashes) if h not in cache]
    return todo, [i for i, h in enumerate(hashes) if h in cache]


def chunk_code_stats(sae: SAE, emb: np.ndarray, owner: np.ndarray, n_docs: int):
    """Per-document statistics of the SAE codes of its chunks: chunk count, and the per-latent sum, max and firing
    count over chunks (the `TokenStats` every pooling reads, with chunks for tokens)."""
    import torch

    from saefeat.embed.pooling import TokenStats

    with torch.no_grad():
        codes = sp.csr_matrix(sae.encode(torch.from_numpy(emb)).float().numpy())
    codes.eliminate_zeros()
    owners = sp.csr_matrix((np.ones(len(owner), np.float32), (owner, np.arange(len(owner)))),
                           shape=(n_docs, len(owner)))
    total = (owners @ codes).tocsr()
    count = (owners @ (codes > 0).astype(np.float32)).tocsr()
    counts = np.bincount(owner, minlength=n_docs)
    bounds = np.searchsorted(owner, np.arange(n_docs + 1))  # chunks come in document order
    if (counts > 1).any():
        top = sp.vstack([codes[bounds[d]:bounds[d + 1]].max(axis=0) if counts[d] > 1 else codes[bounds[d]:bounds[d] + 1]
                         for d in range(n_docs)], format="csr")
    else:
        top = codes
    log1p = owners @ codes.log1p()
    return TokenStats(counts, total.astype(np.float32), sp.csr_matrix(top, dtype=np.float32),
                      count.astype(np.float32), log1p.astype(np.float32))
