"""SAEEmbedder: documents -> pooled SAE latents (scipy CSR), in the style of sentence-transformers.

It composes a `WindowReader` (host, read point, windows, runtime), the SAE, a `StatsAccumulator` and the
on-disk `StatsCache`; every pooling is computed from the cached statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from saefeat.data import check_texts
from saefeat.device import Runtime, autocast, resolve_runtime
from saefeat.embed.cache import StatsCache, default_cache_dir, doc_hash
from saefeat.embed.config import EmbedConfig
from saefeat.embed.pooling import TokenStats, pool
from saefeat.embed.reader import WindowReader
from saefeat.embed.stats import StatsAccumulator
from saefeat.errors import SaefeatError
from saefeat.hosts import HostModel, get_host
from saefeat.onnx_host import onnx_capable
from saefeat.onnx_sae import STEP_NAME, OnnxSAEEncoder
from saefeat.sae.formats import check_compatible, resolve_sae
from saefeat.sae.model import SAE, topk_rows_to_coo
from saefeat.sae.sites import host_read_point

logger = logging.getLogger(__name__)


@dataclass
class TokenActivations:
    """Per-token SAE activations of one document: `acts` is (n_tokens, d_sae) CSR, one row per token."""

    tokens: list[str]
    token_ids: list[int]
    acts: sp.csr_matrix


class SAEEmbedder:
    """Encode documents into sparse SAE embeddings (and the same layer's dense activations).

    Takes the settings of `saefeat.embed.config.EmbedConfig` as keywords, or one `config=`; see there for each.
    `sae` may also be an in-memory `SAE`, or None for the dense side only (`encode_dense`). The window defaults
    to the SAE's training window where it records one, else to the host's default (`HostModel.default_window`).
    What ran (backend, precision) is in `runtime`.
    """

    def __init__(self, model: str = "minilm", sae: str | Path | SAE | None = "default", *,
                 config: EmbedConfig | None = None, **settings):
        memory_sae = sae if isinstance(sae, SAE) else None
        if config is None:
            spec = None if sae is None else "memory" if memory_sae is not None else str(sae)
            config = EmbedConfig().replace(model=model, sae=spec, **settings)
        elif settings:
            config = config.replace(**settings)
        self.config = config
        self.host: HostModel = get_host(config.model, config.device)
        self.device = self.host.device
        self.model_name = config.model
        self.sae: SAE | None = None
        if memory_sae is not None or config.sae is not None:
            self.sae = resolve_sae(memory_sae if memory_sae is not None else config.sae, config.model, self.device,
                                   layer=config.layer)
        self.layer, site = self._read_point()
        if self.sae is not None:
            check_compatible(self.sae, config.model, self.host.d_model, None)  # the read point is checked above
            if config.sae_k is not None:
                if not self.sae.is_topk:
                    raise SaefeatError(f"sae_k applies to TopK SAEs only; this is a {self.sae.cfg.architecture} SAE")
                if config.sae_k > self.sae.d_sae:
                    raise SaefeatError(f"embed.sae_k={config.sae_k} exceeds the SAE's {self.sae.d_sae} latents")
                self.sae.cfg.k = int(config.sae_k)
        self.pooling, self.pool_k = config.pooling, config.pool_k
        self.window = min(config.window or self._default_window(), self.host.window_capacity)
        self.overlap, self.max_tokens, self.keep_special = config.overlap, config.max_tokens, config.keep_special
        self.cache_root = Path(config.cache_dir or default_cache_dir()) if config.cache else None
        runtime = resolve_runtime(self.device, config.precision, config.backend,
                                  onnx_capable(self.host) and site == "output")
        self.reader = WindowReader(self.host, self.layer, site, self.window, self.overlap, self.max_tokens,
                                   self.keep_special, runtime, self.cache_root or default_cache_dir())
        self._caches: dict[str, StatsCache] = {}
        self._int8_encoder: OnnxSAEEncoder | None = None

    @classmethod
    def from_config(cls, config: EmbedConfig, sae: SAE | None = None) -> SAEEmbedder:
        """The embedder `config` describes (with an in-memory `sae` in place of `config.sae` when given)."""
        return cls(config.model, sae if sae is not None else config.sae, config=config)

    def _read_point(self) -> tuple[int, str]:
        """(block, site) read: where the SAE was trained (resid_pre of block L is block L-1's output; `layer`, when
        set, must be the SAE's layer), or for no SAE `layer`'s output (default: the last block)."""
        if self.sae is None:
            layer = self.config.layer if self.config.layer is not None else self.host.n_layers - 1
            return layer, "output"
        return host_read_point(self.sae.cfg, self.config.layer)

    def _default_window(self) -> int:
        trained = getattr(self.sae.cfg, "context_size", None) if self.sae is not None else None
        return int(trained) if trained else self.host.default_window

    @property
    def runtime(self) -> Runtime:
        return self.reader.runtime

    @property
    def precision(self) -> str:
        return self.reader.precision

    @property
    def sae_step(self) -> str:
        """How the SAE encoder runs: `onnx-int8` (the int8 matmul on ONNX Runtime, on the onnx int8 runtime for
        TopK SAEs), else `torch` (in the torch parts' precision)."""
        rt = self.runtime
        int8 = rt.backend == "onnx" and rt.precision == "int8" and self.sae is not None and self.sae.is_topk
        return STEP_NAME if int8 else "torch"

    @property
    def d_sae(self) -> int:
        return self._need_sae().d_sae

    def _need_sae(self) -> SAE:
        if self.sae is None:
            raise SaefeatError("this embedder has no SAE (embed.sae is null): only encode_dense is available")
        return self.sae

    def settings(self, kind: str) -> dict:
        """Everything that changes the cached statistics of a document."""
        s = {"kind": kind, **self.reader.settings()}
        if kind == "sae":
            sae = self._need_sae()
            s |= {"sae": sae.content_hash, "sae_k": sae.cfg.k}
            if self.sae_step != "torch":  # torch-step keys as before, so existing caches stay valid
                s["sae_step"] = self.sae_step
        return s

    # ---- public API -------------------------------------------------------------------------
    def encode(self, docs: Sequence[str], batch_size: int | None = None, show_progress_bar: bool | None = None,
               pooling: str | None = None) -> sp.csr_matrix:
        """Pooled SAE latents, (n_docs, d_sae) float32 CSR, rows in input order. Empty docs give zero rows.

        `batch_size`, `show_progress_bar` and `pooling` default to the embedder's settings."""
        return pool(self.encode_stats(docs, "sae", batch_size, show_progress_bar), pooling or self.pooling,
                    self.pool_k)

    def encode_dense(self, docs: Sequence[str], pooling: str = "mean", batch_size: int | None = None,
                     show_progress_bar: bool | None = None) -> np.ndarray:
        """The same layer's dense activations pooled per document, (n_docs, d_model) float32."""
        return pool(self.encode_stats(docs, "dense", batch_size, show_progress_bar), pooling)

    def encode_tokens(self, doc: str, batch_size: int | None = None) -> TokenActivations:
        """Per-token latent activations of one document with the token strings."""
        return self.encode_tokens_batch(check_texts([doc], field="doc"), batch_size)[0]

    def encode_tokens_batch(self, docs: Sequence[str], batch_size: int | None = None,
                            show_progress_bar: bool = False, cache_pooled: bool = False) -> list[TokenActivations]:
        """Per-token latent activations of many documents; their windows share forward batches.

        cache_pooled: also cache the documents' pooled statistics that the cache lacks (the same pass gives them),
        so a later `encode` or `encode_dense` of these documents runs no forward pass."""
        docs = _documents(docs)
        batch_size = batch_size or self.config.batch_size
        with _progress(len(docs), "encode tokens", not show_progress_bar) as bar, self._cast_once():
            if not cache_pooled or self.cache_root is None:
                return self._token_pass(docs, batch_size, bar, cache_pooled=False)
            out: list[TokenActivations] = []
            # groups the size of a cache shard: the statistics of a group are held in memory until it is done
            for group in _chunks(list(range(len(docs))), [len(d) for d in docs]):
                out += self._token_pass([docs[i] for i in group], batch_size, bar, cache_pooled=True)
            return out

    @torch.no_grad()
    def _token_pass(self, docs: list[str], batch_size: int, bar: tqdm,
                    cache_pooled: bool) -> list[TokenActivations]:
        """Token activations of `docs` from one pass of the host; with `cache_pooled`, the pooled statistics the
        cache lacks are cached too."""
        docs_ids = self.reader.token_ids(docs)
        cache = self._cache("sae")
        new = {}  # document hash -> its first row, for the documents whose statistics are not cached yet
        if cache_pooled:
            new = {h: i for i, h in reversed(list(enumerate(map(doc_hash, docs)))) if h not in cache}
        acc = StatsAccumulator(len(docs), self.host.d_model, self.d_sae, self.device) if new else None
        parts = []
        for doc, pos, x in self.reader.batches(docs_ids, batch_size, bar):
            r, c, v = self._encode_sae(x)
            if acc is not None:  # the statistics `_compute_stats` gathers, from the same codes
                acc.add_tokens(doc, x)
                acc.add_codes(doc[r] * self.d_sae + c, v.float(), torch.ones(len(v), device=v.device))
            keep = pos[r] >= 0  # special tokens kept by keep_special have no position in the document
            parts.append((doc[r][keep].cpu(), pos[r][keep].cpu(), c[keep].cpu(), v[keep].float().cpu()))
        if acc is not None:
            rows = list(new.values())
            cache.put(list(new), acc.sae().take(rows))
            self._cache("dense").put(list(new), acc.dense().take(rows))
        offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in docs_ids])]).astype(np.int64)
        if parts:
            d, p, c, v = (torch.cat(t).numpy() for t in zip(*parts))
            acts = sp.csr_matrix((v, (offsets[d] + p, c)), shape=(int(offsets[-1]), self.d_sae), dtype=np.float32)
        else:
            acts = sp.csr_matrix((int(offsets[-1]), self.d_sae), dtype=np.float32)
        return [TokenActivations(self.host.tokenizer.convert_ids_to_tokens(ids), ids, acts[offsets[i]:offsets[i + 1]])
                for i, ids in enumerate(docs_ids)]

    def encode_stats(self, docs: Sequence[str], kind: str = "sae", batch_size: int | None = None,
                     show_progress_bar: bool | None = None) -> TokenStats:
        """Token statistics per document (cached); every pooling is computed from these."""
        texts = _documents(docs)
        batch_size = batch_size or self.config.batch_size
        if show_progress_bar is None:
            show_progress_bar = self.config.show_progress_bar
        hashes = [doc_hash(t) for t in texts]
        cache = self._cache(kind)
        if cache is not None:
            cache.verify(hashes)  # damaged shards are dropped here, so their documents are recomputed below
        sources: list[TokenStats] = []
        refs: dict[str, tuple[int, int]] = {}  # document hash -> (source, row)
        todo = list(dict.fromkeys(h for h in hashes if cache is None or h not in cache))
        if todo:
            first = {h: t for h, t in zip(reversed(hashes), reversed(texts))}
            todo.sort(key=lambda h: len(first[h]), reverse=True)
            if show_progress_bar is None:
                show_progress_bar = logger.getEffectiveLevel() <= logging.INFO and len(todo) > 1
            bar = _progress(len(todo), f"encode {kind}", not show_progress_bar)
            try:
                for chunk in _chunks(todo, [len(first[h]) for h in todo]):
                    # an SAE pass gets the dense statistics almost free, so with a cache it stores both
                    kinds = ("sae", "dense") if kind == "sae" and cache is not None else (kind,)
                    computed = self._compute_stats([first[h] for h in chunk], batch_size, bar, kinds)
                    for other, stats in computed.items():
                        other_cache = self._cache(other)
                        if other_cache is not None:
                            other_cache.put(chunk, stats)
                    sources.append(computed[kind])
                    refs |= {h: (len(sources) - 1, i) for i, h in enumerate(chunk)}
            finally:
                bar.close()
        cached = [h for h in dict.fromkeys(hashes) if h not in refs]
        if cached:
            sources.append(cache.get(cached))
            refs |= {h: (len(sources) - 1, i) for i, h in enumerate(cached)}
        if not hashes:
            width = self.d_sae if kind == "sae" else self.host.d_model
            empty = sp.csr_matrix((0, width), dtype=np.float32) if kind == "sae" else np.zeros((0, width), np.float32)
            sae_only = empty if kind == "sae" else None
            return TokenStats(np.zeros(0, np.int64), empty, empty, sae_only, sae_only)
        return TokenStats.gather(sources, [refs[h] for h in hashes])

    # ---- internals --------------------------------------------------------------------------
    def _cache(self, kind: str) -> StatsCache | None:
        if self.cache_root is None:
            return None
        if kind not in self._caches:
            self._caches[kind] = StatsCache(self.cache_root, self.settings(kind))
        return self._caches[kind]

    def _cast_once(self):
        """One autocast region around a whole pass: inside it, the host's weights are cast to bf16 once, not per
        batch (autocast caches the casts of parameters until its outermost region ends); 10-20% faster on CPU."""
        return autocast(self.device, self.precision)

    def _encode_sae(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAE codes of a batch as COO triples; callers run it inside `_cast_once`, which sets the precision."""
        with torch.no_grad():
            if self.sae_step != "torch":
                return topk_rows_to_coo(*self._topk_rows(x))
            return self._need_sae().encode_sparse(x)

    def _topk_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, latent ids) of a TopK SAE for a batch, through the SAE step `sae_step` names."""
        sae = self._need_sae()
        if self.sae_step == "torch":
            return sae.encode_topk_rows(x)
        if self._int8_encoder is None:  # built on first use: a dense-only pass never needs it
            self._int8_encoder = OnnxSAEEncoder(sae, self.cache_root or default_cache_dir())
        return self._int8_encoder.encode_topk_rows(x)

    def _sae_codes(self, doc: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """SAE codes of a batch as (flat doc x latent slot, float32 value, 1.0 where it fires) for pooling; called
        under no_grad."""
        sae = self._need_sae()
        if sae.is_topk:  # (rows, k) codes as they are: a zero adds nothing, so no compaction is needed
            vals, idx = self._topk_rows(x)
            v = vals.float().view(-1)
            fired = v > 0
            return (doc.unsqueeze(1) * self.d_sae + idx).view(-1), torch.where(fired, v, 0.0), fired.float()
        r, c, v = self._encode_sae(x)
        return doc[r] * self.d_sae + c, v.float(), torch.ones(len(v), device=v.device)

    @torch.no_grad()
    def _compute_stats(self, texts: list[str], batch_size: int, bar: tqdm | None,
                       kinds: tuple[str, ...] = ("sae", "dense")) -> dict[str, TokenStats]:
        """Statistics of `texts` for each of `kinds` ("sae", "dense") from one pass of the host."""
        docs_ids = self.reader.token_ids(texts)
        acc = StatsAccumulator(len(texts), self.host.d_model, self.d_sae if "sae" in kinds else None, self.device,
                               dense="dense" in kinds)
        with self._cast_once():
            for doc, _, x in self.reader.batches(docs_ids, batch_size, bar):
                acc.add_tokens(doc, x)
                if "sae" in kinds:
                    acc.add_codes(*self._sae_codes(doc, x))
        out = {"dense": acc.dense()} if "dense" in kinds else {}
        if "sae" in kinds:
            out["sae"] = acc.sae()
        return out


def _documents(docs: Sequence[str]) -> list[str]:
    """The documents as a list, refusing a lone string (which would otherwise embed each character)."""
    if isinstance(docs, (str, bytes)):
        raise SaefeatError("expected a list of documents, got a single string; wrap it in a list: [text]")
    return check_texts(list(docs), field="docs")


def _progress(total: int, desc: str, disable: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="doc", disable=disable,
                bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}, {rate_fmt}]")


def _chunks(items: list[str], sizes: list[int], max_chars: int = 200_000, max_docs: int = 256) -> Iterator[list[str]]:
    """Groups of documents cached together (one shard each): small enough that an interruption loses little.
    200k characters are about 50k tokens, under half a minute of work at the ~2,000 tokens/s of fp32 on an AVX2-only
    CPU, so a kill loses less than a minute."""
    chunk: list[str] = []
    chars = 0
    for item, size in zip(items, sizes):
        if chunk and (chars + size > max_chars or len(chunk) >= max_docs):
            yield chunk
            chunk, chars = [], 0
        chunk.append(item)
        chars += size
    if chunk:
        yield chunk
