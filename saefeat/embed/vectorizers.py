"""scikit-learn transformers over the embedding layer; they clone and pickle without model weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin

from saefeat.device import autocast, resolve_device, resolve_precision
from saefeat.embed.cache import StatsCache, default_cache_dir, doc_hash
from saefeat.embed.config import EmbedConfig
from saefeat.embed.embedder import SAEEmbedder
from saefeat.errors import SaefeatError
from saefeat.sae.formats import default_sae_path, state_hash
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
    folder = default_sae_path(config.model) if config.sae == "default" else Path(config.sae)
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

    Documents longer than the model's max_seq_length are split into chunks of that many tokens and
    their embeddings averaged, so long texts are not silently truncated.
    """

    _model_attr = "_st"

    def __init__(self, model: str = "minilm", batch_size: int = 32, device: str | None = None,
                 cache_dir: str | None = None, show_progress_bar: bool | None = None, precision: str = "auto"):
        self.model, self.batch_size, self.device, self.precision = model, batch_size, device, precision
        self.cache_dir, self.show_progress_bar = cache_dir, show_progress_bar

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
        cache = None
        if self.cache_dir is not False:
            cache = StatsCache(self.cache_dir or default_cache_dir(),
                               {"kind": "sentence", "model": self.model, "precision": self._precision()})
        hashes = [doc_hash(t) for t in texts]
        if cache is not None:
            cache.verify(hashes)
        todo = [i for i, h in enumerate(hashes) if cache is None or h not in cache]
        out = np.zeros((len(texts), self._dim()), np.float32)
        if todo:
            from saefeat.embed.pooling import TokenStats

            pieces, owner = [], []
            for j, i in enumerate(todo):
                for c in self._chunks(texts[i]):
                    pieces.append(c)
                    owner.append(j)
            with autocast(self.st.device, self._precision()):
                emb = self.st.encode(pieces, batch_size=self.batch_size, convert_to_numpy=True,
                                     show_progress_bar=bool(self.show_progress_bar))
            sums = np.zeros((len(todo), emb.shape[1]), np.float32)
            np.add.at(sums, owner, emb)
            counts = np.bincount(owner, minlength=len(todo))
            vecs = sums / np.maximum(counts, 1)[:, None]
            out[todo] = vecs
            if cache is not None:
                cache.put([hashes[i] for i in todo], TokenStats(counts, vecs, vecs))
        if cache is not None:
            cached = [i for i in range(len(texts)) if i not in set(todo)]
            if cached:
                out[cached] = cache.get([hashes[i] for i in cached]).sum
        return out

    def _dim(self) -> int:
        get = getattr(self.st, "get_embedding_dimension", None) or self.st.get_sentence_embedding_dimension
        return int(get())

    def _precision(self) -> str:
        """sentence-transformers runs on torch: int8 (an ONNX Runtime precision) counts as auto here."""
        return resolve_precision(resolve_device(self.device), "auto" if self.precision == "int8" else self.precision)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        return np.array([f"st_{i}" for i in range(self._dim())], dtype=object)
